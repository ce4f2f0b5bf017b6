"""``torch-sdpa``: explicit projections plus ``F.scaled_dot_product_attention``.

``scale=`` carries custom scales, ``enable_gqa`` grouped-query cases, and ``is_causal`` is
used only where its top-left alignment is right (Tq == Tk, no other mask); otherwise the
causal offset goes in as an explicit bool mask (True = may attend, SDPA's convention). The
first call of each prepared case is profiled to record which SDPA kernel PyTorch chose.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from impls.torch_common import TorchAdapter, allowed_mask, to_numpy, to_torch, torch

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
    t = torch()
    with t.profiler.profile(activities=[t.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    ran = {e.key for e in prof.key_averages()}
    return result, next((k for k in candidates if k in ran), "unknown")


class TorchSDPA(TorchAdapter):
    name = "torch-sdpa"
    path = "x @ W + b projections, F.scaled_dot_product_attention(attn_mask, is_causal, scale, enable_gqa)"
    divergences = {
        "golden:decode_tq1_tk1024_long_cache:float32:cpu": (
            "the CPU flash kernel (_scaled_dot_product_flash_attention_for_cpu) pre-scales q and k by "
            "sqrt(scale) and rescales its online softmax block by block; over 1024 keys in float32 it reaches "
            "2.0e-7 abs / 1.1e-6 rel, 5.5x the straightforward float32 computation (the math kernel: 2.4x)"
        ),
        "golden:huge_logits_1e4:float16": (
            "SDPA scales q and k by sqrt(scale) in float16 before Q K^T; with logits near 7e3 (score spacing 4) "
            "the extra roundings move scores by whole ulps: 2.1x the straightforward float16 error"
        ),
    }

    def prepare(self, case, spec, dtype, device):
        t = torch()
        f = t.nn.functional
        params = {n: to_torch(a, dtype, device) for n, a in case.items() if n[:2] in ("w_", "b_")}
        b, tq, tk = spec["batch"], spec["q_len"], spec["kv_len"]
        h, hkv, hd, hdv = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"], spec["v_head_dim"]
        kernel: list[str] = []

        def project(x, short: str, heads: int, width: int):
            y = x @ params[f"w_{short}"]
            if f"b_{short}" in params:
                y = y + params[f"b_{short}"]
            return y.view(b, -1, heads, width).transpose(1, 2)

        def attend(inputs: Mapping[str, np.ndarray]):
            q = project(to_torch(inputs["query"], dtype, device), "q", h, hd)
            k = project(to_torch(inputs["key"], dtype, device), "k", hkv, hd)
            v = project(to_torch(inputs["value"], dtype, device), "v", hkv, hdv)
            top_left_causal = spec["causal"] and tq == tk and inputs.get("mask") is None
            mask = None if top_left_causal else allowed_mask(spec, inputs.get("mask"), device)
            ctx = f.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=top_left_causal, scale=spec["scale"], enable_gqa=hkv != h
            )
            out = ctx.transpose(1, 2).reshape(b, tq, h * hdv)
            if spec["out_proj"]:
                out = out @ params["w_o"]
                if "b_o" in params:
                    out = out + params["b_o"]
            return out

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            with t.no_grad():
                if kernel:
                    out = attend(inputs)
                else:
                    out, name = profiled_kernel(lambda: attend(inputs))
                    kernel.append(name)
            return {"output": to_numpy(out, dtype, device), "meta": {"kernel": kernel[0]}}

        return run
