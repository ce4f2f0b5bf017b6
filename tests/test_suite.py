"""The conformance suite as users meet it: out-of-tree adapters, failures, skips and reports.

Each test runs the real suite in a subprocess (``python -m mha_conformance ...``), as a
user would, against the committed golden vectors.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import runs

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore")


def readme_example() -> str:
    """The adapter a user is told to copy, taken from the README itself."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- example-adapter -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its example adapter block"
    return match.group(1)


def run_suite(*args: str, path: Path | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The suite with the user's adapter folder ``path`` importable, in a bare environment."""
    env = {"PYTHONPATH": f"{path}:{ROOT}" if path else str(ROOT), "PATH": "/usr/bin:/bin"}
    return runs.run_suite(*args, env=env, cwd=cwd)


@pytest.fixture
def user_pkg(tmp_path: Path) -> Path:
    """A user's package with the README's example adapter, registered as an entry point."""
    (tmp_path / "my_attention.py").write_text(readme_example())
    dist = tmp_path / "my_attention-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-attention\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mha_conformance.adapters]\nmy-numpy = my_attention:attention\n")
    return tmp_path


def test_function_adapter_by_module_path(user_pkg, tmp_path):
    report = tmp_path / "r.json"
    res = run_suite(
        "--adapter",
        "my_attention:attention",
        "--case",
        "self_*",
        "--case",
        "gqa*",
        "--dtype",
        "float32",
        "--report",
        str(report),
        path=user_pkg,
    )
    assert res.returncode == 0, res.stdout[-3000:]
    data = json.loads(report.read_text())
    ids = [t["nodeid"] for t in data["tests"]]
    assert (
        "conformance/test_golden.py::test_golden[my_attention:attention-cpu-float32-self_basic_b2_t8_d16_h4]"
        in ids
    )
    outcomes = {t["case"]: t["outcome"] for t in data["tests"]}
    assert outcomes["self_basic_b2_t8_d16_h4"] == "passed"
    assert outcomes["gqa_h8_kv2"] == "skipped"  # the example raises NotImplementedError for GQA
    skipped = next(t for t in data["tests"] if t["case"] == "gqa_h8_kv2")
    assert "grouped-query" in skipped["reason"]
    assert "mha-conformance summary" in res.stdout


def test_function_adapter_by_entry_point(user_pkg):
    res = run_suite("--adapter", "my-numpy", "--case", "mask_*", "--dtype", "float64", path=user_pkg)
    assert res.returncode == 0, res.stdout[-3000:]
    assert re.search(r"my-numpy\s+golden\s+float64\s+cpu\s+\d+\s+0", res.stdout), res.stdout[-2000:]


def test_parametrize_with_cases_from_a_users_test_file(user_pkg):
    (user_pkg / "test_mine.py").write_text(
        textwrap.dedent("""
        from mha_conformance import parametrize_with_cases
        from my_attention import attention

        @parametrize_with_cases(attention, cases=["causal_*", "bias_*"], dtypes=["float32"])
        def test_my_attention(check):
            check()
    """)
    )
    env = {"PYTHONPATH": f"{user_pkg}:{ROOT}", "PATH": "/usr/bin:/bin"}
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_mine.py"],
        cwd=user_pkg,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:]
    assert re.search(r"(\d+) passed", res.stdout) and "failed" not in res.stdout


BROKEN = {
    "no_scale": (
        "attn_scores / keys.shape[-1] ** 0.5",
        "attn_scores",
        "query 1-7;",
    ),  # query 0 sees one key: no scale can change it
    "causal_off_by_one": (
        "diagonal=1",
        "diagonal=2",
        "query 0-6;",
    ),  # the last query has no future key to leak
}


@pytest.mark.parametrize("bug", BROKEN)
def test_a_broken_copy_of_torch_scratch_fails_and_points_at_the_bug(bug, tmp_path):
    pytest.importorskip("torch")
    old, new, pattern = BROKEN[bug]
    source = (ROOT / "impls" / "torch" / "scratch.py").read_text()
    assert old in source
    (tmp_path / "broken_scratch.py").write_text(
        source.replace(old, new).replace('"torch-scratch"', '"broken-scratch"')
    )
    res = run_suite(
        "--adapter",
        "broken_scratch:TorchScratch",
        "--case",
        "self_causal_b2_t8_d16_h4",
        "--dtype",
        "float32",
        path=tmp_path,
    )
    assert res.returncode == 1, res.stdout[-3000:]
    assert "broken-scratch on cpu in float32, case self_causal_b2_t8_d16_h4" in res.stdout
    assert "output: max abs err" in res.stdout and "x the precision baseline+floor" in res.stdout
    assert pattern in res.stdout, res.stdout[-3000:]
    repro = (
        "Reproduce: python -m mha_conformance -k 'test_golden' --adapter broken-scratch --device cpu --dtype float32 "
        "--case self_causal_b2_t8_d16_h4"
    )
    assert repro in res.stdout


def test_missing_framework_is_a_skip_naming_the_extra(tmp_path):
    (tmp_path / "needs_fw.py").write_text(
        textwrap.dedent("""
        from mha_conformance.impls.adapter import Adapter

        class NeedsFramework(Adapter):
            name = "needs-fw"
            framework = "framework_that_is_not_installed"
            extra = "imaginary"
    """)
    )
    res = run_suite("--adapter", "needs_fw:NeedsFramework", "--case", "bias_none", "-rs", path=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "framework_that_is_not_installed is not installed: pip install '.[imaginary]'" in res.stdout


def test_cuda_without_a_gpu_is_a_skip_that_says_so():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    res = run_suite("--adapter", "torch-sdpa", "--device", "cuda", "--case", "bias_none", "-rs")
    assert res.returncode == 0, res.stdout[-3000:]
    assert "cuda requested but torch.cuda.is_available() is False" in res.stdout
    assert re.search(r"^4 skipped", res.stdout, re.M), res.stdout[-2000:]


def test_a_declared_divergence_that_does_not_occur_is_reported(user_pkg):
    (user_pkg / "stale.py").write_text(
        textwrap.dedent("""
        from my_attention import attention

        attention.divergences = {"golden:bias_none": "claimed to differ, but does not"}
    """)
    )
    res = run_suite(
        "--adapter", "stale:attention", "--case", "bias_none", "--dtype", "float64", path=user_pkg
    )
    assert res.returncode == 0
    assert "Declared divergences that did NOT occur" in res.stdout and "claimed to differ" in res.stdout


def test_unknown_adapter_is_a_usage_error_listing_the_choices():
    res = run_suite("--adapter", "no-such-adapter")
    assert res.returncode == 4
    assert "unknown adapter 'no-such-adapter'" in res.stderr and "torch-sdpa" in res.stderr


def test_report_and_history_record_environment_and_kernels(tmp_path):
    pytest.importorskip("torch")
    history = tmp_path / "history"
    res = run_suite(
        "--adapter",
        "torch-sdpa",
        "--adapter",
        "torch-mha",
        "--case",
        "self_basic*",
        "--history",
        str(history),
    )
    assert res.returncode == 0, res.stdout[-3000:]
    (path,) = history.iterdir()
    assert re.fullmatch(r"\d{8}T\d{6}Z_[0-9a-z-]+_[0-9a-f]{8}\.json", path.name)
    data = json.loads(path.read_text())
    assert data["environment"]["adapters"]["torch-sdpa"]["torch"]
    sdpa = [t for t in data["tests"] if t["adapter"] == "torch-sdpa"]
    assert all(t["meta"]["kernel"].startswith("aten::_scaled_dot_product") for t in sdpa)
    assert all(t["meta"]["device_name"] for t in data["tests"])
    mha = next(t for t in data["tests"] if t["adapter"] == "torch-mha" and t["dtype"] == "float32")
    assert {v["tensor"] for v in mha["verdicts"]} == {"output", "attn_weights"}
    rows = {(r["adapter"], r["dtype"]): r for r in data["summary"]}
    assert rows[("torch-sdpa", "float32")]["passed"] == 1
