"""Dropout in training mode, checked statistically: the fraction dropped and the 1/(1-p) rescaling.

Attention dropout zeroes each attention weight with probability p and scales the kept ones by
1/(1-p), so the expected context is unchanged. To see the weights through any adapter (most
return only the output), the crafted case makes the output *be* the weights: one head of width
Tk, every query weight zero (all scores 0: uniform weights 1/Tk), values the identity
(value j = e_j, W_v = I) and W_o = I, no biases. Then output[b, i, j] is query i's weight on key
j after dropout: 0 where dropped, exactly 1/(Tk (1-p)) where kept.

The verdict: the dropped fraction over n independent weights must lie within ``SIGMAS``
binomial standard deviations of p (5 sigma: a correct implementation fails about once in
1.7 million runs); every kept weight must equal 1/(Tk (1-p)) to float32 rounding; and the same
module in eval mode must drop nothing (every weight exactly 1/Tk).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mha_conformance.checks.skeleton import output_problems
from mha_conformance.impls.adapter import Adapter, refusal
from mha_conformance.vectors.catalogue import spec as make_spec

P = 0.2
TK = 64
CALLS = 4
SIGMAS = 5.0
DTYPE = "float32"
RESCALE_RTOL = 1e-5


def dropout_spec(p: float = P, tk: int = TK) -> dict[str, Any]:
    """One batch row, one head of width Tk, Tq = Tk self-attention, no biases, dropout p."""
    return make_spec(
        f"probe_dropout_p{p:g}_t{tk}",
        "dropout statistics probe",
        batch=1,
        q_len=tk,
        d_in=tk,
        num_heads=1,
        head_dim=tk,
        qkv_bias=False,
        out_bias=False,
        dropout=p,
        dtypes=[DTYPE],
    )


def dropout_case(tk: int = TK) -> dict[str, np.ndarray]:
    """Weights and inputs that make the output equal the (dropped, rescaled) attention weights."""
    eye = np.eye(tk, dtype=np.float32)
    return {
        "w_q": np.zeros((tk, tk), np.float32),
        "w_k": eye,
        "w_v": eye,
        "w_o": eye,
        "query": eye[None],
        "key": eye[None],
        "value": eye[None],
    }


def binomial_bounds(p: float, n: int, sigmas: float = SIGMAS) -> tuple[float, float]:
    """Bounds on the observed fraction of n Bernoulli(p) draws: p +- sigmas * sqrt(p(1-p)/n)."""
    half = sigmas * math.sqrt(p * (1 - p) / n)
    return p - half, p + half


def judge_training(outputs: list[np.ndarray], p: float, tk: int) -> dict[str, Any]:
    """Dropped fraction within binomial bounds, kept weights rescaled by 1/(1-p)."""
    weights = np.concatenate([o.reshape(-1) for o in outputs]).astype(np.float64)
    n = weights.size
    dropped = np.abs(weights) <= 1e-3 / tk  # exact zeros in practice; tiny values are rounding
    fraction = float(dropped.mean())
    low, high = binomial_bounds(p, n)
    expected_kept = 1.0 / (tk * (1 - p))
    kept = weights[~dropped]
    worst = float(np.max(np.abs(kept / expected_kept - 1))) if kept.size else math.inf
    return {
        "n": n,
        "p": p,
        "dropped_fraction": fraction,
        "bounds": [low, high],
        "fraction_ok": low <= fraction <= high,
        "kept_expected": expected_kept,
        "kept_worst_rel_err": worst,
        "rescale_ok": worst <= RESCALE_RTOL,
    }


def check_dropout(adapter: Adapter, p: float = P, tk: int = TK, calls: int = CALLS) -> dict[str, Any]:
    """The dropout statistics for one adapter: ``{"verdict", "detail", "training", "eval"}``.

    verdict is ``ok``, ``wrong`` (a bound missed), ``n/a`` (no training mode, or the crafted
    case cannot be expressed) or ``error``."""
    spec, case = dropout_spec(p, tk), dropout_case(tk)
    inputs = {n: case[n] for n in ("query", "key", "value")}
    reason = refusal(adapter, spec, DTYPE, "cpu")
    if reason:
        return {"verdict": "n/a", "detail": reason}
    try:
        train = adapter.prepare_training(case, spec, DTYPE, "cpu")
        results = [train(dict(inputs)) for _ in range(calls)]
        results.append(adapter.prepare(case, spec, DTYPE, "cpu")(dict(inputs)))
    except NotImplementedError as exc:
        return {"verdict": "n/a", "detail": str(exc)}
    except Exception as exc:  # reported, never raised: one adapter must not stop the others
        return {"verdict": "error", "detail": f"{type(exc).__name__}: {exc}"[:300]}
    problems = [problem for r in results for problem in output_problems(r, spec, DTYPE)]
    if problems:
        return {"verdict": "error", "detail": problems[0][:300]}
    outputs = [r["output"] for r in results[:-1]]
    evaluated = results[-1]["output"].astype(np.float64)
    training = judge_training(outputs, p, tk)
    eval_err = float(np.max(np.abs(evaluated * tk - 1)))
    eval_ok = eval_err <= RESCALE_RTOL
    ok = training["fraction_ok"] and training["rescale_ok"] and eval_ok
    low, high = training["bounds"]
    detail = (
        f"p={p:g}: dropped {training['dropped_fraction']:.4f} of {training['n']} (5-sigma bounds "
        f"{low:.4f}-{high:.4f}); kept weights x(1-p)*Tk within {training['kept_worst_rel_err']:.1e} of 1; "
        f"eval mode {'drops nothing' if eval_ok else f'is not uniform (max rel err {eval_err:.2g})'}"
    )
    return {
        "verdict": "ok" if ok else "wrong",
        "detail": detail,
        "training": training,
        "eval": {"max_rel_err": eval_err, "ok": eval_ok},
    }
