"""Two more formulations of the reference semantics, written as loops, for cross-checks.

They compute the same attention as ``impls/reference.py`` in a different shape (one head
at a time, one query token at a time), so a shared mistake would have to be made three
times in three different ways.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np


def _proj(t: dict, x: str, short: str) -> np.ndarray:
    y = np.asarray(t[x], np.float64) @ np.asarray(t[f"w_{short}"], np.float64)
    return y + t[f"b_{short}"] if f"b_{short}" in t else y


def _bias(t: dict, b: int, h: int, i: int, j: int) -> float:
    if "attn_bias" not in t:
        return 0.0
    a = t["attn_bias"]
    return float(a[b % a.shape[0], h % a.shape[1], i, j])


def _may_attend(spec: dict, t: dict, b: int, h: int, i: int, j: int) -> bool:
    ok = True
    if "mask" in t:
        m = t["mask"]
        ok = bool(m[b % m.shape[0], h % m.shape[1], i % m.shape[2], j % m.shape[3]])
    length = spec["kv_len"] if spec.get("kv_lengths") is None else spec["kv_lengths"][b]
    p = i + length - spec["q_len"]  # this query's position among its row's keys
    left, right = spec.get("window") or (-1, -1)
    return (
        ok
        and j < length
        and not (spec["causal"] and j > p)
        and not (0 <= left < p - j)
        and not (0 <= right < j - p)
        and _bias(t, b, h, i, j) != -math.inf
    )


def _logit(
    spec: dict, t: dict, raw: float, b: int, h: int, i: int, j: int, softcap_last: bool = False
) -> float:
    """Softcap, then bias, on one scaled score (``softcap_last``: the wrong order, for mutants)."""
    cap = spec.get("softcap")
    if softcap_last:
        raw += _bias(t, b, h, i, j)
    capped = cap * math.tanh(raw / cap) if cap else raw
    return capped if softcap_last else capped + _bias(t, b, h, i, j)


def _scale(spec: dict) -> float:
    return spec["scale"] if spec["scale"] is not None else 1 / math.sqrt(spec["head_dim"])


def _finish(spec: dict, t: dict, context: np.ndarray) -> np.ndarray:
    if not spec["out_proj"]:
        return context
    out = context @ np.asarray(t["w_o"], np.float64)
    return out + t["b_o"] if "b_o" in t else out


def per_head(
    spec: dict, t: dict, may_attend: Callable[..., bool] = _may_attend, softcap_last: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Attention computed head by head with explicit column slices (the seed wrapper's view).
    ``may_attend`` and ``softcap_last`` let a test adapter get one rule wrong."""
    B, Tq, Tk = spec["batch"], spec["q_len"], spec["kv_len"]
    H, Hkv, hd, hdv = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"], spec["v_head_dim"]
    q, k, v = _proj(t, "query", "q"), _proj(t, "key", "k"), _proj(t, "value", "v")
    context = np.zeros((B, Tq, H * hdv))
    weights = np.zeros((B, H, Tq, Tk))
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)
            qh = q[b][:, h * hd : (h + 1) * hd]
            kh = k[b][:, g * hd : (g + 1) * hd]
            vh = v[b][:, g * hdv : (g + 1) * hdv]
            raw = qh @ kh.T * _scale(spec)
            allowed = np.array([[may_attend(spec, t, b, h, i, j) for j in range(Tk)] for i in range(Tq)])
            s = np.array(
                [
                    [
                        _logit(spec, t, raw[i, j], b, h, i, j, softcap_last) if allowed[i, j] else 0.0
                        for j in range(Tk)
                    ]
                    for i in range(Tq)
                ]
            )
            for i in range(Tq):
                if not allowed[i].any():
                    continue
                row = np.where(allowed[i], np.exp(s[i] - s[i][allowed[i]].max()), 0.0)
                weights[b, h, i] = row / row.sum()
            context[b, :, h * hdv : (h + 1) * hdv] = weights[b, h] @ vh
    return _finish(spec, t, context), weights


def per_token(spec: dict, t: dict) -> tuple[np.ndarray, np.ndarray]:
    """Attention computed one query token at a time with scalar sums (the decoding view)."""
    B, Tq, Tk = spec["batch"], spec["q_len"], spec["kv_len"]
    H, Hkv, hd, hdv = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"], spec["v_head_dim"]
    q, k, v = _proj(t, "query", "q"), _proj(t, "key", "k"), _proj(t, "value", "v")
    context = np.zeros((B, Tq, H * hdv))
    weights = np.zeros((B, H, Tq, Tk))
    for b in range(B):
        for i in range(Tq):
            for h in range(H):
                g = h // (H // Hkv)
                keys = [j for j in range(Tk) if _may_attend(spec, t, b, h, i, j)]
                if not keys:
                    continue
                logits = {
                    j: _logit(
                        spec,
                        t,
                        math.fsum(q[b, i, h * hd + c] * k[b, j, g * hd + c] for c in range(hd))
                        * _scale(spec),
                        b,
                        h,
                        i,
                        j,
                    )
                    for j in keys
                }
                top = max(logits.values())
                exps = {j: math.exp(logits[j] - top) for j in keys}
                total = math.fsum(exps.values())
                for j in keys:
                    weights[b, h, i, j] = exps[j] / total
                for c in range(hdv):
                    context[b, i, h * hdv + c] = math.fsum(
                        weights[b, h, i, j] * v[b, j, g * hdv + c] for j in keys
                    )
    return _finish(spec, t, context), weights
