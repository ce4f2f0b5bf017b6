"""What the Keras adapters (``impls/keras_mha.py``) are known to do differently from the
reference, with the measured reasons: data, not branches (see ``Adapter.divergences``)."""

from __future__ import annotations

from impls.adapter import POISON_LEAKS, catalogue_ids

#: Cases whose 1/sqrt(head_dim) is not exact in float32 (head_dim 2, 5, 8, 128).
INEXACT_SCALE_CASES = (
    "causal_long_t512_h2_hd8", "decode_tq1_tk1024_long_cache", "head_dim128_h2",
    "odd_sizes_t7_din13_h3_hd5_dout11", "seed_gpt3_96_heads_hd2",
)  # fmt: skip
TF_SCALE_ROUNDING = (
    "on TensorFlow, Keras turns the Python-float scale 1/sqrt(key_dim) into a float32 tensor before casting "
    "it to the compute dtype (tf.cast of a Python float), so under a float64 policy every logit carries the "
    "scale's float32 rounding: ~3e-8 relative error whenever 1/sqrt(head_dim) is not exact in float32"
)
FLOAT64_TO_FLOAT32 = (
    "Keras's fused ops.dot_product_attention casts q, k and v to backend.result_type('float64', 'float64'), "
    "which is 'float32' under the default floatx, so attention in a float64 layer runs in float32: ~1e-7 "
    "relative error"
)
HALF_SCALE = (
    "Keras casts the scale 1/sqrt(key_dim) to the half dtype (float16 keeps 11 bits: up to 2.4e-4 relative "
    "error in every logit) and multiplies by it in the half dtype; with long rows, wide heads or logits "
    "near 7e3 that reaches 2-6x the straightforward float16/bfloat16 error"
)
UNIFORM_ROWS = (
    "a query row with no allowed key gets uniform weights 1/Tk (masked scores are set to a large negative "
    "number, not excluded), so its context is the mean of all values, where the reference gives zeros"
)
JAX_VALUE_WIDTH = (
    "the JAX backend's dot_product_attention cannot take values wider than keys (TypeError: cannot reshape), "
    "although MultiHeadAttention(value_dim != key_dim) accepts the configuration"
)
TORCH_FLASH = (
    "the torch backend runs torch's CPU flash kernel, whose online softmax over 1024 keys in float32 reaches "
    "5.5x the straightforward float32 error (as torch-sdpa does)"
)


#: With dropout declared (even in eval mode) Keras takes its explicit path, never the fused one.
FUSED_CASES = catalogue_ids(lambda c: c["dropout"] == 0)


def declared(path: str, entries: list[tuple[str, str, str]]) -> dict[str, str]:
    """``{check:case:dtype: "<path>: <reason>"}`` from (case pattern, dtype pattern, reason); first match wins."""
    found = {f"golden:{case}:{dtype}": f"{path}: {reason}" for case, dtype, reason in entries}
    return {**found, **{p: f"{path}: {r}" for p, r in POISON_LEAKS.items()}}


HALF_BIAS_SUM = (
    "TensorFlow sums bias gradients over batch and tokens in the half dtype (grad_b_o of large_values_v1e2 "
    "is a plain sum of grad_output: 2.4x; over 512 tokens 4.7x), where the baseline accumulates in float32; "
    "with the half-dtype scale the other gradients reach 2-2.7x"
)
TF_FLOAT32_BACKWARD = (
    "with 128-wide heads the float32 backward (einsum gradients in TensorFlow's own order) reaches 2.1-2.7x "
    "the straightforward float32 gradient error"
)
#: Gradient divergences measured on CPU (TensorFlow 2.21, Keras 3.15), per path (case, dtype, reason).
TF_GRADIENTS = {
    "fused": [("*fully_masked*", "*", UNIFORM_ROWS + "; the gradients flow into every value")]
    + [(case, "float64", TF_SCALE_ROUNDING) for case in INEXACT_SCALE_CASES]
    + [(c, "bfloat16", HALF_BIAS_SUM) for c in ("batch1_self_t8", "causal_long_t512_h2_hd8", "large_values_v1e2")]
    + [(c, "float16", HALF_BIAS_SUM) for c in (
        "decode_tq1_tk1024_long_cache", "head_dim128_h2", "mqa_h4_kv1", "seed_reduced_projection_din16_h2_hd4_dout16")]
    + [("huge_logits_1e4", "float16", HALF_SCALE), ("huge_logits_1e4", "bfloat16", HALF_SCALE),
       ("head_dim128_h2", "float32", TF_FLOAT32_BACKWARD)],
    "explicit": [(case, "float64", TF_SCALE_ROUNDING) for case in INEXACT_SCALE_CASES]
    + [(c, "bfloat16", HALF_BIAS_SUM) for c in (
        "batch1_self_t8", "causal_long_t512_h2_hd8", "gqa_h6_kv3_causal", "large_values_v1e2")]
    + [(c, "float16", HALF_BIAS_SUM) for c in (
        "causal_long_t512_h2_hd8", "decode_tq1_tk1024_long_cache", "odd_sizes_t7_din13_h3_hd5_dout11")]
    + [("huge_logits_1e4", "float16", HALF_SCALE), ("huge_logits_1e4", "bfloat16", HALF_SCALE),
       ("head_dim128_h2", "float32", TF_FLOAT32_BACKWARD)],
}  # fmt: skip


def declared_gradients(path: str, entries: list[tuple[str, str, str]]) -> dict[str, str]:
    """Like :func:`declared`, for the gradients check."""
    return {f"gradients:{case}:{dtype}": f"{path}: {reason}" for case, dtype, reason in entries}
