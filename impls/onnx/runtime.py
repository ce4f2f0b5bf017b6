"""onnxruntime at the session's edge: providers, lazy imports, dtypes across the boundary, and a
profiled session that proves which provider ran the attention kernel. A leaf module: the graph
builders, the adapters and their timed bodies all read it."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDERS = {"cpu": CPU, "cuda": CUDA}
#: Opsets of the graphs built here: the default domain's, and com.microsoft's.
DEFAULT_OPSET = 21
MS_DOMAIN = "com.microsoft"
#: Ops that carry a decomposed attention's arithmetic (onnxruntime fuses some, e.g. FusedMatMul).
COMPUTE_OPS = frozenset({"MatMul", "FusedMatMul", "Gemm", "Softmax"})


def import_onnxruntime():  # imported lazily so the suite collects without onnxruntime installed
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
    return import_onnxruntime().__version__


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
        rt = import_onnxruntime()
        self.device, self.kernel, self.what = device, kernel, what
        options = rt.SessionOptions()
        options.log_severity_level = 4  # failures surface as exceptions; onnxruntime must not print
        if threads is None:
            # No busy-waiting between runs: the suite runs one small model at a time and compares
            # its outputs in between, and the pool's spinning threads took the cores from that
            # work (the onnx backend's warm run: 48 s spinning, 22 s not; same threads, so the
            # same outputs bit for bit). Timed sessions keep onnxruntime's default.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        else:
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
