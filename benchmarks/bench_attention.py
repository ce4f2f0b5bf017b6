"""Multi-head attention speed per adapter, shape, dtype and causality (asv).

``setup`` builds the module, moves inputs to the device and checks the result against the
reference (``common.configuration``, once per process); the timed bodies run the
computation and synchronise the device, nothing else. A framework or device that is missing
is a skip (``NotImplementedError``), a wrong result an error with no timing.

``version`` is explicit so refactoring a body does not wipe its history; bump it only when
what is measured changes.
"""

from __future__ import annotations

from . import common

PARAMS = [list(common.ADAPTERS), list(common.SHAPES), list(common.DTYPES), list(common.CAUSAL)]
PARAM_NAMES = ["adapter", "shape", "dtype", "causal"]


class _Attention:
    params = PARAMS
    param_names = PARAM_NAMES
    version = "1"
    rounds = 1  # one process per configuration: the suite's size, not the samples, sets the wall time
    repeat = (5, 20, 0.5)  # at least 5 samples, then stop after 0.5 s or 20 samples
    warmup_time = 0.1
    timeout = 600  # covers building, compiling and warming up a long sequence


class Forward(_Attention):
    """Forward pass: time and peak memory of the process."""

    def setup(self, adapter: str, shape: str, dtype: str, causal: bool) -> None:
        self.config = common.configuration(adapter, shape, dtype, causal, common.device())

    def teardown(self, adapter: str, shape: str, dtype: str, causal: bool) -> None:
        self.config.record_median()  # for the track_ benchmarks of this run

    def time_forward(self, adapter: str, shape: str, dtype: str, causal: bool) -> None:
        self.config.forward_recorded()

    def peakmem_forward(self, adapter: str, shape: str, dtype: str, causal: bool) -> None:
        self.config.forward()


class Roofline(_Attention):
    """Achieved GFLOP/s of the forward pass and its fraction of the device's measured peak."""

    def setup(self, adapter: str, shape: str, dtype: str, causal: bool) -> None:
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
        self.backward = common.backward_of(adapter, shape, dtype, causal, common.device())

    def time_backward(self, adapter: str, shape: str, dtype: str, causal: bool) -> None:
        self.backward()
