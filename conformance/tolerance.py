"""The tolerance policy: how far from the float64 truth an implementation may be.

A fixed atol/rtol is the weakest practice in the field: too loose for float64, too tight for a
long bfloat16 reduction, and silently re-tuned until tests pass. This policy follows
FlashAttention's rule instead, anchored per case, dtype and tensor, and made to hold for every
valid order of operations on every machine (docs/tolerance.md has the evidence):

    max_abs_err <= k * (baseline[dtype] + floor)

* ``baseline[dtype]`` is the worst error, over an ensemble of valid algorithms emulated in the
  dtype (``mha_conformance.impls.reference.ENSEMBLE``: sequential, FMA and half-precision accumulation, the
  reciprocal softmax, the scale on q, on q and k or after the product, online softmax, flash
  backwards from the logsumexp, ...), against the float64 truth, measured by the generator and
  stored in the case file. An implementation may be ``k`` (default 2) times as inexact as the
  worst valid order the ensemble knows, no more.
* ``floor`` = ``eps(dtype) / 2 * max|expected|`` + ``(eps64 + FLOOR_C * u(dtype)) * sqrt(terms)
  * rms_magnitude``. The first term is half an ulp of the largest value: the exact answer
  correctly rounded may be that far off, even where every emulation happened to be exact (a
  single key gives weights of exactly 1). The second is the scale of a random-walk rounding
  error along the tensor's chain of reductions (Higham and Mary's probabilistic analysis):
  ``terms`` counts the accumulated terms, ``rms_magnitude`` is the root-sum-square of the terms
  the values are formed from (``mha_conformance.impls.error_model``), so it keeps its size where a value cancels
  to zero. ``eps64`` is the float64 truth's own uncertainty (for float64, whose baseline is
  zero, it carries the rule: a single float32 step fails every ordinary case); ``u = eps/2`` is
  the dtype's unit roundoff.
* ``FLOOR_C = 1/4`` (with :func:`floor`, in ``impls/error_model.py``) is the smallest power of two that keeps every valid order outside the
  ensemble (``impls/variants/valid_orders.py``) at or below half the limit on every case; the largest
  any needs is 0.21 (``python -m mha_conformance.audit.sensitivity --valid-orders``). Smaller would fail
  correct kernels elsewhere; larger would only loosen (the sensitivity table says by how much).

NaN or Inf where the truth is finite always fails, as does a wrong shape or dtype. Rows
with no allowed key are part of the truth (zeros), so a NaN there fails like any other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from mha_conformance.impls.error_model import floor

DEFAULT_K = 2.0


@dataclass(frozen=True)
class Verdict:
    """The judgement of one tensor, with every figure a report needs."""

    tensor: str
    passed: bool
    problem: str  # "" when passed, else "shape", "dtype", "nonfinite" or "tolerance"
    max_abs_err: float
    max_rel_err: float  # max_abs_err / max|expected|
    worst_index: tuple[int, ...] | None
    actual_at_worst: float | None
    expected_at_worst: float | None
    baseline: float
    floor: float
    tolerance: float
    ratio: float  # max_abs_err / (baseline + floor); passes when <= k
    nonfinite: int = 0  # how many values are NaN/Inf where the truth is finite
    where_over: str = ""  # which batch rows, heads, queries, keys or features are out of tolerance

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One or two sentences saying what differs and by how much."""
        if self.problem in ("shape", "dtype"):
            return f"{self.tensor}: {self.actual_at_worst}"
        where = "" if self.worst_index is None else f" at index {list(self.worst_index)}"
        if self.problem == "nonfinite":
            return (
                f"{self.tensor}: {self.nonfinite} non-finite value(s), first{where} (got "
                f"{self.actual_at_worst}, expected {self.expected_at_worst})"
            )
        head = (
            f"{self.tensor}: max abs err {self.max_abs_err:.3e}{where} (got "
            f"{self.actual_at_worst:.6g}, expected {self.expected_at_worst:.6g})"
        )
        tail = f"\n    {self.where_over}" if self.where_over else ""
        return (
            f"{head}; max rel err {self.max_rel_err:.3e}; {self.ratio:.3g}x the precision "
            f"baseline+floor {self.baseline + self.floor:.3e}; tolerance {self.tolerance:.3e}{tail}"
        )


AXES = {"output": ("batch", "query", "feature"), "attn_weights": ("batch", "head", "query", "key")}


def _ranges(values: np.ndarray, size: int) -> str:
    """[0, 1, 2, 5] of 8 -> '0-2,5'; everything -> 'all N'."""
    if len(values) == size:
        return f"all {size}"
    runs, start = [], values[0]
    for prev, cur in zip(values[:-1], values[1:], strict=True):
        if cur != prev + 1:
            runs.append((start, prev))
            start = cur
    runs.append((start, values[-1]))
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def locate(over: np.ndarray, tensor: str) -> str:
    """Which positions along each axis hold values out of tolerance: a pattern such as
    'query 0-6 of 8' or 'key above the diagonal' points at the bug."""
    names = AXES.get(tensor, tuple(f"axis{i}" for i in range(over.ndim)))
    if over.ndim != len(names) or not over.any():
        return ""
    parts = []
    for axis, name in enumerate(names):
        hit = np.flatnonzero(over.any(axis=tuple(i for i in range(over.ndim) if i != axis)))
        parts.append(f"{name} {_ranges(hit, over.shape[axis])}")
    text = f"{int(over.sum())} of {over.size} values out of tolerance at " + "; ".join(parts)
    if tensor == "attn_weights":
        tq, tk = over.shape[-2:]
        above = np.triu(np.ones((tq, tk), dtype=bool), k=tk - tq + 1)  # keys a causal query must not see
        text += f" ({int((over & above).sum())} of them above the causal diagonal)"
    return text


def judge(
    actual: Any,
    expected: np.ndarray,
    *,
    tensor: str,
    dtype: str,
    baseline: float,
    error_scale: dict[str, float],
    k: float = DEFAULT_K,
) -> Verdict:
    """Judge ``actual`` (an implementation's result in ``dtype``) against the float64 truth."""
    expected = np.asarray(expected, dtype=np.float64)
    emax = float(np.max(np.abs(expected), initial=0.0))
    flo = floor(dtype, emax, error_scale)
    tol = k * (baseline + flo)

    def verdict(problem: str, err: float = float("inf"), index=None, got=None, want=None, bad=0) -> Verdict:
        ratio = err / (baseline + flo) if baseline + flo > 0 else (0.0 if err == 0 else float("inf"))
        rel = err / emax if emax > 0 else (0.0 if err == 0 else float("inf"))
        return Verdict(
            tensor, problem == "", problem, err, rel, index, got, want, baseline, flo, tol, ratio, bad
        )

    shape = getattr(actual, "shape", None)
    if shape != expected.shape:
        got = list(shape) if shape is not None else f"a {type(actual).__name__}, not an array"
        return verdict("shape", got=f"shape {got}, expected {list(expected.shape)}")
    actual_dtype = str(getattr(actual, "dtype", type(actual).__name__))
    if actual_dtype != dtype:
        return verdict("dtype", got=f"dtype {actual_dtype}, expected {dtype}")
    a = np.asarray(actual).astype(np.float64)
    bad = ~np.isfinite(a) & np.isfinite(expected)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        return verdict(
            "nonfinite", index=idx, got=float(a[idx]), want=float(expected[idx]), bad=int(bad.sum())
        )
    diff = np.abs(a - expected)
    if diff.size == 0:
        return verdict("", 0.0)
    idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
    err = float(diff[idx])
    if err <= tol:
        return verdict("", err, idx, float(a[idx]), float(expected[idx]))
    failed = verdict("tolerance", err, idx, float(a[idx]), float(expected[idx]))
    return replace(failed, where_over=locate(diff > tol, tensor))


def judge_tensor(actual: Any, case: Any, name: str, dtype: str, k: float = DEFAULT_K) -> Verdict:
    """``actual`` against the golden tensor ``name`` of ``case`` (a ``GoldenCase``), with the case's
    baseline for ``dtype`` and its error scale: the one rule every check applies."""
    return judge(
        actual,
        case.tensors[name],
        tensor=name,
        dtype=dtype,
        baseline=case.baseline[dtype][name],
        error_scale=case.baseline["error_scale"][name],
        k=k,
    )


def judge_relation(
    after: np.ndarray,
    before: np.ndarray,
    truth: np.ndarray,
    *,
    dtype: str,
    baseline: float,
    error_scale: dict[str, float],
    k: float = DEFAULT_K,
) -> Verdict:
    """A metamorphic relation: two runs of one adapter that must agree (``after`` against
    ``before``, on the compared positions). Each run may be ``k x (baseline + floor)`` from the
    truth, so they may differ by twice the baseline; and where the first run is further from the
    truth than that (a precision finding the golden check reports), each may be as far off as it
    actually is: the relation is this check's business, the precision the golden check's."""
    for run in (before, after):  # a non-finite value where the truth is finite fails as such
        if (~np.isfinite(run.astype(np.float64)) & np.isfinite(truth)).any():
            return judge(
                run, truth, tensor="output", dtype=dtype, baseline=baseline, error_scale=error_scale, k=k
            )
    reached = float(np.max(np.abs(before.astype(np.float64) - truth), initial=0.0))
    return judge(
        after,
        before.astype(np.float64),
        tensor="output",
        dtype=dtype,
        baseline=2 * baseline + 2 * reached / k,
        error_scale=error_scale,
        k=k,
    )
