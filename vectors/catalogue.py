"""The declarative catalogue of golden cases.

Each case is a few lines naming what differs from the defaults; :func:`spec` fills in the
rest and derives what follows from it. Ids list the semantic axes a case covers, so a
failing test id says what broke without opening a file. Cases drawn from the seed
documents carry a ``seed`` prefix and name the system they describe.
"""

from __future__ import annotations

from typing import Any

ALL_DTYPES = ("float64", "float32", "float16", "bfloat16")
INPUT_GRADIENTS = ("grad_query", "grad_key", "grad_value")

_DEFAULTS: dict[str, Any] = {
    "batch": 2,
    "q_len": 8,
    "d_in": 16,
    "num_heads": 4,
    "head_dim": 4,
    "causal": False,
    "scale": None,
    "qkv_bias": True,
    "out_proj": True,
    "out_bias": True,
    "dropout": 0.0,
    "mask": None,
    "input_scale": 1.0,
    "weight_scale": 1.0,
    "dtypes": ALL_DTYPES,
}


def spec(case_id: str, description: str, **fields: Any) -> dict[str, Any]:
    """A complete case spec: defaults, then ``fields``, then the derived entries.

    ``mask`` is ``None`` or ``{"kind": ..., "shape": [B|1, H|1, Tq, Tk], ...}`` (see
    ``vectors/generate.py`` for the kinds). ``weight_gradients=False`` keeps only the input
    gradients, for the wide cases that would otherwise blow the size budget. Inputs and weights
    hold values every listed dtype represents exactly; ``input_grid="far_from_bfloat16"`` moves
    float16 values to the float16 neighbours furthest below the bfloat16 grid (docs/vectors.md).
    """
    s = {"id": case_id, "description": description, **_DEFAULTS, **fields}
    s.setdefault("kv_len", s["q_len"])
    s.setdefault("kdim", s["d_in"])
    s.setdefault("vdim", s["d_in"])
    s.setdefault("num_kv_heads", s["num_heads"])
    s.setdefault("v_head_dim", s["head_dim"])
    s.setdefault("d_out", s["d_in"] if s["out_proj"] else s["num_heads"] * s["v_head_dim"])
    s.setdefault(
        "self_attention",
        s["kv_len"] == s["q_len"] and s["kdim"] == s["d_in"] and s["vdim"] == s["d_in"],
    )
    if not s["out_proj"]:
        s["out_bias"] = False
        s["d_out"] = s["num_heads"] * s["v_head_dim"]
    s["dtypes"] = list(s["dtypes"])
    # Inputs are stored float32 holding values every listed dtype represents exactly; a case for
    # float64 alone stores float64 inputs at full precision (format 2, docs/vectors.md).
    if s["dtypes"] == ["float64"]:
        s["input_dtype"] = "float64"
    weight_grads = s.pop("weight_gradients", True)
    grads = list(INPUT_GRADIENTS)
    if weight_grads:
        for short in ("q", "k", "v") + (("o",) if s["out_proj"] else ()):
            grads.append(f"grad_w_{short}")
            if s["out_bias"] if short == "o" else s["qkv_bias"]:
                grads.append(f"grad_b_{short}")
    if s.get("attn_bias") is not None and s["attn_bias"].get("grad", True):
        grads.append("grad_attn_bias")
    s["gradients"] = grads
    return s


def mask_entry(kind: str, shape: tuple[int, ...], **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "shape": list(shape), **extra}


def bias_entry(kind: str, shape: tuple[int, ...], grad: bool = True, **extra: Any) -> dict[str, Any]:
    """An additive attention bias [B|1, H|1, Tq, Tk] (contract v2; kinds in vectors/generate.py).
    ``grad`` stores ``grad_attn_bias`` (a learned bias); ALiBi's fixed slopes have none."""
    return {"kind": kind, "shape": list(shape), "grad": grad, **extra}


CASES: list[dict[str, Any]] = [
    # --- systems described by the seed documents -------------------------------------
    spec(
        "seed_wrapper_stacked_causal_heads_noproj_b2_t6_din3_h2_hd2",
        "The tutorial's MultiHeadAttentionWrapper: 2 independent causal heads of width 2 "
        "concatenated with no output projection; output 2 x 6 x 4.",
        batch=2,
        q_len=6,
        d_in=3,
        num_heads=2,
        head_dim=2,
        causal=True,
        qkv_bias=False,
        out_proj=False,
    ),
    spec(
        "seed_gpt_causal_d512_h8_hd64_noqkvbias",
        "The from-scratch GPT-style module: d_in = d_out = 512, 8 heads of 64, causal, "
        "Linear(bias=False) for Q/K/V, biased out_proj.",
        batch=2,
        q_len=16,
        d_in=512,
        num_heads=8,
        head_dim=64,
        causal=True,
        qkv_bias=False,
        dtypes=ALL_DTYPES,
        weight_gradients=False,
    ),
    spec(
        "seed_transformer_encoder_self_d512_h8_dk64",
        "The original Transformer's encoder self-attention: d_model 512, 8 heads, d_k = d_v = 64, no mask.",
        batch=2,
        q_len=12,
        d_in=512,
        num_heads=8,
        head_dim=64,
        weight_gradients=False,
    ),
    spec(
        "seed_transformer_decoder_causal_self_d512_h8_dk64",
        "The original Transformer's masked decoder self-attention: d_model 512, 8 heads, causal.",
        batch=2,
        q_len=10,
        d_in=512,
        num_heads=8,
        head_dim=64,
        causal=True,
        weight_gradients=False,
    ),
    spec(
        "seed_transformer_cross_encdec_d512_h8_dk64_tq10_tk14_keypad",
        "The original Transformer's encoder-decoder attention: decoder queries (10) attend "
        "encoder memory (14) with source padding masked out.",
        batch=2,
        q_len=10,
        kv_len=14,
        d_in=512,
        num_heads=8,
        head_dim=64,
        self_attention=False,
        mask=mask_entry("key_padding", (2, 1, 1, 14)),
        weight_gradients=False,
    ),
    spec(
        "seed_decode_step_one_query_all_cached_keys_tk9",
        "The per-token view: one new token's query attends every cached key (causal, "
        "bottom-right aligned, so nothing is masked).",
        batch=2,
        q_len=1,
        kv_len=9,
        causal=True,
        self_attention=False,
    ),
    spec(
        "seed_gpt3_96_heads_hd2",
        "GPT-3's head count: 96 heads of width 2 (d 192), causal.",
        batch=1,
        q_len=8,
        d_in=192,
        num_heads=96,
        head_dim=2,
        causal=True,
    ),
    spec(
        "seed_reduced_projection_din16_h2_hd4_dout16",
        "The flow diagram's 'reduce the projection dim': d_model 16 projected to "
        "2 heads x 4 = 8, combined back to 16 by the output Linear.",
        d_in=16,
        num_heads=2,
        head_dim=4,
        d_out=16,
    ),
    # --- baselines -------------------------------------------------------------------
    spec("self_basic_b2_t8_d16_h4", "Plain self-attention with every bias."),
    spec("self_causal_b2_t8_d16_h4", "Causal self-attention, Tq == Tk.", causal=True),
    spec("batch1_self_t8", "Batch of one.", batch=1),
    spec("batch4_self_causal_t5", "Batch of four, causal.", batch=4, q_len=5, causal=True),
    spec("one_token_self", "A single token: the softmax has one key.", q_len=1),
    spec("one_token_self_causal", "A single token, causal.", q_len=1, causal=True),
    spec(
        "odd_sizes_t7_din13_h3_hd5_dout11",
        "Nothing a power of two.",
        q_len=7,
        d_in=13,
        num_heads=3,
        head_dim=5,
        d_out=11,
    ),
    spec("head_dim1_h4", "Head width 1: each score is a single product.", head_dim=1),
    spec(
        "head_dim128_h2",
        "Wide heads of 128 (a common kernel tile).",
        d_in=32,
        num_heads=2,
        head_dim=128,
        q_len=6,
        dtypes=ALL_DTYPES,
    ),
    spec("single_head_h1_hd16", "One head owning the whole projection.", num_heads=1, head_dim=16),
    # --- cross-attention and dimensions ---------------------------------------------
    spec(
        "cross_tq5_tk9",
        "Cross-attention with more keys than queries.",
        q_len=5,
        kv_len=9,
        self_attention=False,
    ),
    spec(
        "cross_tq9_tk3",
        "Cross-attention with fewer keys than queries.",
        q_len=9,
        kv_len=3,
        self_attention=False,
    ),
    spec("cross_tk1_single_key", "One key: every weight is 1.", q_len=4, kv_len=1),
    spec(
        "cross_kdim6_vdim10_din8",
        "Key and value widths differ from the query's.",
        d_in=8,
        kdim=6,
        vdim=10,
        q_len=5,
        kv_len=7,
    ),
    spec(
        "v_head_dim6_ne_head_dim4",
        "Value heads wider than query/key heads.",
        head_dim=4,
        v_head_dim=6,
        q_len=6,
        kv_len=6,
    ),
    spec("d_out24_ne_d_in16", "Output width differs from the input width.", d_out=24),
    # --- causal alignment -----------------------------------------------------------
    spec(
        "causal_tq4_tk7_bottom_right",
        "Causal with Tq < Tk: query i sees keys j <= i + 3 (chunked prefill against a cache).",
        q_len=4,
        kv_len=7,
        causal=True,
        self_attention=False,
    ),
    spec(
        "causal_tq7_tk4_fully_masked_rows",
        "Causal with Tq > Tk: the first 3 queries see no key at all, so their rows must be zero.",
        q_len=7,
        kv_len=4,
        causal=True,
        self_attention=False,
    ),
    spec(
        "causal_long_t512_h2_hd8",
        "A long causal sequence (512 tokens) for tiled kernels.",
        batch=1,
        q_len=512,
        d_in=8,
        num_heads=2,
        head_dim=8,
        d_out=8,
    ),
    spec(
        "decode_tq1_tk1024_long_cache",
        "One query against a long cache of 1024 keys.",
        batch=1,
        q_len=1,
        kv_len=1024,
        causal=True,
        self_attention=False,
        d_in=8,
        num_heads=2,
        head_dim=8,
    ),
    # --- grouped-query and multi-query attention ------------------------------------
    spec(
        "gqa_h8_kv2",
        "Grouped-query: 8 query heads share 2 kv heads (groups of 4).",
        num_heads=8,
        num_kv_heads=2,
        head_dim=4,
        d_in=32,
    ),
    spec(
        "gqa_h6_kv3_causal",
        "Grouped-query with groups of 2, causal.",
        num_heads=6,
        num_kv_heads=3,
        head_dim=4,
        d_in=24,
        causal=True,
    ),
    spec("mqa_h4_kv1", "Multi-query: 4 query heads share one kv head.", num_kv_heads=1),
    spec(
        "gqa_h8_kv2_cross_keypad",
        "Grouped-query cross-attention with key padding.",
        num_heads=8,
        num_kv_heads=2,
        d_in=32,
        q_len=5,
        kv_len=9,
        mask=mask_entry("key_padding", (2, 1, 1, 9)),
    ),
    spec(
        "gqa_decode_tq1_tk12_h8_kv2",
        "Grouped-query decode step.",
        num_heads=8,
        num_kv_heads=2,
        d_in=32,
        q_len=1,
        kv_len=12,
        causal=True,
    ),
    # --- scale ----------------------------------------------------------------------
    spec("scale_custom_0p3", "An explicit scale of 0.3 instead of 1/sqrt(4) = 0.5.", scale=0.3),
    spec("scale_one_unscaled", "Scale 1: the 1/sqrt(d) scaling switched off on purpose.", scale=1.0),
    # --- masks ----------------------------------------------------------------------
    spec(
        "mask_key_padding_b3",
        "Key padding with a different valid length per batch row.",
        batch=3,
        mask=mask_entry("key_padding", (3, 1, 1, 8)),
    ),
    spec(
        "mask_random_per_head",
        "An arbitrary mask that differs per batch row and head.",
        mask=mask_entry("random", (2, 4, 8, 8), keep=0.6),
    ),
    spec(
        "mask_random_broadcast_1_1",
        "An arbitrary mask shared by every batch row and head.",
        mask=mask_entry("random", (1, 1, 8, 8), keep=0.6),
    ),
    spec(
        "mask_random_and_causal",
        "An arbitrary mask combined with causal; each query keeps its own key, so no row is empty.",
        causal=True,
        mask=mask_entry("random", (2, 1, 8, 8), keep=0.7, keep_diagonal=True),
    ),
    spec(
        "mask_diagonal_only", "Each query may only attend itself.", mask=mask_entry("diagonal", (1, 1, 8, 8))
    ),
    spec(
        "mask_fully_masked_query_rows",
        "Some query rows are masked out entirely: weights and context 0, never NaN.",
        mask=mask_entry("masked_rows", (2, 1, 8, 8), rows=[0, 5]),
    ),
    spec(
        "mask_fully_masked_batch_row",
        "One whole batch element attends nothing.",
        mask=mask_entry("masked_batch", (2, 1, 1, 8), batch_row=1),
    ),
    # --- numerics -------------------------------------------------------------------
    spec(
        "huge_logits_1e4", "Logits near 1e4: a softmax without max-subtraction overflows.", input_scale=40.0
    ),
    spec(
        "huge_logits_1e4_masked",
        "Huge logits in the masked-out positions only.",
        input_scale=40.0,
        mask=mask_entry("random", (2, 1, 8, 8), keep=0.5),
    ),
    spec(
        "tiny_values_1e-3",
        "Inputs and weights near 1e-3: outputs near 1e-9, below float16's range (so float16 is not listed).",
        input_scale=1e-3,
        weight_scale=1e-3,
        dtypes=("float64", "float32", "bfloat16"),
    ),
    spec(
        "large_values_v1e2",
        "Inputs near 1e2 with small weights: large values, ordinary logits.",
        input_scale=1e2,
        weight_scale=1e-2,
    ),
    # --- biases ---------------------------------------------------------------------
    spec("bias_none", "No bias anywhere.", qkv_bias=False, out_bias=False),
    spec("bias_qkv_only", "Q/K/V biases, none on the output projection.", out_bias=False),
    spec("bias_out_only", "Only the output projection has a bias.", qkv_bias=False),
    spec("noproj_with_qkv_bias", "No output projection, biased Q/K/V.", out_proj=False),
    spec(
        "noproj_cross_tq3_tk5",
        "No output projection in cross-attention.",
        out_proj=False,
        q_len=3,
        kv_len=5,
        qkv_bias=False,
    ),
    spec(
        "noproj_causal_self_t8_h4",
        "Stacked causal heads with no output projection, as the seed wrapper builds them, at 8 tokens.",
        out_proj=False,
        causal=True,
    ),
    spec(
        "noproj_causal_gqa_h4_kv2",
        "Stacked causal heads without output projection whose K/V weights are shared in pairs.",
        out_proj=False,
        causal=True,
        num_kv_heads=2,
    ),
    # --- precision-exposing inputs: the full precision of one dtype -------------------
    # The cases above hold values exact in bfloat16, so every dtype is judged on the same inputs;
    # these use all the bits of the one dtype they list, so keeping a tensor in a narrower dtype
    # than the call asks for shows (docs/vectors.md).
    spec(
        "precision_f64_inputs_self_b2_t8_d16_h4",
        "float64 inputs and weights at full 53-bit precision (stored float64): a float64 call that keeps "
        "any of them in float32 fails.",
        dtypes=("float64",),
    ),
    spec(
        "precision_f64_inputs_cross_gqa_h8_kv2_keypad",
        "Full-precision float64 inputs in grouped-query cross-attention with key padding.",
        num_heads=8,
        num_kv_heads=2,
        d_in=32,
        q_len=5,
        kv_len=9,
        self_attention=False,
        mask=mask_entry("key_padding", (2, 1, 1, 9)),
        dtypes=("float64",),
    ),
    spec(
        "precision_f32_inputs_self_causal_b2_t8_d16_h4",
        "float32 inputs and weights with all 24 significant bits, causal: a float32 call that keeps its "
        "weights in bfloat16 fails.",
        causal=True,
        dtypes=("float32",),
    ),
    spec(
        "precision_f32_inputs_cross_gqa_h8_kv2_random_mask",
        "Full-precision float32 inputs in grouped-query cross-attention under a per-head mask.",
        num_heads=8,
        num_kv_heads=2,
        d_in=32,
        q_len=5,
        kv_len=9,
        self_attention=False,
        mask=mask_entry("random", (2, 8, 5, 9), keep=0.7, keep_diagonal=True),
        dtypes=("float32",),
    ),
    spec(
        "precision_f16_inputs_far_from_bf16_self_b1_t4_d8_h2",
        "float16 inputs and weights that bfloat16 cannot hold (each 3/8 of a bfloat16 ulp above the grid "
        "point below it): a float16 call computed from bfloat16-rounded inputs fails.",
        batch=1,
        q_len=4,
        d_in=8,
        num_heads=2,
        dtypes=("float16",),
        input_grid="far_from_bfloat16",
    ),
    spec(
        "precision_f16_inputs_far_from_bf16_cross_gqa_keypad",
        "float16 inputs off the bfloat16 grid in grouped-query cross-attention with key padding.",
        num_heads=4,
        num_kv_heads=2,
        d_in=8,
        q_len=3,
        kv_len=5,
        self_attention=False,
        mask=mask_entry("key_padding", (2, 1, 1, 5)),
        dtypes=("float16",),
        input_grid="far_from_bfloat16",
    ),
    spec(
        "precision_bf16_inputs_beyond_f16_range_self",
        "bfloat16 inputs near 1e5, past float16's largest value (65504), with weights near 1e-5: a "
        "bfloat16 call that passes through float16 overflows.",
        input_scale=1e5,
        weight_scale=1e-5,
        dtypes=("bfloat16",),
    ),
    # --- attention variants (contract v2, vector format 3) -----------------------------
    # additive bias
    spec(
        "variant_bias_alibi_self_causal_h4",
        "ALiBi: per-head slopes 2^(-8(h+1)/H) times the key's distance, added to causal scores; no gradient "
        "(the slopes are fixed).",
        causal=True,
        attn_bias=bias_entry("alibi", (1, 4, 8, 8), grad=False),
    ),
    spec(
        "variant_bias_alibi_gqa_h8_kv2_cross_tq4_tk9",
        "ALiBi over grouped-query cross-attention: distances from each query's bottom-right position.",
        num_heads=8,
        num_kv_heads=2,
        d_in=32,
        q_len=4,
        kv_len=9,
        self_attention=False,
        attn_bias=bias_entry("alibi", (1, 8, 4, 9), grad=False),
    ),
    spec(
        "variant_bias_alibi_decode_tq1_tk12",
        "One decoding step under ALiBi: a single query at the last position over a cache of 12 keys.",
        q_len=1,
        kv_len=12,
        causal=True,
        self_attention=False,
        attn_bias=bias_entry("alibi", (1, 4, 1, 12), grad=False),
    ),
    spec(
        "variant_bias_t5_relpos_self",
        "A T5-style learned relative-position bias: one value per head and bucket of the signed distance "
        "(8 buckets, max distance 16), with its gradient.",
        attn_bias=bias_entry("t5", (1, 4, 8, 8)),
    ),
    spec(
        "variant_bias_t5_relpos_cross_tq5_tk11_causal",
        "The T5 bias in causal cross-attention (a decoder over a longer memory).",
        q_len=5,
        kv_len=11,
        causal=True,
        self_attention=False,
        attn_bias=bias_entry("t5", (1, 4, 5, 11)),
    ),
    spec(
        "variant_bias_float_mask_neginf",
        "A float mask: random per-batch values with about 30% -inf entries (masked); every row keeps a key.",
        attn_bias=bias_entry("random", (2, 1, 8, 8), neginf=0.3, keep_diagonal=True),
    ),
    spec(
        "variant_bias_float_mask_neginf_fully_masked_rows",
        "A float mask with whole rows of -inf: those queries see nothing (weights and context 0).",
        attn_bias=bias_entry("random", (2, 1, 8, 8), neginf=0.2, rows=[1, 6]),
    ),
    spec(
        "variant_bias_per_batch_head_b2_h4",
        "A bias that differs per batch row and head, with its full gradient.",
        attn_bias=bias_entry("random", (2, 4, 8, 8)),
    ),
    spec(
        "variant_bias_broadcast_1_1_gqa_h4_kv2",
        "One bias shared by every batch row and head in grouped-query attention: its gradient sums both.",
        num_kv_heads=2,
        attn_bias=bias_entry("random", (1, 1, 8, 8)),
    ),
    spec(
        "variant_bias_and_bool_mask_causal",
        "A bias together with a boolean mask and causal: all three apply.",
        causal=True,
        mask=mask_entry("random", (2, 1, 8, 8), keep=0.7, keep_diagonal=True),
        attn_bias=bias_entry("random", (2, 4, 8, 8)),
    ),
    # softcap
    spec(
        "variant_softcap20_self",
        "Logit softcap 20 (Gemma 2's attention value is 50; 20 bites harder) on ordinary logits.",
        softcap=20.0,
    ),
    spec(
        "variant_softcap50_huge_logits",
        "Softcap 50 on logits near 1e3: tanh saturates, weights become uniform over the largest keys.",
        softcap=50.0,
        input_scale=30.0,
    ),
    spec(
        "variant_softcap20_huge_logits_causal",
        "Softcap 20 on huge causal logits: the capped scores sit at +-20.",
        softcap=20.0,
        input_scale=30.0,
        causal=True,
    ),
    spec(
        "variant_softcap50_gqa_h8_kv2_cross",
        "Softcap 50 in grouped-query cross-attention with large logits.",
        softcap=50.0,
        num_heads=8,
        num_kv_heads=2,
        d_in=32,
        q_len=5,
        kv_len=9,
        self_attention=False,
        input_scale=8.0,
    ),
    spec(
        "variant_softcap20_then_alibi",
        "Softcap before the bias: the capped scores plus ALiBi (the bias is not capped).",
        softcap=20.0,
        input_scale=8.0,
        causal=True,
        attn_bias=bias_entry("alibi", (1, 4, 8, 8), grad=False),
    ),
    spec(
        "variant_softcap30_key_padding_mask",
        "Softcap 30 under a boolean key-padding mask.",
        softcap=30.0,
        input_scale=6.0,
        mask=mask_entry("key_padding", (2, 1, 1, 8)),
    ),
    # sliding windows
    spec(
        "variant_window_left2_causal",
        "A Mistral-style sliding window: causal, each query sees itself and the 2 keys before it.",
        causal=True,
        window=[2, -1],
    ),
    spec(
        "variant_window_left3_right1_bidirectional",
        "A two-sided local window: 3 keys before, 1 after, not causal.",
        window=[3, 1],
    ),
    spec(
        "variant_window_width0_diagonal",
        "A window of width 0 on both sides: each query sees only the key at its own position.",
        window=[0, 0],
    ),
    spec(
        "variant_window_wider_than_sequence_causal",
        "A causal window of 20 over 8 keys: the same as causal alone.",
        causal=True,
        window=[20, 20],
    ),
    spec(
        "variant_window_right2_only",
        "Only a right bound: each query sees every earlier key and at most 2 after its position.",
        window=[-1, 2],
    ),
    spec(
        "variant_window_left2_cross_tq4_tk10_causal",
        "A causal window in cross-attention: query i sits at position i + Tk - Tq (bottom-right).",
        causal=True,
        window=[2, -1],
        q_len=4,
        kv_len=10,
        self_attention=False,
    ),
    spec(
        "variant_window_left4_decode_tq1_tk16",
        "One decoding step with a window of 4 over a cache of 16: the query sees the last 5 keys.",
        causal=True,
        window=[4, -1],
        q_len=1,
        kv_len=16,
        self_attention=False,
    ),
    spec(
        "variant_gemma2_softcap50_window3_gqa_h4_kv2",
        "Gemma 2's local layers in miniature: causal, softcap 50, a sliding window of 3, grouped-query.",
        causal=True,
        softcap=50.0,
        window=[3, -1],
        num_kv_heads=2,
        input_scale=8.0,
    ),
    # per-batch key lengths
    spec(
        "variant_kv_lengths_self_8_5",
        "Per-batch key lengths 8 and 5: keys at or past a row's length are excluded.",
        kv_lengths=[8, 5],
    ),
    spec(
        "variant_kv_lengths_zero_b3_fully_masked",
        "A key length of 0: that batch row sees nothing (weights and context 0, never NaN).",
        batch=3,
        kv_lengths=[6, 0, 8],
    ),
    spec(
        "variant_kv_lengths_equal_tk_cross",
        "Key lengths equal to Tk: nothing excluded, identical to no lengths.",
        q_len=5,
        kv_len=9,
        self_attention=False,
        kv_lengths=[9, 9],
    ),
    spec(
        "variant_kv_lengths_causal_cross_tq4_tk10",
        "Lengths with causal: each row bottom-right aligned to its own length (10 and 6), as varlen "
        "decoding of a padded batch.",
        causal=True,
        q_len=4,
        kv_len=10,
        self_attention=False,
        kv_lengths=[10, 6],
    ),
    spec(
        "variant_kv_lengths_shorter_than_tq_causal_fully_masked",
        "A length of 2 under causal with Tq 4: the row's first queries sit before any key and see nothing.",
        causal=True,
        q_len=4,
        kv_len=8,
        self_attention=False,
        kv_lengths=[8, 2],
    ),
    spec(
        "variant_kv_lengths_gqa_h8_kv2_mask",
        "Lengths with a per-head boolean mask in grouped-query attention.",
        num_heads=8,
        num_kv_heads=2,
        d_in=32,
        kv_lengths=[7, 4],
        mask=mask_entry("random", (2, 8, 8, 8), keep=0.7, keep_diagonal=True),
    ),
    spec(
        "variant_kv_lengths_window_causal_decode_tq2",
        "Two decoding queries over padded caches (lengths 12 and 7) with a window of 3.",
        causal=True,
        window=[3, -1],
        q_len=2,
        kv_len=12,
        self_attention=False,
        kv_lengths=[12, 7],
    ),
    spec(
        "variant_kv_lengths_alibi_causal_fully_masked_rows",
        "Lengths 8 and 6 with ALiBi and causal (a padded batch of a BLOOM-style model): the shorter row's "
        "first two queries sit before its first key and see nothing.",
        causal=True,
        kv_lengths=[8, 6],
        attn_bias=bias_entry("alibi", (1, 4, 8, 8), grad=False),
    ),
    spec(
        "variant_everything_softcap_window_lengths_bias_gqa",
        "Every variant at once: softcap 30, a window [3, 1], lengths 9 and 5, a learned bias per head, GQA, "
        "cross-attention, causal.",
        causal=True,
        softcap=30.0,
        window=[3, 1],
        kv_lengths=[9, 5],
        num_heads=4,
        num_kv_heads=2,
        q_len=4,
        kv_len=9,
        self_attention=False,
        input_scale=4.0,
        attn_bias=bias_entry("random", (1, 4, 4, 9)),
    ),
    # --- modes ----------------------------------------------------------------------
    spec(
        "dropout_p0p1_eval_mode",
        "A module built with dropout 0.1, evaluated in eval mode: no dropout may be applied.",
        dropout=0.1,
    ),
]
