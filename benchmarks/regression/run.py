"""Run the regression gate: ``python benchmarks/regression/run.py [--device D] [--adapter GLOB]
[--backend NAME] [--accept]``.

Saves each run with its raw samples under ``.benchmarks/<host>-<device>[-<backend>]/``
(pytest-benchmark's storage, one per machine, device and nox backend, so a CPU run is never
compared with a GPU one, nor one backend's adapters with another's) and fails when a benchmark
is slower than its baseline, its newest earlier result that the gate did not flag: a one-sided
Mann-Whitney U test on the raw samples gives p < 0.01 and the Hodges-Lehmann ratio of the
times is at least 1.25 (``gate.py``). On CPU it times the process's CPU time with one framework
thread (``MHA_BENCH_THREADS``, default 1 here) and glibc's malloc thresholds fixed, which the
rest of the machine's load barely moves (docs/benchmarks.md). The first run only saves. ``--accept`` makes this run the baseline even if it is slower
(a slowdown you meant). Other arguments reach pytest (e.g. ``-k t128``: a partial run is
compared on the benchmarks it has).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.regression import gate  # noqa: E402
from mha_conformance.impls.bench import THREADS_ENV  # noqa: E402

#: glibc's malloc with fixed thresholds for the timed process: by default it adapts them to what
#: the process freed before, so two processes of one commit differ in how many buffers of a call
#: come from fresh pages (kernel page faults, counted in CPU time: up to 30% of a forward pass
#: here). Fixed, a call's buffers up to 32 MiB are reused and never returned. Ignored off glibc.
MALLOC = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"


def shown(path: Path) -> str:
    """``path`` relative to the project when it is inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def advice(rows: list[gate.Comparison], argv: list[str], storage: Path) -> str:
    """What to do about the benchmarks the gate flagged."""
    slower = [row for row in rows if row.verdict == "SLOWER"]
    rerun = shlex.join(["python", "benchmarks/regression/run.py", *argv])
    names = " or ".join(row.name.removeprefix("test_forward[").removesuffix("]") for row in slower)
    lines = [
        f"speed: FAILED: {len(slower)} of {len(rows)} benchmarks slower than their baseline "
        f"(p < {gate.ALPHA:g} and at least {gate.MIN_RATIO:g}x):",
        *(f"  {row.name}: {row.ratio:.2f}x, baseline {row.baseline_run}" for row in slower),
        "What to do:",
        "  1. Confirm it: run the gate again. A flagged result never becomes a baseline, so the rerun is",
        f"     compared with the same baseline: {rerun}",
        "     Flagged again: a regression. Not flagged: a one-off on a busy machine.",
        f"  2. Find the cause: compare the baseline's commit with this one, timing only the flagged benchmarks "
        f"with -k '{names}'.",
        f"  3. A slowdown you meant: rerun with --accept; that run becomes the baseline ({shown(storage)}).",
    ]
    if any(row.injected for row in rows):
        lines.append("  (this run has a slowdown injected by MHA_SPEED_INJECT: it is never a baseline)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="benchmarks/regression/run.py", description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--adapter", action="append", default=[])
    parser.add_argument("--backend", default="", help="the nox backend: its runs are saved apart")
    parser.add_argument(
        "--storage", type=Path, help="saved runs (default .benchmarks/<host>-<device>[-<backend>]/)"
    )
    parser.add_argument(
        "--accept", action="store_true", help="make this run the baseline even if it is slower"
    )
    args, rest = parser.parse_known_args(argv)
    # Each backend (each set of adapters) keeps its own history.
    folder = "-".join(filter(None, (platform.node() or "host", args.device, args.backend)))
    storage = (args.storage or ROOT / ".benchmarks" / folder).resolve()
    os.environ["MHA_BENCH_DEVICE"] = args.device
    if args.device == "cpu":
        # Several framework threads on a shared machine spin while they wait for each other,
        # which CPU time counts; one thread computes alone (docs/benchmarks.md measures both).
        os.environ.setdefault(THREADS_ENV, "1")
    if args.adapter:
        os.environ["MHA_SPEED_ADAPTERS"] = ",".join(args.adapter)
    clock = gate.clock(args.device)
    env = {**os.environ, "GLIBC_TUNABLES": ":".join(filter(None, (MALLOC, os.environ.get("GLIBC_TUNABLES"))))}
    before = set(storage.rglob("*.json"))
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(HERE),
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(ROOT),
        "-o",
        "python_files=test_*.py",
        f"--benchmark-storage=file://{storage}",
        "--benchmark-autosave",
        "--benchmark-save-data",
        f"--benchmark-timer={clock}",
        "--benchmark-warmup=on",
        "--benchmark-min-rounds=10",
        "--benchmark-max-time=1.0",
        "--benchmark-columns=min,median,iqr,max,rounds",
        "--benchmark-sort=name",
        *rest,
    ]
    code = subprocess.call(command, cwd=ROOT, env=env)
    saved = sorted(set(storage.rglob("*.json")) - before)
    if not saved:
        print(f"speed: nothing was saved in {shown(storage)}; nothing to compare")
        return int(code) or 1
    rows = gate.compare(storage, saved[-1])
    verdict = gate.record(saved[-1], rows, accepted=args.accept)
    print(gate.table(rows, clock))
    print(f"speed: this run is {shown(saved[-1])}")
    if rows and all(row.verdict == "new" for row in rows):
        print(f"speed: no saved run in {shown(storage)} to compare with; this run is saved as the baseline")
    if verdict == "accepted":
        print("speed: slower, and accepted (--accept): this run is the new baseline")
    elif any(row.verdict == "SLOWER" for row in rows):
        print(advice(rows, argv, storage))
        return 1
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
