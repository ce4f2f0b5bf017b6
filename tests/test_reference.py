"""The reference against hand arithmetic, two loop formulations and finite differences."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mha_conformance.impls import reference
from mha_conformance.vectors import golden
from mha_conformance.vectors.catalogue import spec
from mha_conformance.vectors.generate import build_inputs
from tests.loop_impls import per_head, per_token


def test_seed_wrapper_example_by_hand():
    """The seed's stacked causal heads (d_in 3, 2 heads of width 2, no out_proj), tiny enough
    to compute on paper: x0 = [1,0,0], x1 = [0,2,0] and identity-like weights."""
    s = spec(
        "hand",
        "",
        batch=1,
        q_len=2,
        d_in=3,
        num_heads=2,
        head_dim=2,
        causal=True,
        qkv_bias=False,
        out_proj=False,
    )
    w = np.array([[1, 0, 0, 1], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=np.float64)
    x = np.array([[[1, 0, 0], [0, 2, 0]]], dtype=np.float64)
    fw = reference.forward({"query": x, "key": x, "value": x, "w_q": w, "w_k": w, "w_v": w}, s)
    # Token 0 sees only itself: context = its values, head 0 [1, 0], head 1 [0, 1].
    # Token 1, both heads: logits 0 (key 0) and 4/sqrt(2) (key 1).
    p1 = math.exp(4 / math.sqrt(2)) / (1 + math.exp(4 / math.sqrt(2)))
    p0 = 1 - p1
    expected = np.array([[[1, 0, 0, 1], [p0, 2 * p1, 2 * p1, p0]]])
    np.testing.assert_allclose(fw.output, expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(fw.attn_weights[0, :, 1], [[p0, p1], [p0, p1]], atol=1e-15)
    assert fw.output.shape == (1, 2, 4)  # H * head width, as the seed says


SMALL = [
    c
    for c in golden.case_ids()
    if c.startswith(
        (
            "self",
            "cross",
            "causal_tq",
            "gqa",
            "mqa",
            "mask",
            "bias",
            "seed_wrapper",
            "seed_decode",
            "odd",
            "noproj",
            "scale",
            "one_token",
            "head_dim1",
            "v_head",
            "variant",
        )
    )
]


@pytest.mark.parametrize("case_id", SMALL)
def test_three_formulations_agree(case_id):
    case = golden.load_case(case_id)
    fw = reference.forward(case.tensors, case.spec)
    for loop in (per_head, per_token):
        out, weights = loop(case.spec, case.tensors)
        np.testing.assert_allclose(fw.output, out, rtol=0, atol=1e-12, err_msg=loop.__name__)
        np.testing.assert_allclose(fw.attn_weights, weights, rtol=0, atol=1e-12, err_msg=loop.__name__)


GRAD_SPECS = [
    spec(
        "fd_gqa_mask_causal_bias",
        "",
        batch=2,
        q_len=3,
        kv_len=5,
        d_in=5,
        kdim=4,
        vdim=6,
        num_heads=4,
        num_kv_heads=2,
        head_dim=3,
        v_head_dim=2,
        d_out=3,
        causal=True,
        scale=0.7,
        mask={"kind": "random", "shape": [2, 1, 3, 5], "keep": 0.7},
    ),
    spec("fd_noproj_self", "", batch=1, q_len=4, d_in=3, num_heads=2, head_dim=2, out_proj=False),
    spec(
        "fd_fully_masked_rows", "", batch=1, q_len=4, kv_len=2, d_in=4, num_heads=2, head_dim=2, causal=True
    ),
    # Contract v2's variants, each axis on its own and all at once (vectors/catalogue.py, "variant_*").
    spec(
        "fd_bias_per_head_neginf_gqa",
        "",
        batch=2,
        q_len=3,
        kv_len=4,
        d_in=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=2,
        attn_bias={"kind": "random", "shape": [1, 4, 3, 4], "grad": True, "neginf": 0.25, "rows": [1]},
    ),
    spec(
        "fd_bias_alibi_causal",
        "",
        batch=1,
        q_len=4,
        d_in=4,
        num_heads=2,
        head_dim=2,
        causal=True,
        attn_bias={"kind": "alibi", "shape": [1, 2, 4, 4], "grad": True},
    ),
    spec(
        "fd_softcap_large_logits",
        "",
        batch=1,
        q_len=3,
        d_in=4,
        num_heads=2,
        head_dim=2,
        softcap=2.0,
        input_scale=3.0,
    ),
    spec(
        "fd_window_cross",
        "",
        batch=1,
        q_len=3,
        kv_len=6,
        d_in=4,
        num_heads=2,
        head_dim=2,
        window=[1, 1],
        self_attention=False,
    ),
    spec(
        "fd_kv_lengths_zero_causal",
        "",
        batch=3,
        q_len=3,
        kv_len=5,
        d_in=4,
        num_heads=2,
        head_dim=2,
        causal=True,
        kv_lengths=[5, 0, 2],
        self_attention=False,
    ),
    spec(
        "fd_everything",
        "",
        batch=2,
        q_len=3,
        kv_len=5,
        d_in=4,
        num_heads=2,
        num_kv_heads=1,
        head_dim=2,
        causal=True,
        softcap=3.0,
        window=[2, 1],
        kv_lengths=[5, 3],
        self_attention=False,
        attn_bias={"kind": "random", "shape": [2, 1, 3, 5], "grad": True},
    ),
]


@pytest.mark.parametrize("s", GRAD_SPECS, ids=lambda s: s["id"])
def test_backward_matches_central_differences(s):
    t = {k: v.astype(np.float64) if v.dtype != bool else v for k, v in build_inputs(s).items()}
    if s["self_attention"]:  # separate copies, so each argument's gradient is its own
        t["key"], t["value"] = t["query"].copy(), t["query"].copy()
    g = t.pop("grad_output")
    grads = reference.backward(t, s, g)
    names = ["query", "key", "value"] + [n for n in t if n[:2] in ("w_", "b_") or n == "attn_bias"]
    assert sorted(grads) == sorted(f"grad_{n}" for n in names)
    step = 1e-6
    for name in names:
        fd = np.zeros_like(t[name])
        for idx in np.ndindex(t[name].shape):
            orig = t[name][idx]
            t[name][idx] = orig + step
            up = np.sum(reference.forward(t, s).output * g)
            t[name][idx] = orig - step
            down = np.sum(reference.forward(t, s).output * g)
            t[name][idx] = orig
            fd[idx] = (up - down) / (2 * step)
        np.testing.assert_allclose(grads[f"grad_{name}"], fd, rtol=1e-6, atol=1e-8, err_msg=name)


def test_fully_masked_rows_give_zeros_not_nan():
    s = spec(
        "masked",
        "",
        batch=1,
        q_len=3,
        kv_len=3,
        d_in=4,
        num_heads=2,
        head_dim=2,
        mask={"kind": "masked_rows", "shape": [1, 1, 3, 3], "rows": [1]},
    )
    t = build_inputs(s)
    fw = reference.forward(t, s)
    assert np.all(fw.attn_weights[:, :, 1] == 0)
    assert np.all(fw.context[:, 1] == 0)
    assert np.isfinite(fw.output).all()
    grads = reference.backward(t, s, t["grad_output"])
    assert all(np.isfinite(v).all() for v in grads.values())


def test_huge_logits_stay_finite():
    s = spec("huge", "", batch=1, q_len=4, d_in=4, num_heads=1, head_dim=4, scale=1.0)
    t = build_inputs(s)
    t = {k: v * (100.0 if k == "query" else 1.0) for k, v in t.items()}
    t["key"] = t["value"] = t["query"]
    fw = reference.forward(t, s)
    logits = (fw.q @ fw.k.swapaxes(-1, -2)) * fw.scale
    assert np.abs(logits).max() >= 1e4
    assert np.isfinite(fw.output).all() and np.isfinite(fw.attn_weights).all()
    np.testing.assert_allclose(fw.attn_weights.sum(-1), 1.0, atol=1e-12)


def test_causal_is_bottom_right_aligned():
    s = spec("br", "", batch=1, q_len=2, kv_len=4, causal=True)
    allowed = reference.allowed_keys(s, None)[0, 0]
    assert allowed.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_bfloat16_rounding_is_round_to_nearest_even():
    import ml_dtypes  # an independent implementation of the same rounding

    x = np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 1e3
    ours = reference.round_to_bfloat16(x)
    theirs = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize(
    "dtype,lo,hi", [("float32", 1e-8, 1e-5), ("float16", 1e-5, 1e-1), ("bfloat16", 1e-4, 1e0)]
)
def test_emulated_precision_errs_like_its_dtype(dtype, lo, hi):
    case = golden.load_case("self_basic_b2_t8_d16_h4")
    truth = reference.forward(case.tensors, case.spec)
    emulated = reference.forward(case.tensors, case.spec, reference.PRECISIONS[dtype])
    err = np.abs(emulated.output - truth.output).max()
    assert lo < err < hi
