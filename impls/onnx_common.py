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

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

import numpy as np

from impls.adapter import Adapter

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDERS = {"cpu": CPU, "cuda": CUDA}
#: Opsets of the graphs built here: the default domain's, and com.microsoft's.
DEFAULT_OPSET = 21
MS_DOMAIN = "com.microsoft"
#: Ops that carry a decomposed attention's arithmetic (onnxruntime fuses some, e.g. FusedMatMul).
COMPUTE_OPS = frozenset({"MatMul", "FusedMatMul", "Gemm", "Softmax"})


def ort():  # imported lazily so the suite collects without onnxruntime installed
    import onnxruntime

    return onnxruntime


def onnx():
    import onnx

    return onnx


def onnx_type(dtype: str) -> int:
    """The ONNX element type of a dtype name."""
    tp = onnx().TensorProto
    return {"float64": tp.DOUBLE, "float32": tp.FLOAT, "float16": tp.FLOAT16, "bfloat16": tp.BFLOAT16}[dtype]


def io_dtype(dtype: str) -> str:
    """The dtype a session's inputs and outputs use for ``dtype`` (bfloat16 goes as float32)."""
    return "float32" if dtype == "bfloat16" else dtype


def to_io(array: np.ndarray, dtype: str) -> np.ndarray:
    """A runtime input as the session takes it (bool stays bool; exact for golden values)."""
    if array.dtype == np.bool_:
        return np.ascontiguousarray(array)
    return np.ascontiguousarray(array.astype(np.dtype(io_dtype(dtype))))


def from_io(array: np.ndarray, dtype: str) -> np.ndarray:
    """A session output back in ``dtype``."""
    if dtype == "bfloat16":
        import ml_dtypes

        return np.asarray(array, np.float32).astype(ml_dtypes.bfloat16)
    return np.asarray(array)


def ort_version() -> str:
    return ort().__version__


class OnnxRuntimeAdapter(Adapter):
    """Base for adapters that run a graph with onnxruntime: cpu always, cuda with onnxruntime-gpu."""

    framework = "onnxruntime"
    extra = "onnx"
    device_kinds = ("cpu", "cuda")
    #: (op_type, domain) of the node that computes the attention: the kernel the adapter tests;
    #: None for a decomposed attention (see :class:`Session`).
    kernel: tuple[str, str] | None = ("Attention", "")

    def devices(self) -> list[str]:
        return ["cpu", "cuda"] if CUDA in ort().get_available_providers() else ["cpu"]

    def device_unavailable(self, device: str) -> str | None:
        if device == "cuda" and device not in self.devices():
            return (
                f"cuda requested but onnxruntime {ort_version()} has no {CUDA} (available: "
                f"{', '.join(ort().get_available_providers())}); it comes with onnxruntime-gpu: "
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
            "providers": ", ".join(ort().get_available_providers()),
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

    def bench(self, case, spec, dtype, device):
        """The timed path (``impls/onnx_bench.py``): :meth:`timed_model` in one session with
        fixed threads, inputs prepared once; onnxruntime runs inference only (no backward)."""
        from impls.onnx_bench import bench

        return bench(self, case, spec, dtype, device)


def cuda_device_name() -> str:
    """The GPU's name, from torch when it can see it (onnxruntime does not report names)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.cuda.current_device())
    except ImportError:
        pass
    return "cuda device 0 (name unknown: torch cannot see it)"


class Session:
    """An onnxruntime session on the asked device that checks, on its first run, which
    provider ran the attention node and that a kernel (not an inlined function) ran it."""

    def __init__(
        self, model: Any, device: str, kernel: tuple[str, str] | None, what: str, threads: int | None = None
    ) -> None:
        """``model`` is a ModelProto, serialized bytes or a path; ``kernel`` the (op type, domain)
        that must run (None: a decomposed attention, any of COMPUTE_OPS); ``what`` names the
        case and dtype for error messages. ``threads`` fixes the CPU threads for timing:
        ``threads`` within an operator, one between operators, nodes run in sequence (the
        profiling of the first run ends with it, so later runs are not slowed by it)."""
        rt = ort()
        self.device, self.kernel, self.what = device, kernel, what
        options = rt.SessionOptions()
        options.log_severity_level = 4  # failures surface as exceptions; onnxruntime must not print
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = rt.ExecutionMode.ORT_SEQUENTIAL
        self._profile_dir = tempfile.mkdtemp(prefix="mha-ort-profile-")
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(self._profile_dir, "run")
        source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
        asked = [PROVIDERS[device], CPU] if device == "cuda" else [CPU]
        try:
            self.session = rt.InferenceSession(source, options, providers=asked)
        except Exception as exc:  # onnxruntime raises its own exception types per status code
            shutil.rmtree(self._profile_dir, ignore_errors=True)
            if "NOT_IMPLEMENTED" in str(exc):
                raise NotImplementedError(
                    f"onnxruntime {ort_version()} {asked[0]}: {short_status(exc)}"
                ) from exc
            raise RuntimeError(f"{what}: onnxruntime could not load the model: {short_status(exc)}") from exc
        active = self.session.get_providers()
        if device == "cuda" and active[0] != CUDA:
            raise NotImplementedError(
                f"cuda requested but onnxruntime fell back to {active[0]} ({CUDA} did not load: check the "
                "CUDA and cuDNN libraries onnxruntime-gpu needs); a CPU result is never reported as cuda"
            )
        self.meta: dict[str, str] = {"session_providers": ", ".join(active)}
        self._checked = False

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        """Run once; the first run also proves where (and whether) the attention kernel ran."""
        try:
            result = self.session.run(list(outputs) if outputs else None, dict(feeds))
        except Exception as exc:  # onnxruntime's Fail / InvalidArgument: say which case, keep its status
            if not self._checked:
                self.session.end_profiling()
                shutil.rmtree(self._profile_dir, ignore_errors=True)
                self._checked = True
            raise RuntimeError(f"{self.what}: onnxruntime failed while running: {short_status(exc)}") from exc
        if not self._checked:
            self._check(ran_nodes(self.session.end_profiling()))
            self._checked = True
        return result

    def _check(self, ran: list[tuple[str, str]]) -> None:
        if self.kernel is None:  # a decomposed attention: whatever did its matrix products and softmax
            op, domain = "attention compute (MatMul/Softmax)", ""
            placed = sorted({provider for op_name, provider in ran if op_name in COMPUTE_OPS})
        else:
            op, domain = self.kernel
            placed = sorted({provider for op_name, provider in ran if op_name == op})
        if not placed:
            ops = sorted({op_name for op_name, _ in ran})
            shown = ", ".join(ops[:8]) + (", ..." if len(ops) > 8 else "")
            raise NotImplementedError(
                f"no {domain + '.' if domain else ''}{op} kernel ran: onnxruntime {ort_version()} "
                f"{PROVIDERS[self.device]} ran {shown or 'nothing'} in its place (the op's ONNX function "
                "body or another decomposition), not the kernel under test"
            )
        if self.device == "cuda" and placed != [CUDA]:
            raise NotImplementedError(
                f"onnxruntime placed {op} on {', '.join(placed)}, not {CUDA} (no CUDA kernel for these "
                "inputs); a CPU result is never reported as cuda"
            )
        self.meta["provider"] = placed[0]
        if self.kernel is not None:
            self.meta["kernel"] = f"{domain + '.' if domain else ''}{op} on {placed[0]}"


def short_status(exc: BaseException) -> str:
    """onnxruntime's status message without the C++ signature it embeds."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return re.sub(r"\S+\.(?:h|cc):\d+ .*?\) ", "", text)


def ran_nodes(profile_path: str) -> list[tuple[str, str]]:
    """(op type, provider) of every node an onnxruntime profile saw run; removes the file."""
    try:
        with open(profile_path) as f:
            events = json.load(f)
    finally:
        shutil.rmtree(os.path.dirname(profile_path), ignore_errors=True)
    found = []
    for event in events:
        args = event.get("args") or {}
        if (
            event.get("cat") == "Node"
            and "op_name" in args
            and event.get("name", "").endswith("_kernel_time")
        ):
            found.append((args["op_name"], args.get("provider", "")))
    return found


# --- graph parts ------------------------------------------------------------------------


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

    def input(self, name: str, array: np.ndarray, shape: Sequence[int | str] | None = None) -> str:
        """A graph input shaped like ``array`` (or ``shape``, where a string names a dimension
        that varies between runs, e.g. a KV cache's length); float inputs in the session's I/O
        dtype, cast to bfloat16 inside when the graph runs in bfloat16."""
        helper = onnx().helper
        dims = list(array.shape if shape is None else shape)
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
    x = np.zeros((1, 2, 4), np.float32)
    q, k, v = (g.input(n, x) for n in ("q", "k", "v"))
    if op == "Attention":
        (y,) = g.node("Attention", [q, k, v], q_num_heads=2, kv_num_heads=2)
        opsets = {"": 24}
    elif op == "MultiHeadAttention":
        (y,) = g.node(op, [q, k, v], domain=MS_DOMAIN, num_heads=2)
        opsets = {"": DEFAULT_OPSET, MS_DOMAIN: 1}
    else:  # a decomposed attention's core: MatMul (Q K^T), Softmax
        (y,) = g.node("Softmax", g.node("MatMul", [q, g.node("Transpose", [k], perm=[0, 2, 1])[0]]))
        opsets = {"": DEFAULT_OPSET}
    g.output(y, "y", [1, 2, 2] if kernel is None else [1, 2, 4])
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
