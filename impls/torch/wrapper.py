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

from mha_conformance.impls.adapter import Arrays, Prepared, Spec
from mha_conformance.impls.torch.common import TorchAdapter, feed_projections, input_leaves, linear_weight
from mha_conformance.impls.torch.convert import import_torch, to_numpy, to_torch, torch_dtype
from mha_conformance.impls.torch.timed import Built


def module_classes():
    t = import_torch()
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
    cannot_express = {
        "attn_bias": "CausalAttention has no additive attention bias",
        "softcap": "CausalAttention has no logit softcap",
        "window": "CausalAttention masks with its causal buffer only (no sliding window)",
        "kv_lengths": "CausalAttention has no per-batch key lengths",
    }

    def supports(self, spec: Spec, dtype: str, device: str) -> str | None:
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

    def prepare(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        t = import_torch()
        module = self.build(case, spec, dtype, device)

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            with t.no_grad():
                out = module(to_torch(inputs["query"], dtype, device))
            return {"output": to_numpy(out, dtype, device)}

        return run

    def build(self, case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str, device: str):
        """The stacked heads with the case's weights, in eval mode (both prepare methods start here)."""
        t = import_torch()
        h, hd, group = spec["num_heads"], spec["head_dim"], spec["num_heads"] // spec["num_kv_heads"]
        module = module_classes()(
            spec["d_in"],
            hd,
            context_length=spec["q_len"],
            dropout=spec["dropout"],
            num_heads=h,
            qkv_bias=spec["qkv_bias"],
        ).to(device=device, dtype=torch_dtype(dtype))
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
        return module.eval()

    def prepare_backward(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        """Autograd through the stacked heads. Every head projects the one input x; forward
        pre-hooks give all W_query layers the query leaf, all W_key the key leaf and all W_value
        the value leaf (same values), so the three gradients come out separately. Head i's
        [hd, d_in] weight gradients are transposed into columns i*hd:(i+1)*hd of the golden
        weight; heads sharing a kv head (grouped-query) add theirs up, as tied weights do."""
        t = import_torch()
        module = self.build(case, spec, dtype, device)
        h, hkv, hd = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"]

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            module.zero_grad(set_to_none=True)
            leaves = input_leaves(inputs, dtype, device)
            feeds = {}
            for head in module.heads:
                feeds.update(
                    {head.W_query: leaves["query"], head.W_key: leaves["key"], head.W_value: leaves["value"]}
                )
            with feed_projections(feeds):
                out = module(leaves["query"])
            out.backward(to_torch(inputs["grad_output"], dtype, device))
            grads = {f"grad_{n}": leaf.grad for n, leaf in leaves.items()}
            for short, attr, heads in (("q", "W_query", h), ("k", "W_key", hkv), ("v", "W_value", hkv)):
                w = t.zeros(spec["d_in"], heads * hd, dtype=torch_dtype(dtype), device=device)
                b = t.zeros(heads * hd, dtype=w.dtype, device=device)
                for i, head in enumerate(module.heads):
                    col = i if short == "q" else i // (h // hkv)
                    layer = getattr(head, attr)
                    w[:, col * hd : (col + 1) * hd] += layer.weight.grad.T
                    if layer.bias is not None:
                        b[col * hd : (col + 1) * hd] += layer.bias.grad
                grads[f"grad_w_{short}"] = w
                if f"b_{short}" in case:
                    grads[f"grad_b_{short}"] = b
            return {name: to_numpy(grad, dtype, device) for name, grad in grads.items()}

        return run

    def timed_body(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Built:
        """The stacked heads :meth:`build` makes, under ``no_grad``."""
        t = import_torch()
        module = self.build(case, spec, dtype, device)
        x = to_torch(case["query"], dtype, device)

        def forward():
            with t.no_grad():
                return module(x)

        return forward, lambda: module(to_torch(case["query"], dtype, device, requires_grad=True))
