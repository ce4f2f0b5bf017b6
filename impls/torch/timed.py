"""Timed bodies for the PyTorch adapters (``Adapter.bench``, contract in ``impls/bench.py``).

Each adapter's module is built exactly as its conformance path builds it (the same
``build``/``masks`` methods, or the very module its ``prepare`` made), inputs go to the
device once, and the closures run only the computation, in the same grad mode as the
conformance path: ``torch-mha`` and ``torch-mha-noweights`` with autograd on (that is what
keeps them on the paths they name), the fast path under ``inference_mode``, the rest under
``no_grad``. ``torch-sdpa``'s projections and SDPA call are restated on tensors here (its
``prepare`` converts inside the call); the benchmarks' correctness gate holds them to the
reference like every other timed body.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mha_conformance.impls.bench import Bench, bench_threads
from mha_conformance.impls.torch.convert import import_torch, to_numpy, to_torch, torch_dtype

Forward = Callable[[], Any]
#: (forward closure, graph builder): the graph builder runs the forward with autograd on,
#: inputs and weights requiring grad, and returns the output; None when it cannot backprop.
Built = tuple[Forward, Callable[[], Any] | None]


def synchronizer(device: str) -> Callable[[], None]:
    """Wait for queued device work: CUDA and MPS run asynchronously, the CPU does not."""
    t = import_torch()
    if device == "cuda":
        return t.cuda.synchronize
    if device == "mps":
        return t.mps.synchronize
    return lambda: None


def bench_inputs(
    spec: Mapping[str, Any], case: Mapping[str, np.ndarray], dtype: str, device: str, grad: bool
):
    q = to_torch(case["query"], dtype, device, requires_grad=grad)
    if spec["self_attention"]:
        return q, q, q  # the same tensor three times, as self-attention callers pass it
    k = to_torch(case["key"], dtype, device, requires_grad=grad)
    return q, k, to_torch(case["value"], dtype, device, requires_grad=grad)


def bench(adapter, case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str, device: str) -> Bench:
    """The timed closures of a built-in PyTorch adapter on ``device`` (see ``impls/bench.py``)."""
    t = import_torch()
    threads = bench_threads()
    t.set_num_threads(threads)
    t.manual_seed(0)
    forward, graph = adapter.timed_body(case, spec, dtype, device)

    def make_backward() -> Callable[[], Any]:
        out = graph()  # the graph is recorded once, in setup; each call runs backward only
        grad_output = t.randn_like(out)

        def backward():
            out.backward(grad_output, retain_graph=True)

        return backward

    def matmul(n: int) -> Callable[[], Any]:
        a = t.randn(n, n, device=device).to(torch_dtype(dtype))
        b = t.randn(n, n, device=device).to(torch_dtype(dtype))
        return lambda: t.mm(a, b)

    return Bench(
        forward=forward,
        sync=synchronizer(device),
        to_numpy=lambda out: to_numpy(out, dtype, device),
        make_backward=None if graph is None else make_backward,
        matmul=matmul,
        meta={"threads": str(threads), "torch": t.__version__},
    )
