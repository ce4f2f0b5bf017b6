"""Gradients: the emulated reference backward, the tolerance rule's power on gradients, and the
gradients check on real and deliberately wrong backwards."""

from __future__ import annotations

import numpy as np
import pytest

from mha_conformance.checks.gradients import check_gradients
from mha_conformance.execution.harness import InProcess, load
from mha_conformance.impls import reference
from mha_conformance.impls.registry import as_adapter, builtin
from mha_conformance.tolerance import judge_tensor

CASES = ["self_basic_b2_t8_d16_h4", "gqa_h8_kv2", "causal_long_t512_h2_hd8", "cross_kdim6_vdim10_din8"]


def head_by_head_backward(spec: dict, t: dict, g: np.ndarray, *, scale=None, float32_softmax_backward=False):
    """Gradients of sum(output * g) written head by head in float64, in another order than
    impls/reference.py (which these tests must not reuse). ``scale`` overrides the softmax scale
    (a wrong backward); ``float32_softmax_backward`` puts one float32 step in the chain."""
    f = {k: np.asarray(v, np.float64) for k, v in t.items() if k != "mask" and k[:4] != "grad"}
    b, tq, tk = spec["batch"], spec["q_len"], spec["kv_len"]
    h, hkv, hd, hdv = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"], spec["v_head_dim"]
    scale = scale if scale is not None else spec["scale"] if spec["scale"] is not None else hd**-0.5
    allowed = np.ones((b, h, tq, tk), bool)
    if "mask" in t:
        allowed &= np.broadcast_to(t["mask"], allowed.shape)
    if spec["causal"]:
        allowed &= np.tri(tq, tk, k=tk - tq, dtype=bool)

    def lin(x, s):
        return f[x] @ f[f"w_{s}"] + f.get(f"b_{s}", 0.0)

    q, k, v = lin("query", "q"), lin("key", "k"), lin("value", "v")
    d_out = np.asarray(g, np.float64)
    grads, d_ctx = {}, d_out
    if spec["out_proj"]:
        ctx = np.zeros((b, tq, h * hdv))
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    if spec["out_proj"]:
        d_ctx = d_out @ f["w_o"].T
    for head in range(h):
        kvh = head // (h // hkv)
        qs, ks, vs = (
            slice(head * hd, (head + 1) * hd),
            slice(kvh * hd, (kvh + 1) * hd),
            slice(kvh * hdv, (kvh + 1) * hdv),
        )
        cs = slice(head * hdv, (head + 1) * hdv)
        s = np.einsum("bid,bjd->bij", q[..., qs], k[..., ks]) * scale
        s = np.where(allowed[:, head], s, -np.inf)
        top = s.max(-1, keepdims=True)
        e = np.exp(s - np.where(np.isfinite(top), top, 0.0))
        tot = e.sum(-1, keepdims=True)
        p = np.divide(e, tot, out=np.zeros_like(e), where=tot > 0)
        if spec["out_proj"]:
            ctx[..., cs] = p @ v[..., vs]
        dp = d_ctx[..., cs] @ v[..., vs].transpose(0, 2, 1)
        dv[..., vs] += p.transpose(0, 2, 1) @ d_ctx[..., cs]
        if float32_softmax_backward:
            p32, dp32 = p.astype(np.float32), dp.astype(np.float32)
            ds = (p32 * (dp32 - (dp32 * p32).sum(-1, keepdims=True))).astype(np.float64)
        else:
            ds = p * (dp - np.einsum("bij,bij->bi", dp, p)[..., None])
        dq[..., qs] += ds @ k[..., ks] * scale
        dk[..., ks] += ds.transpose(0, 2, 1) @ q[..., qs] * scale
    if spec["out_proj"]:
        grads["grad_w_o"] = ctx.reshape(-1, ctx.shape[-1]).T @ d_out.reshape(-1, d_out.shape[-1])
        if "b_o" in f:
            grads["grad_b_o"] = d_out.reshape(-1, d_out.shape[-1]).sum(0)
    for s, x, dy in (("q", "query", dq), ("k", "key", dk), ("v", "value", dv)):
        grads[f"grad_w_{s}"] = f[x].reshape(-1, f[x].shape[-1]).T @ dy.reshape(-1, dy.shape[-1])
        if f"b_{s}" in f:
            grads[f"grad_b_{s}"] = dy.reshape(-1, dy.shape[-1]).sum(0)
        grads[f"grad_{x}"] = dy @ f[f"w_{s}"].T
    return grads


# ---------------------------------------------------------------- the emulated backward


@pytest.mark.parametrize("case_id", CASES)
def test_emulated_backward_rounds_to_its_dtype_and_errs_like_it(case_id):
    case = load(case_id)
    t, g = case.inputs(), case.tensors["grad_output"]
    errors = {}
    for dtype in ("float32", "float16", "bfloat16"):
        if dtype not in case.spec["dtypes"]:
            continue
        for algorithm in (a for a in reference.ENSEMBLE if a.used_in(dtype)):
            grads = reference.backward(t, case.spec, g, reference.PRECISIONS[dtype], algorithm=algorithm)
            for name, grad in grads.items():
                assert np.array_equal(reference.PRECISIONS[dtype].round(grad), grad), (dtype, algorithm, name)
            for n in ("grad_query", "grad_key", "grad_value"):  # the stored baseline is the ensemble's worst
                assert np.abs(grads[n] - case.tensors[n]).max() <= case.baseline[dtype][n], (
                    dtype,
                    algorithm,
                    n,
                )
        errors[dtype] = max(
            case.baseline[dtype][n] / np.abs(case.tensors[n]).max()
            for n in ("grad_query", "grad_key", "grad_value")
        )
    assert 1e-9 < errors["float32"] < 1e-5
    assert errors["float32"] < errors["bfloat16"] < 0.1


def test_key_bias_gradient_is_zero_and_its_baseline_bounds_noise():
    """A key bias shifts a whole score row, which the softmax ignores: grad_b_k is 0 exactly."""
    case = load("self_basic_b2_t8_d16_h4")
    assert np.abs(case.tensors["grad_b_k"]).max() < 1e-14
    for dtype in ("float32", "float16", "bfloat16"):
        emulated = reference.backward(
            case.inputs(), case.spec, case.tensors["grad_output"], reference.PRECISIONS[dtype]
        )
        assert case.baseline[dtype]["grad_b_k"] >= np.abs(emulated["grad_b_k"]).max()


# ------------------------------------------------------------ the tolerance rule's power


@pytest.mark.parametrize("case_id", CASES)
def test_float64_backward_in_another_summation_order_passes(case_id):
    case = load(case_id)
    grads = head_by_head_backward(case.spec, case.tensors, case.tensors["grad_output"])
    for name in case.spec["gradients"]:
        v = judge_tensor(grads[name], case, name, "float64")
        assert v.passed and v.ratio < 0.25, v.describe()  # 8x inside the limit


@pytest.mark.parametrize("case_id", CASES)
def test_float64_backward_with_one_float32_step_fails(case_id):
    """A float32 softmax backward inside an otherwise float64 backward is caught."""
    case = load(case_id)
    grads = head_by_head_backward(
        case.spec, case.tensors, case.tensors["grad_output"], float32_softmax_backward=True
    )
    failed = [n for n in ("grad_query", "grad_key") if not judge_tensor(grads[n], case, n, "float64").passed]
    assert failed == ["grad_query", "grad_key"]


# ------------------------------------------------------------------ the gradients check


def simple_backward_adapter(**wrong):
    """A function adapter of the simple form whose ``backward`` computes float64 gradients
    (head by head) and returns them in the dtype asked for."""

    def attention(case, spec, dtype, device):
        raise NotImplementedError("forward not needed here")

    def backward(case, spec, dtype, device):
        grads = head_by_head_backward(spec, case, case["grad_output"], **wrong)
        return {name: grad.astype(case["query"].dtype) for name, grad in grads.items()}

    attention.backward = backward
    return as_adapter(attention, "head-by-head")


def test_simple_form_backward_passes():
    check_gradients(simple_backward_adapter(), "gqa_h8_kv2", "float64", "cpu")
    check_gradients(simple_backward_adapter(), "cross_kdim6_vdim10_din8", "float32", "cpu")


def test_backward_of_an_unscaled_forward_fails_with_a_reproduce_line():
    with pytest.raises(AssertionError) as failure:
        check_gradients(simple_backward_adapter(scale=1.0), "self_basic_b2_t8_d16_h4", "float32", "cpu")
    text = str(failure.value)
    assert "grad_query: max abs err" in text and "grad_w_q" in text
    assert (
        "Reproduce: python -m mha_conformance -k 'test_gradients' --adapter head-by-head --device cpu "
        "--dtype float32 --case self_basic_b2_t8_d16_h4" in text
    )


def test_missing_and_invented_gradients_fail():
    def attention(case, spec, dtype, device):
        raise NotImplementedError

    def backward(case, spec, dtype, device):
        grads = head_by_head_backward(spec, case, case["grad_output"])
        grads.pop("grad_w_o")
        grads["grad_b_q"] = np.zeros(spec["num_heads"] * spec["head_dim"])  # the case has no b_q
        return grads

    attention.backward = backward
    with pytest.raises(AssertionError) as failure:
        check_gradients(as_adapter(attention, "sloppy"), "bias_out_only", "float64", "cpu")
    assert "'grad_w_o' is missing from the result" in str(failure.value)
    assert "unexpected 'grad_b_q' in the result: the case has no such tensor" in str(failure.value)


def test_no_backward_is_a_skip_with_the_reason():
    def attention(case, spec, dtype, device):
        raise NotImplementedError

    with pytest.raises(pytest.skip.Exception, match="does not compute gradients"):
        check_gradients(as_adapter(attention, "forward-only"), "self_basic_b2_t8_d16_h4", "float32", "cpu")


torch_adapters = pytest.mark.skipif(
    builtin("torch-sdpa").missing() is not None, reason="torch is not installed"
)


@torch_adapters
@pytest.mark.parametrize("name", ["torch-sdpa", "torch-mha", "torch-mha-noweights", "torch-scratch"])
@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_torch_adapters_pass_the_gradients_check(name, dtype):
    record = check_gradients(builtin(name), "bias_qkv_only", dtype, "cpu", runner=InProcess())
    assert {v.tensor for v in record.verdicts} == set(load("bias_qkv_only").spec["gradients"])
    assert all(v.passed for v in record.verdicts)


@torch_adapters
def test_torch_wrapper_gradients_add_up_over_shared_kv_heads():
    record = check_gradients(builtin("torch-wrapper"), "noproj_causal_gqa_h4_kv2", "float64", "cpu")
    assert all(v.passed for v in record.verdicts) and len(record.verdicts) == 9  # q, k, v, w_*, b_*


@torch_adapters
def test_the_fast_path_cannot_differentiate():
    with pytest.raises(pytest.skip.Exception, match="inference_mode"):
        check_gradients(builtin("torch-mha-fastpath"), "self_basic_b2_t8_d16_h4", "float32", "cpu")
