"""Portable verdicts: the same implementation gets the same verdicts however its machine computes.

``python -m mha_conformance.audit.portability --backend torch|tensorflow [pytest args ...]`` runs the
suite on one backend's built-in adapters once per setting that changes the order of floating-
point operations, not the semantics: thread counts, kernel libraries, instruction sets. Every
test must end the same way in every setting (passed, skipped, xfailed, finding, ...); a test
that passes with one thread and fails with two is a tolerance-model problem, and this fails.
Prints each setting's worst error ratio and every difference; exit 0 when there is none.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mha_conformance import __main__ as suite

#: Per backend: its adapters, and the settings (environment variables) to compare.
SETTINGS: dict[str, dict] = {
    "torch": {
        # Every torch path but FlexAttention, which decomposes into the same aten ops the others
        # already vary and costs 4 x 4 minutes here: its eager call traces with dynamo once per
        # distinct shape, dtype and structure in each process (~0.5 s each, nothing persists
        # between processes; docs/speed.md).
        "adapters": ["torch-mha*", "torch-sdpa", "torch-scratch", "torch-wrapper"],
        "env": {
            "2 threads": {"OMP_NUM_THREADS": "2"},
            "1 thread": {"OMP_NUM_THREADS": "1"},
            "oneDNN (mkldnn) off": {"MHA_TORCH_MKLDNN": "0"},
            "no SIMD kernels (ATEN_CPU_CAPABILITY=default)": {"ATEN_CPU_CAPABILITY": "default"},
        },
    },
    "tensorflow": {
        "adapters": ["keras-mha", "keras-mha-scores"],
        "env": {
            "oneDNN on": {"TF_ENABLE_ONEDNN_OPTS": "1", "KERAS_BACKEND": "tensorflow"},
            "oneDNN off": {"TF_ENABLE_ONEDNN_OPTS": "0", "KERAS_BACKEND": "tensorflow"},
        },
    },
}


def run_setting(backend: str, env: dict[str, str], extra: Sequence[str], report: Path) -> dict[str, dict]:
    """Run the suite once under ``env``; return its test records by node id."""
    adapters = [a for name in SETTINGS[backend]["adapters"] for a in ("--adapter", name)]
    args = ["-q", "--no-header", "--tb=no", "--report", str(report), *adapters, *extra]
    proc = suite.run(args, env={**os.environ, **env})
    if not report.exists():
        raise RuntimeError(
            f"the suite wrote no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}"
        )
    return {t["nodeid"]: t for t in json.loads(report.read_text())["tests"]}


def worst_ratio(tests: dict[str, dict]) -> float:
    ratios = [
        v["ratio"] for t in tests.values() if t["outcome"] in ("passed", "failed") for v in t["verdicts"]
    ]
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mha_conformance.audit.portability", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--backend", choices=list(SETTINGS), required=True)
    args, extra = parser.parse_known_args(argv)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, env) in enumerate(SETTINGS[args.backend]["env"].items()):
            print(f"[{i + 1}/{len(SETTINGS[args.backend]['env'])}] {args.backend}: {name} ...", flush=True)
            runs[name] = run_setting(args.backend, env, extra, Path(tmp) / f"{i}.json")
            counts: dict[str, int] = {}
            for test in runs[name].values():
                counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
            print(f"    {counts}; worst ratio {worst_ratio(runs[name]):.3g}", flush=True)
    problems = compare(runs)
    for line in problems:
        print(f"DIFFERS: {line}")
    verdict = "identical verdicts" if not problems else f"{len(problems)} tests differ"
    print(f"{args.backend}: {len(runs)} settings, {len(next(iter(runs.values())))} tests each: {verdict}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
