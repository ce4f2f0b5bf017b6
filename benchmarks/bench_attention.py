"""Multi-head attention speed per adapter, shape, dtype and causality (asv).

``setup`` builds the module, moves inputs to the device and checks the result against the
reference (``common.configuration``, once per process); the timed bodies run the
computation and synchronise the device, nothing else. A framework or device that is missing
is a skip (``NotImplementedError``), a wrong result an error with no timing.

``version`` is explicit so refactoring a body does not wipe its history; bump it only when
what is measured changes.
"""

from __future__ import annotations

import time

from . import common

common.preload()  # under asv's forkserver: imported once, before the fork of every benchmark

PARAMS = [list(common.ADAPTERS), list(common.SHAPES), list(common.DTYPES), list(common.CAUSAL)]
PARAM_NAMES = ["adapter", "shape", "dtype", "causal"]


class _Attention:
    params = PARAMS
    param_names = PARAM_NAMES
    version = "1"
    rounds = 1  # one process per configuration: the suite's size, not the samples, sets the wall time
    repeat = common.REPEAT
    # No warm-up samples: the calibration of ``number`` (common.calibrate) warms the timed body up.
    warmup_time = 0.0
    timeout = 600  # covers building, compiling and warming up a long sequence

    def teardown(self, adapter: str, shape: str, dtype: str, causal: bool) -> None:
        """Add this process's seconds, from its setup on, to the configuration's cost in the run
        cache (``common.record_seconds``)."""
        started = self.__dict__.get("started")
        if started is not None:
            key = common.config_key(adapter, shape, dtype, causal, common.device())
            common.record_seconds(key, time.perf_counter() - started)
            del self.started  # asv may set up and tear down again in one process


class Forward(_Attention):
    """Forward pass: time and peak memory of the process.

    ``number`` (calls per sample) is chosen when asv asks for it, which only ``time_forward``
    does, after setup: a warm call's time (``common.calibrate``), then
    ``common.calls_per_sample``. ``peakmem_forward``'s process never asks, so it calls the
    forward only for its measurement (and the gate, as the first process of a configuration).
    """

    def setup(self, adapter: str, shape: str, dtype: str, causal: bool) -> None:
        self.started = time.perf_counter()
        self.config = common.configuration(adapter, shape, dtype, causal, common.device())

    @property
    def number(self) -> int | None:
        config = self.__dict__.get("config")  # None before setup: asv reads attributes then too
        if config is None:
            return None
        if common.quick():  # asv --quick: the body once, no calibrating call
            return 1
        return common.calls_per_sample(config.call_seconds())

    def teardown(self, adapter: str, shape: str, dtype: str, causal: bool) -> None:
        config = self.__dict__.get("config")  # None: setup skipped (asv tears down anyway)
        if config is not None:
            config.record_median()  # for the track_ benchmarks of this run
        super().teardown(adapter, shape, dtype, causal)

    def time_forward(self, adapter: str, shape: str, dtype: str, causal: bool) -> None:
        self.config.forward_recorded()

    def peakmem_forward(self, adapter: str, shape: str, dtype: str, causal: bool) -> None:
        self.config.forward()

    # 2: the process is forked from asv's forkserver with the environment's frameworks imported,
    # and its gate no longer computes the reference (the runner stores it first): its peak moved.
    # Kept at 2 since: from a28df6b the gate no longer copies a whole bias to float64, so ALiBi at
    # 2048 tokens peaks 124-146 MB lower (a step in its history); the other configurations moved
    # by a few MB either way, as between runs (the forkserver's inductor probe added ~4 MB).
    peakmem_forward.version = "2"  # type: ignore[attr-defined]


class Roofline(_Attention):
    """Achieved GFLOP/s of the forward pass and its fraction of the device's measured peak."""

    def setup(self, adapter: str, shape: str, dtype: str, causal: bool) -> None:
        self.started = time.perf_counter()
        self.where = (adapter, shape, dtype, causal, common.device())
        self.figures = common.forward_figures(*self.where)

    def track_gflops(self, adapter: str, shape: str, dtype: str, causal: bool) -> float:
        """Useful GFLOP/s (``common.forward_flops``) at the run's median forward time."""
        return self.figures.gflops

    track_gflops.unit = "GFLOP/s"  # type: ignore[attr-defined]

    def track_peak_fraction(self, adapter: str, shape: str, dtype: str, causal: bool) -> float:
        """Achieved GFLOP/s over the GEMM peak measured in the same framework, dtype and
        device (1.0 = attention runs as fast as a large matmul): the roofline view."""
        return self.figures.gflops / common.peak_gflops(*self.where, self.figures.framework)

    track_peak_fraction.unit = "fraction of peak"  # type: ignore[attr-defined]


class Gradients(_Attention):
    """Backward pass alone (the graph is recorded in setup): gradients of inputs and weights.

    Named to sort after ``Forward``: asv runs classes in name order, and by then the run
    cache knows which paths cannot backprop, so those skip without importing a framework."""

    def setup(self, adapter: str, shape: str, dtype: str, causal: bool) -> None:
        self.started = time.perf_counter()
        self.where = (adapter, shape, dtype, causal)
        self.backward = common.backward_of(adapter, shape, dtype, causal, common.device())

    @property
    def number(self) -> int | None:
        """Calls per sample, from a warm backward pass (``common.calibrate``, once per process)."""
        backward = self.__dict__.get("backward")
        if backward is None:
            return None
        if common.quick():
            return 1
        if "call_seconds" not in self.__dict__:
            self.call_seconds = common.calibrate(backward, warm=False)
            where = self.__dict__.get("where")  # set by setup; how number was set, for the run cache
            if where is not None:
                key = common.config_key(*where, common.device())
                common.update_run_cache("configs", key, {"backward_call_seconds": self.call_seconds})
        return common.calls_per_sample(self.call_seconds)

    def time_backward(self, adapter: str, shape: str, dtype: str, causal: bool) -> None:
        self.backward()
