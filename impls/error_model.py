"""The error model's magnitudes: how large a rounding error each golden tensor can honestly carry.

The tolerance rule's floor (``conformance/tolerance.py``) is ``u * sqrt(terms) * magnitude`` per
tensor, from two replays of the reference pass:

* ``terms`` (:func:`chain_terms`): how many terms are accumulated along the tensor's chain of
  reductions (projection, scores, softmax, context, output projection, and back);
* ``rms_magnitude`` (:func:`rms_arrays`): the pass replayed on squares, the root-sum-square
  ``sqrt(x^2 . y^2)`` of the terms each value is formed from (and never less than the value
  itself), with a weight's sensitivity to its logits' errors.

Rounding errors add like a random walk (Higham and Mary's probabilistic analysis), so
``u * sqrt(terms) * rms_magnitude`` is the scale of a valid algorithm's error in a dtype with unit
roundoff u: the ensemble's measured errors sit at a median 0.04-0.17 of it. It keeps that scale
where the value itself cancels to zero (a lone key's query gradient), which is what a floor is
for. A replay on absolute values (``|x| . |y|``, the worst case) was used before and overestimates
real errors 10^2 to 10^5 times on the gradients: enough to let a float32-rounded gradient pass a
float64 check (docs/tolerance.md).

:func:`floor` turns them into the tolerance rule's floor for a dtype; the rule itself (the baseline,
``k``, the verdict) is ``conformance/tolerance.py``'s, and ``vectors/verify.py`` holds a recomputed
float64 truth to the same floor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mha_conformance.impls.reference import (
    EXACT,
    PROJECTIONS,
    Array,
    backward,
    bias_gradient,
    forward,
    merge_heads,
    split_heads,
    sum_groups,
)

#: Machine epsilon per dtype name (bfloat16 keeps 8 significant bits).
EPS = {"float64": 2.0**-52, "float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}
#: The dtype floor's constant: the smallest power of two that keeps every valid order outside the
#: ensemble (``impls/variants/valid_orders.py``) at or below half the limit on every case
#: (docs/tolerance.md; ``python -m mha_conformance.audit.sensitivity --valid-orders``).
FLOOR_C = 1.0 / 4


def floor(dtype: str, expected_max: float, error_scale: Mapping[str, float]) -> float:
    """Half an ulp of the largest expected value, plus ``(eps64 + FLOOR_C * u(dtype)) * sqrt(terms)
    * rms_magnitude``: the float64 truth's own uncertainty and the dtype's analytic floor.

    Half an ulp: the exact answer correctly rounded may be that far off. The second term is the
    scale of a random-walk rounding error along the tensor's chain of ``terms`` reductions of
    values of root-sum-square size ``rms_magnitude`` (Higham and Mary), which keeps its size where
    the value itself cancels to zero."""
    if "rms_magnitude" not in error_scale:
        raise ValueError(
            "the case's error scale has no 'rms_magnitude': its vector files were written before the "
            "ensemble tolerance rule; run `python -m mha_conformance.vectors generate` (or use the committed vectors)"
        )
    unit = float(np.sqrt(error_scale["terms"])) * error_scale["rms_magnitude"]
    return EPS[dtype] / 2 * expected_max + (EPS["float64"] + FLOOR_C * EPS[dtype] / 2) * unit


def chain_terms(spec: Mapping[str, Any]) -> dict[str, int]:
    """Per tensor, the number of accumulated terms along its chain of reductions: each step's
    reduction length, added up the way its errors reach the tensor."""
    h, hd, hdv = spec["num_heads"], spec["head_dim"], spec["v_head_dim"]
    b, tq, tk = spec["batch"], spec["q_len"], spec["kv_len"]
    group = h // spec["num_kv_heads"]
    # A softcap adds a division, a tanh and a product; a bias one sum (elementwise steps).
    cap = 3 if spec.get("softcap") is not None else 0
    logits = max(spec["d_in"], spec["kdim"], spec["vdim"]) + hd + cap + (spec.get("attn_bias") is not None)
    weights = logits + tk
    terms = {"attn_weights": weights, "output": weights + (h * hdv if spec["out_proj"] else 0)}
    d_context = 0
    if spec["out_proj"]:
        terms["grad_w_o"] = weights + hdv + b * tq
        terms["grad_b_o"] = b * tq
        d_context = spec["d_out"]
    d_weights = max(d_context + hdv, weights)
    d_scores = d_weights + tk
    if spec.get("attn_bias") is not None:
        shape = spec["attn_bias"]["shape"]
        summed = (b if shape[0] == 1 else 1) * (h if shape[1] == 1 else 1)
        terms["grad_attn_bias"] = d_scores + summed
    d_scores += 2 * cap  # the softcap's derivative 1 - tanh^2
    chains = {"q": d_scores + tk, "k": d_scores + tq, "v": d_weights + tq}
    widths = {"q": h * hd, "k": h // group * hd, "v": h // group * hdv}  # each projection's output width
    for short, name in PROJECTIONS[:3]:
        chain, tokens = chains[short], (tq if short == "q" else tk)
        terms[f"grad_w_{short}"] = terms[f"grad_b_{short}"] = chain + group + b * tokens
        terms[f"grad_{name}"] = chain + group + widths[short]
    return terms


def rms_magnitudes(
    tensors: Mapping[str, Array], spec: Mapping[str, Any], grad_output: Array | None = None
) -> dict[str, float]:
    """Per tensor, the largest of :func:`rms_arrays`: the ``rms_magnitude`` a case file stores."""
    return {
        name: float(np.max(array, initial=0.0))
        for name, array in rms_arrays(tensors, spec, grad_output).items()
    }


def rms_arrays(
    tensors: Mapping[str, Array], spec: Mapping[str, Any], grad_output: Array | None = None
) -> dict[str, Array]:
    """Per tensor and element, the root-sum-square magnitude of the terms the value is formed from.

    The pass is replayed on squares: a product ``x @ y`` becomes ``x^2 @ y^2`` (the square of
    the terms' root-sum-square), biases add their squares, and the softmax weights carry their
    logits' magnitude ``m_j`` (an error ``e`` in logit j moves weight j by ``P_j (e_j - sum_l P_l
    e_l)``, so a weight's scale is ``P_j (1 + m_j (1 - P_j) + sum_{l != j} P_l m_l)``). Where
    terms cancel (``dP - rowsum(dP P)`` for a lone key), the magnitude is that of the terms,
    not of their zero sum. With ``grad_output``, every gradient too.
    """
    t = {k: np.asarray(v, np.float64) for k, v in tensors.items() if k != "mask"}
    h, hkv = spec["num_heads"], spec["num_kv_heads"]
    hd, hdv, group = spec["head_dim"], spec["v_head_dim"], h // spec["num_kv_heads"]
    fw = forward(tensors, spec)
    weights, scale = fw.attn_weights, abs(fw.scale)

    def squared_linear(x: str, short: str) -> Array:  # the square of each projected value's scale
        y = t[x] ** 2 @ t[f"w_{short}"] ** 2
        return y + t[f"b_{short}"] ** 2 if f"b_{short}" in t else y

    def flat(x: Array) -> Array:
        return x.reshape(-1, x.shape[-1])

    q2 = split_heads(squared_linear("query", "q"), h, hd)
    k2 = np.repeat(split_heads(squared_linear("key", "k"), hkv, hd), group, axis=1)
    v2 = np.repeat(split_heads(squared_linear("value", "v"), hkv, hdv), group, axis=1)
    logits = np.where(fw.allowed, np.sqrt(q2 @ k2.swapaxes(-1, -2)) * scale, 0.0)
    slope = 1.0  # the logits' sensitivity to the raw scores: the softcap's derivative where it has one
    if fw.capped is not None:
        # c * tanh(s / c) passes an error in s on times 1 - tanh^2 and rounds at its own value; the
        # derivative 1 - t^2, formed from a tanh t rounded relatively, errs by ~2 t^2 units in absolute
        # terms (it cancels where tanh saturates), so the backward keeps that scale.
        slope = 1.0 - fw.capped**2
        logits = np.sqrt((slope * logits) ** 2 + (spec["softcap"] * fw.capped) ** 2)
        slope = np.sqrt(slope**2 + (2.0 * fw.capped**2) ** 2)
    if "attn_bias" in t:
        logits = np.where(fw.allowed, np.sqrt(logits**2 + fw.scores**2), 0.0)  # the sum rounds at its value
    shared = (weights * logits).sum(axis=-1, keepdims=True)
    w_scale = weights * (1.0 + logits * (1.0 - weights) + shared - weights * logits)
    context2 = merge_heads(w_scale**2 @ v2)
    squares = {"attn_weights": w_scale**2}
    if spec["out_proj"]:
        squares["output"] = context2 @ t["w_o"] ** 2 + (t["b_o"] ** 2 if "b_o" in t else 0.0)
    else:
        squares["output"] = context2
    if grad_output is not None:
        d2 = np.asarray(grad_output, np.float64) ** 2
        if spec["out_proj"]:
            squares["grad_w_o"] = flat(context2).T @ flat(d2)
            if "b_o" in t:
                squares["grad_b_o"] = flat(d2).sum(axis=0)
            d2 = d2 @ (t["w_o"] ** 2).T
        d_heads2 = split_heads(d2, h, hdv)
        d_w2 = d_heads2 @ v2.swapaxes(-1, -2)
        d_scores2 = w_scale**2 * (d_w2 + (w_scale**2 * d_w2).sum(axis=-1, keepdims=True))
        if "attn_bias" in t:
            squares["grad_attn_bias"] = bias_gradient(EXACT, d_scores2, t["attn_bias"].shape)
        d_scores2 = d_scores2 * slope**2
        chains = {
            "q": merge_heads(d_scores2 @ k2) * scale**2,
            "k": merge_heads(sum_groups(EXACT, d_scores2.swapaxes(-1, -2) @ q2, group)) * scale**2,
            "v": merge_heads(sum_groups(EXACT, w_scale.swapaxes(-1, -2) ** 2 @ d_heads2, group)),
        }
        for short, input_name in PROJECTIONS[:3]:
            d_y2 = chains[short]
            squares[f"grad_w_{short}"] = flat(t[input_name] ** 2).T @ flat(d_y2)
            if f"b_{short}" in t:
                squares[f"grad_b_{short}"] = flat(d_y2).sum(axis=0)
            squares[f"grad_{input_name}"] = d_y2 @ (t[f"w_{short}"] ** 2).T
    # A long sum of same-signed terms (a bias gradient over many tokens) errs with its partial
    # sums, which grow to the value itself: the scale is never below the value's own magnitude.
    values = {"output": fw.output, "attn_weights": weights}
    if grad_output is not None:
        values.update(backward(tensors, spec, grad_output))
    return {name: np.sqrt(sq + np.asarray(values[name], np.float64) ** 2) for name, sq in squares.items()}


def case_error_scales(
    tensors: Mapping[str, Array], spec: Mapping[str, Any], grad_output: Array | None, gradients: list[str]
) -> dict[str, dict]:
    """``{tensor: {"terms", "rms_magnitude"}}`` for the forward tensors and the listed gradients (none
    without ``grad_output``): what a case file stores for the tolerance rule's floor."""
    terms = chain_terms(spec)
    rms = rms_magnitudes(tensors, spec, grad_output)
    names = ["output", "attn_weights", *(gradients if grad_output is not None else [])]
    return {name: {"terms": terms[name], "rms_magnitude": rms[name]} for name in names}
