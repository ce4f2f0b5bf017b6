"""What the onnxruntime adapters share: providers, honest device checks, dtypes and graph parts.

Providers: ``cpu`` asks for ``CPUExecutionProvider``; ``cuda`` asks for
``CUDAExecutionProvider``, which only the ``onnxruntime-gpu`` package (extra ``onnx-gpu``,
its own environment) has. onnxruntime silently falls back to CPU when CUDA cannot load, so
every session is checked: ``session.get_providers()`` must start with the asked provider,
and the first run is profiled to see which provider really ran the node that computes the
attention (and that a kernel ran at all: onnxruntime inlines a standard function op such
as ``Attention`` into its ONNX function body when it has no kernel for the dtype). A
result is only ever labelled with the provider that produced it (``meta["provider"]``).

bfloat16 crosses the session boundary as float32 (a Cast at the graph edge, exact for the
golden values): onnxruntime's NumPy binding has no bfloat16, and the computation inside
stays in bfloat16.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

import numpy as np

from mha_conformance.impls.adapter import Adapter, Arrays, Spec
from mha_conformance.impls.bench import Bench
from mha_conformance.impls.onnx import timed
from mha_conformance.impls.onnx.runtime import (
    CUDA,
    DEFAULT_OPSET,
    MS_DOMAIN,
    PROVIDERS,
    Session,
    cuda_device_name,
    import_onnxruntime,
    io_dtype,
    onnx,
    onnx_type,
    ort_version,
    short_status,
)


class OnnxRuntimeAdapter(Adapter):
    """Base for adapters that run a graph with onnxruntime: cpu always, cuda with onnxruntime-gpu."""

    framework = "onnxruntime"
    extra = "onnx"
    device_kinds = ("cpu", "cuda")
    #: (op_type, domain) of the node that computes the attention: the kernel the adapter tests;
    #: None for a decomposed attention (see :class:`Session`).
    kernel: tuple[str, str] | None = ("Attention", "")

    def devices(self) -> list[str]:
        return ["cpu", "cuda"] if CUDA in import_onnxruntime().get_available_providers() else ["cpu"]

    def device_unavailable(self, device: str) -> str | None:
        if device == "cuda" and device not in self.devices():
            return (
                f"cuda requested but onnxruntime {ort_version()} has no {CUDA} (available: "
                f"{', '.join(import_onnxruntime().get_available_providers())}); it comes with onnxruntime-gpu: "
                f"pip install '.[onnx-gpu]' in its own environment (nox -s \"conformance(backend='onnx-gpu')\")"
            )
        return super().device_unavailable(device)

    def device_name(self, device: str) -> str:
        if device == "cuda":
            return cuda_device_name()
        return super().device_name(device)

    def versions(self) -> dict[str, str]:
        return {
            "onnxruntime": ort_version(),
            "onnx": onnx().__version__,
            "providers": ", ".join(import_onnxruntime().get_available_providers()),
        }

    def kernel_problem(self, dtype: str, device: str) -> str | None:
        """Why this adapter's attention kernel cannot run in ``dtype`` on ``device``, else None."""
        return kernel_probe(self.kernel, dtype, device)

    def timed_model(
        self, case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str
    ) -> tuple[Any, list[str], dict[str, str]]:
        """What :meth:`bench` runs: the model (ModelProto or path), its runtime input names, and
        strings about it for ``meta``. The conformance path's graph, minus outputs only a check
        reads (attention weights), so the timing is the forward pass alone."""
        raise NotImplementedError(f"{self.name} has no timed model (OnnxRuntimeAdapter.timed_model)")

    def runtime_feeds(
        self, spec: Mapping[str, Any], inputs: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Inputs the model takes beyond the case's own, derived from them per call (a mask with
        the rules folded in); the conformance path and the timed path both feed them."""
        return {}

    def bench(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Bench:
        """The timed path (``impls/onnx/timed.py``): :meth:`timed_model` in one session with
        fixed threads, inputs prepared once; onnxruntime runs inference only (no backward)."""
        return timed.bench(self, case, spec, dtype, device)


class Graph:
    """A small builder for the hand-made graphs: nodes, initializers, inputs and outputs."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self._names = 0

    def name(self, stem: str) -> str:
        self._names += 1
        return f"{stem}_{self._names}"

    def node(
        self,
        op: str,
        inputs: Sequence[str],
        n_out: int = 1,
        domain: str = "",
        unused: Sequence[int] = (),
        **attrs: Any,
    ) -> list[str]:
        """Add a node; returns its output names ("" for the optional outputs listed in ``unused``).
        Trailing empty inputs are dropped, as ONNX wants."""
        ins = list(inputs)
        while ins and not ins[-1]:
            ins.pop()
        outs = ["" if i in unused else self.name(op.lower()) for i in range(n_out)]
        self.nodes.append(onnx().helper.make_node(op, ins, outs, domain=domain, **attrs))
        return outs

    def const(self, stem: str, array: np.ndarray, elem_type: int | None = None) -> str:
        """An initializer; float arrays are stored in the graph's dtype (exact for golden values)."""
        name = self.name(stem)
        arr = np.asarray(array)
        if elem_type is None and arr.dtype.kind == "f":
            elem_type = onnx_type(self.dtype)
        if elem_type == onnx_type("bfloat16"):
            import ml_dtypes

            bits = np.ascontiguousarray(arr.astype(np.float32).astype(ml_dtypes.bfloat16)).view(np.uint16)
            tensor = onnx().helper.make_tensor(name, elem_type, arr.shape, bits.tobytes(), raw=True)
        else:
            np_type = (
                onnx().helper.tensor_dtype_to_np_dtype(elem_type) if elem_type is not None else arr.dtype
            )
            tensor = onnx().numpy_helper.from_array(np.ascontiguousarray(arr.astype(np_type)), name)
        self.initializers.append(tensor)
        return name

    def ints(self, stem: str, values: Sequence[int]) -> str:
        return self.const(stem, np.asarray(values, np.int64))

    def input(
        self,
        name: str,
        array: np.ndarray,
        shape: Sequence[int | str] | None = None,
        elem_type: int | None = None,
    ) -> str:
        """A graph input shaped like ``array`` (or ``shape``, where a string names a dimension
        that varies between runs, e.g. a KV cache's length); ``elem_type`` for an integer input; float inputs in the session's I/O
        dtype, cast to bfloat16 inside when the graph runs in bfloat16."""
        helper = onnx().helper
        dims = list(array.shape if shape is None else shape)
        if elem_type is not None:  # an integer input (lengths), as given
            self.inputs.append(helper.make_tensor_value_info(name, elem_type, dims))
            return name
        if array.dtype == np.bool_:
            self.inputs.append(helper.make_tensor_value_info(name, onnx().TensorProto.BOOL, dims))
            return name
        self.inputs.append(helper.make_tensor_value_info(name, onnx_type(io_dtype(self.dtype)), dims))
        if self.dtype == "bfloat16":
            return self.node("Cast", [name], to=onnx_type("bfloat16"))[0]
        return name

    def output(self, value: str, name: str, shape: Sequence[int | str]) -> None:
        """Expose ``value`` as graph output ``name`` in the session's I/O dtype."""
        to = onnx_type(io_dtype(self.dtype))
        self.nodes.append(onnx().helper.make_node("Cast", [value], [name], to=to))
        self.outputs.append(onnx().helper.make_tensor_value_info(name, to, list(shape)))

    def linear(self, x: str, case: Mapping[str, np.ndarray], short: str, bias: bool = True) -> str:
        """``x @ W (+ b)`` with the case's [in, out] weight."""
        y = self.node("MatMul", [x, self.const(f"w_{short}", case[f"w_{short}"])])[0]
        if bias and f"b_{short}" in case:
            y = self.node("Add", [y, self.const(f"b_{short}", case[f"b_{short}"])])[0]
        return y

    def heads(self, x: str, batch: int, length: int, heads: int, width: int) -> str:
        """[B, T, heads*width] -> [B, heads, T, width] (head h owns columns h*width:(h+1)*width)."""
        shaped = self.node("Reshape", [x, self.ints("shape", [batch, length, heads, width])])[0]
        return self.node("Transpose", [shaped], perm=[0, 2, 1, 3])[0]

    def seq_slice(self, x: str, start: int, end: int) -> str:
        """Positions ``start:end`` of a [B, T, ...] tensor."""
        return self.node(
            "Slice", [x, self.ints("starts", [start]), self.ints("ends", [end]), self.ints("axes", [1])]
        )[0]

    def model(self, opsets: Mapping[str, int]) -> Any:
        """The ModelProto, checked, with the lowest IR version its opsets allow (onnxruntime
        accepts it; onnx's newest IR may be ahead of onnxruntime)."""
        helper = onnx().helper
        ids = [helper.make_opsetid(domain, version) for domain, version in opsets.items()]
        graph = helper.make_graph(self.nodes, "mha", self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=ids, producer_name="mha-conformance")
        model.ir_version = helper.find_min_ir_version_for([i for i in ids if i.domain == ""])
        onnx().checker.check_model(model)
        return model


@cache
def kernel_probe(kernel: tuple[str, str] | None, dtype: str, device: str) -> str | None:
    """Why onnxruntime cannot run ``kernel`` in ``dtype`` on ``device``, found once by running a
    one-node graph (for None: MatMul then Softmax); None when it runs there."""
    op, domain = kernel or ("Softmax", "")
    g = Graph(dtype)
    int32 = onnx().TensorProto.INT32
    x = np.zeros((1, 2, 16 if op == "GroupQueryAttention" else 4), np.float32)  # GQA: head_size 8
    q, k, v = (g.input(n, x) for n in ("q", "k", "v"))
    if op == "Attention":
        (y,) = g.node("Attention", [q, k, v], q_num_heads=2, kv_num_heads=2)
        opsets = {"": 24}
    elif op == "GroupQueryAttention":
        lengths = [g.const("seqlens_k", np.array([1]), int32), g.const("total", np.array(2), int32)]
        (y, _, _) = g.node(
            op, [q, k, v, "", "", *lengths], n_out=3, domain=MS_DOMAIN, num_heads=2, kv_num_heads=2
        )
        opsets = {"": DEFAULT_OPSET, MS_DOMAIN: 1}
    elif op == "MultiHeadAttention":
        (y,) = g.node(op, [q, k, v], domain=MS_DOMAIN, num_heads=2)
        opsets = {"": DEFAULT_OPSET, MS_DOMAIN: 1}
    else:  # a decomposed attention's core: MatMul (Q K^T), Softmax
        (y,) = g.node("Softmax", g.node("MatMul", [q, g.node("Transpose", [k], perm=[0, 2, 1])[0]]))
        opsets = {"": DEFAULT_OPSET}
    g.output(y, "y", [1, 2, 2] if kernel is None else list(x.shape))
    try:
        model = g.model(opsets)
    except Exception as exc:  # the op's schema rejects the dtype: onnx.checker's ValidationError
        return f"{domain + '.' if domain else ''}{op} is not defined for {dtype}: {str(exc).splitlines()[0]}"
    what = f"{domain + '.' if domain else ''}{op}" if kernel else "MatMul and Softmax"
    where = f"onnxruntime {ort_version()} {PROVIDERS[device]} cannot run {what} in {dtype}"
    try:
        Session(model, device, kernel, f"{op} probe").run({n: x.astype(io_dtype(dtype)) for n in "qkv"})
    except NotImplementedError as exc:
        detail = short_status(exc.__cause__) if exc.__cause__ else str(exc)
        if kernel and f"implementation for {op}(" not in detail and "Could not find" in detail:
            detail += f" (there is no {op} kernel, so onnxruntime tried the op's ONNX function body)"
        return f"{where}: {detail}"
    except RuntimeError as exc:  # e.g. a contrib op's type constraints reject the dtype (INVALID_GRAPH)
        return f"{where}: {short_status(exc.__cause__ or exc)}"
    return None
