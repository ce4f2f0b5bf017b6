"""What the Keras adapters (``impls/keras_mha.py``) are known to do differently from the
reference, with the measured reasons: data, not branches (see ``Adapter.divergences``)."""

from __future__ import annotations

from impls.adapter import catalogue_ids

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
UNIFORM_ROWS = (
    "a query row with no allowed key gets uniform weights 1/Tk (masked scores are set to a large negative "
    "number, not excluded), so its context is the mean of all values, where the reference gives zeros"
)
JAX_VALUE_WIDTH = (
    "the JAX backend's dot_product_attention cannot take values wider than keys (TypeError: cannot reshape), "
    "although MultiHeadAttention(value_dim != key_dim) accepts the configuration"
)
#: With dropout declared (even in eval mode) Keras takes its explicit path, never the fused one.
FUSED_CASES = catalogue_ids(lambda c: c["dropout"] == 0)


def declared(path: str, entries: list[tuple[str, str, str]]) -> dict[str, str]:
    """``{check:case:dtype: "<path>: <reason>"}`` from (case pattern, dtype pattern, reason); first match wins."""
    return {f"golden:{case}:{dtype}": f"{path}: {reason}" for case, dtype, reason in entries}


#: Gradient divergences on TensorFlow (Keras 3.15), per path: (case, dtype, reason).
TF_GRADIENTS = {
    "fused": [("*fully_masked*", "*", UNIFORM_ROWS + "; the gradients flow into every value")]
    + [(case, "float64", TF_SCALE_ROUNDING) for case in INEXACT_SCALE_CASES],
    "explicit": [(case, "float64", TF_SCALE_ROUNDING) for case in INEXACT_SCALE_CASES],
}


def declared_gradients(path: str, entries: list[tuple[str, str, str]]) -> dict[str, str]:
    """Like :func:`declared`, for the gradients check."""
    return {f"gradients:{case}:{dtype}": f"{path}: {reason}" for case, dtype, reason in entries}
