"""Valid orders of operations, written independently of ``impls/reference.py``: the portability test.

Each adapter here computes the reference semantics exactly as a correct kernel may, emulated in
the dtype it is asked for (inputs, weights and every intermediate rounded to the dtype, products
and sums formed in float32 for the half types), in an order of operations that shipped kernels
use. None of them is the order the golden baselines were measured with; a tolerance model that
holds on every machine must accept all of them, with room to spare:
``tests/test_portability.py`` requires every one to pass every case at ``--k-factor 1``, half
the default limit. They are not built-ins (nothing here is fast), and nothing here imports the
reference: a shared mistake would have to be made twice.

Orders (``Order``):

* matmul: ``fma`` (sequential fused multiply-add along K, one rounding a step, as an FMA GEMM
  micro-kernel), ``pairwise`` (a tree over K, as vectorised reductions), ``split4`` (K split in
  four chunks summed sequentially, then the chunks added: split-K GEMMs), ``mma16`` (16 products
  at a time summed wide, then accumulated in float32: tensor cores);
* scale: on the scores, on ``q`` in the dtype, ``sqrt(scale)`` on ``q`` and ``k``, or folded
  into ``exp2`` with ``log2(e)`` (FlashAttention-2/3, Triton);
* softmax: two-pass with division or reciprocal, online over blocks of ``block`` keys, or split-K
  (parts of ``block`` keys combined by their logsumexps);
* backward: the stored weights, or recomputed from the logsumexp with ``D = rowsum(dO * O)``;
* sums over tokens and kv groups in float32 or in the half dtype itself.

Every order also computes contract v2's variants (docs/semantics.md#variants): the softcap and the
bias on the scaled scores in the accumulation dtype (with ``exp2``, the scores are then scaled
before the cap instead of inside ``exp2``), per-batch key lengths and windows in the allowed set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import ml_dtypes
import numpy as np

from mha_conformance.impls.adapter import ALL_DTYPES, Adapter, Arrays, Prepared, Spec

F32, F64 = np.float32, np.float64
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class Order:
    matmul: str = "fma"
    scale: str = "scores"
    softmax: str = "divide"  # "divide", "reciprocal", "online" or "split"
    block: int = 0
    backward: str = "stored"  # or "lse"
    sums: str = "float32"  # or "dtype"


class Arith:
    """Arithmetic in one dtype: ``store`` rounds to the dtype, ``acc`` is the accumulation dtype."""

    def __init__(self, dtype: str, order: Order) -> None:
        self.dtype, self.order = dtype, order
        self.acc = F64 if dtype == "float64" else F32

    def store(self, x: Any) -> np.ndarray:
        if self.dtype == "bfloat16":
            return np.asarray(x, F32).astype(ml_dtypes.bfloat16).astype(F32)
        if self.dtype == "float16":
            return np.asarray(x, F32).astype(np.float16).astype(F32)
        return np.asarray(x, self.acc)

    def a(self, x: Any) -> np.ndarray:
        return np.asarray(x, self.acc)

    def reduce(self, x: np.ndarray, axis: int, how: str | None = None) -> np.ndarray:
        """Sum ``x`` along ``axis`` in the order ``how`` (default: the matmul order)."""
        how = how or self.order.matmul
        x = np.moveaxis(self.a(x), axis, 0)
        if how == "pairwise":
            while x.shape[0] > 1:
                if x.shape[0] % 2:
                    x = np.concatenate([x, np.zeros_like(x[:1])])
                x = x[0::2] + x[1::2]
            return x[0]
        if how == "split4":
            chunks = np.array_split(np.arange(x.shape[0]), min(4, x.shape[0]))
            partial = [self.reduce(x[c], 0, "sequential") for c in chunks]
            return self.reduce(np.stack(partial), 0, "sequential")
        if how == "dtype":  # term by term, every partial sum rounded to the storage dtype
            total = self.store(x[0])
            for term in x[1:]:
                total = self.store(total + self.store(term))
            return total
        total = x[0]
        for term in x[1:]:
            total = total + term
        return total

    def mm(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """``x @ y`` (batched over leading axes) in the accumulation dtype. ``fma`` and ``mma16``
        run along K without forming every product at once (kernel-scale cases)."""
        x, y = self.a(x), self.a(y)
        shape = np.broadcast_shapes(x.shape[:-1] + (1,), y.shape[:-2] + (1, y.shape[-1]))
        if self.order.matmul == "fma":
            total = np.zeros(shape, F64)
            for i in range(x.shape[-1]):  # a product of two float32 is exact in float64: one rounding a step
                total = total + x[..., :, i : i + 1].astype(F64) * y[..., i : i + 1, :].astype(F64)
                total = total.astype(self.acc).astype(F64)
            return total.astype(self.acc)
        if self.order.matmul == "mma16":
            # A tensor-core MMA: 16 products of K at a time summed wide (float64 here), then added
            # to the accumulator in its dtype (float32 for the half types).
            total = np.zeros(shape, self.acc)
            for i in range(0, x.shape[-1], 16):
                part = x[..., :, i : i + 16].astype(F64) @ y[..., i : i + 16, :].astype(F64)
                total = (total.astype(F64) + part).astype(self.acc)
            return total
        products = x[..., :, :, None] * y[..., None, :, :]
        return self.reduce(products, -2)

    def exp(self, x: np.ndarray) -> np.ndarray:
        """The platform's exp in the accumulation dtype (a vectorised libm, a few ulps)."""
        return np.exp(self.a(x))


def _heads(x: np.ndarray, n: int) -> np.ndarray:
    b, t, width = x.shape
    return x.reshape(b, t, n, width // n).transpose(0, 2, 1, 3)


def _merge(x: np.ndarray) -> np.ndarray:
    b, h, t, w = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * w)


def _allowed(spec: Mapping[str, Any], mask: np.ndarray | None, bias: np.ndarray | None) -> np.ndarray:
    b, h, tq, tk = spec["batch"], spec["num_heads"], spec["q_len"], spec["kv_len"]
    ok = np.ones((b, h, tq, tk), bool)
    if mask is not None:
        ok = ok & np.broadcast_to(mask, ok.shape)
    if bias is not None:
        ok = ok & np.broadcast_to(np.isfinite(bias), ok.shape)
    for row in range(b):  # each batch row's queries sit bottom-right of its own keys
        length = tk if spec.get("kv_lengths") is None else spec["kv_lengths"][row]
        key = np.arange(tk)[None, :]
        at = np.arange(tq)[:, None] + length - tq
        rule = key < length
        if spec["causal"]:
            rule = rule & (key <= at)
        left, right = spec.get("window") or (-1, -1)
        if left >= 0:
            rule = rule & (key >= at - left)
        if right >= 0:
            rule = rule & (key <= at + right)
        ok[row] &= rule
    return ok


class Attention:
    """One forward (and backward) of the reference semantics in one order and dtype."""

    def __init__(self, ar: Arith, spec: Mapping[str, Any], t: Mapping[str, np.ndarray]) -> None:
        self.ar, self.spec = ar, spec
        self.t = {n: (a if a.dtype == bool else ar.store(np.asarray(a, F64))) for n, a in t.items()}
        scale = spec["scale"] if spec["scale"] is not None else 1.0 / np.sqrt(spec["head_dim"])
        self.scale = float(scale)
        self.group = spec["num_heads"] // spec["num_kv_heads"]

    def linear(self, x: np.ndarray, short: str) -> np.ndarray:
        ar = self.ar
        y = ar.mm(x, self.t[f"w_{short}"])
        if f"b_{short}" in self.t:
            y = y + ar.a(self.t[f"b_{short}"])
        return ar.store(y)

    def forward(self, q_in, k_in, v_in, mask) -> np.ndarray:
        ar, o, spec = self.ar, self.ar.order, self.spec
        h = spec["num_heads"]
        q = _heads(self.linear(ar.store(q_in), "q"), h)
        k = np.repeat(_heads(self.linear(ar.store(k_in), "k"), spec["num_kv_heads"]), self.group, 1)
        v = np.repeat(_heads(self.linear(ar.store(v_in), "v"), spec["num_kv_heads"]), self.group, 1)
        self.q, self.k, self.v = q, k, v
        bias = self.t.get("attn_bias")
        self.allowed = _allowed(spec, mask, bias)
        if o.scale == "q":
            qs, ks = ar.store(q * ar.a(ar.store(self.scale))), k
        elif o.scale == "qk":
            root = ar.a(ar.store(np.sqrt(self.scale)))
            qs, ks = ar.store(q * root), ar.store(k * root)
        else:
            qs, ks = q, k
        s = ar.mm(qs, ks.swapaxes(-1, -2))
        if o.scale == "scores":
            s = s * ar.a(self.scale)
        cap = spec.get("softcap")
        # The factor from the scores kept to the natural-log logits (only exp2 leaves them unscaled).
        self.unit = self.scale if o.scale == "exp2" and cap is None and bias is None else 1.0
        exp_scale = ar.a(self.unit * LOG2E) if o.scale == "exp2" else None
        if o.scale == "exp2" and self.unit == 1.0:
            s = s * ar.a(self.scale)
        self.capped = None
        if cap is not None:
            c = ar.a(ar.store(cap))
            self.capped = np.tanh((ar.a(s) / c).astype(F64)).astype(ar.acc)
            s = self.capped * c
        if bias is not None:
            s = np.where(self.allowed, ar.a(s) + np.where(self.allowed, ar.a(bias), 0).astype(ar.acc), s)
        if o.softmax not in ("online", "split"):  # a fused kernel keeps its scores in registers
            s = ar.store(s)
        self.s, self.exp_scale = s, exp_scale
        softmax = {"online": self._online, "split": self._split}.get(o.softmax, self._two_pass)
        context = softmax(s, v)
        self.context = _merge(context)
        return self.linear(self.context, "o") if spec["out_proj"] else self.context

    def _p(self, shifted: np.ndarray) -> np.ndarray:
        """exp of (score - max), or exp2 with the scale and log2(e) folded in."""
        if self.exp_scale is not None:
            return np.exp2(self.ar.a(shifted * self.exp_scale))
        return self.ar.exp(shifted)

    def _two_pass(self, s: np.ndarray, v: np.ndarray) -> np.ndarray:
        ar = self.ar
        masked = np.where(self.allowed, s, -np.inf)
        top = masked.max(-1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0)
        e = np.where(self.allowed, self._p(np.where(self.allowed, s - top, 0)), 0).astype(ar.acc)
        total = ar.reduce(e, -1)[..., None]
        safe = np.where(total > 0, total, 1)
        w = e * (ar.a(1) / safe) if ar.order.softmax == "reciprocal" else e / safe
        self.w = ar.store(np.where(total > 0, w, 0))
        self.lse = None
        return ar.store(ar.mm(self.w, v))

    def _online(self, s: np.ndarray, v: np.ndarray) -> np.ndarray:
        ar, block = self.ar, self.ar.order.block
        shape = s.shape[:-1] + (1,)
        m = np.full(shape, -np.inf, ar.acc)
        total = np.zeros(shape, ar.acc)
        acc = np.zeros(s.shape[:-1] + (v.shape[-1],), ar.acc)
        for j in range(0, s.shape[-1], block):
            ok = self.allowed[..., j : j + block]
            sj = np.where(ok, s[..., j : j + block], -np.inf)
            m_new = np.maximum(m, sj.max(-1, keepdims=True))
            base = np.where(np.isfinite(m_new), m_new, 0).astype(ar.acc)
            fix = np.where(np.isfinite(m), self._p(np.where(np.isfinite(m), m - base, 0)), 0).astype(ar.acc)
            p = np.where(ok, self._p(np.where(ok, sj - base, 0)), 0).astype(ar.acc)
            total = total * fix + ar.reduce(p, -1)[..., None]
            acc = acc * fix + ar.mm(ar.store(p), v[..., j : j + block, :])
            m = m_new
        safe = np.where(total > 0, total, 1)
        log_total = np.log(safe.astype(F64)).astype(ar.acc)
        # lse in the natural-log units of the logits
        self.lse = np.where(total > 0, m * ar.a(self.unit) + log_total, 0).astype(ar.acc)
        self.w = None
        return ar.store(np.where(total > 0, acc / safe, 0))

    def _split(self, s: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Split-K (FlashDecoding, FlashAttention's num_splits): the keys cut in parts of ``block``,
        each part's softmax and output normalised on its own (kept in the accumulation dtype with
        its logsumexp), then the parts combined by their logsumexps: ``O = sum_i exp(lse_i - lse) O_i``."""
        ar, block = self.ar, self.ar.order.block
        outs, lses = [], []
        for j in range(0, s.shape[-1], block):
            ok = self.allowed[..., j : j + block]
            sj = np.where(ok, s[..., j : j + block], -np.inf)
            top = sj.max(-1, keepdims=True)
            base = np.where(np.isfinite(top), top, 0).astype(ar.acc)
            p = np.where(ok, self._p(np.where(ok, sj - base, 0)), 0).astype(ar.acc)
            total = ar.reduce(p, -1)[..., None]
            safe = np.where(total > 0, total, 1)
            outs.append(
                np.where(total > 0, ar.mm(ar.store(p), v[..., j : j + block, :]) / safe, 0).astype(ar.acc)
            )
            log_total = np.log(safe.astype(F64)).astype(ar.acc)
            lses.append(np.where(total > 0, base * ar.a(self.unit) + log_total, -np.inf).astype(ar.acc))
        top = np.max(lses, axis=0)
        base = np.where(np.isfinite(top), top, 0).astype(ar.acc)
        weights = [
            np.where(np.isfinite(lse), ar.exp(np.where(np.isfinite(lse), lse - base, 0)), 0) for lse in lses
        ]
        total = ar.reduce(np.stack(weights), 0, "sequential")
        safe = np.where(total > 0, total, 1)
        self.lse = np.where(total > 0, base + np.log(safe.astype(F64)).astype(ar.acc), 0).astype(ar.acc)
        combined = ar.reduce(
            np.stack([w / safe * o for w, o in zip(weights, outs, strict=True)]), 0, "sequential"
        )
        self.w = None
        return ar.store(np.where(total > 0, combined, 0))

    def backward(self, d_out: np.ndarray) -> dict[str, np.ndarray]:
        ar, spec, t = self.ar, self.spec, self.t
        sums = "dtype" if ar.order.sums == "dtype" else None
        d_out = ar.store(d_out)
        grads: dict[str, np.ndarray] = {}

        def flat(x: np.ndarray) -> np.ndarray:
            return x.reshape(-1, x.shape[-1])

        if spec["out_proj"]:
            grads["grad_w_o"] = ar.store(ar.mm(flat(self.context).T, flat(d_out)))
            if "b_o" in t:
                grads["grad_b_o"] = ar.store(ar.reduce(flat(d_out), 0, sums))
            d_ctx = ar.store(ar.mm(d_out, t["w_o"].T))
        else:
            d_ctx = d_out
        d_heads = _heads(d_ctx, spec["num_heads"])
        d_p = ar.mm(d_heads, self.v.swapaxes(-1, -2))
        if ar.order.backward == "lse" and self.lse is not None:
            scores = self.s * ar.a(self.unit)
            p = np.where(self.allowed, ar.exp(np.where(self.allowed, scores - self.lse, 0)), 0).astype(ar.acc)
            o = _heads(self.context, spec["num_heads"])
            row = ar.reduce(ar.a(d_heads) * ar.a(o), -1, "pairwise")[..., None]
            d_s = ar.store(p * (d_p - row))
            d_v = ar.store(ar.mm(ar.store(p).swapaxes(-1, -2), d_heads))
        else:
            w = self.w if self.w is not None else np.zeros_like(self.s)
            d_p = ar.store(d_p)
            row = ar.reduce(d_p * w, -1)[..., None]
            d_s = ar.store(w * (d_p - row))
            d_v = ar.store(ar.mm(w.swapaxes(-1, -2), d_heads))
        if "attn_bias" in t:  # summed back over the batch and head axes the bias broadcasts along
            d_b = d_s
            for axis in (0, 1):
                if t["attn_bias"].shape[axis] == 1:
                    d_b = ar.reduce(d_b, axis, sums)[(slice(None),) * axis + (None,)]
            grads["grad_attn_bias"] = ar.store(d_b)
        if self.capped is not None:
            d_s = ar.store(ar.a(d_s) * (ar.a(1) - self.capped * self.capped))
        d_q = ar.store(ar.mm(d_s, self.k) * ar.a(self.scale))
        d_k = ar.store(ar.mm(d_s.swapaxes(-1, -2), self.q) * ar.a(self.scale))

        def groups(x: np.ndarray) -> np.ndarray:
            b, h, n, w = x.shape
            return ar.store(ar.reduce(x.reshape(b, h // self.group, self.group, n, w), 2, sums))

        chains = {"q": _merge(d_q), "k": _merge(groups(d_k)), "v": _merge(groups(d_v))}
        for short, name in (("q", "query"), ("k", "key"), ("v", "value")):
            d_y = chains[short]
            grads[f"grad_w_{short}"] = ar.store(ar.mm(flat(t[name]).T, flat(d_y)))
            if f"b_{short}" in t:
                grads[f"grad_b_{short}"] = ar.store(ar.reduce(flat(d_y), 0, sums))
            grads[f"grad_{name}"] = ar.store(ar.mm(d_y, t[f"w_{short}"].T))
        return grads


def _as(dtype: str):
    return ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)


class ValidOrder(Adapter):
    """Base of the valid orders: forward and backward in ``order``, emulated in the dtype."""

    order: ClassVar[Order] = Order()
    dtypes = ALL_DTYPES
    variants = frozenset({"attn_bias", "softcap", "window", "kv_lengths"})

    def prepare(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            att = Attention(Arith(dtype, self.order), spec, {**case, **inputs})
            out = att.forward(inputs["query"], inputs["key"], inputs["value"], inputs.get("mask"))
            return {"output": out.astype(_as(dtype))}

        return run

    def prepare_backward(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            att = Attention(Arith(dtype, self.order), spec, {**case, **inputs})
            att.forward(inputs["query"], inputs["key"], inputs["value"], inputs.get("mask"))
            return {n: g.astype(_as(dtype)) for n, g in att.backward(inputs["grad_output"]).items()}

        return run


def _valid(cls_name: str, name: str, path: str, order: Order) -> type[ValidOrder]:
    return type(cls_name, (ValidOrder,), {"name": name, "path": path, "order": order, "__doc__": path})


FmaReciprocalPrescale = _valid(
    "FmaReciprocalPrescale",
    "valid-fma-reciprocal-prescale-q",
    "FMA GEMMs, q pre-scaled in the dtype, softmax by reciprocal (PyTorch's math path on CPU)",
    Order(matmul="fma", scale="q", softmax="reciprocal"),
)
Flash2Exp2 = _valid(
    "Flash2Exp2",
    "valid-flash2-exp2",
    "FlashAttention-2: online softmax over 4-key blocks, scale folded into exp2, split-K GEMMs, "
    "backward from the logsumexp with D = rowsum(dO * O)",
    Order(matmul="split4", scale="exp2", softmax="online", block=4, backward="lse"),
)
PairwiseHalfSums = _valid(
    "PairwiseHalfSums",
    "valid-pairwise-half-sums",
    "tree-summed GEMMs and softmax, sqrt(scale) on q and k, bias and kv-group gradients summed in the dtype "
    "(XLA on half types)",
    Order(matmul="pairwise", scale="qk", softmax="divide", sums="dtype"),
)
OnlineFma = _valid(
    "OnlineFma",
    "valid-online-fma",
    "FMA GEMMs, online softmax over 8-key blocks with the scale on the scores, backward from the logsumexp",
    Order(matmul="fma", scale="scores", softmax="online", block=8, backward="lse"),
)

#: Every valid order the portability test runs.
VALID_ORDERS: tuple[type[ValidOrder], ...] = (FmaReciprocalPrescale, Flash2Exp2, PairwiseHalfSums, OnlineFma)

# The orders real kernels use at scale, run on the kernel tier (``vectors/kernels.py``): tensor-core
# GEMMs (``mma16``), flash tiling of 64 and 128 keys, split-K decoding.
Flash64Exp2 = _valid(
    "Flash64Exp2",
    "valid-flash64-exp2",
    "FlashAttention-2 on tensor cores: online softmax over 64-key tiles, scale folded into exp2, GEMMs "
    "16 products at a time accumulated in float32, backward from the logsumexp",
    Order(matmul="mma16", scale="exp2", softmax="online", block=64, backward="lse"),
)
Flash128 = _valid(
    "Flash128",
    "valid-flash128",
    "online softmax over 128-key tiles with the scale on the scores, tensor-core GEMMs, backward from the "
    "logsumexp",
    Order(matmul="mma16", scale="scores", softmax="online", block=128, backward="lse"),
)
SplitKLse = _valid(
    "SplitKLse",
    "valid-split-k-lse",
    "split-K (FlashDecoding): keys in parts of 1024, each part normalised on its own, the parts combined "
    "by their logsumexps; tensor-core GEMMs, backward from the logsumexp",
    Order(matmul="mma16", scale="scores", softmax="split", block=1024, backward="lse"),
)
Mma16TwoPass = _valid(
    "Mma16TwoPass",
    "valid-mma16-two-pass",
    "half-precision products accumulated in float32 16 at a time (cuBLAS on tensor cores), q pre-scaled "
    "in the dtype, two-pass softmax, backward from the stored weights",
    Order(matmul="mma16", scale="q", softmax="divide"),
)
#: The valid orders the kernel tier's evidence runs (docs/tolerance.md, at kernel scale).
KERNEL_VALID_ORDERS: tuple[type[ValidOrder], ...] = (Flash64Exp2, Flash128, SplitKLse, Mma16TwoPass)
