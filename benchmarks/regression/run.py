"""Run the regression gate: ``python benchmarks/regression/run.py [--device D] [--adapter GLOB]
[--backend NAME]``.

Saves each run under ``.benchmarks/<host>-<device>[-<backend>]/`` (pytest-benchmark's storage,
one per machine, device and nox backend, so a CPU run is never compared with a GPU one, nor
one backend's adapters with another's) and fails when a median is more than 10% slower than
the previous saved run there. The first run only saves. Other arguments reach pytest (e.g.
``-k t128``: a partial run is compared on the benchmarks it shares with the previous one).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import pytest
from pytest_benchmark.session import PerformanceRegression

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def shown(path: Path) -> str:
    """``path`` relative to the project when it is inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/regression/run.py", description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--adapter", action="append", default=[])
    parser.add_argument("--backend", default="", help="the nox backend: its runs are saved apart")
    parser.add_argument(
        "--storage", type=Path, help="saved runs (default .benchmarks/<host>-<device>[-<backend>]/)"
    )
    args, rest = parser.parse_known_args(argv)
    # pytest-benchmark compares with the newest saved run and silently skips benchmarks that run
    # lacks, so each backend (each set of adapters) keeps its own history.
    folder = "-".join(filter(None, (platform.node() or "host", args.device, args.backend)))
    storage = (args.storage or ROOT / ".benchmarks" / folder).resolve()
    os.environ["MHA_BENCH_DEVICE"] = args.device
    if args.adapter:
        os.environ["MHA_SPEED_ADAPTERS"] = ",".join(args.adapter)
    compare = (
        ["--benchmark-compare", "--benchmark-compare-fail=median:10%"] if any(storage.rglob("*.json")) else []
    )
    if not compare:
        print(f"speed: no saved run in {shown(storage)} yet; this run is saved as the baseline")
    sys.path.insert(0, str(ROOT))
    try:
        return pytest.main(
            [
                str(HERE),
                "-p",
                "no:cacheprovider",
                "--rootdir",
                str(ROOT),
                "-o",
                "python_files=test_*.py",
                f"--benchmark-storage=file://{storage}",
                "--benchmark-autosave",
                *compare,
                "--benchmark-warmup=on",
                "--benchmark-min-rounds=10",
                "--benchmark-max-time=1.0",
                "--benchmark-columns=min,median,iqr,max,rounds",
                "--benchmark-sort=name",
                *rest,
            ]
        )
    except PerformanceRegression:  # raised after the comparison table is printed
        print(f"speed: a median is more than 10% slower than the previous run saved in {shown(storage)}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
