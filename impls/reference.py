"""The float64 NumPy reference multi-head attention: the truth every adapter is held to.

Canonical semantics (README, "Reference semantics"):

* ``query`` [B, Tq, d_in], ``key`` [B, Tk, kdim], ``value`` [B, Tk, vdim].
* Projections ``y = x @ W + b`` with W stored [in, out]; biases are optional.
* Head h owns columns ``h*hd:(h+1)*hd``; with grouped-query attention (Hkv < H) query
  head h reads kv head ``h // (H // Hkv)``.
* ``scores = Q K^T * scale`` with ``scale`` defaulting to ``1/sqrt(hd)``.
* A key j is allowed for query i when ``mask[b, h, i, j]`` (True = may attend, broadcast
  from [B|1, H|1, Tq, Tk]) and, when causal, ``j <= i + (Tk - Tq)`` (bottom-right aligned).
* Softmax over allowed keys, max-subtracted; a row with no allowed key gives weights 0
  and a context row of 0, never NaN.
* Heads are concatenated to [B, Tq, H*hdv]; the output projection is optional.

The same forward also runs in emulated low precision (:class:`Precision`), which is how
the generator measures each dtype's precision baseline. This module imports nothing but
NumPy, so the truth never depends on a framework under test.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

Array = np.ndarray

#: Weight and bias names in the order the projections use them.
PROJECTIONS = (("q", "query"), ("k", "key"), ("v", "value"), ("o", None))


# --------------------------------------------------------------------------- precision


def round_to_bfloat16(x: Array) -> Array:
    """Round to the nearest bfloat16 value (ties to even), returned as float32.

    bfloat16 is the top half of a float32, so rounding is integer arithmetic on the bits.
    NaN stays NaN; values past the bfloat16 range become Inf, as on hardware.
    """
    f = np.asarray(x, dtype=np.float32)
    bits = f.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(f), f, out)


@dataclass(frozen=True)
class Precision:
    """How the reference computes when it emulates a dtype.

    ``storage`` is the dtype every intermediate tensor is rounded to after each step
    (projection, scores, softmax weights, context, output); ``accumulate`` is the dtype
    in which each step's products and sums are formed. Half types accumulate in float32,
    as tensor-core GEMMs and fused attention kernels do.
    """

    name: str
    accumulate: type

    def round(self, x: Array) -> Array:
        if self.name == "bfloat16":
            return round_to_bfloat16(x)
        if self.name == "float16":
            return np.asarray(x).astype(np.float16).astype(np.float32)
        return np.asarray(x, dtype=self.accumulate)

    def acc(self, x: Array) -> Array:
        return np.asarray(x, dtype=self.accumulate)


PRECISIONS = {
    "float64": Precision("float64", np.float64),
    "float32": Precision("float32", np.float32),
    "float16": Precision("float16", np.float32),
    "bfloat16": Precision("bfloat16", np.float32),
}
FLOAT64 = PRECISIONS["float64"]


# ----------------------------------------------------------------------------- forward


@dataclass
class Forward:
    """Everything the forward pass computed; the backward pass reads the intermediates."""

    output: Array  # [B, Tq, d_out]
    attn_weights: Array  # [B, H, Tq, Tk]
    allowed: Array  # [B, H, Tq, Tk] bool
    q: Array  # [B, H, Tq, hd] (kv heads already repeated for q, k, v)
    k: Array  # [B, H, Tk, hd]
    v: Array  # [B, H, Tk, hdv]
    context: Array  # [B, Tq, H*hdv], before the output projection
    scale: float


def default_scale(spec: Mapping[str, Any]) -> float:
    """The softmax scale: the spec's own, else 1/sqrt(head_dim)."""
    scale = spec.get("scale")
    return float(scale) if scale is not None else 1.0 / float(np.sqrt(spec["head_dim"]))


def allowed_keys(spec: Mapping[str, Any], mask: Array | None) -> Array:
    """Boolean [B, H, Tq, Tk]: may query i of head h attend key j?

    Combines the explicit mask (True = may attend) with the causal rule ``j <= i + Tk - Tq``,
    which is bottom-right aligned: the last query sees every key, as in KV-cache decoding.
    """
    b, h, tq, tk = spec["batch"], spec["num_heads"], spec["q_len"], spec["kv_len"]
    allowed = np.ones((b, h, tq, tk), dtype=bool)
    if mask is not None:
        allowed &= np.broadcast_to(np.asarray(mask, dtype=bool), allowed.shape)
    if spec["causal"]:
        i = np.arange(tq)[:, None]
        j = np.arange(tk)[None, :]
        allowed &= j <= i + (tk - tq)
    return allowed


def _split_heads(x: Array, heads: int, width: int) -> Array:
    """[B, T, heads*width] -> [B, heads, T, width]."""
    b, t, _ = x.shape
    return x.reshape(b, t, heads, width).transpose(0, 2, 1, 3)


def _merge_heads(x: Array) -> Array:
    """[B, heads, T, width] -> [B, T, heads*width]."""
    b, h, t, w = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * w)


def _linear(p: Precision, x: Array, w: Array, b: Array | None) -> Array:
    y = p.acc(x) @ p.acc(w)
    if b is not None:
        y = y + p.acc(b)
    return p.round(y)


def masked_softmax(p: Precision, scores: Array, allowed: Array) -> Array:
    """Softmax over the allowed keys of each row; rows with none allowed give zeros."""
    any_allowed = allowed.any(axis=-1, keepdims=True)
    row_max = np.where(allowed, scores, -np.inf).max(axis=-1, keepdims=True)
    row_max = np.where(any_allowed, row_max, 0.0)
    # exp(-inf) = 0 for keys that may not be attended, without overflow warnings.
    exps = np.exp(p.acc(np.where(allowed, scores - row_max, -np.inf)))
    denom = exps.sum(axis=-1, keepdims=True)
    weights = exps / np.where(denom > 0, denom, 1.0)
    return p.round(weights)


def forward(tensors: Mapping[str, Array], spec: Mapping[str, Any], precision: Precision = FLOAT64) -> Forward:
    """Multi-head attention forward pass.

    ``tensors`` holds ``query key value w_q w_k w_v`` (and ``w_o`` when ``out_proj``),
    the biases the case has (``b_q b_k b_v b_o``) and optionally ``mask``. In the default
    float64 precision this is the truth; other precisions emulate a dtype (see
    :class:`Precision`) to measure what that dtype can achieve.
    """
    p = precision
    h, hkv = spec["num_heads"], spec["num_kv_heads"]
    hd, hdv = spec["head_dim"], spec["v_head_dim"]
    if h % hkv:
        raise ValueError(f"case {spec.get('id')}: num_heads {h} not divisible by num_kv_heads {hkv}")
    group = h // hkv
    scale = default_scale(spec)

    def get(name: str) -> Array | None:
        value = tensors.get(name)
        return None if value is None else p.round(value)

    q = _split_heads(_linear(p, get("query"), get("w_q"), get("b_q")), h, hd)
    k = _split_heads(_linear(p, get("key"), get("w_k"), get("b_k")), hkv, hd)
    v = _split_heads(_linear(p, get("value"), get("w_v"), get("b_v")), hkv, hdv)
    k = np.repeat(k, group, axis=1)  # query head h reads kv head h // group
    v = np.repeat(v, group, axis=1)

    allowed = allowed_keys(spec, tensors.get("mask"))
    scores = p.round((p.acc(q) @ p.acc(k).swapaxes(-1, -2)) * p.accumulate(scale))
    weights = masked_softmax(p, scores, allowed)
    context = _merge_heads(p.round(p.acc(weights) @ p.acc(v)))
    output = _linear(p, context, get("w_o"), get("b_o")) if spec["out_proj"] else context
    return Forward(output, weights, allowed, q, k, v, context, scale)


# ---------------------------------------------------------------------------- backward


def _sum_groups(x: Array, group: int) -> Array:
    """[B, H, T, w] -> [B, H/group, T, w]: gradients of repeated kv heads add up."""
    b, h, t, w = x.shape
    return x.reshape(b, h // group, group, t, w).sum(axis=2)


def backward(
    tensors: Mapping[str, Array],
    spec: Mapping[str, Any],
    grad_output: Array,
    precision: Precision = FLOAT64,
    projection_grads: dict[str, Array] | None = None,
) -> dict[str, Array]:
    """Gradients of ``sum(output * grad_output)`` with respect to every input and weight.

    Returns ``grad_<name>`` for ``query key value`` and every weight and bias present.
    ``query``, ``key`` and ``value`` are treated as separate arguments even when a
    self-attention case stores the same array three times. In the default float64 this is
    the truth; another precision emulates a dtype as the forward does: the backward runs on
    the emulated forward's rounded intermediates, and each step (a matmul, the softmax
    backward, a sum over tokens or kv groups) is formed in the accumulation dtype and its
    result rounded to the storage dtype, as autograd does with its half-precision kernels.
    ``projection_grads``, when given, receives the gradients of the projections' outputs
    (``q k v``, [B, T, width]), from which the bias gradients are sums over tokens.
    """
    p = precision
    fw = forward(tensors, spec, p)
    h, hdv = spec["num_heads"], spec["v_head_dim"]
    group = h // spec["num_kv_heads"]
    grads: dict[str, Array] = {}

    def matmul(x: Array, y: Array) -> Array:
        return p.round(p.acc(x) @ p.acc(y))

    def token_sum(x: Array) -> Array:  # bias gradients: a sum over batch and tokens
        return p.round(p.acc(x).sum(axis=(0, 1)))

    def weight_grad(x: Array, d_y: Array) -> Array:  # x^T d_y over batch and tokens
        return p.round(np.einsum("bti,bto->io", p.acc(x), p.acc(d_y)))

    d_context = p.round(grad_output)
    if spec["out_proj"]:
        grads["grad_w_o"] = weight_grad(fw.context, d_context)
        if "b_o" in tensors:
            grads["grad_b_o"] = token_sum(d_context)
        d_context = matmul(d_context, p.round(tensors["w_o"]).T)

    d_ctx_heads = _split_heads(d_context, h, hdv)  # [B, H, Tq, hdv]
    w = fw.attn_weights
    d_w = matmul(d_ctx_heads, fw.v.swapaxes(-1, -2))
    d_v = matmul(w.swapaxes(-1, -2), d_ctx_heads)
    wa, d_wa = p.acc(w), p.acc(d_w)
    d_scores = p.round(wa * (d_wa - (d_wa * wa).sum(axis=-1, keepdims=True)))  # zero where masked
    scale = p.accumulate(fw.scale)
    d_q = p.round((p.acc(d_scores) @ p.acc(fw.k)) * scale)
    d_k = p.round((p.acc(d_scores).swapaxes(-1, -2) @ p.acc(fw.q)) * scale)

    projected = {
        "q": _merge_heads(d_q),
        "k": _merge_heads(p.round(_sum_groups(p.acc(d_k), group))),
        "v": _merge_heads(p.round(_sum_groups(p.acc(d_v), group))),
    }
    if projection_grads is not None:
        projection_grads.update(projected)
    for short, input_name in PROJECTIONS[:3]:
        d_y = projected[short]
        grads[f"grad_w_{short}"] = weight_grad(p.round(tensors[input_name]), d_y)
        if f"b_{short}" in tensors:
            grads[f"grad_b_{short}"] = token_sum(d_y)
        grads[f"grad_{input_name}"] = matmul(d_y, p.round(tensors[f"w_{short}"]).T)
    return grads


# ------------------------------------------------------------------- error magnitudes


def error_scales(tensors: Mapping[str, Array], spec: Mapping[str, Any]) -> dict[str, dict]:
    """The magnitudes that bound float rounding error in ``output`` and ``attn_weights``.

    A length-n dot product computed in floating point errs by about ``sqrt(n) * eps *
    (|x| . |y|)`` with high probability (Higham and Mary's probabilistic bound; the
    worst case is n instead of sqrt(n)), so the forward pass is replayed on absolute values
    to get ``|x| . |y|`` for every step. Returns, per tensor, the largest such magnitude
    and the number of accumulated terms along its chain of reductions. The tolerance
    policy turns these into its floor (``conformance/tolerance.py``).

    * Logits: ``scale * |Q| |K|^T`` with ``|Q| = |x||W_q| + |b_q|``. An absolute error
      delta in a logit changes its softmax weight by a relative delta, so the weights'
      magnitude is ``1 + max|logit|`` (the 1 covers exp and the normalising division).
    * Output: ``(P |V|) |W_o| + |b_o|``, times the same ``1 + max|logit|`` since every
      weight error carries into it.
    """
    h, hkv = spec["num_heads"], spec["num_kv_heads"]
    hd, hdv, group = spec["head_dim"], spec["v_head_dim"], h // hkv

    def abs_linear(x: str, w: str, b: str) -> Array:
        y = np.abs(tensors[x]) @ np.abs(tensors[w])
        return y + np.abs(tensors[b]) if b in tensors else y

    aq = _split_heads(abs_linear("query", "w_q", "b_q"), h, hd)
    ak = np.repeat(_split_heads(abs_linear("key", "w_k", "b_k"), hkv, hd), group, axis=1)
    av = np.repeat(_split_heads(abs_linear("value", "w_v", "b_v"), hkv, hdv), group, axis=1)
    fw = forward(tensors, spec)
    logits = np.where(fw.allowed, (aq @ ak.swapaxes(-1, -2)) * abs(fw.scale), 0.0)
    logit_factor = 1.0 + float(logits.max(initial=0.0))
    out = _merge_heads(fw.attn_weights @ av)
    if spec["out_proj"]:
        out = out @ np.abs(tensors["w_o"])
        if "b_o" in tensors:
            out = out + np.abs(tensors["b_o"])
    projection_terms = max(spec["d_in"], spec["kdim"], spec["vdim"])
    logit_terms = projection_terms + hd
    output_terms = logit_terms + spec["kv_len"] + (h * hdv if spec["out_proj"] else 0)
    return {
        "attn_weights": {"magnitude": logit_factor, "terms": logit_terms + spec["kv_len"]},
        "output": {"magnitude": float(out.max(initial=0.0)) * logit_factor, "terms": output_terms},
    }


def gradient_error_scales(
    tensors: Mapping[str, Array], spec: Mapping[str, Any], grad_output: Array
) -> dict[str, dict]:
    """The magnitudes that bound float rounding error in each gradient, as
    :func:`error_scales` does for the forward: the backward pass replayed on absolute values
    (``|dY| |W|^T``, ``|x|^T |dY|``, ``P (|dP| + rowsum(|dP| P))``, ...), so each gradient
    gets the largest ``|x| . |y|`` along its chain and the number of terms accumulated on
    the way (the forward's chain, then the backward's). Everything downstream of the
    softmax weights carries the forward's ``1 + max|logit|`` factor, since an error in a
    logit changes its weight, and so every gradient through it, by that relative amount.
    """
    h, hkv = spec["num_heads"], spec["num_kv_heads"]
    hd, hdv, group = spec["head_dim"], spec["v_head_dim"], h // hkv
    b, tq, tk = spec["batch"], spec["q_len"], spec["kv_len"]
    scales = error_scales(tensors, spec)
    factor = scales["attn_weights"]["magnitude"]
    forward_terms = scales["attn_weights"]["terms"]  # the projections, scores and softmax

    def absolute(name: str) -> Array:
        return np.abs(np.asarray(tensors[name], dtype=np.float64))

    def abs_linear(x: str, short: str) -> Array:
        y = absolute(x) @ absolute(f"w_{short}")
        return y + absolute(f"b_{short}") if f"b_{short}" in tensors else y

    aq = _split_heads(abs_linear("query", "q"), h, hd)
    ak = np.repeat(_split_heads(abs_linear("key", "k"), hkv, hd), group, axis=1)
    av = np.repeat(_split_heads(abs_linear("value", "v"), hkv, hdv), group, axis=1)
    weights = forward(tensors, spec).attn_weights
    scale = abs(default_scale(spec))
    d_out = np.abs(np.asarray(grad_output, dtype=np.float64))

    out: dict[str, dict] = {}

    def put(name: str, magnitude: Array, terms: int) -> None:
        out[name] = {"magnitude": float(np.max(magnitude, initial=0.0)), "terms": int(terms)}

    d_ctx, d_ctx_terms = d_out, 0
    if spec["out_proj"]:
        context = _merge_heads(weights @ av)
        put("grad_w_o", np.einsum("bti,bto->io", context, d_out) * factor, forward_terms + hdv + b * tq)
        if "b_o" in tensors:
            put("grad_b_o", d_out.sum(axis=(0, 1)), b * tq)
        d_ctx, d_ctx_terms = d_out @ absolute("w_o").T, spec["d_out"]
    d_heads = _split_heads(d_ctx, h, hdv)
    d_w = d_heads @ av.swapaxes(-1, -2)
    d_w_terms = max(d_ctx_terms + hdv, forward_terms)
    d_scores = weights * (d_w + (d_w * weights).sum(axis=-1, keepdims=True)) * factor
    d_scores_terms = d_w_terms + tk
    chains = {
        "q": (_merge_heads(d_scores @ ak * scale), d_scores_terms + tk),
        "k": (_merge_heads(_sum_groups(d_scores.swapaxes(-1, -2) @ aq * scale, group)), d_scores_terms + tq),
        "v": (_merge_heads(_sum_groups(weights.swapaxes(-1, -2) @ d_heads, group)) * factor, d_w_terms + tq),
    }
    for short, input_name in PROJECTIONS[:3]:
        d_y, terms = chains[short]
        x = absolute(input_name)
        put(f"grad_w_{short}", np.einsum("bti,bto->io", x, d_y), terms + group + b * x.shape[1])
        if f"b_{short}" in tensors:
            put(f"grad_b_{short}", d_y.sum(axis=(0, 1)), terms + group + b * x.shape[1])
        put(f"grad_{input_name}", d_y @ absolute(f"w_{short}").T, terms + group + d_y.shape[-1])
    return out
