"""What the Keras adapters (``impls/keras/mha.py``) are known to do differently from the
reference, with the measured reasons: data, not branches (see ``Adapter.divergences``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mha_conformance.impls.adapter import Divergence, has_empty_rows


def scale_inexact_in_float32(spec: Mapping[str, Any]) -> bool:
    """Is the default scale 1/sqrt(head_dim) not exact in float32 (head_dim 2, 5, 8, 128, ...)?"""
    scale = 1.0 / np.sqrt(spec["head_dim"])
    return spec["scale"] is None and float(np.float32(scale)) != scale


def fused(spec: Mapping[str, Any]) -> bool:
    """Cases Keras runs through its fused ops.dot_product_attention: with dropout declared (even in
    eval mode) it takes its explicit path instead."""
    return spec["dropout"] == 0


TF_SCALE_ROUNDING = (
    "on TensorFlow, Keras turns the Python-float scale 1/sqrt(key_dim) into a float32 tensor before casting "
    "it to the compute dtype (tf.cast of a Python float), so under a float64 policy every logit carries the "
    "scale's float32 rounding: ~3e-8 relative error whenever 1/sqrt(head_dim) is not exact in float32"
)
FLOAT64_TO_FLOAT32 = (
    "Keras's fused ops.dot_product_attention casts q, k and v to backend.result_type('float64', 'float64'), "
    "which is 'float32' under the default floatx, so attention in a float64 layer runs in float32: ~1e-7 "
    "relative error"
)
UNIFORM_ROWS = (
    "a query row with no allowed key gets uniform weights 1/Tk (masked scores are set to a large negative "
    "number, not excluded), so its context is the mean of all values, where the reference gives zeros"
)
JAX_VALUE_WIDTH = (
    "the JAX backend's dot_product_attention cannot take values wider than keys (TypeError: cannot reshape), "
    "although MultiHeadAttention(value_dim != key_dim) accepts the configuration"
)


def fused_with_empty_rows(spec: Mapping[str, Any]) -> bool:
    """A query row with no allowed key, on the fused path."""
    return has_empty_rows(spec) and fused(spec)


def values_wider_than_keys(spec: Mapping[str, Any]) -> bool:
    """Value heads wider (or narrower) than query and key heads."""
    return spec["v_head_dim"] != spec["head_dim"]


def keras_divergences(path: str, *, fused_path: bool, tensorflow: bool) -> tuple[Divergence, ...]:
    """The semantic divergences of one Keras path (fused or explicit, on one backend), for the golden
    and gradient checks (Keras 3.15; TensorFlow 2.21, JAX 0.10.2, torch 2.13). The properties compare
    the layer with itself, which none of these disturbs."""
    found: list[tuple[str, str, Any]] = []
    if fused_path:
        found.append((UNIFORM_ROWS, "*", fused_with_empty_rows))
        if not tensorflow:
            found.append((FLOAT64_TO_FLOAT32, "float64", fused))
    if tensorflow:
        found.append((TF_SCALE_ROUNDING, "float64", scale_inexact_in_float32))
    return tuple(
        Divergence(f"{path}: {reason}", check=check, dtype=dtype, when=when)
        for reason, dtype, when in found
        for check in ("golden", "gradients")
    )
