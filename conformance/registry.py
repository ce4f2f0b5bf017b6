"""Finding adapters: built-in names, ``package.module:attr`` paths, and entry points."""

from __future__ import annotations

import importlib
from fnmatch import fnmatchcase
from importlib.metadata import entry_points
from typing import Any

from impls.adapter import Adapter, FunctionAdapter

ENTRY_POINT_GROUP = "mha_conformance.adapters"

#: Built-in adapters by name, and the nox environment (pip extra) each runs in.
BUILTINS: dict[str, str] = {
    "torch-mha": "impls.torch_mha:TorchMHA",
    "torch-mha-noweights": "impls.torch_mha:TorchMHANoWeights",
    "torch-mha-fastpath": "impls.torch_mha:TorchMHAFastPath",
    "torch-sdpa": "impls.torch_sdpa:TorchSDPA",
    "torch-scratch": "impls.torch_scratch:TorchScratch",
    "torch-wrapper": "impls.torch_wrapper:TorchWrapper",
    "onnx-export": "impls.onnx_export:OnnxExport",
    "onnx-export-attention": "impls.onnx_export:OnnxExportAttention",
    "onnx-attention": "impls.onnx_attention:OnnxAttention",
    "onnx-contrib-mha": "impls.onnx_contrib:OnnxContribMHA",
    "jax-sdpa": "impls.jax_sdpa:JaxSDPA",
    "flax-mha": "impls.flax_mha:FlaxMHA",
    "flax-mha-weights": "impls.flax_mha:FlaxMHAWeights",
    "keras-mha": "impls.keras_mha:KerasMHA",
    "keras-mha-scores": "impls.keras_mha:KerasMHAScores",
    "keras-mha-jax": "impls.keras_mha:KerasMHAJax",
    "keras-mha-scores-jax": "impls.keras_mha:KerasMHAScoresJax",
    "keras-mha-torch": "impls.keras_mha:KerasMHATorch",
    "keras-mha-scores-torch": "impls.keras_mha:KerasMHAScoresTorch",
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
