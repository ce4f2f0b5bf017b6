"""What the JAX adapters share: x64 mode, devices, conversions, and the process-wide jit cache."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

import numpy as np

from mha_conformance.impls import cache as caches
from mha_conformance.impls.adapter import Adapter, has_empty_rows, rule_mask  # noqa: F401 (re-exported)


def import_jax():
    """JAX with float64 enabled (needed before any float64 array exists; no effect on other dtypes,
    since every array here is created with an explicit dtype) and the suite's persistent
    compilation cache (``impls/cache.py``: a warm run compiles nothing)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    caches.jax_persistent_cache(jax)
    return jax


@cache
def jitted(fn: Callable[..., Any], *static: str) -> Callable[..., Any]:
    """``jax.jit(fn, static_argnames=static)``, made once per process for a module-level ``fn``.

    Every prepared case calls the same jitted function with its weights as arguments and its
    structure (head counts, scale, causal alignment, the Flax graph) as static arguments, so
    XLA compiles once per distinct structure, shapes and dtypes in the process, not once per
    prepared case: cases that differ only in their numbers (most of the catalogue shares a
    handful of shapes) and the head-permutation property's renumbered copies reuse one
    executable, and a prepared case evicted from the suite's cache costs no recompile.
    """
    return import_jax().jit(fn, static_argnames=static)


class JaxAdapter(Adapter):
    framework = "jax"
    extra = "jax"
    device_kinds = ("cpu", "cuda")

    def devices(self) -> list[str]:
        return ["cpu", "cuda"] if self._gpus() else ["cpu"]

    def _gpus(self) -> list[Any]:
        try:
            return import_jax().devices("gpu")
        except RuntimeError:  # no GPU backend in this jaxlib
            return []

    def device(self, device: str):
        return self._gpus()[0] if device == "cuda" else import_jax().devices("cpu")[0]

    def device_name(self, device: str) -> str:
        return self.device(device).device_kind if device == "cuda" else super().device_name(device)

    def versions(self) -> dict[str, str]:
        import jaxlib

        return {"jax": import_jax().__version__, "jaxlib": jaxlib.__version__}

    def put(self, array: np.ndarray, dtype: str, device: str):
        """A NumPy array (ml_dtypes bfloat16 included) as a jax array of ``dtype`` on ``device``."""
        j = import_jax()
        target = np.bool_ if array.dtype == np.bool_ else np.dtype(getattr(j.numpy, dtype))
        return j.device_put(np.asarray(array, dtype=target), self.device(device))

    def fetch(self, out, dtype: str, device: str) -> np.ndarray:
        """Back to NumPy after checking the result really lives on ``device``."""
        platforms = {d.platform for d in out.devices()}
        wanted = "gpu" if device == "cuda" else "cpu"
        if platforms != {wanted}:
            raise RuntimeError(f"result is on {platforms}, but the test asked for {device}")
        host = np.asarray(out)
        if str(host.dtype) != dtype:
            raise RuntimeError(f"result is {host.dtype}, not the requested {dtype}")
        return host


UNIFORM_ROWS = (
    "a query row with no allowed key gets uniform weights 1/Tk (masked logits are replaced by the dtype's "
    "large negative value, not excluded), so its context is the mean of all values, or NaN where the row's "
    "additive bias is -inf at every key (the bias enters the logits before the mask, and a softmax over a "
    "row of -inf is 0/0), where the reference gives zeros"
)


def several_keys_per_row(spec: Mapping[str, Any]) -> bool:
    """Does some query attend more than one key? Only there can a softmax's precision show (with
    one key per row every weight is exactly 1)."""
    mask = spec.get("mask")
    return (
        spec["kv_len"] > 1
        and not (mask and mask["kind"] == "diagonal")
        and tuple(spec.get("window") or (-1, -1)) != (0, 0)
        and not spec["fully_masked_rows"]
    )


def allowed(spec: dict, mask: np.ndarray | None, window: bool = True) -> np.ndarray | None:
    """Bool [B|1, 1|H, Tq, Tk], True = may attend: the case mask AND the bottom-right causal rule,
    each row's key length and, with ``window``, the window (``impls.adapter.rule_mask``)."""
    return rule_mask(spec, mask, window=window)
