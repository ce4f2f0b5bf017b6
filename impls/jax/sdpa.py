"""``jax-sdpa``: projections in ``jax.numpy`` plus ``jax.nn.dot_product_attention``.

Layout [B, T, N, H]; native grouped-query attention (fewer kv heads), ``scale=`` for custom
scales, and ``is_causal`` only where its top-left alignment is right (Tq == Tk, no other
mask); otherwise the bottom-right causal rule goes in as a bool mask. Contract v2: ``bias=``
for ``attn_bias`` (differentiated by the vjp), ``key_value_seq_lengths=`` for ``kv_lengths``,
and ``local_window_size=`` where its top-left alignment is right (Tq == Tk, no lengths), else
the window in the bool mask, aligned to each row's length. It has no softcap. ``implementation``
is ``"xla"`` on CPU and ``"cudnn"`` on GPU where the case fits cuDNN (half dtypes), else
``"xla"``. :func:`attention` is the one statement of the computation (forward, vjp and the
timed body in ``impls/jax/timed.py``); it is jit-compiled once per process for each distinct
:class:`Structure`, shapes and dtypes (``impls/jax/common.jitted``), weights as arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from mha_conformance.impls.adapter import Arrays, Divergence, Prepared, Spec
from mha_conformance.impls.bench import Bench
from mha_conformance.impls.jax import timed
from mha_conformance.impls.jax.common import (
    UNIFORM_ROWS,
    JaxAdapter,
    allowed,
    has_empty_rows,
    import_jax,
    jitted,
    several_keys_per_row,
)

FLOAT32_SOFTMAX = (
    "jax.nn.dot_product_attention's xla implementation computes the softmax in float32 even for float64 "
    "inputs (it upcasts half types to float32 and never goes higher), so float64 results err by ~1e-7 relative, "
    "a float32 step inside a float64 computation"
)


@dataclass(frozen=True)
class Structure:
    """What the traced computation depends on besides the arrays' shapes and dtypes: the
    static part of the jit cache key (hashable), taken from the spec."""

    heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    scale: float | None
    #: jax's is_causal is top-left aligned: used only where that is the rule (Tq == Tk, no mask).
    top_left_causal: bool
    #: local_window_size (left, right), where its top-left alignment is the rule; else in the mask.
    window: tuple[int, int] | None
    out_proj: bool
    implementation: str


def attention(params: Mapping[str, Any], query, key, value, mask, bias, lengths, structure: Structure):
    """Projections, ``jax.nn.dot_product_attention`` ([B, T, N, H]) and the output projection;
    ``params`` holds the case's ``w_*``/``b_*`` in the golden [in, out] layout (a bias the case
    lacks is absent, not zero). Pure, for ``jax.jit`` and ``jax.vjp``."""
    s = structure

    def project(x, short: str, heads: int, width: int):
        y = x @ params[f"w_{short}"]
        if f"b_{short}" in params:
            y = y + params[f"b_{short}"]
        return y.reshape(x.shape[0], x.shape[1], heads, width)

    q, k = project(query, "q", s.heads, s.head_dim), project(key, "k", s.kv_heads, s.head_dim)
    v = project(value, "v", s.kv_heads, s.v_head_dim)
    ctx = import_jax().nn.dot_product_attention(
        q,
        k,
        v,
        bias=bias,
        mask=mask,
        scale=s.scale,
        is_causal=s.top_left_causal,
        key_value_seq_lengths=lengths,
        local_window_size=s.window,
        implementation=s.implementation,
    )
    out = ctx.reshape(query.shape[0], query.shape[1], s.heads * s.v_head_dim)
    if s.out_proj:
        out = out @ params["w_o"]
        if "b_o" in params:
            out = out + params["b_o"]
    return out


def attention_vjp(params, query, key, value, mask, bias, lengths, structure: Structure):
    """``(output, pullback)`` of :func:`attention` with respect to params, query, key, value and,
    where the case has one, the bias (three arguments even when a self-attention caller passes
    one array three times)."""
    if bias is None:
        return import_jax().vjp(
            lambda p, q, k, v: attention(p, q, k, v, mask, None, lengths, structure),
            params,
            query,
            key,
            value,
        )
    return import_jax().vjp(
        lambda p, q, k, v, b: attention(p, q, k, v, mask, b, lengths, structure),
        params,
        query,
        key,
        value,
        bias,
    )


def attention_gradients(params, query, key, value, mask, bias, lengths, grad_output, structure: Structure):
    """The gradients of ``sum(attention(...) * grad_output)``: (d_params, d_query, d_key, d_value[, d_bias])."""
    _, pullback = attention_vjp(params, query, key, value, mask, bias, lengths, structure)
    return pullback(grad_output)


class JaxSDPA(JaxAdapter):
    name = "jax-sdpa"
    path = (
        "jax.numpy projections + jax.nn.dot_product_attention (xla on CPU, cudnn on GPU for half dtypes), jit"
    )
    variants = frozenset({"attn_bias", "window", "kv_lengths"})
    cannot_express = {"softcap": "jax.nn.dot_product_attention has no logit softcap"}
    divergences = (
        Divergence(FLOAT32_SOFTMAX, check="golden", dtype="float64", when=several_keys_per_row),
        Divergence(FLOAT32_SOFTMAX, check="gradients", dtype="float64", when=several_keys_per_row),
        Divergence(
            f"jax.nn.dot_product_attention (xla): {UNIFORM_ROWS}", check="golden", when=has_empty_rows
        ),
        Divergence(
            f"jax.nn.dot_product_attention (xla): {UNIFORM_ROWS}; the gradients flow into every value through "
            "the uniform weights",
            check="gradients",
            when=has_empty_rows,
        ),
    )

    def supports(self, spec: Spec, dtype: str, device: str) -> str | None:
        if spec["v_head_dim"] != spec["head_dim"]:
            return "jax.nn.dot_product_attention requires values of the same head width as queries and keys"
        if device == "cpu" and dtype == "float16":
            return (
                "XLA:CPU has no float16 x float16 -> float32 dot_general, which jax.nn.dot_product_attention's "
                "xla implementation requests ('F16_F16_F32' is not supported by dot_general on CPU)"
            )
        return None

    def implementation(self, dtype: str, device: str) -> str:
        return "cudnn" if device == "cuda" and dtype in ("float16", "bfloat16") else "xla"

    def structure(self, spec: Mapping[str, Any], dtype: str, device: str) -> Structure:
        aligned = spec["q_len"] == spec["kv_len"] and spec.get("kv_lengths") is None
        top_left = spec["causal"] and aligned and spec.get("mask") is None
        window = spec.get("window")
        native = None
        if window is not None and aligned:
            native = tuple(w if w >= 0 else spec["kv_len"] for w in window)
        return Structure(
            window=native,
            heads=spec["num_heads"],
            kv_heads=spec["num_kv_heads"],
            head_dim=spec["head_dim"],
            v_head_dim=spec["v_head_dim"],
            scale=spec["scale"],
            top_left_causal=top_left,
            out_proj=spec["out_proj"],
            implementation=self.implementation(dtype, device),
        )

    def params(self, case: Mapping[str, np.ndarray], dtype: str, device: str) -> dict[str, Any]:
        """The case's weights and biases on ``device``, as :func:`attention` takes them."""
        return {n: self.put(a, dtype, device) for n, a in case.items() if n[:2] in ("w_", "b_")}

    def mask(self, spec: Mapping[str, Any], structure: Structure, mask: np.ndarray | None, device: str):
        """The bool mask :func:`attention` takes (None where ``is_causal`` carries the rule)."""
        if structure.top_left_causal:
            return None
        allowed_keys = allowed(spec, mask, window=structure.window is None)
        return None if allowed_keys is None else self.put(allowed_keys, "bool", device)

    def extras(self, spec: Mapping[str, Any], inputs: Mapping[str, np.ndarray], dtype: str, device: str):
        """``(bias, key_value_seq_lengths)`` as :func:`attention` takes them (None where absent)."""
        bias = self.put(inputs["attn_bias"], dtype, device) if "attn_bias" in inputs else None
        lengths = spec.get("kv_lengths")
        if lengths is not None:
            lengths = import_jax().device_put(np.asarray(lengths, np.int32), self.device(device))
        return bias, lengths

    def prepare(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        params, structure = self.params(case, dtype, device), self.structure(spec, dtype, device)
        forward = jitted(attention, "structure")

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            args = [self.put(inputs[n], dtype, device) for n in ("query", "key", "value")]
            mask = self.mask(spec, structure, inputs.get("mask"), device)
            out = forward(params, *args, mask, *self.extras(spec, inputs, dtype, device), structure=structure)
            return {
                "output": self.fetch(out, dtype, device),
                "meta": {"implementation": structure.implementation},
            }

        return run

    def prepare_backward(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        """``jax.vjp`` of :func:`attention` at ``grad_output``: weights in the golden [in, out]
        layout, query, key and value as three arguments (a self-attention case's one array
        becomes three)."""
        params, structure = self.params(case, dtype, device), self.structure(spec, dtype, device)
        gradients = jitted(attention_gradients, "structure")

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            args = [self.put(inputs[n], dtype, device) for n in ("query", "key", "value", "grad_output")]
            mask = self.mask(spec, structure, inputs.get("mask"), device)
            bias, lengths = self.extras(spec, inputs, dtype, device)
            d_params, d_query, d_key, d_value, *d_bias = gradients(
                params, *args[:3], mask, bias, lengths, args[3], structure=structure
            )
            grads = {"grad_query": d_query, "grad_key": d_key, "grad_value": d_value}
            if d_bias:
                grads["grad_attn_bias"] = d_bias[0]
            grads.update({f"grad_{n}": g for n, g in d_params.items()})
            result: dict[str, Any] = {n: self.fetch(g, dtype, device) for n, g in grads.items()}
            result["meta"] = {"implementation": structure.implementation}
            return result

        return run

    def prepare_training(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        raise NotImplementedError(
            "jax.nn.dot_product_attention has no dropout (no rate or rng argument): a training mode would be "
            "dropout written around it, not this implementation's"
        )

    def bench(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Bench:
        """``jax-sdpa``: ``jax_sdpa.attention`` jitted with its ``Structure``, weights as arguments."""
        meta = timed.setup(self, spec, dtype, device)
        j = import_jax()
        structure = self.structure(spec, dtype, device)
        params = self.params(case, dtype, device)
        q, k, v = timed.device_inputs(self, case, spec, dtype, device)
        mask = self.mask(spec, structure, case.get("mask"), device)
        bias, lengths = self.extras(spec, case, dtype, device)
        forward = j.jit(partial(attention, structure=structure))
        pullback = j.jit(partial(attention_vjp, structure=structure))
        meta.update(
            implementation=structure.implementation,
            jitted="forward: jax.jit(jax_sdpa.attention), weights as arguments, compiled in setup; backward: "
            "jax.jit of jax.vjp's pullback on forward residuals computed in setup",
        )
        return timed.timed(
            self,
            dtype,
            device,
            forward=lambda: forward(params, q, k, v, mask, bias, lengths),
            pullback=lambda: pullback(params, q, k, v, mask, bias, lengths),
            meta=meta,
        )
