"""The tolerance policy separates honest rounding from real mistakes."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from mha_conformance.impls import reference
from mha_conformance.tolerance import judge
from mha_conformance.vectors import golden
from tests.loop_impls import per_head

CASES = [
    "self_basic_b2_t8_d16_h4",
    "gqa_h8_kv2",
    "seed_gpt_causal_d512_h8_hd64_noqkvbias",
    "causal_long_t512_h2_hd8",
    "tiny_values_1e-3",
    "mask_fully_masked_query_rows",
]


def verdict(case, actual, dtype, tensor="output", k=2.0):
    return judge(
        actual,
        case.tensors[tensor],
        tensor=tensor,
        dtype=dtype,
        baseline=case.baseline[dtype][tensor],
        error_scale=case.baseline["error_scale"][tensor],
        k=k,
    )


@pytest.mark.parametrize("case_id", CASES)
def test_float64_in_another_summation_order_passes(case_id):
    case = golden.load_case(case_id)
    out, weights = per_head(case.spec, case.tensors)
    assert verdict(case, out, "float64").passed
    assert verdict(case, weights, "float64", "attn_weights").passed


@pytest.mark.parametrize("case_id", [c for c in CASES if c != "tiny_values_1e-3"])
def test_float64_with_one_float32_step_fails(case_id):
    """A float32 softmax inside an otherwise float64 computation is caught."""
    case = golden.load_case(case_id)
    spec, t = case.spec, case.tensors
    fw = reference.forward(t, spec)
    scores = (fw.q @ fw.k.swapaxes(-1, -2)) * fw.scale
    w32 = reference.masked_softmax(reference.PRECISIONS["float32"], scores, fw.allowed).astype(np.float64)
    b, h, tq, _ = w32.shape
    ctx = (w32 @ fw.v).transpose(0, 2, 1, 3).reshape(b, tq, -1)
    out = ctx @ t["w_o"].astype(np.float64) + t.get("b_o", 0.0) if spec["out_proj"] else ctx
    v = verdict(case, out, "float64")
    assert not v.passed and v.problem == "tolerance", v.describe()
    assert not verdict(case, w32, "float64", "attn_weights").passed


@pytest.mark.parametrize("case_id", CASES)
def test_float32_loops_pass_and_a_1e_3_error_fails(case_id):
    case = golden.load_case(case_id)
    t32 = {k: v.astype(np.float32) if v.dtype != bool else v for k, v in case.tensors.items()}
    out = reference.forward(t32, case.spec, reference.PRECISIONS["float32"]).output.astype(np.float32)
    assert verdict(case, out, "float32").passed
    assert not verdict(case, (out * (1 + 1e-3)).astype(np.float32), "float32").passed


def test_bfloat16_result_is_accepted_as_bfloat16():
    case = golden.load_case("self_basic_b2_t8_d16_h4")
    emulated = reference.forward(case.tensors, case.spec, reference.PRECISIONS["bfloat16"])
    v = verdict(case, emulated.output.astype(ml_dtypes.bfloat16), "bfloat16")
    assert v.passed and v.ratio <= 1.0
    shifted = (emulated.output * 1.05).astype(ml_dtypes.bfloat16)
    assert not verdict(case, shifted, "bfloat16").passed


def test_nan_shape_and_dtype_fail_with_what_is_wrong():
    case = golden.load_case("mask_fully_masked_query_rows")
    out = case.tensors["output"].copy()
    out[0, 0, 1] = np.nan
    v = verdict(case, out, "float64")
    assert (v.passed, v.problem, v.worst_index) == (False, "nonfinite", (0, 0, 1))
    assert "non-finite" in v.describe() and "[0, 0, 1]" in v.describe()
    assert verdict(case, case.tensors["output"][:, :1], "float64").problem == "shape"
    assert verdict(case, case.tensors["output"].astype(np.float32), "float64").problem == "dtype"
    assert verdict(case, case.tensors["output"].tolist(), "float64").problem == "shape"


def test_failure_names_the_worst_index_and_ratio():
    case = golden.load_case("self_basic_b2_t8_d16_h4")
    out = case.tensors["output"].astype(np.float32)
    out[1, 3, 2] += 1e-2
    v = verdict(case, out, "float32")
    assert not v.passed and v.worst_index == (1, 3, 2)
    assert v.ratio > 2 and v.max_abs_err == pytest.approx(1e-2, rel=1e-3)
    assert "index [1, 3, 2]" in v.describe() and "tolerance" in v.describe()
