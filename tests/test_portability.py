"""Portable verdicts: valid orders of operations the baselines were not measured with pass every
case with half the limit to spare, a float32 step in a float64 call still fails every ordinary
case, and the README's example adapter passes the whole suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mha_conformance.audit.sensitivity import ordinary
from mha_conformance.impls import reference
from mha_conformance.impls.variants.valid_orders import VALID_ORDERS
from mha_conformance.tolerance import judge
from mha_conformance.vectors import golden
from tests import runs
from tests.test_suite import readme_example


def test_every_valid_order_passes_every_case_at_half_the_limit(tmp_path):
    """``--k-factor 1``: each order's error is at most the baseline plus floor, in every dtype,
    forward and gradients, on every case. The default k = 2 leaves the other half for what no
    emulation covers (another machine's kernels)."""
    report = tmp_path / "valid.json"
    adapters = [
        a
        for cls in VALID_ORDERS
        for a in ("--adapter", f"mha_conformance.impls.variants.valid_orders:{cls.__name__}")
    ]
    res = runs.run_suite(
        "conformance/test_gradients.py",
        "--isolation",
        "none",
        "--k-factor",
        "1",
        "--report",
        str(report),
        *adapters,
        timeout=900,
    )
    tests = json.loads(report.read_text())["tests"]
    outcomes = Counter(t["outcome"] for t in tests)
    assert res.returncode == 0 and set(outcomes) == {"passed"}, (outcomes, res.stdout[-4000:])
    cases = golden.case_ids()
    dtypes = sum(len(golden.load_case(c).spec["dtypes"]) for c in cases)
    assert len(tests) == 2 * len(VALID_ORDERS) * dtypes  # golden and gradients, every case and dtype
    worst = max(v["ratio"] for t in tests for v in t["verdicts"])
    assert worst <= 1.0


@pytest.mark.parametrize(
    "case_id",
    [
        c
        for c in golden.case_ids()
        if ordinary(spec := golden.load_case(c).spec) and "float64" in spec["dtypes"]
    ],
)
def test_one_float32_step_in_a_float64_call_fails_every_ordinary_case(case_id):
    """The float64 truth rounded once to float32 (inputs kept in float32, or one float32 step at
    the end) fails: the dtype floor does not blunt float64."""
    case = golden.load_case(case_id)
    for name in ("output", "grad_query", "grad_w_q"):
        if name not in case.tensors or np.abs(case.tensors[name]).max() == 0:
            continue
        rounded = case.tensors[name].astype(np.float32).astype(np.float64)
        verdict = judge(
            rounded,
            case.tensors[name],
            tensor=name,
            dtype="float64",
            baseline=case.baseline["float64"][name],
            error_scale=case.baseline["error_scale"][name],
        )
        assert not verdict.passed, (name, verdict.describe())


def test_baselines_are_the_ensembles_worst_and_name_their_algorithm():
    """A stored baseline is the largest error over the ensemble, recomputable from its member."""
    case = golden.load_case("mask_diagonal_only")
    for dtype in ("float32", "bfloat16"):
        by = case.baseline["set_by"][dtype]
        assert set(by.values()) <= {a.name for a in reference.ENSEMBLE}
        member = next(a for a in reference.ENSEMBLE if a.name == by["output"])
        emulated = reference.forward(case.inputs(), case.spec, reference.PRECISIONS[dtype], member)
        err = float(np.max(np.abs(emulated.output - case.tensors["output"])))
        assert err == pytest.approx(case.baseline[dtype]["output"], rel=1e-12)
        straightforward = reference.forward(case.inputs(), case.spec, reference.PRECISIONS[dtype])
        assert np.max(np.abs(straightforward.output - case.tensors["output"])) <= err


def test_the_readme_example_passes_the_whole_suite(tmp_path: Path):
    """The README's adapter, a correct float64 implementation in the plain form, has no failure and
    no expected failure in any check; what it leaks (Inf and NaN poison) is an advisory finding."""
    (tmp_path / "my_attention.py").write_text(readme_example())
    report = tmp_path / "r.json"
    env = {"PYTHONPATH": f"{tmp_path}:{runs.ROOT}", "PATH": "/usr/bin:/bin"}
    res = runs.run_suite(
        "--adapter",
        "my_attention:attention",
        "--isolation",
        "none",
        "--report",
        str(report),
        test="conformance",
        env=env,
    )
    outcomes = Counter(t["outcome"] for t in json.loads(report.read_text())["tests"])
    assert res.returncode == 0, res.stdout[-3000:]
    assert outcomes["failed"] == 0 and outcomes["xfailed"] == 0 and outcomes["passed"] > 100, outcomes
    assert outcomes["finding"] > 0 and "Advisory findings" in res.stdout
    strict = runs.run_suite(
        "--adapter",
        "my_attention:attention",
        "--isolation",
        "none",
        "--strict",
        "-k",
        "masked-poison",
        test="conformance",
        env=env,
    )
    assert strict.returncode == 1, strict.stdout[-3000:]


def test_the_docs_name_every_ensemble_member_and_the_constant():
    text = (runs.ROOT / "docs" / "tolerance.md").read_text()
    from mha_conformance.impls.error_model import FLOOR_C

    assert all(f"| `{a.name}` |" in text for a in reference.ENSEMBLE)
    assert f"c = 1/{round(1 / FLOOR_C)}" in text


def test_numpy_side_gives_the_same_verdicts_and_verify_results_under_every_kernel(tmp_path):
    """``--backend numpy``: verify (the reference, every baseline's emulation), the README's adapter,
    the project's NumPy adapters (mutants, twin, valid orders, the loop implementations) under each
    OpenBLAS kernel family and NumPy SIMD level this CPU can run: no verify problem and the same
    verdict for every test in each; what the CPU cannot run is skipped with its reason."""
    from mha_conformance.audit.portability import BACKENDS

    (tmp_path / "my_attention.py").write_text(readme_example())
    adapters = ["my_attention:attention", "tests.faulty_adapters:good", "tests.variant_adapters:loops"]
    env = {"PYTHONPATH": f"{tmp_path}:{runs.ROOT}"}
    done = subprocess.run(
        [sys.executable, "-m", "mha_conformance.audit.portability", "--backend", "numpy", "--quick"]
        + ["--isolation", "none", *(a for name in adapters for a in ("--adapter", name))],
        cwd=runs.ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=1800,  # a hang guard: about 3 minutes here, 8x that on a busy machine
    )
    out = done.stdout
    assert done.returncode == 0, out[-5000:] + done.stderr[-2000:]
    assert "identical verdicts" in out
    settings = BACKENDS["numpy"]["settings"]
    blocks = out.split("] numpy: ")[1:]
    assert [b.split(" (", 1)[0] for b in blocks] == list(settings)
    ran = [b for b in blocks if "skipped:" not in b]
    for block in ran:
        counts = block.splitlines()[1]
        assert "'passed'" in counts and "'failed'" in counts and "verify: 0 problem(s)" in counts, block
    names = [b.split(" (", 1)[0] for b in ran]
    assert "this machine's own kernels" in names and "NumPy's baseline loops" in names and len(names) >= 3
    for block in blocks:
        if "skipped:" in block:  # a reason: the CPU lacks the instruction set, or it repeats a setting
            assert "SIGILL" in block or "the same kernels as" in block, block


def test_the_docs_list_every_portability_setting_and_what_it_emulates():
    """docs/tolerance.md's portability section names every setting of every backend, with its
    variables and what it stands for, and says which machines were never tried."""
    from mha_conformance.audit.portability import BACKENDS

    text = (runs.ROOT / "docs" / "tolerance.md").read_text()
    section = text.split("## Portability, tested", 1)[1].split("\n## ", 1)[0]
    for backend, config in BACKENDS.items():
        for name, setting in config["settings"].items():
            row = next(
                (line for line in section.splitlines() if line.startswith(f"| {backend} | {name} |")), None
            )
            assert row is not None, (backend, name)
            variables = [  # NumPy's dispatch targets depend on the machine: the variable is named
                f"`{k}=" if k == "NPY_DISABLE_CPU_FEATURES" else f"`{k}={v}`"
                for k, v in setting.env.items()
                if k != "KERAS_BACKEND"  # said once under the table
            ]
            assert all(v in row for v in variables) and setting.emulates in row, (row, variables)
    assert "Never tried" in section and "GPU" in section and "ARM" in section
