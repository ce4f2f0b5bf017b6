"""The timing contract: what an adapter hands the benchmarks so they can time it honestly.

The conformance path (``Adapter.prepare``) converts NumPy inputs to framework tensors and
the result back on every call; those host copies would dominate a timing. For benchmarks an
adapter implements ``Adapter.bench(case, spec, dtype, device)`` and returns a :class:`Bench`:
everything built, exported, compiled and moved to the device in that call, and closures
that only run the computation. The benchmarks (``benchmarks/``) time ``forward(); sync()``
and ``backward(); sync()``, check ``to_numpy(forward())`` against the reference before any
timing, and time ``matmul(n)`` once per run for the device's peak. ``make_backward()``
records the graph (setup) and returns the timed backward closure, so a forward-only
benchmark never holds the activations a backward pass needs.

An adapter without a timed path raises ``NotImplementedError("why")`` (the default in
``mha_conformance.impls.adapter.Adapter``): the benchmark is a skip with that reason, never a wrong number.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Environment variable fixing the CPU threads a framework may use while benchmarked.
THREADS_ENV = "MHA_BENCH_THREADS"


@dataclass
class Bench:
    """Closures over one configuration, already built on its device.

    * ``forward()``: one forward pass on inputs already on the device; returns the
      framework's output (not converted). It may return before the device finishes.
    * ``sync()``: wait until the device has finished what was queued
      (``torch.cuda.synchronize``, ``block_until_ready``, a host copy for TF and
      onnxruntime); a no-op on CPU frameworks that compute eagerly.
    * ``to_numpy(out)``: a ``forward()`` result as a NumPy array in the benchmark's dtype
      (bfloat16 as ``ml_dtypes.bfloat16``), for the correctness gate; never timed.
    * ``make_backward()``: record the forward graph (inputs and weights requiring grad)
      and return ``backward()``, one backward pass through it (``retain_graph``); None
      when the path cannot backprop.
    * ``matmul(n)``: a closure multiplying two n x n matrices in the same framework, dtype
      and device, for the measured peak; None when the framework has none.
    * ``meta``: strings about what runs (kernel, threads), for reports.
    """

    forward: Callable[[], Any]
    sync: Callable[[], None]
    to_numpy: Callable[[Any], np.ndarray]
    make_backward: Callable[[], Callable[[], Any]] | None = None
    matmul: Callable[[int], Callable[[], Any]] | None = None
    meta: dict[str, str] = field(default_factory=dict)


def bench_threads() -> int:
    """CPU threads a benchmarked framework may use: ``MHA_BENCH_THREADS``, else every core.

    Fixed per run (and recorded with the results) because a thread count that follows the
    load of the machine makes timings incomparable across runs.
    """
    raw = os.environ.get(THREADS_ENV, "")
    if not raw:
        return os.cpu_count() or 1
    try:
        threads = int(raw)
    except ValueError:
        raise ValueError(
            f"{THREADS_ENV}={raw!r} is not a whole number; set it to the CPU threads to use"
        ) from None
    if threads < 1:
        raise ValueError(f"{THREADS_ENV}={raw!r}: use at least 1 thread")
    return threads
