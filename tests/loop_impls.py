"""Two more formulations of the reference semantics, written as loops, for cross-checks.

They compute the same attention as ``impls/reference.py`` in a different shape (one head
at a time, one query token at a time), so a shared mistake would have to be made three
times in three different ways.
"""

from __future__ import annotations

import math

import numpy as np


def _proj(t: dict, x: str, short: str) -> np.ndarray:
    y = np.asarray(t[x], np.float64) @ np.asarray(t[f"w_{short}"], np.float64)
    return y + t[f"b_{short}"] if f"b_{short}" in t else y


def _may_attend(spec: dict, t: dict, b: int, h: int, i: int, j: int) -> bool:
    ok = True
    if "mask" in t:
        m = t["mask"]
        ok = bool(m[b % m.shape[0], h % m.shape[1], i % m.shape[2], j % m.shape[3]])
    if spec["causal"]:
        ok = ok and j <= i + spec["kv_len"] - spec["q_len"]
    return ok


def _scale(spec: dict) -> float:
    return spec["scale"] if spec["scale"] is not None else 1 / math.sqrt(spec["head_dim"])


def _finish(spec: dict, t: dict, context: np.ndarray) -> np.ndarray:
    if not spec["out_proj"]:
        return context
    out = context @ np.asarray(t["w_o"], np.float64)
    return out + t["b_o"] if "b_o" in t else out


def per_head(spec: dict, t: dict) -> tuple[np.ndarray, np.ndarray]:
    """Attention computed head by head with explicit column slices (the seed wrapper's view)."""
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
            s = qh @ kh.T * _scale(spec)
            allowed = np.array([[_may_attend(spec, t, b, h, i, j) for j in range(Tk)] for i in range(Tq)])
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
                    j: math.fsum(q[b, i, h * hd + c] * k[b, j, g * hd + c] for c in range(hd)) * _scale(spec)
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
