"""Finding adapters: built-in names, ``package.module:attr`` paths, and entry points."""

from __future__ import annotations

import importlib
from fnmatch import fnmatchcase
from importlib.metadata import entry_points
from typing import Any

from mha_conformance.impls.adapter import Adapter, FunctionAdapter

ENTRY_POINT_GROUP = "mha_conformance.adapters"

#: Built-in adapters by name, and the nox environment (pip extra) each runs in.
BUILTINS: dict[str, str] = {
    "torch-mha": "mha_conformance.impls.torch.mha:TorchMHA",
    "torch-mha-noweights": "mha_conformance.impls.torch.mha:TorchMHANoWeights",
    "torch-mha-fastpath": "mha_conformance.impls.torch.mha:TorchMHAFastPath",
    "torch-sdpa": "mha_conformance.impls.torch.sdpa:TorchSDPA",
    "torch-scratch": "mha_conformance.impls.torch.scratch:TorchScratch",
    "torch-wrapper": "mha_conformance.impls.torch.wrapper:TorchWrapper",
    "torch-flex": "mha_conformance.impls.torch.flex:TorchFlex",
    "torch-flex-compiled": "mha_conformance.impls.torch.flex:TorchFlexCompiled",
    "onnx-export": "mha_conformance.impls.onnx.export:OnnxExport",
    "onnx-export-attention": "mha_conformance.impls.onnx.export:OnnxExportAttention",
    "onnx-attention": "mha_conformance.impls.onnx.attention:OnnxAttention",
    "onnx-contrib-mha": "mha_conformance.impls.onnx.contrib:OnnxContribMHA",
    "onnx-contrib-gqa": "mha_conformance.impls.onnx.gqa:OnnxContribGQA",
    "onnx-reference": "mha_conformance.impls.onnx.attention:OnnxReference",
    "jax-sdpa": "mha_conformance.impls.jax.sdpa:JaxSDPA",
    "flax-mha": "mha_conformance.impls.jax.flax_mha:FlaxMHA",
    "flax-mha-weights": "mha_conformance.impls.jax.flax_mha:FlaxMHAWeights",
    "keras-mha": "mha_conformance.impls.keras.mha:KerasMHA",
    "keras-mha-scores": "mha_conformance.impls.keras.mha:KerasMHAScores",
    "keras-mha-jax": "mha_conformance.impls.keras.mha:KerasMHAJax",
    "keras-mha-scores-jax": "mha_conformance.impls.keras.mha:KerasMHAScoresJax",
    "keras-mha-torch": "mha_conformance.impls.keras.mha:KerasMHATorch",
    "keras-mha-scores-torch": "mha_conformance.impls.keras.mha:KerasMHAScoresTorch",
    "keras-ops-sdpa": "mha_conformance.impls.keras.ops_sdpa:KerasOpsSDPA",
    "keras-ops-sdpa-jax": "mha_conformance.impls.keras.ops_sdpa:KerasOpsSDPAJax",
    "keras-ops-sdpa-torch": "mha_conformance.impls.keras.ops_sdpa:KerasOpsSDPATorch",
}


class AdapterError(Exception):
    """An --adapter value that names nothing loadable."""


def load_object(ref: str) -> Any:
    """Import ``package.module:attr`` (attr may be dotted)."""
    module_name, _, attr = ref.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise AdapterError(f"adapter {ref!r}: cannot import module {module_name!r} ({exc})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AdapterError(f"adapter {ref!r}: module {module_name!r} has no attribute {attr!r}") from None
    return obj


def as_adapter(obj: Any, name: str) -> Adapter:
    """An Adapter instance from an instance, an Adapter subclass, or a plain function."""
    if isinstance(obj, Adapter):
        return obj
    if isinstance(obj, type) and issubclass(obj, Adapter):
        return obj()
    if callable(obj):
        return FunctionAdapter(obj, name)
    raise AdapterError(f"adapter {name!r} is a {type(obj).__name__}, not a function or an Adapter")


def builtin(name: str) -> Adapter:
    adapter = as_adapter(load_object(BUILTINS[name]), name)
    return adapter


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def resolve(refs: list[str]) -> list[Adapter]:
    """Adapters for ``--adapter`` values: built-in names (globs allowed), entry-point names,
    or ``package.module:attr``. Raises AdapterError naming what is available."""
    adapters: dict[str, Adapter] = {}
    eps = _entry_points()
    for ref in refs:
        builtins = [n for n in BUILTINS if fnmatchcase(n, ref)]
        if builtins:
            found = {n: (builtin(n), n) for n in builtins}
        elif ref in eps:
            found = {ref: (as_adapter(eps[ref].load(), ref), ref)}
        elif ":" in ref:
            found = {ref: (as_adapter(load_object(ref), ref), ref)}
        else:
            known = ", ".join(list(BUILTINS) + list(eps))
            raise AdapterError(
                f"unknown adapter {ref!r}: use a built-in or registered name ({known}) or package.module:attr"
            )
        for name, (adapter, how) in found.items():
            adapter.ref = how  # how a worker process finds the same adapter again
            adapters[name] = adapter
    return list(adapters.values())
