"""Portable verdicts: the same implementation gets the same verdicts however its machine computes.

``python -m mha_conformance.audit.portability --backend numpy|torch|tensorflow [pytest args ...]``
runs the suite on one backend's adapters once per setting that changes the order of floating-point
operations, not the semantics: kernel libraries and the instruction sets they are built for, thread
counts. Each setting emulates another machine on this one (:class:`Setting`, docs/tolerance.md).
Every test must end the same way in every setting (passed, skipped, xfailed, finding, ...); a test
that passes with one thread and fails with two is a tolerance-model problem, and this fails.

``numpy`` is the suite's own side: the float64 reference, the golden files' verification (the
truth recomputed, every baseline's emulation; ``python -m mha_conformance.vectors verify``, which
must find nothing in any setting) and the NumPy adapters (the mutants and their twin, the valid
orders; add your own with ``--adapter``). A setting the CPU cannot run (an instruction set it
lacks) is skipped with the reason, as is one that would run the same kernels as a setting already
run. Prints each setting's outcomes and worst error ratios and every difference; exit 0 when there
is none.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mha_conformance import __main__ as suite
from mha_conformance.impls.variants import mutants, valid_orders


@dataclass(frozen=True)
class Setting:
    """One way of computing: environment variables, and which machine or configuration they emulate."""

    env: dict[str, str]
    emulates: str


def numpy_dispatch_targets() -> str:
    """Every SIMD target NumPy dispatches to at run time, space-separated: the value of
    ``NPY_DISABLE_CPU_FEATURES`` that leaves NumPy its compile-time baseline alone."""
    try:
        from numpy._core import _multiarray_umath as umath
    except ImportError:  # NumPy 1.x
        from numpy.core import _multiarray_umath as umath  # type: ignore[no-redef]
    return " ".join(umath.__cpu_dispatch__)


#: The NumPy adapters every numpy run judges: the mutants and their correct twin, the valid orders.
NUMPY_ADAPTERS = [
    f"{cls.__module__}:{cls.__name__}"
    for cls in (mutants.Correct, *mutants.MUTANTS, *valid_orders.VALID_ORDERS)
]

#: Per backend: its adapters, whether each setting also verifies the golden files, and the settings.
BACKENDS: dict[str, dict] = {
    "numpy": {
        "adapters": NUMPY_ADAPTERS,
        "verify": True,
        "settings": {
            "this machine's own kernels": Setting({}, "this CPU as OpenBLAS and NumPy find it"),
            "OpenBLAS Prescott kernels": Setting(
                {"OPENBLAS_CORETYPE": "Prescott"}, "the oldest x86-64 CPUs (SSE3): OpenBLAS's generic kernels"
            ),
            "OpenBLAS Haswell kernels": Setting(
                {"OPENBLAS_CORETYPE": "Haswell"}, "Intel Haswell to Alder Lake, AMD Zen 1-3 (AVX2, FMA)"
            ),
            "OpenBLAS SkylakeX kernels": Setting(
                {"OPENBLAS_CORETYPE": "SkylakeX"},
                "Intel Skylake-SP and later server CPUs, AMD Zen 4 (AVX-512)",
            ),
            "NumPy's baseline loops": Setting(
                {"NPY_DISABLE_CPU_FEATURES": numpy_dispatch_targets()},
                "a CPU with only NumPy's compile-time baseline (x86-64-v2 on x86): exp, log, tanh and "
                "the other loops without their AVX2 and AVX-512 versions",
            ),
            "1 BLAS thread": Setting(
                {"OPENBLAS_NUM_THREADS": "1"}, "a one-core machine: BLAS splits no product"
            ),
        },
    },
    "torch": {
        # Every torch path but FlexAttention, which decomposes into the same aten ops the others
        # already vary and costs 4 x 4 minutes here: its eager call traces with dynamo once per
        # distinct shape, dtype and structure in each process (~0.5 s each, nothing persists
        # between processes; docs/speed.md).
        "adapters": ["torch-mha*", "torch-sdpa", "torch-scratch", "torch-wrapper"],
        "settings": {
            "2 threads": Setting({"OMP_NUM_THREADS": "2"}, "this CPU's own kernels on two cores"),
            "1 thread": Setting({"OMP_NUM_THREADS": "1"}, "a one-core machine: no parallel reduction"),
            "oneDNN (mkldnn) off": Setting({"MHA_TORCH_MKLDNN": "0"}, "a torch build without oneDNN"),
            "no SIMD kernels": Setting(
                {"ATEN_CPU_CAPABILITY": "default"}, "a CPU without AVX2 (ATen's scalar kernels)"
            ),
            "AVX2 kernels": Setting(
                {"ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "2"}, "an AVX2 CPU (Haswell to Zen 3)"
            ),
            "AVX-512 kernels": Setting(
                {"ATEN_CPU_CAPABILITY": "avx512", "OMP_NUM_THREADS": "2"},
                "an AVX-512 CPU (Skylake-SP, Zen 4)",
            ),
        },
    },
    "tensorflow": {
        "adapters": ["keras-mha", "keras-mha-scores"],
        "settings": {
            "oneDNN on": Setting(
                {"TF_ENABLE_ONEDNN_OPTS": "1", "KERAS_BACKEND": "tensorflow"}, "TensorFlow's oneDNN kernels"
            ),
            "oneDNN off": Setting(
                {"TF_ENABLE_ONEDNN_OPTS": "0", "KERAS_BACKEND": "tensorflow"}, "TensorFlow's Eigen kernels"
            ),
            "oneDNN capped at SSE4.1": Setting(
                {"TF_ENABLE_ONEDNN_OPTS": "1", "ONEDNN_MAX_CPU_ISA": "SSE41", "KERAS_BACKEND": "tensorflow"},
                "a CPU without AVX (oneDNN's SSE4.1 kernels)",
            ),
            "oneDNN capped at AVX2": Setting(
                {"TF_ENABLE_ONEDNN_OPTS": "1", "ONEDNN_MAX_CPU_ISA": "AVX2", "KERAS_BACKEND": "tensorflow"},
                "an AVX2 CPU (oneDNN's AVX2 kernels, on a machine with AVX-512)",
            ),
        },
    },
}

#: Per backend, a program that exercises its kernels and prints what selects them, as JSON. Run under
#: each setting first: a setting the CPU cannot run dies here (SIGILL), not in the middle of the suite.
PROBES = {
    "numpy": """
import ctypes, json, os, numpy as np
a = np.linspace(-1.0, 1.0, 4096).reshape(64, 64)
for x in (a, a.astype(np.float32)):
    (x @ x, np.exp(x), np.log(np.abs(x) + 1), np.tanh(x))
maps = "/proc/self/maps"  # Linux: the OpenBLAS library NumPy loaded, asked which kernels it chose
paths = sorted({line.split()[-1] for line in open(maps) if "openblas" in line.lower()}) if os.path.exists(maps) else []
core = None
for name in ("openblas_get_corename", "scipy_openblas_get_corename64_", "openblas_get_corename64_"):
    for path in paths:
        function = getattr(ctypes.CDLL(path), name, None)
        if function is not None and core is None:
            function.restype = ctypes.c_char_p
            core = function().decode()
try:
    from numpy._core._multiarray_umath import __cpu_features__ as features, __cpu_dispatch__ as dispatch
except ImportError:
    from numpy.core._multiarray_umath import __cpu_features__ as features, __cpu_dispatch__ as dispatch
print(json.dumps({"openblas": core, "numpy_simd": [f for f in dispatch if features.get(f)]}))
""",
    "torch": """
import json, torch
x = torch.randn(2, 4, 16, 8)
torch.nn.functional.scaled_dot_product_attention(x, x, x); torch.softmax(x, -1) @ x.transpose(-1, -2)
print(json.dumps({"aten": torch.backends.cpu.get_cpu_capability()}))
""",
    "tensorflow": """
import json, os
os.environ["ONEDNN_VERBOSE"] = "1"  # oneDNN says which instruction set it chose (an 'isa:' line)
import tensorflow as tf
x = tf.random.normal((2, 4, 16, 8))
tf.nn.softmax(tf.matmul(x, x, transpose_b=True)) @ x
print(json.dumps({}))
""",
}
#: The variables a probe reports the effect of: two settings whose probes agree and whose other
#: variables are equal run the same kernels.
EXPLAINED = {
    "numpy": {"OPENBLAS_CORETYPE", "NPY_DISABLE_CPU_FEATURES"},
    "torch": {"ATEN_CPU_CAPABILITY"},
    "tensorflow": {"ONEDNN_MAX_CPU_ISA"},
}


def probe(backend: str, env: dict[str, str]) -> tuple[str | None, str]:
    """Run the backend's probe under ``env``: (what selects its kernels, None if it could not run;
    a sentence saying what happened)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", PROBES[backend]],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        return None, "its probe did not finish in 300 s"
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        why = (
            "this CPU lacks the instruction set its kernels need"
            if name == "SIGILL"
            else "the kernels crashed"
        )
        return None, f"killed by {name}: {why}"
    if done.returncode != 0:
        return None, f"its probe failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"
    lines = done.stdout.strip().splitlines()
    chosen = sorted({line.split(",isa:", 1)[1] for line in lines if ",isa:" in line})  # oneDNN's own word
    return lines[-1] + (f" oneDNN {', '.join(chosen)}" if chosen else ""), "ran"


@dataclass
class Run:
    """One setting's results: its test records by node id and, for numpy, verify's findings."""

    tests: dict[str, dict] = field(default_factory=dict)
    verify: dict | None = None


def run_setting(backend: str, env: dict[str, str], extra: Sequence[str], tmp: Path) -> Run:
    """Run the suite (and, for numpy, verify, side by side) once under ``env``."""
    full_env = {**os.environ, **env}
    checking = None
    if BACKENDS[backend].get("verify"):
        command = [
            sys.executable,
            "-m",
            "mha_conformance.vectors",
            "verify",
            "-q",
            "--json",
            str(tmp / "verify.json"),
        ]
        checking = subprocess.Popen(
            command, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    own = [a for name in BACKENDS[backend]["adapters"] for a in ("--adapter", name)]
    report = tmp / "report.json"
    proc = suite.run(["-q", "--no-header", "--tb=no", "--report", str(report), *own, *extra], env=full_env)
    run = Run()
    if checking is not None:
        _, err = checking.communicate()
        if not (tmp / "verify.json").exists():
            raise RuntimeError(f"verify wrote no result (exit {checking.returncode}):\n{err[-3000:]}")
        run.verify = json.loads((tmp / "verify.json").read_text())
    if not report.exists():
        raise RuntimeError(
            f"the suite wrote no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}"
        )
    run.tests = {t["nodeid"]: t for t in json.loads(report.read_text())["tests"]}
    return run


def worst_ratio(tests: dict[str, dict]) -> float:
    """The largest error ratio of a passing test: how close a correct result came to its limit."""
    ratios = [v["ratio"] for t in tests.values() if t["outcome"] == "passed" for v in t["verdicts"]]
    return max((r for r in ratios if r is not None), default=0.0)


def compare(runs: dict[str, dict[str, dict]]) -> list[str]:
    """Every test whose outcome differs between settings, as a line naming each setting's outcome."""
    names = list(runs)
    every = sorted(set().union(*(r.keys() for r in runs.values())))
    problems = []
    for nodeid in every:
        outcomes = {n: runs[n].get(nodeid, {}).get("outcome", "missing") for n in names}
        if len(set(outcomes.values())) > 1:
            problems.append(f"{nodeid}: " + "; ".join(f"{n}: {o}" for n, o in outcomes.items()))
    return problems


def describe(run: Run) -> str:
    """One line: outcome counts, the worst error ratio, and verify's problems and margins."""
    counts: dict[str, int] = {}
    for test in run.tests.values():
        counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
    line = f"{counts}; worst ratio of a passing test {worst_ratio(run.tests):.3g}"
    if run.verify is not None:
        margins = ", ".join(f"{k} {r:.3g} ({w})" for k, (r, w) in sorted(run.verify["margins"].items()))
        line += f"; verify: {len(run.verify['problems'])} problem(s), worst error over its bound: {margins}"
    return line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mha_conformance.audit.portability", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--backend", choices=list(BACKENDS), required=True)
    args, extra = parser.parse_known_args(argv)
    backend, settings = args.backend, BACKENDS[args.backend]["settings"]
    runs: dict[str, Run] = {}
    seen: dict[tuple, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, setting) in enumerate(settings.items()):
            print(f"[{i + 1}/{len(settings)}] {backend}: {name} ({setting.emulates}) ...", flush=True)
            kernels, what = probe(backend, setting.env)
            if kernels is None:
                print(f"    skipped: {what}", flush=True)
                continue
            rest = tuple(
                sorted((k, v) for k, v in setting.env.items() if k not in EXPLAINED.get(backend, ()))
            )
            if (kernels, rest) in seen:
                print(
                    f"    skipped: the same kernels as '{seen[kernels, rest]}' here ({kernels})", flush=True
                )
                continue
            seen[kernels, rest] = name
            folder = Path(tmp) / str(i)
            folder.mkdir()
            runs[name] = run_setting(backend, setting.env, extra, folder)
            print(f"    {describe(runs[name])}", flush=True)
    if not runs:
        print(f"{backend}: no setting could run here")
        return 1
    problems = compare({name: run.tests for name, run in runs.items()})
    for name, run in runs.items():
        problems += [f"verify under '{name}': {line}" for line in (run.verify or {}).get("problems", [])]
    for line in problems:
        print(f"DIFFERS: {line}")
    verdict = "identical verdicts" if not problems else f"{len(problems)} differences"
    tests = len(next(iter(runs.values())).tests)
    print(f"{backend}: {len(runs)} of {len(settings)} settings run, {tests} tests each: {verdict}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
