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

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from impls.bench import Bench, bench_threads
from impls.torch_common import to_numpy, to_torch, torch, torch_dtype

Forward = Callable[[], Any]
#: (forward closure, graph builder): the graph builder runs the forward with autograd on,
#: inputs and weights requiring grad, and returns the output; None when it cannot backprop.
Built = tuple[Forward, Callable[[], Any] | None]


def synchronizer(device: str) -> Callable[[], None]:
    """Wait for queued device work: CUDA and MPS run asynchronously, the CPU does not."""
    t = torch()
    if device == "cuda":
        return t.cuda.synchronize
    if device == "mps":
        return t.mps.synchronize
    return lambda: None


def _inputs(spec: Mapping[str, Any], case: Mapping[str, np.ndarray], dtype: str, device: str, grad: bool):
    q = to_torch(case["query"], dtype, device, requires_grad=grad)
    if spec["self_attention"]:
        return q, q, q  # the same tensor three times, as self-attention callers pass it
    k = to_torch(case["key"], dtype, device, requires_grad=grad)
    return q, k, to_torch(case["value"], dtype, device, requires_grad=grad)


def _mha(adapter, case, spec, dtype, device) -> Built:
    module = adapter.build(case, spec, dtype, device, bias=spec["qkv_bias"] or spec["out_bias"])
    attn_mask, key_padding_mask = adapter.masks(spec, case, device)

    def run(q, k, v):
        out, _ = module(
            q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
            need_weights=adapter.need_weights, average_attn_weights=False,
        )  # fmt: skip
        return out

    q, k, v = _inputs(spec, case, dtype, device, grad=False)
    return (lambda: run(q, k, v)), (lambda: run(*_inputs(spec, case, dtype, device, grad=True)))


def _mha_fastpath(adapter, case, spec, dtype, device) -> Built:
    t = torch()
    module = adapter.build(case, spec, dtype, device, bias=True)  # the fast path needs in_proj_bias
    attn_mask, key_padding_mask = adapter.masks(spec, case, device)
    q, k, v = _inputs(spec, case, dtype, device, grad=False)

    def forward():
        with t.inference_mode():
            out, _ = module(
                q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False
            )
        return out

    with t.profiler.profile(activities=[t.profiler.ProfilerActivity.CPU]) as prof:
        forward()
    if "aten::_native_multi_head_attention" not in {e.key for e in prof.key_averages()}:
        raise NotImplementedError("PyTorch did not take the native fast path for this configuration")
    return forward, None  # inference_mode: no graph to backprop through


def _sdpa(adapter, case, spec, dtype, device) -> Built:
    t = torch()
    masks = adapter.masks(spec, case.get("mask"), device)  # on the device once, in setup

    def weights(grad: bool) -> dict[str, Any]:
        return {
            n: to_torch(a, dtype, device, requires_grad=grad)
            for n, a in case.items()
            if n[:2] in ("w_", "b_")
        }

    def run(params, q, k, v):
        return adapter.attend(params, q, k, v, masks, spec)

    params, (q, k, v) = weights(False), _inputs(spec, case, dtype, device, grad=False)

    def forward():
        with t.no_grad():  # as torch-sdpa's conformance path runs it
            return run(params, q, k, v)

    return forward, lambda: run(weights(True), *_inputs(spec, case, dtype, device, grad=True))


def _prepared_module(adapter, case, spec, dtype, device):
    """The module the adapter's own ``prepare`` built and loaded (its closure's ``module``)."""
    module = inspect.getclosurevars(adapter.prepare(case, spec, dtype, device)).nonlocals.get("module")
    if module is None:
        raise NotImplementedError(
            f"{adapter.name}: prepare() no longer keeps a 'module'; update impls/torch_bench.py"
        )
    return module


def _scratch(adapter, case, spec, dtype, device) -> Built:
    t = torch()
    module = _prepared_module(adapter, case, spec, dtype, device)
    mask = case.get("mask")
    mask = None if mask is None else t.from_numpy(np.ascontiguousarray(mask)).to(device)

    def run(x, kv):
        return module(x, None if spec["self_attention"] else kv, mask)

    x, kv, _ = _inputs(spec, case, dtype, device, grad=False)

    def forward():
        with t.no_grad():
            return run(x, kv)

    def graph():
        x, kv, _ = _inputs(spec, case, dtype, device, grad=True)
        return run(x, kv)

    return forward, graph


def _wrapper(adapter, case, spec, dtype, device) -> Built:
    t = torch()
    module = _prepared_module(adapter, case, spec, dtype, device)
    x = to_torch(case["query"], dtype, device)

    def forward():
        with t.no_grad():
            return module(x)

    return forward, lambda: module(to_torch(case["query"], dtype, device, requires_grad=True))


def _builder(adapter) -> Callable[..., Built]:
    from impls.torch_mha import TorchMHA, TorchMHAFastPath
    from impls.torch_scratch import TorchScratch
    from impls.torch_sdpa import TorchSDPA
    from impls.torch_wrapper import TorchWrapper

    for cls, build in (
        (TorchMHAFastPath, _mha_fastpath),  # before TorchMHA, its base class
        (TorchMHA, _mha),
        (TorchSDPA, _sdpa),
        (TorchScratch, _scratch),
        (TorchWrapper, _wrapper),
    ):
        if isinstance(adapter, cls):
            return build
    raise NotImplementedError(
        f"{adapter.name}: no timed body in impls/torch_bench.py for {type(adapter).__name__}"
    )


def bench(adapter, case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str, device: str) -> Bench:
    """The timed closures of a built-in PyTorch adapter on ``device`` (see ``impls/bench.py``)."""
    t = torch()
    threads = bench_threads()
    t.set_num_threads(threads)
    t.manual_seed(0)
    forward, graph = _builder(adapter)(adapter, case, spec, dtype, device)

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
