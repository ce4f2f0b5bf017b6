"""``keras-ops-sdpa``: ``keras.ops.dot_product_attention``, the function modern Keras code calls.

Projections are ``keras.ops.matmul`` with the case's weights; then one call of
``keras.ops.dot_product_attention(query, key, value, bias, mask, scale, is_causal,
attn_logits_soft_cap)`` in the [B, T, N, H] layout, and the output projection. ``is_causal``
(top-left aligned) only where that is the rule (Tq == Tk, no mask, no lengths or window); else
the bottom-right causal rule, the window and the per-batch lengths go into the boolean mask.
``attn_bias`` is the ``bias`` argument; ``softcap`` is ``attn_logits_soft_cap``. One adapter per
Keras backend (``keras-ops-sdpa`` on TensorFlow, ``-jax``, ``-torch``), as for the layers. It is
checked forward: no gradient path is written for it. The timed path traces the same function
(:meth:`KerasOpsSDPA.attention`) where the backend traces.

Keras 3.15 cannot express two things here: ``attn_logits_soft_cap`` raises "only supported for JAX
on TPU" on every CPU backend (a skip with that reason), and the torch backend refuses ``bias``
and ``mask`` together, so there the mask goes into the bias as ``-inf``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mha_conformance.impls.adapter import (
    Arrays,
    Divergence,
    Prepared,
    Spec,
    has_empty_rows,
    refusal,
    rule_mask,
)
from mha_conformance.impls.bench import Bench
from mha_conformance.impls.keras.backend import import_keras
from mha_conformance.impls.keras.divergences import (
    JAX_VALUE_WIDTH,
    values_wider_than_keys,
)
from mha_conformance.impls.keras.mha import KerasMHA

EMPTY_ROWS = (
    "a query row with no allowed key gets uniform weights 1/Tk (masked scores are set to a large negative "
    "number, not excluded), so its context is the mean of all values, or NaN where the row's bias is -inf "
    "at every key (a softmax over a row of -inf is 0/0), where the reference gives zeros"
)
SCALE_IN_FLOAT32 = (
    "on TensorFlow the Python-float scale becomes a float32 tensor before the cast to the compute dtype, so "
    "in float64 every logit carries the scale's float32 rounding (~3e-8 relative) wherever the scale (0.3, or "
    "1/sqrt(head_dim) for head_dim 2, 5, 8, 128, ...) is not exact in float32"
)
TF_SINGLE_KV_HEAD = (
    "on TensorFlow, one kv head shared by every query head (multi-query attention) fails inside the backend's "
    "einsum ('Expected dimension 4 at axis 2 of the input shaped [2,8,1,4] but got dimension 1'), although "
    "grouped-query attention with several kv heads runs"
)


FLOAT32_ONLY = (
    "keras.ops.dot_product_attention on {backend} computes float64 query, key and value in float32 and returns "
    "float32 (backend.result_type under the default floatx 'float32'): there is no float64 attention here to "
    "check, only a float32 one"
)


def scale_not_float32(spec: Mapping[str, Any]) -> bool:
    """Is the scale (the case's, or 1/sqrt(head_dim)) not exact in float32?"""
    scale = spec["scale"] if spec["scale"] is not None else 1.0 / np.sqrt(spec["head_dim"])
    return float(np.float32(scale)) != float(scale)


def multi_query(spec: Mapping[str, Any]) -> bool:
    return spec["num_kv_heads"] == 1 and spec["num_heads"] > 1


class KerasOpsSDPA(KerasMHA):
    name = "keras-ops-sdpa"
    keras_backend = "tensorflow"
    path = (
        "keras.ops matmul projections + keras.ops.dot_product_attention(bias, mask, scale, is_causal, "
        "attn_logits_soft_cap)"
    )
    variants = frozenset({"attn_bias", "window", "kv_lengths"})
    cannot_express = {
        "softcap": "keras.ops.dot_product_attention's attn_logits_soft_cap is only supported for JAX on TPU "
        "(Keras 3.15 raises ValueError on every CPU backend)"
    }
    divergences = (
        Divergence(f"keras.ops.dot_product_attention: {EMPTY_ROWS}", check="golden", when=has_empty_rows),
        Divergence(
            f"keras.ops.dot_product_attention: {SCALE_IN_FLOAT32}",
            check="golden",
            dtype="float64",
            when=scale_not_float32,
        ),
        Divergence(f"keras.ops.dot_product_attention: {TF_SINGLE_KV_HEAD}", when=multi_query),
    )

    def supports(self, spec: Spec, dtype: str, device: str) -> str | None:
        return None

    def attention(self, case: Arrays, spec: Spec, dtype: str, device: str):
        """``(attend, arguments)``: ``attend(params, query, key, value, bias, mask)`` is the whole
        forward on backend tensors (projections, ``keras.ops.dot_product_attention``, output
        projection), pure, so it can be traced (``tf.function``, ``jax.jit``); ``arguments(inputs)``
        puts one call's inputs on ``device`` as its arguments. The conformance and timed paths both
        run it."""
        k = import_keras()
        b, tq, tk = spec["batch"], spec["q_len"], spec["kv_len"]
        h, hkv, hd, hdv = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"], spec["v_head_dim"]
        rules = any(spec.get(v) is not None for v in ("window", "kv_lengths"))

        def project(params, x, short: str, heads: int, width: int):
            y = k.ops.matmul(x, params[f"w_{short}"])
            if f"b_{short}" in params:
                y = y + params[f"b_{short}"]
            return k.ops.reshape(y, (b, -1, heads, width))

        def attend(params, query, key, value, bias, mask):
            ctx = k.ops.dot_product_attention(
                project(params, query, "q", h, hd),
                project(params, key, "k", hkv, hd),
                project(params, value, "v", hkv, hdv),
                bias=bias,
                mask=mask,
                scale=spec["scale"],
                is_causal=top_left,
                attn_logits_soft_cap=spec.get("softcap"),
            )
            out = k.ops.reshape(ctx, (b, tq, h * hdv))
            if spec["out_proj"]:
                out = k.ops.matmul(out, params["w_o"])
                if "b_o" in params:
                    out = out + params["b_o"]
            return out

        top_left = spec["causal"] and tq == tk and "mask" not in case and not rules

        def arguments(inputs: Mapping[str, np.ndarray]) -> tuple:
            allowed = None if top_left else rule_mask(spec, inputs.get("mask"))
            given = inputs.get("attn_bias")
            if given is not None and allowed is not None and self.keras_backend == "torch":
                # Keras on torch takes a bias or a mask, not both: the mask goes in as -inf.
                given, allowed = np.where(allowed, given, -np.inf).astype(given.dtype), None
            with self._device_scope(device):
                tensors = [self._tensor(inputs[n], dtype) for n in ("query", "key", "value")]
                bias = None if given is None else self._tensor(given, dtype)
                mask = None if allowed is None else self._tensor(np.ascontiguousarray(allowed), dtype)
            return (*tensors, bias, mask)

        return attend, arguments

    def params(self, case: Arrays, dtype: str, device: str) -> dict[str, Any]:
        with self._device_scope(device):
            return {n: self._tensor(a, dtype) for n, a in case.items() if n[:2] in ("w_", "b_")}

    def prepare(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        k = import_keras()
        params = self.params(case, dtype, device)
        attend, arguments = self.attention(case, spec, dtype, device)

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            args = arguments(inputs)
            with self._device_scope(device):
                out = attend(params, *args)
            self._check_device(out, device)
            return {"output": self._numpy(out, dtype), "meta": {"keras_backend": k.backend.backend()}}

        return run

    def bench(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Bench:
        """The timed path (``impls/keras/timed.py``): :meth:`attention` traced once in setup
        (``tf.function`` on TensorFlow, ``jax.jit`` on JAX; eager under ``no_grad`` on torch, as
        Keras runs it there), inputs and weights on the device once; forward only."""
        from mha_conformance.impls.bench import bench_threads
        from mha_conformance.impls.keras.timed import bench_function, fix_threads

        reason = refusal(self, spec, dtype, device)
        if reason:
            raise NotImplementedError(reason)
        meta = fix_threads(self.keras_backend, bench_threads())  # before the backend's first op
        attend, arguments = self.attention(case, spec, dtype, device)
        params, args = self.params(case, dtype, device), arguments(case)
        return bench_function(self, attend, params, args, dtype, device, meta)

    def prepare_backward(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        raise NotImplementedError(f"{self.name} is checked forward only: no gradient path is written for it")

    def prepare_training(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        raise NotImplementedError("keras.ops.dot_product_attention has no dropout")


class KerasOpsSDPAJax(KerasOpsSDPA):
    name = "keras-ops-sdpa-jax"
    keras_backend = "jax"
    extra = "jax"
    divergences = (
        Divergence(
            f"keras.ops.dot_product_attention on JAX: {EMPTY_ROWS}", check="golden", when=has_empty_rows
        ),
        Divergence(f"keras.ops.dot_product_attention on JAX: {JAX_VALUE_WIDTH}", when=values_wider_than_keys),
    )

    def supports(self, spec: Spec, dtype: str, device: str) -> str | None:
        return FLOAT32_ONLY.format(backend="JAX") if dtype == "float64" else None


class KerasOpsSDPATorch(KerasOpsSDPA):
    name = "keras-ops-sdpa-torch"
    keras_backend = "torch"
    extra = "torch"
    divergences = (
        Divergence(
            "keras.ops.dot_product_attention on torch: given a boolean mask, a query row with no allowed key "
            "gets uniform weights 1/Tk (masked scores are set to a large negative number, not excluded), so "
            "its context is the mean of all values, where the reference gives zeros (through a bias, the -inf "
            "float mask torch's SDPA receives, such rows give zeros)",
            check="golden",
            when=lambda s: has_empty_rows(s) and s.get("attn_bias") is None,
        ),
    )

    def supports(self, spec: Spec, dtype: str, device: str) -> str | None:
        return FLOAT32_ONLY.format(backend="torch") if dtype == "float64" else None
