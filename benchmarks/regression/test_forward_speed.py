"""The quick regression gate: a few forward passes timed with pytest-benchmark.

Not part of ``pytest tests``; run it through ``nox -s speed`` (or ``python
benchmarks/regression/run.py``), which saves every run per machine and device and fails when
a median is more than 10% slower than the previous saved run. Each configuration passes the
same correctness gate as the asv suite before it is timed.
"""

from __future__ import annotations

import os
from fnmatch import fnmatchcase

import pytest

from benchmarks import common

#: adapter globs (from run.py's --adapter) and the configurations timed for each adapter.
ADAPTERS = os.environ.get("MHA_SPEED_ADAPTERS", "torch-*").split(",")
CONFIGS = [("gpt-t512", "float32", True), ("transformer-t128", "float32", False)]


def configurations() -> list:
    names = [n for n in common.ADAPTERS if any(fnmatchcase(n, p) for p in ADAPTERS)]
    return [
        pytest.param(n, *c, id=f"{n}-{c[0]}-{c[1]}-{'causal' if c[2] else 'full'}")
        for n in names
        for c in CONFIGS
    ]


@pytest.mark.parametrize(("adapter", "shape", "dtype", "causal"), configurations())
def test_forward(benchmark, adapter: str, shape: str, dtype: str, causal: bool) -> None:
    try:
        config = common.configuration(adapter, shape, dtype, causal, common.device())
    except NotImplementedError as exc:
        pytest.skip(str(exc))
    benchmark.extra_info.update(device=config.device, threads=config.bench.meta.get("threads", "?"))
    benchmark(config.forward)
