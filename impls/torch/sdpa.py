"""``torch-sdpa``: explicit projections plus ``F.scaled_dot_product_attention``.

``scale=`` carries custom scales, ``enable_gqa`` grouped-query cases, and ``is_causal`` is
used only where its top-left alignment is right (Tq == Tk, no other mask); otherwise the
causal offset goes in as an explicit bool mask (True = may attend, SDPA's convention), with
per-batch key lengths and windows. An additive ``attn_bias`` is SDPA's float ``attn_mask`` (the
bool rules folded in as ``-inf``), differentiable for ``grad_attn_bias``. SDPA has no softcap. The
first call of each prepared case is profiled to record which SDPA kernel PyTorch chose.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mha_conformance.impls.adapter import Arrays, Prepared, Spec
from mha_conformance.impls.torch.common import (
    TorchAdapter,
    additive_mask,
    allowed_mask,
    input_leaves,
    merge_and_project,
    project_heads,
)
from mha_conformance.impls.torch.convert import import_torch, to_numpy, to_torch
from mha_conformance.impls.torch.timed import Built, bench_inputs

SDPA_KERNELS = (
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_fused_attention_overrideable",
    "aten::_scaled_dot_product_attention_math",
)


def profiled_kernel(fn, candidates=SDPA_KERNELS):
    """Run ``fn`` under the profiler; return its result and the first candidate op that ran."""
    t = import_torch()
    with t.profiler.profile(activities=[t.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    ran = {e.key for e in prof.key_averages()}
    return result, next((k for k in candidates if k in ran), "unknown")


class TorchSDPA(TorchAdapter):
    name = "torch-sdpa"
    path = "x @ W + b projections, F.scaled_dot_product_attention(attn_mask, is_causal, scale, enable_gqa)"
    variants = frozenset({"attn_bias", "window", "kv_lengths"})
    cannot_express = {
        "softcap": "F.scaled_dot_product_attention has no logit softcap (FlexAttention's score_mod has)"
    }

    def prepare(
        self, case: Arrays, spec: Spec, dtype: str, device: str, *, dropout_p: float = 0.0
    ) -> Prepared:
        t = import_torch()
        params = {n: to_torch(a, dtype, device) for n, a in case.items() if n[:2] in ("w_", "b_")}
        kernel: list[str] = []

        def attend(inputs: Mapping[str, np.ndarray]):
            q, k, v = (to_torch(inputs[n], dtype, device) for n in ("query", "key", "value"))
            masks = self.masks(spec, inputs.get("mask"), device)
            bias = to_torch(inputs["attn_bias"], dtype, device) if "attn_bias" in inputs else None
            return self.attend(params, q, k, v, masks, spec, dropout_p=dropout_p, bias=bias)

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            with t.no_grad():
                if kernel:
                    out = attend(inputs)
                else:
                    out, name = profiled_kernel(lambda: attend(inputs))
                    kernel.append(name)
            return {"output": to_numpy(out, dtype, device), "meta": {"kernel": kernel[0]}}

        return run

    def prepare_training(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        """SDPA's own attention dropout, ``dropout_p=spec["dropout"]`` (SDPA has no module to put in
        training mode: the caller passes dropout_p while training and 0 in eval)."""
        return self.prepare(case, spec, dtype, device, dropout_p=spec["dropout"])

    def masks(self, spec: Mapping[str, Any], mask: np.ndarray | None, device: str):
        """SDPA's mask arguments ``(attn_mask, is_causal)``: ``is_causal`` only where its top-left
        alignment is right (Tq == Tk, no other mask), else the bottom-right rule and the case's
        mask as one bool tensor on ``device`` (built once per call; once in setup when timed)."""
        top_left_causal = (
            spec["causal"]
            and spec["q_len"] == spec["kv_len"]
            and mask is None
            and not any(spec.get(v) is not None for v in ("attn_bias", "window", "kv_lengths"))
        )
        return (None if top_left_causal else allowed_mask(spec, mask, device)), top_left_causal

    def attend(
        self, params, query, key, value, masks, spec: Mapping[str, Any], dropout_p: float = 0.0, bias=None
    ):
        """The attention on tensors: projections, SDPA (``masks`` from :meth:`masks`), output
        projection. :meth:`prepare`, :meth:`prepare_backward` and the timed body
        (``impls/torch/timed.py``) all run this."""
        f = import_torch().nn.functional
        h, hkv, hd, hdv = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"], spec["v_head_dim"]
        q = project_heads(params, query, "q", h, hd)
        k, v = project_heads(params, key, "k", hkv, hd), project_heads(params, value, "v", hkv, hdv)
        allowed, top_left_causal = masks
        ctx = f.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=allowed if bias is None else additive_mask(bias, allowed),
            dropout_p=dropout_p,
            is_causal=top_left_causal,
            scale=spec["scale"],
            enable_gqa=hkv != h,
        )
        return merge_and_project(params, ctx, spec)

    def prepare_backward(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        """Autograd through the same computation: weights, biases, query, key and value are
        separate leaves (a self-attention case's one array becomes three), weights already in
        the golden [in, out] layout."""
        names = [n for n in case if n[:2] in ("w_", "b_")]

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            leaves = {n: to_torch(case[n], dtype, device, requires_grad=True) for n in names}
            leaves.update(input_leaves(inputs, dtype, device))
            if "attn_bias" in inputs:
                leaves["attn_bias"] = to_torch(inputs["attn_bias"], dtype, device, requires_grad=True)
            masks = self.masks(spec, inputs.get("mask"), device)
            bias = leaves.get("attn_bias")
            out = self.attend(leaves, leaves["query"], leaves["key"], leaves["value"], masks, spec, bias=bias)
            out.backward(to_torch(inputs["grad_output"], dtype, device))
            return {f"grad_{n}": to_numpy(leaf.grad, dtype, device) for n, leaf in leaves.items()}

        return run

    def timed_body(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Built:
        """Its projections and SDPA call on tensors put on the device once, under ``no_grad``."""
        t = import_torch()
        masks = self.masks(spec, case.get("mask"), device)  # on the device once, in setup

        def weights(grad: bool) -> dict[str, Any]:
            return {
                n: to_torch(a, dtype, device, requires_grad=grad)
                for n, a in case.items()
                if n[:2] in ("w_", "b_")
            }

        def run(params, q, k, v, bias):
            return self.attend(params, q, k, v, masks, spec, bias=bias)

        def bias(grad: bool):
            return (
                to_torch(case["attn_bias"], dtype, device, requires_grad=grad)
                if "attn_bias" in case
                else None
            )

        params, (q, k, v) = weights(False), bench_inputs(spec, case, dtype, device, grad=False)

        def forward():
            with t.no_grad():  # as torch-sdpa's conformance path runs it
                return run(params, q, k, v, bias(False))

        return forward, lambda: run(
            weights(True), *bench_inputs(spec, case, dtype, device, grad=True), bias(True)
        )
