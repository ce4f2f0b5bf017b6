"""``torch-wrapper``: the seed's ``MultiHeadAttentionWrapper`` of stacked causal heads.

A list of independent single-head ``CausalAttention`` modules whose outputs are concatenated,
with no output projection, exactly as the tutorial builds it. Grouped-query cases load the
shared K/V weights into every head of a group. Only causal self-attention without an
output projection or extra mask fits this design; everything else is a skip with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from impls.torch_common import TorchAdapter, linear_weight, to_numpy, to_torch, torch, torch_dtype


def module_classes():
    t = torch()
    nn = t.nn

    class CausalAttention(nn.Module):
        def __init__(self, d_in, d_out, context_length, dropout, qkv_bias=False):
            super().__init__()
            self.d_out = d_out
            self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
            self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
            self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
            self.dropout = nn.Dropout(dropout)
            self.register_buffer("mask", t.triu(t.ones(context_length, context_length), diagonal=1))

        def forward(self, x):
            b, num_tokens, d_in = x.shape
            keys = self.W_key(x)
            queries = self.W_query(x)
            values = self.W_value(x)
            attn_scores = queries @ keys.transpose(1, 2)
            attn_scores.masked_fill_(self.mask.bool()[:num_tokens, :num_tokens], -t.inf)
            attn_weights = t.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
            attn_weights = self.dropout(attn_weights)
            return attn_weights @ values

    class MultiHeadAttentionWrapper(nn.Module):
        def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
            super().__init__()
            self.heads = nn.ModuleList(
                [CausalAttention(d_in, d_out, context_length, dropout, qkv_bias) for _ in range(num_heads)]
            )

        def forward(self, x):
            return t.cat([head(x) for head in self.heads], dim=-1)

    return MultiHeadAttentionWrapper


class TorchWrapper(TorchAdapter):
    name = "torch-wrapper"
    path = "the seed's MultiHeadAttentionWrapper: a ModuleList of single-head CausalAttention, outputs concatenated"

    def supports(self, spec: Mapping[str, Any], dtype: str, device: str) -> str | None:
        if spec["out_proj"]:
            return "MultiHeadAttentionWrapper has no output projection (only out_proj: false cases)"
        if not spec["causal"] or not spec["self_attention"]:
            return "MultiHeadAttentionWrapper stacks causal self-attention heads only"
        if spec.get("mask") is not None:
            return "CausalAttention takes no mask beyond its causal buffer"
        if spec["v_head_dim"] != spec["head_dim"]:
            return "CausalAttention uses one width (d_out) for queries, keys and values"
        if spec["scale"] is not None:
            return "CausalAttention always scales by 1/sqrt(d_out)"
        return super().supports(spec, dtype, device)

    def prepare(self, case, spec, dtype, device):
        t = torch()
        h, hd, group = spec["num_heads"], spec["head_dim"], spec["num_heads"] // spec["num_kv_heads"]
        module = module_classes()(
            spec["d_in"], hd, context_length=spec["q_len"], dropout=spec["dropout"], num_heads=h,
            qkv_bias=spec["qkv_bias"],
        ).to(device=device, dtype=torch_dtype(dtype))  # fmt: skip
        with t.no_grad():
            for i, head in enumerate(module.heads):
                for short, layer in (("q", head.W_query), ("k", head.W_key), ("v", head.W_value)):
                    col = i if short == "q" else i // group  # query head i reads kv head i // group
                    layer.weight.copy_(
                        linear_weight(case[f"w_{short}"][:, col * hd : (col + 1) * hd], dtype, device)
                    )
                    if layer.bias is not None:
                        layer.bias.copy_(
                            to_torch(case[f"b_{short}"][col * hd : (col + 1) * hd], dtype, device)
                        )
        module.eval()

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            with t.no_grad():
                out = module(to_torch(inputs["query"], dtype, device))
            return {"output": to_numpy(out, dtype, device)}

        return run
