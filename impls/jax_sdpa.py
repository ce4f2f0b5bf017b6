"""``jax-sdpa``: projections in ``jax.numpy`` plus ``jax.nn.dot_product_attention``.

Layout [B, T, N, H]; native grouped-query attention (fewer kv heads), ``scale=`` for custom
scales, and ``is_causal`` only where its top-left alignment is right (Tq == Tk, no other
mask); otherwise the bottom-right causal rule goes in as a bool mask. ``implementation``
is ``"xla"`` on CPU and ``"cudnn"`` on GPU where the case fits cuDNN (half dtypes), else
``"xla"``. The forward is jit-compiled once per prepared (case, dtype, device).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from impls.adapter import POISON_LEAKS
from impls.jax_common import UNIFORM_ROWS, JaxAdapter, allowed, jax, several_keys_per_row

FLOAT32_SOFTMAX = (
    "jax.nn.dot_product_attention's xla implementation computes the softmax in float32 even for float64 "
    "inputs (it upcasts half types to float32 and never goes higher), so float64 results err by ~1e-7 relative, "
    "a float32 step inside a float64 computation"
)


BF16_BIAS_SUM = (
    "the vjp of a broadcast bias add is a reduce_sum over batch and tokens in the array's own dtype, which "
    "XLA:CPU accumulates in bfloat16 (the baseline sums in float32); the bias gradients reach 2.0-2.7x the "
    "straightforward bfloat16 error (grad_b_o of large_values_v1e2 is a plain sum of grad_output: 2.4x)"
)
BF16_BIAS_SUM_CASES = (
    "causal_long_t512_h2_hd8", "decode_tq1_tk1024_long_cache", "gqa_h6_kv3_causal", "gqa_h8_kv2",
    "large_values_v1e2",
)  # fmt: skip


XLA_FLOAT32_GRADS = (
    "XLA:CPU's float32 backward (the softmax backward and token sums fused in its own order) reaches "
    "2.25-4.0x the straightforward float32 gradient error here (scale_one_unscaled grad_query 4.0x, "
    "single_head_h1_hd16 2.7x, cross_tq5_tk9 grad_b_q 2.25x)"
)
XLA_FLOAT32_GRAD_CASES = ("cross_tq5_tk9", "scale_one_unscaled", "single_head_h1_hd16")


class JaxSDPA(JaxAdapter):
    name = "jax-sdpa"
    path = (
        "jax.numpy projections + jax.nn.dot_product_attention (xla on CPU, cudnn on GPU for half dtypes), jit"
    )
    divergences = {
        **POISON_LEAKS,
        **{f"golden:{case}:float64": FLOAT32_SOFTMAX for case in several_keys_per_row()},
        "golden:*fully_masked*": f"jax.nn.dot_product_attention (xla): {UNIFORM_ROWS}",
        **{f"gradients:{case}:float64": FLOAT32_SOFTMAX for case in several_keys_per_row()},
        "gradients:*fully_masked*": f"jax.nn.dot_product_attention (xla): {UNIFORM_ROWS}; the gradients "
        "flow into every value through the uniform weights",
        "gradients:huge_logits_1e4:bfloat16": "with logits near 7e3 (bfloat16 score spacing 32) the gradients "
        "through the softmax are rounding noise in any order: 12x the straightforward bfloat16 error (grad_key)",
        **{f"gradients:{case}:bfloat16": BF16_BIAS_SUM for case in BF16_BIAS_SUM_CASES},
        **{f"gradients:{case}:float32": XLA_FLOAT32_GRADS for case in XLA_FLOAT32_GRAD_CASES},
    }

    def supports(self, spec: Mapping[str, Any], dtype: str, device: str) -> str | None:
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

    def prepare(self, case, spec, dtype, device):
        j = jax()
        b, tq = spec["batch"], spec["q_len"]
        h, hkv, hd, hdv = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"], spec["v_head_dim"]
        params = {n: self.put(a, dtype, device) for n, a in case.items() if n[:2] in ("w_", "b_")}
        impl = self.implementation(dtype, device)
        top_left = spec["causal"] and spec["q_len"] == spec["kv_len"] and spec.get("mask") is None

        @j.jit
        def forward(params, query, key, value, mask):
            def project(x, short, heads, width):
                y = x @ params[f"w_{short}"]
                if f"b_{short}" in params:
                    y = y + params[f"b_{short}"]
                return y.reshape(b, -1, heads, width)  # [B, T, N, H]

            q, k, v = project(query, "q", h, hd), project(key, "k", hkv, hd), project(value, "v", hkv, hdv)
            ctx = j.nn.dot_product_attention(
                q, k, v, mask=mask, scale=spec["scale"], is_causal=top_left, implementation=impl
            )
            out = ctx.reshape(b, tq, h * hdv)
            if spec["out_proj"]:
                out = out @ params["w_o"]
                if "b_o" in params:
                    out = out + params["b_o"]
            return out

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            mask = None if top_left else allowed(spec, inputs.get("mask"))
            args = [self.put(inputs[n], dtype, device) for n in ("query", "key", "value")]
            out = forward(params, *args, None if mask is None else self.put(mask, "bool", device))
            return {"output": self.fetch(out, dtype, device), "meta": {"implementation": impl}}

        return run

    def prepare_backward(self, case, spec, dtype, device):
        """``jax.vjp`` of the same computation (written once more here as a pure function of the
        weights and inputs) at ``grad_output``: weights in the golden [in, out] layout, query,
        key and value as three arguments (a self-attention case's one array becomes three)."""
        j = jax()
        b, tq = spec["batch"], spec["q_len"]
        h, hkv, hd, hdv = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"], spec["v_head_dim"]
        params = {n: self.put(a, dtype, device) for n, a in case.items() if n[:2] in ("w_", "b_")}
        impl = self.implementation(dtype, device)
        top_left = spec["causal"] and spec["q_len"] == spec["kv_len"] and spec.get("mask") is None

        def forward(params, query, key, value, mask):
            def project(x, short, heads, width):
                y = x @ params[f"w_{short}"]
                if f"b_{short}" in params:
                    y = y + params[f"b_{short}"]
                return y.reshape(b, -1, heads, width)

            q, k, v = project(query, "q", h, hd), project(key, "k", hkv, hd), project(value, "v", hkv, hdv)
            ctx = j.nn.dot_product_attention(
                q, k, v, mask=mask, scale=spec["scale"], is_causal=top_left, implementation=impl
            )
            out = ctx.reshape(b, tq, h * hdv)
            if spec["out_proj"]:
                out = out @ params["w_o"]
                if "b_o" in params:
                    out = out + params["b_o"]
            return out

        @j.jit
        def gradients(params, query, key, value, mask, grad_output):
            _, vjp = j.vjp(lambda p, q, k, v: forward(p, q, k, v, mask), params, query, key, value)
            return vjp(grad_output)

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            mask = None if top_left else allowed(spec, inputs.get("mask"))
            args = [self.put(inputs[n], dtype, device) for n in ("query", "key", "value", "grad_output")]
            mask = None if mask is None else self.put(mask, "bool", device)
            d_params, d_query, d_key, d_value = gradients(params, *args[:3], mask, args[3])
            grads = {"grad_query": d_query, "grad_key": d_key, "grad_value": d_value}
            grads.update({f"grad_{n}": g for n, g in d_params.items()})
            result: dict[str, Any] = {n: self.fetch(g, dtype, device) for n, g in grads.items()}
            result["meta"] = {"implementation": impl}
            return result

        return run
