"""The kernel-scale catalogue: the shapes attention kernels dispatch on, where their bugs live.

Attention kernels choose their code path by shape: query and key tiles (32, 64, 128, 256; torch's
CPU flash kernel tiles keys by 512, queries by 32, 64 or 256, switching at 192 and 768 queries),
head-dim templates (up to 256, padded to a multiple of 8), split-K decoding over long caches. A
case here is a spec and a seed: too large to commit, it is generated where it runs
(``vectors/materialize.py``), its inputs from a stream whose bits are fixed (``vectors/stream.py``)
and checked against the digest in ``vectors/KERNELS.json``, its float64 truth computed on first use
and cached.

The sequence lengths sit on both sides of the tile boundaries (1, 63, 65, 127, 129, 191, 193, 255,
257, 511, 513, 767, 769, 1023, 1025, 2047, 2049), in pairs as FlashAttention's tests pick them,
not their full product; causal cases with Tq > Tk take FlashAttention's swapped pairs, where most
queries see no key (three times as many as the keys or more, so that a convention for such rows,
zeros or uniform weights, shows in every dtype, gradients included); the head dims are FlashAttention's (32, 40, 59, 64, 80, 96, 111, 128,
160, 192, 256), with 192/128 for multi-head latent attention; GQA groups of 2, 4 and 8 and MQA;
causal with Tq < Tk and Tq > Tk; decoding after caches of 4096 and 16384 keys; and every variant
at scale. Batch 1 and two heads keep the projections cheap: the attention is what is at scale.
Ids say the shape: ``k_`` then the axes.
"""

from __future__ import annotations

from typing import Any

from mha_conformance.vectors.catalogue import bias_entry, mask_entry, spec

#: Attention weights are stored (and judged) where a case has at most this many (float64: 64 MB).
WEIGHTS_LIMIT = 1 << 23

_KERNEL_DEFAULTS: dict[str, Any] = {
    "batch": 1,
    "num_heads": 2,
    "weight_gradients": False,
    "stream": "splitmix64",
    "tier": "kernel",
}


def kernel(case_id: str, description: str, **fields: Any) -> dict[str, Any]:
    """A kernel-scale spec: :func:`vectors.catalogue.spec` with the kernel defaults, and whether its
    attention weights are small enough to store (``store_weights``). The model width is heads x
    head dim, as in a transformer layer (the modules that fix ``head_dim = embed_dim / heads``,
    nn.MultiheadAttention among them, can express the case); with grouped-query heads or a value
    head dim of its own, which those modules cannot express anyway, it is 64, which keeps the
    projections cheap."""
    if "kv_len" in fields and fields.get("q_len") != fields["kv_len"]:
        fields.setdefault("self_attention", False)
    heads = fields.get("num_heads", _KERNEL_DEFAULTS["num_heads"])
    plain = (
        fields.get("num_kv_heads", heads) == heads
        and fields.get("v_head_dim", fields["head_dim"]) == fields["head_dim"]
    )
    fields.setdefault("d_in", heads * fields["head_dim"] if plain else 64)
    gradients = fields.pop("gradients", True)
    s = spec(case_id, description, **{**_KERNEL_DEFAULTS, **fields})
    if not gradients:  # a case for the forward and decoding alone
        s["gradients"] = []
    s["store_weights"] = s["batch"] * s["num_heads"] * s["q_len"] * s["kv_len"] <= WEIGHTS_LIMIT
    return s


KERNEL_CASES: list[dict[str, Any]] = [
    # --- tile tails: one key or query either side of 64, 128, 192, 256, 512, 768, 1024, 2048 --------
    kernel("k_self_t63_hd32", "63 tokens: one short of a 64 tile, head dim 32.", q_len=63, head_dim=32),
    kernel(
        "k_self_t65_hd40_causal",
        "65 causal tokens: a 64 tile and a tail of one; head dim 40 (not a power of two).",
        q_len=65,
        head_dim=40,
        causal=True,
    ),
    kernel(
        "k_cross_tq113_tk203_hd59",
        "FlashAttention's (113, 203): neither length a tile multiple; head dim 59 (odd, padded to 64).",
        q_len=113,
        kv_len=203,
        head_dim=59,
    ),
    kernel(
        "k_self_t129_hd64_causal",
        "129 causal tokens: two 64 tiles and one a 128 tile plus a tail of one (kv_len % 32 == 1).",
        q_len=129,
        head_dim=64,
        causal=True,
    ),
    kernel(
        "k_cross_tq128_tk217_hd80",
        "FlashAttention's (128, 217): a full query tile over a key tail; head dim 80.",
        q_len=128,
        kv_len=217,
        head_dim=80,
    ),
    kernel(
        "k_self_t191_hd96_causal",
        "191 causal tokens: just under torch's CPU flash switch at 192 queries; head dim 96.",
        q_len=191,
        head_dim=96,
        causal=True,
    ),
    kernel(
        "k_self_t193_hd111",
        "193 tokens: just over the 192-query switch; head dim 111 (odd, above 96).",
        q_len=193,
        head_dim=111,
    ),
    kernel(
        "k_noproj_self_t257_hd64_causal",
        "257 causal tokens past a 256 tile, no output projection: the heads' contexts concatenated (the "
        "seed's wrapper of stacked heads at scale).",
        q_len=257,
        head_dim=64,
        causal=True,
        out_proj=False,
    ),
    kernel(
        "k_causal_tq255_tk257_hd128",
        "Causal, Tq 255 < Tk 257: bottom-right alignment across a 256 tile edge; head dim 128.",
        q_len=255,
        kv_len=257,
        head_dim=128,
        causal=True,
    ),
    kernel(
        "k_causal_tq257_tk63_hd128_fully_masked_rows",
        "Causal, Tq 257 > Tk 63 (past a 256 query tile, under a 64 key tile): the first 194 queries see no "
        "key (rows of zeros).",
        q_len=257,
        kv_len=63,
        head_dim=128,
        causal=True,
    ),
    kernel(
        "k_causal_tq127_tk513_hd64",
        "FlashAttention's causal (127, 513): a partial query tile against a 512 key tile and a tail of one.",
        q_len=127,
        kv_len=513,
        head_dim=64,
        causal=True,
    ),
    kernel(
        "k_causal_tq513_tk127_hd64_fully_masked_rows",
        "The same swapped, Tq 513 > Tk 127: 386 queries see no key; the rest a partial tile.",
        q_len=513,
        kv_len=127,
        head_dim=64,
        causal=True,
    ),
    kernel(
        "k_cross_tq511_tk513_hd256",
        "511 queries over 513 keys (either side of 512); head dim 256, the largest template.",
        q_len=511,
        kv_len=513,
        head_dim=256,
    ),
    kernel(
        "k_cross_tq767_tk769_hd192_vhd128",
        "Either side of 768 (torch's second query-tile switch), multi-head latent attention's 192/128 heads.",
        q_len=767,
        kv_len=769,
        head_dim=192,
        v_head_dim=128,
    ),
    kernel(
        "k_causal_tq799_tk3_hd160_fully_masked_rows",
        "FlashAttention's causal (3, 799) swapped, with head dim 160, above the 128 template: 796 queries see "
        "no key, the last three one to three.",
        q_len=799,
        kv_len=3,
        head_dim=160,
        causal=True,
    ),
    kernel(
        "k_cross_tq1023_tk1025_gqa_h8_kv2_hd64",
        "Either side of 1024, grouped-query attention with groups of 4.",
        q_len=1023,
        kv_len=1025,
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
    ),
    kernel(
        "k_causal_tq1025_tk255_mqa_h4_kv1_hd128_fully_masked_rows",
        "Causal, Tq 1025 > Tk 255, multi-query attention (4 query heads, one kv head): 770 queries see no key.",
        q_len=1025,
        kv_len=255,
        num_heads=4,
        num_kv_heads=1,
        head_dim=128,
        causal=True,
    ),
    kernel(
        "k_causal_tq2047_tk2049_gqa_h2_kv1_hd64",
        "Causal, 2047 queries over 2049 keys: past 2048 by one, a key tail of one; MQA.",
        q_len=2047,
        kv_len=2049,
        num_kv_heads=1,
        head_dim=64,
        causal=True,
    ),
    # --- decoding: few queries over long caches (split-K territory) ----------------------------------
    kernel(
        "k_decode_tq1_tk4096_gqa_h16_kv8_hd128",
        "One query over 4096 cached keys, 16 query heads on 8 kv heads (the num_splits shape of "
        "flash-attention#1647).",
        q_len=1,
        kv_len=4096,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        causal=True,
    ),
    kernel(
        "k_decode_tq3_tk16384_gqa_h16_kv2_hd64",
        "Three queries over 16384 cached keys, GQA groups of 8: a long split-K reduction in every dtype.",
        q_len=3,
        kv_len=16384,
        num_heads=16,
        num_kv_heads=2,
        head_dim=64,
        causal=True,
    ),
    kernel(
        "k_decode_prefill4096_then_3_self_causal_hd64",
        "Causal self-attention over 4099 tokens: decoded as one prefill call of 4096 tokens, then three "
        "single tokens against the cache (forward and decoding; the other cases hold the gradients).",
        q_len=4099,
        head_dim=64,
        causal=True,
        decode_prefill=4096,
        gradients=False,
    ),
    # --- variants at scale ---------------------------------------------------------------------------
    kernel(
        "k_variant_window_left300_t1025_causal",
        "A causal sliding window of 300 keys over 1025 tokens: the window's edge inside 64 and 128 tiles.",
        q_len=1025,
        head_dim=64,
        causal=True,
        window=[300, -1],
    ),
    kernel(
        "k_variant_kv_lengths_b2_1025_700_causal",
        "Per-batch key lengths 1025 and 700 (ending inside a tile), causal, 129 queries each.",
        batch=2,
        q_len=129,
        kv_len=1025,
        head_dim=64,
        causal=True,
        kv_lengths=[1025, 700],
    ),
    kernel(
        "k_variant_alibi_t2048_h4_causal",
        "ALiBi on 2048 causal tokens, four heads (a BLOOM-style layer at its training length).",
        q_len=2048,
        num_heads=4,
        head_dim=32,
        causal=True,
        attn_bias=bias_entry("alibi", (1, 4, 2048, 2048), grad=False),
    ),
    kernel(
        "k_variant_softcap50_t1023_hd128_causal",
        "Gemma 2's softcap of 50 on 1023 causal tokens with large logits.",
        q_len=1023,
        head_dim=128,
        causal=True,
        softcap=50.0,
        input_scale=4.0,
    ),
    kernel(
        "k_variant_banded_neginf_t640",
        "A float mask of -inf outside a band of 48 keys either side (pytorch#127055's NaN at n = 640).",
        q_len=640,
        head_dim=64,
        attn_bias=bias_entry("band", (1, 1, 640, 640), width=48),
    ),
    kernel(
        "k_variant_bool_mask_keypad_b2_tk257",
        "A boolean key-padding mask over 257 keys (valid lengths end inside a tile), 63 queries.",
        batch=2,
        q_len=63,
        kv_len=257,
        head_dim=64,
        mask=mask_entry("key_padding", (2, 1, 1, 257)),
    ),
]


def memory_needed(spec: dict[str, Any], dtype: str, check: str) -> float:
    """About how many GB a kernel-scale test needs at its peak, in the larger of the suite process
    (the float64 truth on first use, one head at a time: about ten score matrices of one head) and
    the adapter's worker (every head's scores, weights and, for a backward, their gradients, in the
    dtype, computed in float32 for half types: about six matrices, twice that for gradients)."""
    b, h, tq, tk = spec["batch"], spec["num_heads"], spec["q_len"], spec["kv_len"]
    width = 8 if dtype == "float64" else 4
    truth = 10 * 8 * b * tq * tk
    adapter = (12 if check == "gradients" else 6) * width * b * h * tq * tk
    return max(truth, adapter) / 1e9
