"""The quick regression gate: a few forward passes timed with pytest-benchmark.

Not part of ``pytest tests``; run it through ``nox -s speed`` (or ``python
benchmarks/regression/run.py``), which saves every run with its raw samples and fails when a
benchmark is significantly and substantially slower than its baseline (``gate.py``). Each
configuration passes the same correctness gate as the asv suite before it is timed.

``MHA_SPEED_INJECT="<glob>=<factor>[,<glob>=<factor>...]"`` is the gate's test hook: a benchmark
whose name (``test_forward[<adapter>-<shape>-<dtype>-<causal|full>]``) matches a glob busy-waits
after each timed call until the call has taken ``factor`` times its own time on the run's clock,
so a known slowdown reaches the gate through the real timing path. Only the gate's tests and
its documented detection-power command set it; a run with it is never a baseline.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from fnmatch import fnmatchcase

import pytest

from benchmarks import common

#: adapter globs (from run.py's --adapter) and the configurations timed for each adapter.
ADAPTERS = os.environ.get("MHA_SPEED_ADAPTERS", "torch-*").split(",")
CONFIGS = [("gpt-t512", "float32", True), ("transformer-t128", "float32", False)]
INJECT_ENV = "MHA_SPEED_INJECT"


def configurations() -> list:
    names = [n for n in common.ADAPTERS if any(fnmatchcase(n, p) for p in ADAPTERS)]
    return [
        pytest.param(n, *c, id=f"{n}-{c[0]}-{c[1]}-{'causal' if c[2] else 'full'}")
        for n in names
        for c in CONFIGS
    ]


def injected_factor(name: str) -> float:
    """The slowdown ``MHA_SPEED_INJECT`` asks of benchmark ``name`` (1.0: none)."""
    for item in filter(None, os.environ.get(INJECT_ENV, "").split(",")):
        glob, sep, factor = item.rpartition("=")
        try:
            value = float(factor) if sep and glob else 0.0
        except ValueError:
            value = 0.0
        if value < 1.0:
            raise ValueError(
                f"{INJECT_ENV}: {item!r} is not <benchmark-glob>=<factor >= 1>, e.g. '*t128*=1.5'"
            )
        if fnmatchcase(name, glob):
            return value
    return 1.0


def slowed(fn: Callable[[], None], factor: float, clock: Callable[[], float]) -> Callable[[], None]:
    """``fn`` made ``factor`` times as slow on ``clock``: it busy-waits after each call for
    ``factor - 1`` times that call's own time (a busy wait, so CPU time grows as wall time does)."""

    def timed() -> None:
        start = clock()
        fn()
        end = start + factor * (clock() - start)
        while clock() < end:
            pass

    return timed


def timer(config: pytest.Config) -> Callable[[], float]:
    """The clock pytest-benchmark times with (``--benchmark-timer``, a dotted name)."""
    module, _, name = config.getoption("benchmark_timer").rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(("adapter", "shape", "dtype", "causal"), configurations())
def test_forward(benchmark, request, adapter: str, shape: str, dtype: str, causal: bool) -> None:
    try:
        config = common.configuration(adapter, shape, dtype, causal, common.device())
    except NotImplementedError as exc:
        pytest.skip(str(exc))
    factor = injected_factor(request.node.name)
    benchmark.extra_info.update(device=config.device, threads=config.bench.meta.get("threads", "?"))
    if factor == 1.0:
        benchmark(config.forward)
        return
    benchmark.extra_info["injected"] = factor
    benchmark(slowed(config.forward, factor, timer(request.config)))
