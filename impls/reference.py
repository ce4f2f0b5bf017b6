"""The float64 NumPy reference multi-head attention: the truth every adapter is held to.

Canonical semantics (docs/semantics.md):

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

The variants of contract v2 (vector format 3, docs/semantics.md#variants), each optional:

* ``softcap`` c: the scaled scores become ``c * tanh(scores / c)``, before the bias and masking.
* ``attn_bias`` [B|1, H|1, Tq, Tk]: added to the (capped) scores; ``-inf`` means masked.
* ``kv_lengths`` [B]: keys ``j >= kv_lengths[b]`` are excluded; each batch row's causal and
  window rules are then aligned to its own length: its query i sits at position
  ``p = i + kv_lengths[b] - Tq`` (``i + Tk - Tq`` without lengths).
* ``window`` [left, right] (-1 unbounded): key j is allowed iff ``p - left <= j <= p + right``.

Every rule that excludes keys (mask, causal, window, lengths, ``-inf`` bias) intersects.

The same forward and backward also run in emulated low precision (:class:`Precision`) and
in any of several valid orders of operations (:class:`Algorithm`): the generator measures
each dtype's precision baseline as the worst error over that ensemble (:data:`ENSEMBLE`).
Every emulated step is deterministic: IEEE arithmetic, dot products correctly rounded
(:func:`correctly_rounded_matmul`) and exp, log and tanh computed from IEEE operations alone
(:func:`portable_exp`), never by the machine's BLAS or vectorised libm, so an emulated result is
the same bits on every machine; a baseline (its error against the float64 truth) moves only with the
truth's own last bits. This module imports nothing but NumPy, so
the truth never depends on a framework under test.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

Array = np.ndarray

#: Weight and bias names in the order the projections use them.
PROJECTIONS = (("q", "query"), ("k", "key"), ("v", "value"), ("o", None))


# ------------------------------------------------------------ portable float64 arithmetic
#
# BLAS kernels and NumPy's vectorised exp, log and tanh are chosen by the CPU (OpenBLAS's core
# type, NumPy's SIMD dispatch), and differ in their last bits from one CPU to another. That is
# harmless in the float64 truth (vectors/verify.py holds it to the float64 rule), but where an
# emulation rounds such a value to float32, a last bit can send the rounding the other way. The
# emulation therefore rounds only values that are the same on every machine: the functions
# below use IEEE +, -, *, / and exact scalings alone, in a fixed order.

_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that k * _LN2_HI is exact for |k| < 2**20
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
_SQRT_HALF = 0.7071067811865476


def _expm1_series(r: Array, degree: int) -> Array:
    """``exp(r) - 1`` by its Taylor series in Horner form (``r (1 + r/2 (1 + r/3 (...))))``)."""
    p = np.ones_like(r)
    for n in range(degree, 1, -1):
        p = 1.0 + p * r / n
    return p * r


def portable_exp(x: Array) -> Array:
    """exp in float64, within a few ulps, from IEEE operations alone: the same bits on every machine.

    ``x = k ln2 + r`` with ``|r| <= ln2 / 2`` (Cody and Waite's two-part ln2), ``exp(r)`` by its
    Taylor series to degree 14 (truncation below 1e-19), scaled by ``2**k`` exactly."""
    x = np.asarray(x, np.float64)
    finite = np.isfinite(x) & (x < 709.8) & (x > -745.2)
    xs = np.where(finite, x, 0.0)
    k = np.rint(xs * _INV_LN2)
    r = (xs - k * _LN2_HI) - k * _LN2_LO
    out = np.ldexp(1.0 + _expm1_series(r, 14), k.astype(np.int64))
    return np.where(finite, out, np.where(x > 0, np.inf, np.where(np.isnan(x), np.nan, 0.0)))


def portable_log(x: Array) -> Array:
    """Natural log in float64, within a few ulps, from IEEE operations alone.

    ``x = m 2**e`` with ``m`` in ``[sqrt(1/2), sqrt(2))`` (exact), ``log m = 2 atanh(s)`` with
    ``s = (m - 1) / (m + 1)``, ``|s| <= 0.172``, by its series to ``s**23`` (truncation below 1e-18)."""
    x = np.asarray(x, np.float64)
    ok = np.isfinite(x) & (x > 0)
    m, e = np.frexp(np.where(ok, x, 1.0))
    low = m < _SQRT_HALF
    m, e = np.where(low, m * 2.0, m), np.where(low, e - 1, e).astype(np.float64)
    s = (m - 1.0) / (m + 1.0)
    z = s * s
    series = np.zeros_like(s)
    for n in range(11, -1, -1):
        series = 1.0 / (2 * n + 1) + z * series
    out = e * _LN2_HI + (e * _LN2_LO + 2.0 * s * series)
    special = np.where(x == 0, -np.inf, np.where(x == np.inf, np.inf, np.nan))
    return np.where(ok, out, special)


def portable_tanh(x: Array) -> Array:
    """tanh in float64, within a few ulps, from IEEE operations alone: ``e / (e + 2)`` with
    ``e = exp(2|x|) - 1`` (its series below 0.5, where ``exp - 1`` would cancel), signed; 1 past 22."""
    x = np.asarray(x, np.float64)
    a = np.minimum(np.abs(np.where(np.isnan(x), 0.0, x)), 22.0)
    y = 2.0 * a
    e = np.where(y < 0.5, _expm1_series(y, 17), portable_exp(y) - 1.0)
    t = np.where(a >= 22.0, 1.0, e / (e + 2.0))
    return np.where(np.isnan(x), np.nan, np.copysign(t, x))


def _exact_sum_to_float32(values: Array) -> np.float32:
    """The exact sum of float64 ``values`` rounded once to float32 (nearest, ties to even), in
    Python integers: no rounding until the last, so the same on every machine."""
    ratios = [float(v).as_integer_ratio() for v in values]  # each denominator is a power of two
    shift = max(d for _, d in ratios).bit_length() - 1
    total = sum(n << (shift - (d.bit_length() - 1)) for n, d in ratios)
    nearest64 = total / (1 << shift)  # an int over an int: correctly rounded to float64
    rounded = np.float32(nearest64)
    if np.isfinite(rounded):  # compared as Python floats: a float32 would pull the other side to float32
        other = np.nextafter(rounded, np.float32(np.inf if nearest64 > float(rounded) else -np.inf))
        middle = (float(rounded) + float(other)) / 2  # exact in float64
        if nearest64 == middle:  # a float64 tie need not be an exact one: decide exactly
            n, d = middle.as_integer_ratio()
            above = total * d - (n << shift)
            if above != 0:
                rounded = other if (above > 0) == (float(other) > float(rounded)) else rounded
    return rounded


def _lowest_bit(x: Array) -> Array:
    """The exponent of each float32 value's least significant set bit (``x = odd * 2**e``), from its
    bits; a large number for 0."""
    bits = np.asarray(x, np.float32).view(np.int32)
    field = (bits >> 23) & 0xFF
    significand = (bits & 0x7FFFFF) | np.where(field > 0, 0x800000, 0)
    low = (significand & -significand).astype(np.float32)  # a power of two, exact in float32
    shift = ((low.view(np.int32) >> 23) & 0xFF) - 127
    return np.where(significand != 0, np.maximum(field, 1) - 150 + shift, 1 << 20)


def correctly_rounded_matmul(x: Array, y: Array) -> Array:
    """``x @ y`` of float32-representable values, each dot product exact and rounded once to float32.

    The products are exact in float64. BLAS's float64 sum is exact, in whatever order it sums, where
    every product is a multiple of ``2**q`` (``q``: the lowest set bit of the row's and the column's
    values, added) and ``|x| @ |y| < 2**(q + 52)``: every partial sum then fits in 53 bits. Elsewhere
    it is within ``gamma = K u64`` times ``|x| @ |y|`` of the exact sum, so where no float32 rounding
    boundary lies that close, rounding it gives the correctly rounded value. The few dot products
    left are summed exactly (:func:`_exact_sum_to_float32`). Either way the result is the correctly
    rounded one, whatever the machine's BLAS."""
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    approx = x64 @ y64
    out = approx.astype(np.float32)
    magnitude = np.abs(x64) @ np.abs(y64)
    bound = 2.0 * x64.shape[-1] * 2.0**-53 * magnitude  # twice gamma: room for |x| @ |y|'s own error
    up = np.nextafter(out, np.float32(np.inf)).astype(np.float64)
    down = np.nextafter(out, np.float32(-np.inf)).astype(np.float64)
    centre = out.astype(np.float64)
    near = (approx + bound >= (centre + up) / 2) | (approx - bound <= (centre + down) / 2)
    near &= np.isfinite(approx)
    if near.any():
        quantum = (
            np.min(_lowest_bit(x64), axis=-1)[..., :, None] + np.min(_lowest_bit(y64), axis=-2)[..., None, :]
        )
        near &= magnitude >= np.ldexp(1.0, np.minimum(quantum + 52, 1000))  # not summed exactly by BLAS
    if near.any():
        xb, yb = np.broadcast_arrays(x64[..., :, None, :], np.swapaxes(y64, -1, -2)[..., None, :, :])
        for index in zip(*np.nonzero(near), strict=True):
            out[index] = _exact_sum_to_float32(xb[index] * yb[index])
    return out


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


# -------------------------------------------------------------------------- algorithms


@dataclass(frozen=True)
class Algorithm:
    """One valid order of operations for the same attention. Every choice here is made by a
    shipped kernel; none changes the exact result, only where the roundings fall.

    * ``matmul``: ``"rounded"``, each dot product and sum formed exactly and rounded once to
      the accumulation dtype (the most accurate order); ``"sequential"``, summed term by term,
      every product and partial sum rounded (XLA:CPU and oneDNN dot products); ``"fma"``, term by
      term with one rounding a step (a fused multiply-add GEMM micro-kernel along K);
      ``"storage"``, term by term with every product and partial sum rounded to the dtype itself
      (TensorFlow's CPU einsum on half types accumulates in the half type).
    * ``softmax``: normalise by dividing by the row sum, or by multiplying with its reciprocal.
    * ``scale``: applied to the scores ``Q K^T`` in the accumulation dtype (``"scores"``), to
      ``Q K^T`` after it is stored in the dtype (``"after"``), to ``q`` in the dtype before the
      product (``"q"``), or ``sqrt(scale)`` to both ``q`` and ``k`` in the dtype (``"qk"``); the
      scale itself rounded to the dtype wherever the dtype multiplies by it.
    * ``key_block``: 0 for the two-pass softmax; n > 0 for the online (flash) softmax over
      blocks of n keys: scores kept in the accumulation dtype, a running max and sum, the
      context rescaled at every new max, the weights rounded to the dtype before ``P @ V``.
    * ``backward``: ``"stored"`` reuses the forward's normalised weights; ``"recompute"`` (the
      flash backward) recomputes them as ``exp(scores - lse)`` from the accumulation-dtype
      logsumexp and forms ``D = rowsum(dO * O)`` from the rounded output.
    * ``reductions``: sums over tokens and kv groups (bias gradients, grouped kv heads) in
      the accumulation dtype, or term by term in the storage dtype (XLA and TensorFlow sum a
      half-precision broadcast's gradient in the half dtype).
    * ``dtypes``: where the order is used. TensorFlow's CPU einsum accumulates float16 in
      float16 but bfloat16 in float32, so accumulating GEMMs in the dtype is a float16 order only.
    """

    name: str
    matmul: str = "rounded"
    softmax: str = "divide"
    scale: str = "scores"
    key_block: int = 0
    backward: str = "stored"
    reductions: str = "accumulate"
    #: The dtypes a shipped kernel uses this order in (empty: every dtype).
    dtypes: tuple[str, ...] = ()

    def used_in(self, dtype: str) -> bool:
        return not self.dtypes or dtype in self.dtypes


STRAIGHTFORWARD = Algorithm("straightforward")
#: The valid algorithms whose worst error, per dtype and tensor, is a case's precision baseline.
ENSEMBLE: tuple[Algorithm, ...] = (
    STRAIGHTFORWARD,
    Algorithm("sequential", matmul="sequential"),
    Algorithm("reciprocal", softmax="reciprocal"),
    Algorithm("prescale-q", scale="q"),
    Algorithm("prescale-qk", scale="qk"),
    Algorithm("postscale", scale="after"),
    Algorithm("online", key_block=16),
    Algorithm("half-reductions", reductions="storage", dtypes=("float16", "bfloat16")),
    # Whole kernel stacks, whose choices compound:
    Algorithm("eager", matmul="fma", softmax="reciprocal", scale="q"),
    Algorithm("xla", matmul="sequential", reductions="storage", dtypes=("float16", "bfloat16")),
    Algorithm("half-accumulation", matmul="storage", reductions="storage", dtypes=("float16",)),
    Algorithm("flash", matmul="fma", scale="qk", key_block=16, softmax="reciprocal", backward="recompute"),
    Algorithm("flash-tiled", key_block=8, backward="recompute"),
)
#: One line per ensemble member, stored with every case so a reader knows what was measured.
ENSEMBLE_DESCRIPTION = {
    "straightforward": "every product and sum formed exactly and rounded once to the accumulation dtype, "
    "each step rounded to the dtype",
    "sequential": "every matmul and sum accumulated term by term in the accumulation dtype",
    "reciprocal": "softmax normalised by multiplying with 1/rowsum",
    "prescale-q": "q multiplied by the scale (rounded to the dtype) in the dtype before Q K^T",
    "prescale-qk": "q and k each multiplied by sqrt(scale) (rounded to the dtype) in the dtype",
    "postscale": "Q K^T stored in the dtype, then multiplied by the scale (rounded to the dtype) in the dtype",
    "online": "online softmax over blocks of 16 keys (running max and sum, rescaled context), "
    "scores in the accumulation dtype, weights rounded to the dtype before P @ V",
    "eager": "FMA GEMMs + reciprocal + prescale-q: an eager framework's math path on CPU",
    "xla": "sequential + half-reductions: XLA and TensorFlow on CPU",
    "half-accumulation": "float16 only: every matmul and sum accumulated term by term in float16 itself "
    "(TensorFlow's CPU einsum)",
    "flash-tiled": "online softmax over blocks of 8 keys, backward recomputed from the logsumexp with D summed "
    "sequentially (dP from a correctly rounded GEMM)",
    "flash": "FMA GEMMs + prescale-qk + online + reciprocal forward; backward recomputes the weights from the "
    "accumulation-dtype logsumexp, with D = rowsum(dO * O) summed as a tree",
    "half-reductions": "sums over tokens and kv groups term by term in the dtype itself",
}


def _sequential_sum(x: Array, axis: int, round_each) -> Array:
    """Sum along ``axis`` term by term, ``round_each`` applied to every partial sum."""
    x = np.moveaxis(x, axis, 0)
    total = x[0].copy()
    for term in x[1:]:
        total = round_each(total + term)
    return total


def _tree_sum(x: Array) -> Array:
    """Sum along the last axis pairwise (a reduction tree), every partial sum rounded."""
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:
            x = np.concatenate([x, np.zeros_like(x[..., :1])], axis=-1)
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


@dataclass(frozen=True)
class Arithmetic:
    """The arithmetic of one emulation: a precision and an algorithm. In float64 it is the
    truth's own arithmetic (NumPy and BLAS in float64), whatever the algorithm."""

    p: Precision
    alg: Algorithm = STRAIGHTFORWARD

    @property
    def exact(self) -> bool:
        return self.p.name == "float64"

    def round(self, x: Array) -> Array:
        return self.p.round(x)

    def acc(self, x: Array) -> Array:
        return self.p.acc(x)

    def matmul(self, x: Array, y: Array) -> Array:
        """``x @ y`` in the accumulation dtype (not yet rounded to the storage dtype)."""
        if self.exact:
            return np.asarray(x, np.float64) @ np.asarray(y, np.float64)
        # Products of two half-precision values are exact in float32: there an FMA is sequential.
        if self.alg.matmul == "sequential" or (self.alg.matmul == "fma" and self.p.name != "float32"):
            xa, ya = self.acc(x), self.acc(y)
            total = xa[..., :, :1] * ya[..., :1, :]
            for i in range(1, xa.shape[-1]):  # left to right, every product and partial sum rounded
                total = total + xa[..., :, i : i + 1] * ya[..., i : i + 1, :]
            return total
        if self.alg.matmul == "storage":  # accumulated in the dtype itself: every partial sum rounded to it
            if self.p.name == "float16":  # NumPy's float16 arithmetic rounds every operation to float16
                xa, ya = np.asarray(x, np.float16), np.asarray(y, np.float16)
                total = xa[..., :, :1] * ya[..., :1, :]
                for i in range(1, xa.shape[-1]):
                    total = total + xa[..., :, i : i + 1] * ya[..., i : i + 1, :]
                return self.acc(total)
            xa, ya = self.acc(x), self.acc(y)
            total = self.round(xa[..., :, :1] * ya[..., :1, :])
            for i in range(1, xa.shape[-1]):
                total = self.round(total + self.round(xa[..., :, i : i + 1] * ya[..., i : i + 1, :]))
            return total
        if self.alg.matmul == "fma":
            # Left to right with one rounding a step: a product of two float32 values is exact in
            # float64, so rounding the float64 sum to float32 is a fused multiply-add.
            xd, yd = np.asarray(self.acc(x), np.float64), np.asarray(self.acc(y), np.float64)
            total = self.acc(xd[..., :, :1] * yd[..., :1, :])
            for i in range(1, xd.shape[-1]):
                total = self.acc(total + xd[..., :, i : i + 1] * yd[..., i : i + 1, :])
            return total
        return correctly_rounded_matmul(self.acc(x), self.acc(y))

    def sum(self, x: Array, axis: int, reduction: bool = False) -> Array:
        """Sum along ``axis`` in the accumulation dtype; ``reduction`` marks the sums over tokens
        and kv groups that ``Algorithm.reductions`` may move to the storage dtype."""
        if self.exact:
            return np.asarray(x, np.float64).sum(axis=axis)
        if reduction and self.alg.reductions == "storage":
            return _sequential_sum(self.round(x), axis, self.round)
        if self.alg.matmul == "storage":
            return _sequential_sum(self.round(x), axis, self.round)
        if self.alg.matmul in ("sequential", "fma"):
            return _sequential_sum(self.acc(x), axis, self.acc)
        return self.acc(np.asarray(x, np.float64).sum(axis=axis))

    def exp(self, x: Array) -> Array:
        """exp computed in float64 and rounded to the accumulation dtype; emulated, from IEEE
        operations alone (:func:`portable_exp`), so the same on every machine."""
        if self.exact:
            return np.exp(np.asarray(x, np.float64))
        return self.acc(portable_exp(x))

    def log(self, x: Array) -> Array:
        """log, as :meth:`exp` (:func:`portable_log` when emulated)."""
        if self.exact:
            return np.log(np.asarray(x, np.float64))
        return self.acc(portable_log(x))

    def tanh(self, x: Array) -> Array:
        """tanh, as :meth:`exp` (:func:`portable_tanh` when emulated)."""
        if self.exact:
            return np.tanh(np.asarray(x, np.float64))
        return self.acc(portable_tanh(x))


EXACT = Arithmetic(FLOAT64)


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
    scores: Array | None = None  # [B, H, Tq, Tk] the logits as the algorithm formed them
    lse: Array | None = None  # [B, H, Tq, 1] logsumexp of the online softmax (emulations only)
    capped: Array | None = None  # [B, H, Tq, Tk] tanh(scores / softcap), where the case has a softcap


def default_scale(spec: Mapping[str, Any]) -> float:
    """The softmax scale: the spec's own, else 1/sqrt(head_dim)."""
    scale = spec.get("scale")
    return float(scale) if scale is not None else 1.0 / float(np.sqrt(spec["head_dim"]))


#: The optional variants of contract v2, by the spec key that states each.
VARIANTS = ("attn_bias", "softcap", "window", "kv_lengths")


def case_variants(spec: Mapping[str, Any]) -> tuple[str, ...]:
    """The contract-v2 variants a case uses (empty for every format 1 and 2 case)."""
    return tuple(v for v in VARIANTS if spec.get(v) is not None)


def allowed_keys(spec: Mapping[str, Any], mask: Array | None, attn_bias: Array | None = None) -> Array:
    """Boolean [B, H, Tq, Tk]: may query i of head h attend key j?

    The intersection of: the explicit mask (True = may attend); the bias's finite entries
    (``-inf`` = masked); the keys below each batch row's ``kv_lengths``; the causal rule
    ``j <= p``; the window ``p - left <= j <= p + right``. Query i's position p is
    ``i + L - Tq`` with L the row's key length (Tk without ``kv_lengths``): bottom-right
    aligned, so the last query sees every key, as in KV-cache decoding.
    """
    b, h, tq, tk = spec["batch"], spec["num_heads"], spec["q_len"], spec["kv_len"]
    allowed = np.ones((b, h, tq, tk), dtype=bool)
    if mask is not None:
        allowed &= np.broadcast_to(np.asarray(mask, dtype=bool), allowed.shape)
    if attn_bias is not None:
        allowed &= np.broadcast_to(np.asarray(attn_bias, np.float64) != -np.inf, allowed.shape)
    lengths = spec.get("kv_lengths")
    ends = np.full(b, tk) if lengths is None else np.asarray(lengths, dtype=np.int64)
    j = np.arange(tk)[None, None, None, :]
    position = np.arange(tq)[None, None, :, None] + (ends - tq)[:, None, None, None]  # [B, 1, Tq, 1]
    if lengths is not None:
        allowed &= j < ends[:, None, None, None]
    if spec["causal"]:
        allowed &= j <= position
    window = spec.get("window")
    if window is not None:
        left, right = window
        if left >= 0:
            allowed &= j >= position - left
        if right >= 0:
            allowed &= j <= position + right
    return allowed


def split_heads(x: Array, heads: int, width: int) -> Array:
    """[B, T, heads*width] -> [B, heads, T, width]."""
    b, t, _ = x.shape
    return x.reshape(b, t, heads, width).transpose(0, 2, 1, 3)


def merge_heads(x: Array) -> Array:
    """[B, heads, T, width] -> [B, T, heads*width]."""
    b, h, t, w = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * w)


def _linear(ar: Arithmetic, x: Array, w: Array, b: Array | None) -> Array:
    y = ar.matmul(x, w)
    if b is not None:
        y = y + ar.acc(b)
    return ar.round(y)


def _scores(ar: Arithmetic, q: Array, k: Array, scale: float) -> Array:
    """``Q K^T * scale`` where the algorithm puts the scale; rounded to the dtype unless the
    online softmax keeps them in the accumulation dtype."""
    where = ar.alg.scale
    if where == "q":
        q = ar.round(ar.acc(q) * ar.acc(ar.round(np.float64(scale))))
    elif where == "qk":
        root = ar.acc(ar.round(np.sqrt(np.float64(scale))))
        q, k = ar.round(ar.acc(q) * root), ar.round(ar.acc(k) * root)
    product = ar.matmul(q, k.swapaxes(-1, -2))
    if where == "scores":
        product = product * ar.p.accumulate(scale)
    elif where == "after":  # Q K^T stored in the dtype, then multiplied by the dtype's scale
        product = ar.acc(ar.round(product)) * ar.acc(ar.round(np.float64(scale)))
    return product if ar.alg.key_block else ar.round(product)


def _logits(
    ar: Arithmetic, scores: Array, spec: Mapping[str, Any], attn_bias: Array | None, allowed: Array
) -> tuple[Array, Array | None]:
    """The scaled scores with the softcap, then the bias, applied: each an elementwise step in the
    accumulation dtype, rounded to the dtype unless the online softmax keeps the scores there.
    Returns the logits and ``tanh(scores / softcap)`` (None without a softcap)."""
    keep = (lambda x: x) if ar.alg.key_block and not ar.exact else ar.round
    capped = None
    cap = spec.get("softcap")
    if cap is not None:
        c = ar.acc(ar.round(np.float64(cap)))
        capped = ar.tanh(ar.acc(ar.acc(scores) / c))
        scores = keep(capped * c)
    if attn_bias is not None:
        bias = np.broadcast_to(ar.acc(ar.round(attn_bias)), scores.shape)
        scores = keep(np.where(allowed, ar.acc(scores) + np.where(allowed, bias, ar.acc(0.0)), scores))
    return scores, capped


def _normalise(ar: Arithmetic, x: Array, total: Array) -> Array:
    """``x / total`` (or ``x * (1/total)``) where ``total > 0``, else 0."""
    safe = np.where(total > 0, total, ar.acc(1.0))
    out = x * (ar.acc(1.0) / safe) if ar.alg.softmax == "reciprocal" else x / safe
    return np.where(total > 0, out, ar.acc(0.0))


def masked_softmax(
    p: Precision, scores: Array, allowed: Array, algorithm: Algorithm = STRAIGHTFORWARD
) -> Array:
    """Softmax over the allowed keys of each row; rows with none allowed give zeros."""
    ar = Arithmetic(p, algorithm)
    any_allowed = allowed.any(axis=-1, keepdims=True)
    row_max = np.where(allowed, scores, -np.inf).max(axis=-1, keepdims=True)
    row_max = np.where(any_allowed, row_max, 0.0)
    # exp(-inf) = 0 for keys that may not be attended, without overflow warnings.
    exps = ar.exp(ar.acc(np.where(allowed, scores - row_max, -np.inf)))
    total = ar.sum(exps, -1)[..., None]
    return p.round(_normalise(ar, exps, total))


def _online_attention(ar: Arithmetic, scores: Array, allowed: Array, v: Array) -> tuple[Array, Array, Array]:
    """The flash forward: blocks of keys, a running max ``m`` and sum ``l``, the context
    rescaled by ``exp(m_old - m_new)`` at every new max, weights rounded to the dtype before
    ``P @ V``. Returns the per-head context (rounded), the weights recomputed from the final
    logsumexp (rounded) and that logsumexp."""
    block = ar.alg.key_block
    shape = scores.shape[:-1] + (1,)
    m = np.full(shape, -np.inf, ar.p.accumulate)
    total = np.zeros(shape, ar.p.accumulate)
    context = np.zeros(scores.shape[:-1] + (v.shape[-1],), ar.p.accumulate)
    for j0 in range(0, scores.shape[-1], block):
        s = ar.acc(np.where(allowed[..., j0 : j0 + block], scores[..., j0 : j0 + block], -np.inf))
        m_new = np.maximum(m, s.max(axis=-1, keepdims=True))
        base = np.where(np.isfinite(m_new), m_new, ar.acc(0.0))
        rescale = np.where(np.isfinite(m), ar.exp(m - base), ar.acc(0.0))
        p = ar.exp(s - base)
        total = total * rescale + ar.sum(p, -1)[..., None]
        context = context * rescale + ar.matmul(ar.round(p), v[..., j0 : j0 + block, :])
        m = m_new
    lse = np.where(total > 0, m + ar.log(np.where(total > 0, total, 1.0)), ar.acc(0.0))
    weights = np.where(allowed, ar.exp(ar.acc(np.where(allowed, scores, lse)) - lse), ar.acc(0.0))
    return ar.round(_normalise(ar, context, total)), ar.round(weights), ar.acc(lse)


def forward(
    tensors: Mapping[str, Array],
    spec: Mapping[str, Any],
    precision: Precision = FLOAT64,
    algorithm: Algorithm = STRAIGHTFORWARD,
) -> Forward:
    """Multi-head attention forward pass.

    ``tensors`` holds ``query key value w_q w_k w_v`` (and ``w_o`` when ``out_proj``),
    the biases the case has (``b_q b_k b_v b_o``) and optionally ``mask`` and ``attn_bias``. In the default
    float64 precision this is the truth; other precisions emulate a dtype (see
    :class:`Precision`), in the order of operations ``algorithm`` describes, to measure what
    that dtype can achieve.
    """
    ar = Arithmetic(precision, algorithm)
    h, hkv = spec["num_heads"], spec["num_kv_heads"]
    hd, hdv = spec["head_dim"], spec["v_head_dim"]
    if h % hkv:
        raise ValueError(f"case {spec.get('id')}: num_heads {h} not divisible by num_kv_heads {hkv}")
    group = h // hkv
    scale = default_scale(spec)

    def get(name: str) -> Array | None:
        value = tensors.get(name)
        return None if value is None else ar.round(value)

    q = split_heads(_linear(ar, get("query"), get("w_q"), get("b_q")), h, hd)
    k = split_heads(_linear(ar, get("key"), get("w_k"), get("b_k")), hkv, hd)
    v = split_heads(_linear(ar, get("value"), get("w_v"), get("b_v")), hkv, hdv)
    k = np.repeat(k, group, axis=1)  # query head h reads kv head h // group
    v = np.repeat(v, group, axis=1)

    attn_bias = tensors.get("attn_bias")
    allowed = allowed_keys(spec, tensors.get("mask"), attn_bias)
    scores, capped = _logits(ar, _scores(ar, q, k, scale), spec, attn_bias, allowed)
    lse = None
    if algorithm.key_block and not ar.exact:
        heads, weights, lse = _online_attention(ar, scores, allowed, v)
    else:
        weights = masked_softmax(precision, scores, allowed, algorithm)
        heads = ar.round(ar.matmul(weights, v))
    context = merge_heads(heads)
    output = _linear(ar, context, get("w_o"), get("b_o")) if spec["out_proj"] else context
    return Forward(output, weights, allowed, q, k, v, context, scale, scores, lse, capped)


# ---------------------------------------------------------------------------- backward


def sum_groups(ar: Arithmetic, x: Array, group: int) -> Array:
    """[B, H, T, w] -> [B, H/group, T, w]: gradients of repeated kv heads add up."""
    b, h, t, w = x.shape
    return ar.sum(x.reshape(b, h // group, group, t, w), 2, reduction=True)


def bias_gradient(ar: Arithmetic, d_logits: Array, shape: tuple[int, ...]) -> Array:
    """The gradient of an additive bias of ``shape`` [B|1, H|1, Tq, Tk]: the logits' gradient
    summed over the batch and head axes the bias broadcasts along."""
    for axis in (0, 1):
        if shape[axis] == 1 and d_logits.shape[axis] != 1:
            d_logits = ar.sum(d_logits, axis, reduction=True)[(slice(None),) * axis + (None,)]
    return ar.round(d_logits)


def _softmax_backward(ar: Arithmetic, fw: Forward, d_heads: Array) -> tuple[Array, Array]:
    """``(dS, dV)`` from the context gradient per head: reusing the stored weights, or, for the
    flash backward, recomputing them from the logsumexp with ``D = rowsum(dO * O)``."""
    v_t = fw.v.swapaxes(-1, -2)
    d_w = ar.matmul(d_heads, v_t)
    if ar.alg.backward == "recompute" and fw.lse is not None:
        scores = ar.acc(np.where(fw.allowed, fw.scores, fw.lse))
        w = np.where(fw.allowed, ar.exp(scores - fw.lse), ar.acc(0.0))
        heads = split_heads(fw.context, fw.q.shape[1], fw.v.shape[-1])
        # D is a row reduction, not a GEMM: formed in another order than dP = dO V^T (a tree after
        # a sequential GEMM, a sequential sum after a rounded one), so the two cancel only up to
        # rounding, and a lone key's gradient is noise, not exactly zero.
        products = ar.acc(d_heads) * ar.acc(heads)
        if ar.alg.matmul != "rounded":
            row = _tree_sum(products)[..., None]
        else:
            row = _sequential_sum(products, -1, ar.acc)[..., None]
        d_scores = ar.round(w * (d_w - row))
        d_v = ar.round(ar.matmul(ar.round(w).swapaxes(-1, -2), d_heads))
        return d_scores, d_v
    w = fw.attn_weights
    wa, d_wa = ar.acc(w), ar.acc(ar.round(d_w))
    d_scores = ar.round(wa * (d_wa - ar.sum(d_wa * wa, -1)[..., None]))  # zero where masked
    d_v = ar.round(ar.matmul(w.swapaxes(-1, -2), d_heads))
    return d_scores, d_v


def backward(
    tensors: Mapping[str, Array],
    spec: Mapping[str, Any],
    grad_output: Array,
    precision: Precision = FLOAT64,
    projection_grads: dict[str, Array] | None = None,
    algorithm: Algorithm = STRAIGHTFORWARD,
    fw: Forward | None = None,
    only_inputs: bool = False,
) -> dict[str, Array]:
    """Gradients of ``sum(output * grad_output)`` with respect to every input and weight.

    Returns ``grad_<name>`` for ``query key value``, every weight and bias present and
    ``attn_bias`` where the case has one (summed over the axes it broadcasts along).
    ``query``, ``key`` and ``value`` are treated as separate arguments even when a
    self-attention case stores the same array three times. In the default float64 this is
    the truth; another precision emulates a dtype as the forward does: the backward runs on
    the emulated forward's rounded intermediates, and each step (a matmul, the softmax
    backward, a sum over tokens or kv groups) is formed in the accumulation dtype, in the
    order ``algorithm`` describes, and its result rounded to the storage dtype, as autograd
    does with its half-precision kernels. ``projection_grads``, when given, receives the
    gradients of the projections' outputs (``q k v``, [B, T, width]), from which the bias
    gradients are sums over tokens. ``fw``, when given, is this precision's and algorithm's forward
    already computed; ``only_inputs`` leaves out the weight and bias gradients.
    """
    ar = Arithmetic(precision, algorithm)
    fw = fw if fw is not None else forward(tensors, spec, precision, algorithm)
    h, hdv = spec["num_heads"], spec["v_head_dim"]
    group = h // spec["num_kv_heads"]
    grads: dict[str, Array] = {}

    def flat(x: Array) -> Array:  # [B, T, n] -> [B*T, n]
        return x.reshape(-1, x.shape[-1])

    def token_sum(x: Array) -> Array:  # bias gradients: a sum over batch and tokens
        return ar.round(ar.sum(flat(x), 0, reduction=True))

    def weight_grad(x: Array, d_y: Array) -> Array:  # x^T d_y over batch and tokens
        return ar.round(ar.matmul(flat(x).T, flat(d_y)))

    d_context = ar.round(grad_output)
    if spec["out_proj"]:
        if not only_inputs:
            grads["grad_w_o"] = weight_grad(fw.context, d_context)
            if "b_o" in tensors:
                grads["grad_b_o"] = token_sum(d_context)
        d_context = ar.round(ar.matmul(d_context, ar.round(tensors["w_o"]).T))

    d_scores, d_v = _softmax_backward(ar, fw, split_heads(d_context, h, hdv))
    if "attn_bias" in tensors:
        grads["grad_attn_bias"] = bias_gradient(ar, d_scores, np.shape(tensors["attn_bias"]))
    if fw.capped is not None:  # d/dx c * tanh(x / c) = 1 - tanh(x / c)^2
        d_scores = ar.round(ar.acc(d_scores) * (ar.acc(1.0) - fw.capped * fw.capped))
    scale = precision.accumulate(fw.scale)
    d_q = ar.round(ar.matmul(d_scores, fw.k) * scale)
    d_k = ar.round(ar.matmul(d_scores.swapaxes(-1, -2), fw.q) * scale)

    projected = {
        "q": merge_heads(d_q),
        "k": merge_heads(ar.round(sum_groups(ar, d_k, group))),
        "v": merge_heads(ar.round(sum_groups(ar, d_v, group))),
    }
    if projection_grads is not None:
        projection_grads.update(projected)
    for short, input_name in PROJECTIONS[:3]:
        d_y = projected[short]
        if not only_inputs:
            grads[f"grad_w_{short}"] = weight_grad(ar.round(tensors[input_name]), d_y)
            if f"b_{short}" in tensors:
                grads[f"grad_b_{short}"] = token_sum(d_y)
        grads[f"grad_{input_name}"] = ar.round(ar.matmul(d_y, ar.round(tensors[f"w_{short}"]).T))
    return grads
