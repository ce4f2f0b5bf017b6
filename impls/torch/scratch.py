"""``torch-scratch``: the seed documents' from-scratch multi-head attention module.

``MultiHeadAttention`` below is the tutorial's module as written there (W_query/W_key/
W_value Linear layers, ``view`` to heads, ``transpose``, a ``triu`` mask buffer for a
context length cut to the number of tokens, ``masked_fill(-inf)``, scale, softmax, dropout,
``transpose``, ``contiguous().view``, ``out_proj``), extended only as far as a user would:
keys and values may come from another sequence, causal masking is a switch, and an
optional bool mask (True = may attend) is honoured. What its design cannot express is a
skip with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mha_conformance.impls.adapter import Arrays, Divergence, Prepared, Spec, has_empty_rows
from mha_conformance.impls.torch.common import TorchAdapter, feed_projections, input_leaves, linear_weight
from mha_conformance.impls.torch.convert import import_torch, to_numpy, to_torch, torch_dtype
from mha_conformance.impls.torch.timed import Built, bench_inputs

NAN_ROWS = (
    "masked_fill(-inf) then softmax gives NaN for a query row with no allowed key, where the "
    "reference gives zeros"
)


def module_class():
    nn = import_torch().nn

    class MultiHeadAttention(nn.Module):
        def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False, causal=True):
            super().__init__()
            assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
            self.d_out = d_out
            self.num_heads = num_heads
            self.head_dim = d_out // num_heads
            self.causal = causal
            self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
            self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
            self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
            self.out_proj = nn.Linear(d_out, d_out)
            self.dropout = nn.Dropout(dropout)
            self.register_buffer(
                "mask", import_torch().triu(import_torch().ones(context_length, context_length), diagonal=1)
            )

        def forward(self, x, kv=None, mask=None):
            kv = x if kv is None else kv
            b, num_tokens, d_in = x.shape
            kv_tokens = kv.shape[1]
            keys = self.W_key(kv)
            queries = self.W_query(x)
            values = self.W_value(kv)
            keys = keys.view(b, kv_tokens, self.num_heads, self.head_dim).transpose(1, 2)
            queries = queries.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
            values = values.view(b, kv_tokens, self.num_heads, self.head_dim).transpose(1, 2)
            attn_scores = queries @ keys.transpose(2, 3)
            if self.causal:
                mask_bool = self.mask.bool()[:num_tokens, :num_tokens]
                attn_scores.masked_fill_(mask_bool, -import_torch().inf)
            if mask is not None:
                attn_scores.masked_fill_(~mask, -import_torch().inf)
            attn_weights = import_torch().softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
            attn_weights = self.dropout(attn_weights)
            context_vec = (attn_weights @ values).transpose(1, 2)
            context_vec = context_vec.contiguous().view(b, num_tokens, self.d_out)
            return self.out_proj(context_vec)

        def forward_cached(self, x, cache):
            """Incremental decoding: ``x`` holds the new tokens; keys and values of earlier tokens
            come from ``cache`` (a dict), which this call extends. The triu buffer is cut at the
            new tokens' positions, so it is the same causal mask as the full pass."""
            b, num_tokens, d_in = x.shape
            start = cache["keys"].shape[2] if cache else 0
            keys = self.W_key(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
            queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
            values = self.W_value(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
            if cache:
                keys = import_torch().cat([cache["keys"], keys], dim=2)
                values = import_torch().cat([cache["values"], values], dim=2)
            cache["keys"], cache["values"] = keys, values
            attn_scores = queries @ keys.transpose(2, 3)
            mask_bool = self.mask.bool()[start : start + num_tokens, : start + num_tokens]
            attn_scores.masked_fill_(mask_bool, -import_torch().inf)
            attn_weights = import_torch().softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
            attn_weights = self.dropout(attn_weights)
            context_vec = (attn_weights @ values).transpose(1, 2)
            context_vec = context_vec.contiguous().view(b, num_tokens, self.d_out)
            return self.out_proj(context_vec)

    return MultiHeadAttention


class TorchScratch(TorchAdapter):
    name = "torch-scratch"
    path = "the seed's from-scratch nn.Module: Linear Q/K/V, view/transpose, triu buffer, masked_fill(-inf), softmax"
    cannot_express = {
        "attn_bias": "the seed's from-scratch module has no additive attention bias",
        "softcap": "the seed's from-scratch module has no logit softcap",
        "window": "the seed's from-scratch module masks with its causal triu buffer only (no sliding window)",
        "kv_lengths": "the seed's from-scratch module has no per-batch key lengths",
    }
    divergences = (
        Divergence(f"seed from-scratch module: {NAN_ROWS}", check="golden", when=has_empty_rows),
        Divergence(
            f"seed from-scratch module backward: {NAN_ROWS}, and the NaN weights make every weight and bias "
            "gradient NaN",
            check="gradients",
            when=has_empty_rows,
        ),
    )

    def supports(self, spec: Spec, dtype: str, device: str) -> str | None:
        h, hd = spec["num_heads"], spec["head_dim"]
        if spec["num_kv_heads"] != h:
            return "the from-scratch module has one K/V head per query head (no grouped-query attention)"
        if spec["v_head_dim"] != hd:
            return "the from-scratch module uses one head_dim = d_out // num_heads for Q, K and V"
        if not spec["out_proj"] or spec["d_out"] != h * hd:
            return "the from-scratch module always has out_proj = Linear(d_out, d_out) with d_out = heads * head_dim"
        if spec["kdim"] != spec["d_in"] or spec["vdim"] != spec["d_in"]:
            return "the from-scratch module projects keys and values from d_in-wide inputs"
        if spec["scale"] is not None:
            return "the from-scratch module always scales by 1/sqrt(head_dim)"
        if spec["causal"] and spec["q_len"] != spec["kv_len"]:
            return "the from-scratch module's triu buffer is cut to [:T, :T] (top-left); it cannot align Tq != Tk"
        return super().supports(spec, dtype, device)

    def prepare_training(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        """module.train(): the seed module's nn.Dropout on the attention weights is active."""
        return self.prepare(case, spec, dtype, device, training=True)

    def prepare(
        self, case: Arrays, spec: Spec, dtype: str, device: str, *, training: bool = False
    ) -> Prepared:
        t = import_torch()
        module = self.build(case, spec, dtype, device)
        module.train(training)

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            x = to_torch(inputs["query"], dtype, device)
            kv = None if spec["self_attention"] else to_torch(inputs["key"], dtype, device)
            if kv is not None and not np.array_equal(inputs["key"], inputs["value"], equal_nan=True):
                raise NotImplementedError("the from-scratch module reads keys and values from one sequence")
            mask = inputs.get("mask")
            with t.no_grad():
                out = module(
                    x, kv, None if mask is None else t.from_numpy(np.ascontiguousarray(mask)).to(device)
                )
            return {"output": to_numpy(out, dtype, device)}

        return run

    def build(self, case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str, device: str):
        """The module with the case's weights, in eval mode (every prepare method starts here)."""
        t = import_torch()
        h, hd = spec["num_heads"], spec["head_dim"]
        module = module_class()(
            spec["d_in"],
            h * hd,
            context_length=max(spec["kv_len"], 1),
            dropout=spec["dropout"],
            num_heads=h,
            qkv_bias=spec["qkv_bias"],
            causal=spec["causal"],
        ).to(device=device, dtype=torch_dtype(dtype))
        with t.no_grad():
            for short in ("q", "k", "v", "o"):
                layer = self.layers(module)[short]
                layer.weight.copy_(linear_weight(case[f"w_{short}"], dtype, device))
                if layer.bias is not None:  # out_proj always has one; a missing bias is exactly zero
                    bias = case.get(f"b_{short}")
                    layer.bias.copy_(
                        to_torch(bias, dtype, device) if bias is not None else t.zeros_like(layer.bias)
                    )
        return module.eval()

    @staticmethod
    def layers(module) -> dict[str, Any]:
        return {"q": module.W_query, "k": module.W_key, "v": module.W_value, "o": module.out_proj}

    def prepare_backward(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        """Autograd through the module as written. It reads one sequence for both keys and values
        (in self-attention for queries too), so forward pre-hooks hand W_query, W_key and W_value
        each its own leaf holding the same values: the three gradients come out separately, as
        the golden ones treat query, key and value as separate arguments."""
        t = import_torch()
        module = self.build(case, spec, dtype, device)

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            if not spec["self_attention"] and not np.array_equal(inputs["key"], inputs["value"]):
                raise NotImplementedError("the from-scratch module reads keys and values from one sequence")
            module.zero_grad(set_to_none=True)
            leaves = input_leaves(inputs, dtype, device)
            x = leaves["query"]
            kv = None if spec["self_attention"] else leaves["key"]
            mask = inputs.get("mask")
            mask = None if mask is None else t.from_numpy(np.ascontiguousarray(mask)).to(device)
            feeds = {
                module.W_query: leaves["query"],
                module.W_key: leaves["key"],
                module.W_value: leaves["value"],
            }
            with feed_projections(feeds):
                out = module(x, kv, mask)
            out.backward(to_torch(inputs["grad_output"], dtype, device))
            grads = {f"grad_{n}": leaf.grad for n, leaf in leaves.items()}
            for short, layer in self.layers(module).items():
                grads[f"grad_w_{short}"] = layer.weight.grad.T
                if f"b_{short}" in case:  # out_proj's zero bias for a case without one is not returned
                    grads[f"grad_b_{short}"] = layer.bias.grad
            return {name: to_numpy(grad, dtype, device) for name, grad in grads.items()}

        return run

    def prepare_decoder(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Callable[[], Prepared]:
        """The module's KV cache (``forward_cached``): one token per call, each new stream with
        an empty cache."""
        t = import_torch()
        module = self.build(case, spec, dtype, device)

        def new_stream():
            cache: dict[str, Any] = {}

            def step(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
                with t.no_grad():
                    out = module.forward_cached(to_torch(inputs["query"], dtype, device), cache)
                return {"output": to_numpy(out, dtype, device)}

            return step

        return new_stream

    def timed_body(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Built:
        """The module :meth:`build` makes, under ``no_grad``."""
        t = import_torch()
        module = self.build(case, spec, dtype, device)
        mask = case.get("mask")
        mask = None if mask is None else t.from_numpy(np.ascontiguousarray(mask)).to(device)

        def run(x, kv):
            return module(x, None if spec["self_attention"] else kv, mask)

        x, kv, _ = bench_inputs(spec, case, dtype, device, grad=False)

        def forward():
            with t.no_grad():
                return run(x, kv)

        def graph():
            x, kv, _ = bench_inputs(spec, case, dtype, device, grad=True)
            return run(x, kv)

        return forward, graph
