"""Multi-head attention under a chosen set of conventions, in float64 NumPy.

The suite fixes one semantics (docs/semantics.md); frameworks and bugs differ
from it along a few axes: where the causal diagonal sits when Tq != Tk, which kv head a query
head reads under grouped-query attention, what a row with no allowed key becomes, what the
default scale is, which polarity a bool mask has. :func:`attention` computes attention with
each axis a knob, so the convention probes (``conformance/probes/conventions.py``) can ask "which of these
does the adapter match?" and the mutants (``impls/variants/mutants.py``) can be the same computation
with one deliberate bug. Written from scratch: ``impls/reference.py`` is the judge, so nothing
here imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Convention:
    """One choice per axis; the defaults are the suite's reference semantics."""

    scale: str = "rsqrt_d"  # default scale: "rsqrt_d" 1/sqrt(hd), "inv_d" 1/hd, "one"
    causal: str = "bottom_right"  # "bottom_right", "top_left", "ignored", "off_by_one"
    mask: str = "true_attends"  # bool mask polarity: "true_attends", "true_blocks", or "ignored"
    empty_rows: str = "zeros"  # a row with no allowed key: "zeros", "nan", "uniform", "unmasked"
    gqa: str = "repeat"  # query head h reads kv head h // group ("repeat") or h % Hkv ("tile")
    softmax_axis: int = -1  # -1: over keys (right); -2: over queries (a bug)
    merge: str = "transpose"  # heads back to [B, T, H*hdv]: "transpose", or "reshape" (a bug)
    key_weights: str = "k"  # project keys with w_k/b_k ("k") or with the value weights ("v", a bug)
    softmax_float32: bool = False  # compute the softmax in float32 (a bug in a float64 run)
    dropout: bool = False  # apply dropout(spec["dropout"]) although this is eval mode (a bug)
    rel_error: float = 0.0  # multiply the output by (1 + rel_error)
    biases: bool = True  # add the biases the case has
    softcap: str = "before_bias"  # contract v2: "before_bias", "after_bias" (the bias capped too), "ignored"
    window: str = "bottom_right"  # a window's query position: "bottom_right", "top_left" (i), "ignored"
    #: A kernel's shape-dependent bug (:data:`KERNEL_BUGS`), exact on every other shape; "" for none.
    kernel: str = ""


#: Tiled kernels' bugs by shape, each only where its shape occurs: keys tiled by TILE, head dims
#: padded to a multiple of 8 up to a largest template of 128, long caches split by SPLIT keys.
TILE, TEMPLATE, SPLIT = 64, 128, 2048
KERNEL_BUGS = {
    "tail_tile_dropped": "keys past the last full 64-key tile ignored (more than one tile, a tail)",
    "tail_tile_unmasked": "the tail tile's padding keys (score 0, value 0) left in the softmax",
    "partial_query_tile_offset": "the last partial query tile (after a full one) takes its causal offset "
    "from a full tile: its queries see up to 63 keys too few",
    "head_dim_padding_garbage": "head dims above 8 padded to a multiple of 8 with the next head's "
    "values instead of zeros",
    "head_dim_truncated": "head dims above the 128 template truncated to 128 in Q K^T",
    "split_k_no_rescale": "caches over 2048 keys split in 2048-key parts whose results are combined "
    "by their sums without rescaling to the common maximum (a few queries)",
    "window_edge_off_by_one": "a window's left edge inside a tile lets one key too many in (past one tile)",
    "length_edge_off_by_one": "a per-batch key length inside a tile lets one key too many in (past one tile)",
}


REFERENCE = Convention()


def _allowed(
    spec: Mapping[str, Any], mask: np.ndarray | None, bias: np.ndarray | None, conv: Convention
) -> np.ndarray:
    b, h, tq, tk = spec["batch"], spec["num_heads"], spec["q_len"], spec["kv_len"]
    allowed = np.ones((b, h, tq, tk), bool)
    if mask is not None and conv.mask != "ignored":
        allowed &= mask if conv.mask == "true_attends" else ~mask
    if bias is not None:
        allowed &= bias > -np.inf
    lengths = spec.get("kv_lengths") or [tk] * b
    for row, length in enumerate(lengths):  # contract v2: each row's keys, aligned to its length
        if conv.kernel == "length_edge_off_by_one" and tk > TILE and length < tk and length % TILE:
            length += 1  # the row is read as one key longer, and aligned to that
        allowed[row, ..., length:] = False
        offset = length - tq
        if spec["causal"] and conv.causal != "ignored":
            shift = {"bottom_right": offset, "top_left": 0, "off_by_one": offset + 1}[conv.causal]
            allowed[row] &= np.tri(tq, tk, k=shift, dtype=bool)
        if conv.kernel == "partial_query_tile_offset" and spec["causal"] and tq > TILE and tq % TILE:
            start = tq // TILE * TILE
            allowed[row, ..., start:, :] &= np.tri(tq, tk, k=offset - (TILE - tq % TILE), dtype=bool)[start:]
        window = spec.get("window")
        if window is not None and conv.window != "ignored":
            shift = offset if conv.window == "bottom_right" else 0
            left, right = window
            if left >= 0:
                edge = ~np.tri(tq, tk, k=shift - left - 1, dtype=bool)
                if conv.kernel == "window_edge_off_by_one" and tk > TILE:
                    first = np.arange(tq) + shift - left  # each query's first key
                    inside = (first > 0) & (first % TILE != 0)
                    edge[inside, first[inside] - 1] = True
                allowed[row] &= edge
            if right >= 0:
                allowed[row] &= np.tri(tq, tk, k=shift + right, dtype=bool)
    if conv.kernel == "tail_tile_dropped" and tk > TILE and tk % TILE:
        allowed[..., tk // TILE * TILE :] = False
    return allowed


def _softmax(scores: np.ndarray, allowed: np.ndarray, conv: Convention) -> np.ndarray:
    """Softmax over allowed entries along ``conv.softmax_axis``; empty rows per ``conv.empty_rows``."""
    axis = conv.softmax_axis
    work = scores.astype(np.float32) if conv.softmax_float32 else scores
    masked = np.where(allowed, work, -np.inf)
    top = np.max(masked, axis=axis, keepdims=True)
    e = np.exp(masked - np.where(np.isfinite(top), top, 0.0))
    total = e.sum(axis=axis, keepdims=True)
    weights = e / np.where(total == 0, 1.0, total)  # an empty row stays 0; a NaN row stays NaN
    empty = ~allowed.any(axis=axis, keepdims=True)
    if conv.empty_rows == "nan":
        weights = np.where(empty, np.nan, weights)
    elif conv.empty_rows == "uniform":
        weights = np.where(empty, 1.0 / scores.shape[axis], weights)
    elif conv.empty_rows == "unmasked":  # the row attends every key as if nothing were masked
        free = np.exp(work - work.max(axis=axis, keepdims=True))
        weights = np.where(empty, free / free.sum(axis=axis, keepdims=True), weights)
    return weights.astype(np.float64)


def attention(
    case: Mapping[str, np.ndarray],
    spec: Mapping[str, Any],
    conv: Convention = REFERENCE,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """``output`` and per-head ``attn_weights`` in float64 for the inputs and weights in ``case``
    (names as in the vector contract), computed under ``conv``."""
    f64 = {n: np.asarray(a, np.float64) for n, a in case.items() if n != "mask"}
    b, tq = spec["batch"], spec["q_len"]
    h, hkv, hd, hdv = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"], spec["v_head_dim"]

    def project(x: str, short: str, heads: int, width: int) -> np.ndarray:
        y = f64[x] @ f64[f"w_{short}"]
        if conv.biases and f"b_{short}" in f64:
            y = y + f64[f"b_{short}"]
        return y.reshape(b, -1, heads, width).transpose(0, 2, 1, 3)  # [B, heads, T, width]

    q = project("query", "q", h, hd)
    k = project("key", conv.key_weights, hkv, hd)
    v = project("value", "v", hkv, hdv)
    group = h // hkv
    kv_head = np.arange(h) // group if conv.gqa == "repeat" else np.arange(h) % hkv
    k, v = k[:, kv_head], v[:, kv_head]
    default = {"rsqrt_d": hd**-0.5, "inv_d": 1.0 / hd, "one": 1.0}[conv.scale]
    scale = spec["scale"] if spec["scale"] is not None else default
    if conv.kernel == "head_dim_truncated" and hd > TEMPLATE:
        scores = q[..., :TEMPLATE] @ k[..., :TEMPLATE].transpose(0, 1, 3, 2) * scale
    else:
        scores = q @ k.transpose(0, 1, 3, 2) * scale
    if conv.kernel == "head_dim_padding_garbage" and hd > 8 and hd % 8:
        pad = 8 - hd % 8  # the padding columns hold the next head's first values
        nxt = (np.arange(h) + 1) % h
        scores = scores + q[:, nxt, :, :pad] @ k[:, nxt, :, :pad].transpose(0, 1, 3, 2) * scale
    bias = f64.get("attn_bias")
    allowed = _allowed(spec, case.get("mask"), bias, conv)
    cap = spec.get("softcap")
    if cap is not None and conv.softcap == "before_bias":
        scores = cap * np.tanh(scores / cap)
    if bias is not None:
        scores = scores + np.where(np.isfinite(bias), bias, 0.0)
    if cap is not None and conv.softcap == "after_bias":
        scores = cap * np.tanh(scores / cap)
    tk = spec["kv_len"]
    if conv.kernel == "tail_tile_unmasked" and tk > TILE and tk % TILE:
        pad = TILE - tk % TILE  # zero scores the softmax should not see, zero values
        scores = np.concatenate([scores, np.zeros(scores.shape[:-1] + (pad,))], -1)
        allowed = np.concatenate(
            [allowed, np.broadcast_to(allowed.any(-1, keepdims=True), allowed.shape[:-1] + (pad,))], -1
        )
        weights = _softmax(scores, allowed, conv)[..., :tk]
        allowed = allowed[..., :tk]
    elif conv.kernel == "split_k_no_rescale" and tk > SPLIT and tq <= 16:
        parts = [slice(j, j + SPLIT) for j in range(0, tk, SPLIT)]
        local = [_softmax(scores[..., p], allowed[..., p], conv) for p in parts]
        sums = []
        for p in parts:  # each part's sum of exp(score - its own max)
            masked = np.where(allowed[..., p], scores[..., p], -np.inf)
            top = masked.max(-1, keepdims=True)
            sums.append(np.exp(masked - np.where(np.isfinite(top), top, 0.0)).sum(-1, keepdims=True))
        total = sum(sums)
        weights = np.concatenate(
            [w * l / np.where(total > 0, total, 1.0) for w, l in zip(local, sums, strict=True)], -1
        )
    else:
        weights = _softmax(scores, allowed, conv)
    if conv.dropout and spec["dropout"] > 0:
        rng = rng if rng is not None else np.random.default_rng()
        keep = rng.random(weights.shape) >= spec["dropout"]
        weights = np.where(keep, weights / (1.0 - spec["dropout"]), 0.0)
    if np.isfinite(v).all():
        ctx = weights @ v  # [B, H, Tq, hdv]
    else:  # a blocked key contributes nothing, not 0 * NaN: sum over allowed keys only
        ctx = np.where(allowed[..., None], weights[..., None] * v[:, :, None], 0.0).sum(-2)
    if conv.merge == "transpose":
        out = ctx.transpose(0, 2, 1, 3).reshape(b, tq, h * hdv)
    else:
        out = ctx.reshape(b, tq, h * hdv)
    if spec["out_proj"]:
        out = out @ f64["w_o"]
        if conv.biases and "b_o" in f64:
            out = out + f64["b_o"]
    return {"output": out * (1.0 + conv.rel_error), "attn_weights": weights}
