"""Timed bodies for the onnxruntime adapters (``Adapter.bench``, contract in ``impls/bench.py``).

Setup does everything the timing must not see: the adapter's model is built, or exported
(``onnx-export*`` reuse the exported-model cache, so a model already on disk is not exported
again), one ``InferenceSession`` is created with fixed threads (``bench_threads()`` within an
operator, one between operators, nodes in sequence) and the inputs are prepared once. Its
first run is profiled, as on the conformance path, to prove which provider ran the attention
kernel: ``meta["provider"]`` is that provider, never merely the one asked for.

* **CPU**: the timed forward is ``session.run`` on the prepared NumPy inputs. It returns host
  arrays, so the run itself is the host copy and ``sync`` has nothing to wait for.
* **CUDA** (onnxruntime-gpu only; not runnable on a machine without a GPU, where it is a skip
  naming the missing ``CUDAExecutionProvider``): the inputs are copied to the device once as
  ``OrtValue``s and bound with an ``io_binding`` together with a preallocated device output;
  the timed forward is ``run_with_iobinding`` and ``sync`` is
  ``io_binding.synchronize_outputs()`` (onnxruntime also synchronizes the provider's streams
  at the end of every run unless the run option ``disable_synchronize_execution_providers``
  is set). Only ``to_numpy`` (never timed) copies to the host.

bfloat16 crosses the session edge as float32 (``impls/onnx/common.py``), so a bfloat16 timing
includes the Cast nodes at the graph's input and output (elementwise, small next to the
projections); onnxruntime's CPU provider has no bfloat16 attention or MatMul kernel, so
there bfloat16 is a skip with the reason. ``make_backward`` is None: onnxruntime runs
inference only, and the benchmarks' ``time_backward`` skips with that reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mha_conformance.impls.adapter import refusal
from mha_conformance.impls.bench import Bench, bench_threads
from mha_conformance.impls.onnx.runtime import (
    DEFAULT_OPSET,
    Session,
    from_io,
    import_onnxruntime,
    io_dtype,
    onnx,
    onnx_type,
    ort_version,
    to_io,
)

#: (forward, sync, to_numpy) over one session with its inputs in place.
Timed = tuple[Callable[[], Any], Callable[[], None], Callable[[Any], np.ndarray]]


def bench(adapter, case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str, device: str) -> Bench:
    """The timed closures of an onnxruntime adapter on ``device`` (see ``impls/bench.py``)."""
    reason = refusal(adapter, spec, dtype, device)
    if reason:
        raise NotImplementedError(reason)
    model, names, about = adapter.timed_model(case, spec, dtype)
    source = {**case, **adapter.runtime_feeds(spec, case)}
    feeds = {n: to_io(source[n], dtype) for n in names}
    return bench_session(adapter, model, feeds, about, spec, dtype, device)


def bench_session(
    adapter,
    model: Any,
    feeds: Mapping[str, np.ndarray],
    about: Mapping[str, str],
    spec,
    dtype: str,
    device: str,
) -> Bench:
    """:func:`bench` for a model and its runtime feeds (in the session's I/O dtype) already made."""
    threads = bench_threads()
    session = Session(
        model, device, adapter.kernel, f"{adapter.name}: benchmark {spec['id']} in {dtype}", threads=threads
    )
    session.run(feeds, ["output"])  # profiled once: proves where the attention kernel ran
    shape = (spec["batch"], spec["q_len"], spec["d_out"])
    forward, sync, to_numpy = timed_run(session.session, feeds, "output", shape, dtype, device)
    options = session.session.get_session_options()  # what the session runs with, not what was asked
    meta = {
        **session.meta,
        **about,
        "threads": str(options.intra_op_num_threads),
        "inter_op_threads": str(options.inter_op_num_threads),
        "execution_mode": str(options.execution_mode).rpartition(".")[2].lower(),
        "io": "io_binding, device OrtValues" if device == "cuda" else "session.run on host arrays",
        "onnxruntime": ort_version(),
    }
    return Bench(
        forward=forward,
        sync=sync,
        to_numpy=to_numpy,
        make_backward=None,  # inference only
        matmul=lambda n: matmul(n, dtype, device, threads),
        meta=meta,
    )


def timed_run(
    session: Any,
    feeds: Mapping[str, np.ndarray],
    output: str,
    shape: tuple[int, ...],
    dtype: str,
    device: str,
) -> Timed:
    """Closures running ``session`` (an ``onnxruntime.InferenceSession``) on ``feeds`` and
    producing ``output`` of ``shape``; on CUDA with everything bound on the device once."""
    if device != "cuda":
        return (
            lambda: session.run([output], feeds)[0],
            lambda: None,  # run returned host arrays: the copy is part of the run
            lambda out: from_io(out, dtype),
        )
    rt = import_onnxruntime()
    binding = session.io_binding()
    bound = [rt.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), "cuda", 0) for a in feeds.values()]
    for name, value in zip(feeds, bound, strict=True):
        binding.bind_ortvalue_input(name, value)
    result = rt.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(io_dtype(dtype)), "cuda", 0)
    binding.bind_ortvalue_output(output, result)

    def forward(_inputs: list[Any] = bound) -> Any:  # the default keeps the device inputs alive
        session.run_with_iobinding(binding)
        return result  # the same device buffer every run

    return forward, binding.synchronize_outputs, lambda out: from_io(out.numpy(), dtype)


def matmul(n: int, dtype: str, device: str, threads: int) -> Callable[[], Any]:
    """An n x n MatMul as a one-node model in ``dtype`` on the same provider and threads, for
    the device's measured peak (bfloat16 with Casts at the edge, as the attention models)."""
    helper, elem = onnx().helper, onnx_type(io_dtype(dtype))
    nodes, a, b = [], "a", "b"
    if dtype == "bfloat16":
        nodes = [helper.make_node("Cast", [x], [f"{x}16"], to=onnx_type(dtype)) for x in "ab"]
        a, b = "a16", "b16"
    nodes.append(helper.make_node("MatMul", [a, b], ["c" if dtype != "bfloat16" else "c16"]))
    if dtype == "bfloat16":
        nodes.append(helper.make_node("Cast", ["c16"], ["c"], to=elem))
    graph = helper.make_graph(
        nodes,
        "matmul",
        [helper.make_tensor_value_info(x, elem, [n, n]) for x in "ab"],
        [helper.make_tensor_value_info("c", elem, [n, n])],
    )
    opset = helper.make_opsetid("", DEFAULT_OPSET)
    model = helper.make_model(graph, opset_imports=[opset], producer_name="mha-conformance")
    model.ir_version = helper.find_min_ir_version_for([opset])
    session = Session(model, device, ("MatMul", ""), f"matmul {n}x{n} in {dtype}", threads=threads)
    rng = np.random.default_rng(0)
    feeds = {x: to_io(rng.standard_normal((n, n), np.float32), dtype) for x in "ab"}
    session.run(feeds)  # proves the MatMul ran on the asked provider
    forward, sync, _ = timed_run(session.session, feeds, "c", (n, n), dtype, device)

    def product() -> Any:  # waits for its own outputs: the caller's sync is the attention's binding
        out = forward()
        sync()
        return out

    return product
