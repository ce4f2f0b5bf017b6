"""``onnx-export`` and ``onnx-export-attention``: the case's module exported with
``torch.onnx.export`` and run by onnxruntime, the way attention ships as an ONNX model.

The module is ``torch-sdpa``'s computation (``x @ W + b`` projections and
``F.scaled_dot_product_attention`` with the case's scale, grouped-query flag and mask, the
bottom-right causal rule as an explicit bool mask unless Tq == Tk) holding the case's
weights. It goes through the default (dynamo) exporter twice:

* ``onnx-export``: the default opset, where SDPA is decomposed into MatMul/Softmax nodes;
* ``onnx-export-attention``: opset 23, where the exporter lowers SDPA to the standard
  ``Attention`` op (the session proves onnxruntime's ``Attention`` kernel ran).

Exported models are cached on disk (``.cache/onnx/`` under the repository, or
``$MHA_ONNX_CACHE``) under a key of case id, dtype, opset, torch and onnxscript versions and
a digest of the case's spec and weights and of this module's export recipe, written
atomically; a second run exports nothing. ``meta["export"]`` says which happened.
Exporting costs about 0.6 s per case and dtype on a 2-core machine (two minutes for a full
run's 214 models), so these adapters run float32 and float16, the dtypes ONNX models ship in.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from mha_conformance.impls import cache
from mha_conformance.impls.adapter import Arrays, Divergence, Prepared, Spec, has_empty_rows
from mha_conformance.impls.onnx.attention import OnnxAttention
from mha_conformance.impls.onnx.common import OnnxRuntimeAdapter
from mha_conformance.impls.onnx.runtime import Session, from_io, onnx, ort_version, to_io

CACHE_ENV = "MHA_ONNX_CACHE"
FINFO_MIN_MASK = (
    "torch.onnx's SDPA lowering below opset 23 turns the bool attn_mask into an additive mask of "
    "finfo(dtype).min (-3.4e38 in float32), not -inf, so a query row with no allowed key has all-equal "
    "scores and gets uniform weights 1/Tk (the mean of the values; measured within 1.3e-7 of that) and its "
    "IsNaN guard never fires, where eager SDPA and the reference give zeros (errors 0.47-0.94 in float32)"
)


def cache_dir() -> Path:
    """Where exported models live: ``$MHA_ONNX_CACHE``, else ``onnx/`` in the suite's cache
    (``impls/cache.py``)."""
    return Path(os.environ.get(CACHE_ENV) or cache.root() / "onnx")


def import_torch():
    import torch

    return torch


def sdpa_module(case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str):
    """torch-sdpa's computation as an ``nn.Module`` holding the case's weights in ``dtype``.

    bfloat16 modules take and return float32 (a cast inside, exact for the golden values)."""
    t = import_torch()
    b, tq, tk = spec["batch"], spec["q_len"], spec["kv_len"]
    h, hkv, hd, hdv = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"], spec["v_head_dim"]
    compute = getattr(t, dtype)

    class SDPAttention(t.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name, array in case.items():
                if name[:2] in ("w_", "b_"):
                    self.register_buffer(name, t.from_numpy(np.asarray(array, np.float32)).to(compute))
            causal = t.ones(tq, tk, dtype=t.bool).tril(diagonal=tk - tq)  # bottom-right aligned
            self.register_buffer("causal", causal[None, None])

        def project(self, x, short: str, heads: int, width: int):
            y = x @ getattr(self, f"w_{short}")
            if hasattr(self, f"b_{short}"):
                y = y + getattr(self, f"b_{short}")
            return y.view(b, -1, heads, width).transpose(1, 2)

        def forward(self, query, key, value, mask=None):
            q = self.project(query.to(compute), "q", h, hd)
            k = self.project(key.to(compute), "k", hkv, hd)
            v = self.project(value.to(compute), "v", hkv, hdv)
            top_left_causal = spec["causal"] and tq == tk and mask is None
            allowed = mask
            if spec["causal"] and not top_left_causal:
                allowed = self.causal if mask is None else mask & self.causal
            ctx = t.nn.functional.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=allowed,
                is_causal=top_left_causal,
                scale=spec["scale"],
                enable_gqa=hkv != h,
            )
            out = ctx.transpose(1, 2).reshape(b, tq, h * hdv)
            if spec["out_proj"]:
                out = out @ self.w_o
                if hasattr(self, "b_o"):
                    out = out + self.b_o
            return out.to(t.float32) if dtype == "bfloat16" else out

    return SDPAttention().eval()


_REGISTRIES: dict[int, Any] = {}


@contextmanager
def reused_op_registry() -> Iterator[None]:
    """Build torch.onnx's table of torchlib translations once per opset instead of once per export.

    ``torch.onnx.export`` rebuilds it on every call (``ONNXRegistry.from_torchlib``, about 0.9 s
    of the 1.2 s an export of a small case takes here) although it is the same table each time:
    only ``custom_translation_table``, which these adapters do not pass, changes it. The
    exporter is otherwise untouched. Where torch's internals differ from 2.13's, exports
    simply run without this shortcut."""
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:
        yield
        return
    original = _registration.ONNXRegistry.__dict__.get("from_torchlib")
    if not isinstance(original, classmethod):
        yield
        return

    def from_torchlib(cls, opset_version=None, **kwargs):
        if opset_version is None or kwargs:  # not the exporter's own call: no shortcut
            return original.__func__(
                cls, **({"opset_version": opset_version} if opset_version else {}), **kwargs
            )
        if opset_version not in _REGISTRIES:
            _REGISTRIES[opset_version] = original.__func__(cls, opset_version=opset_version)
        return _REGISTRIES[opset_version]

    _registration.ONNXRegistry.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        _registration.ONNXRegistry.from_torchlib = original


def cache_key(case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str, opset: int | None) -> str:
    """The cached model's file name: everything the exported model depends on."""
    import onnxscript

    digest = hashlib.sha256(inspect.getsource(sdpa_module).encode())
    digest.update(json.dumps(spec, sort_keys=True).encode())
    for name in sorted(case):
        array = case[name]
        digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
        if name[:2] in ("w_", "b_"):
            digest.update(np.ascontiguousarray(array).tobytes())
    versions = f"torch{import_torch().__version__}-onnxscript{onnxscript.__version__}".replace("+", "_")
    return f"{spec['id']}.{dtype}.opset{opset or 'default'}.{versions}.{digest.hexdigest()[:16]}.onnx"


def exported_model(
    case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str, opset: int | None
) -> tuple[Path, str]:
    """The path of the case's exported model (exported now, or found in the cache) and what happened."""
    path = cache_dir() / cache_key(case, spec, dtype, opset)
    if path.exists():
        return path, "cached"
    t = import_torch()
    names = ["query", "key", "value"] + (["mask"] if "mask" in case else [])
    host = "float32" if dtype == "bfloat16" else dtype
    args = tuple(
        t.from_numpy(np.ascontiguousarray(case[n] if n == "mask" else np.asarray(case[n], np.dtype(host))))
        for n in names
    )
    start = time.perf_counter()
    exporter_log = logging.getLogger("torch.onnx")  # torch's stderr handler would print its notes
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), t.no_grad(), reused_op_registry():
            warnings.simplefilter("ignore")  # the exporter's deprecation chatter is not the user's concern
            program = t.onnx.export(
                sdpa_module(case, spec, dtype),
                args,
                dynamo=True,
                opset_version=opset,
                verbose=False,
                input_names=names,
                output_names=["output"],
            )
    finally:
        exporter_log.setLevel(level)
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:  # atomic: a reader never sees half a model, concurrent writers just replace each other
        onnx().save_model(program.model_proto, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path, f"exported in {seconds:.2f} s"


class OnnxExport(OnnxRuntimeAdapter):
    name = "onnx-export"
    path = (
        "torch-sdpa's module with the case's weights through torch.onnx.export(dynamo=True) at the default "
        "opset (SDPA decomposed into MatMul/Softmax), run by onnxruntime"
    )
    dtypes = ("float32", "float16")
    # The exported module is traced for contract v1's inputs; the variants are not wired into it.
    cannot_express = {
        v: f"the exported graph is traced from torch-sdpa's module for contract v1's inputs; {v} is not wired "
        "into the export (torch-sdpa and onnx-attention run it)"
        for v in ("attn_bias", "softcap", "window", "kv_lengths")
    }
    divergences = (Divergence(FINFO_MIN_MASK, check="golden", when=has_empty_rows),)
    #: None = the exporter's default opset.
    opset: int | None = None
    #: No single kernel: the decomposed attention's MatMul/Softmax nodes show where it ran.
    kernel = None

    def supports(self, spec: Spec, dtype: str, device: str) -> str | None:
        return self.kernel_problem(dtype, device)

    def versions(self) -> dict[str, str]:
        import onnxscript

        return {
            **super().versions(),
            "torch": import_torch().__version__,
            "onnxscript": onnxscript.__version__,
        }

    def timed_model(self, case, spec, dtype):
        """The exported model's path (from the cache when it is there), its input names, and
        where it came from; the kernel under test must be in it."""
        path, how = exported_model(case, spec, dtype, self.opset)
        model = onnx().load(str(path), load_external_data=False)
        opset = next(str(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))
        emitted = {n.op_type for n in model.graph.node}
        if self.kernel is not None and self.kernel[0] not in emitted:
            raise NotImplementedError(
                f"torch.onnx.export at opset {opset} emitted no {self.kernel[0]} node for case {spec['id']} "
                f"(it emitted {', '.join(sorted(emitted))})"
            )
        names = [i.name for i in model.graph.input]
        return str(path), names, {"opset": opset, "export": how, "model": path.name}

    def prepare(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        path, names, about = self.timed_model(case, spec, dtype)
        session = Session(path, device, self.kernel, f"{self.name}: case {spec['id']} in {dtype}")

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            (out,) = session.run({n: to_io(inputs[n], dtype) for n in names})
            meta = {**session.meta, **about, "onnxruntime": ort_version()}
            return {"output": from_io(out, dtype), "meta": meta}

        return run


class OnnxExportAttention(OnnxExport):
    name = "onnx-export-attention"
    path = (
        "the same module through torch.onnx.export(dynamo=True, opset_version=23): SDPA lowered to the "
        "standard ONNX Attention op, run by onnxruntime's Attention kernel"
    )
    opset = 23
    kernel = ("Attention", "")
    divergences = OnnxAttention.divergences
