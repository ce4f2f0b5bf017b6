"""``torch.nn.MultiheadAttention`` through its three code paths.

* ``torch-mha``: ``need_weights=True, average_attn_weights=False`` with autograd on, which
  keeps PyTorch on the Python path (``F.multi_head_attention_forward``'s explicit softmax)
  and returns per-head weights.
* ``torch-mha-noweights``: ``need_weights=False`` with autograd on: the same function, but
  attention goes through ``scaled_dot_product_attention``.
* ``torch-mha-fastpath``: under ``torch.inference_mode()`` with ``query is key is value``,
  the native ``_native_multi_head_attention`` kernel. The adapter checks with the profiler
  that the kernel really ran, and skips with the reason when its conditions do not hold.

Weights go in as PyTorch stores them: packed ``in_proj_weight`` [3E, E] when kdim = vdim =
E, separate ``q/k/v_proj_weight`` otherwise. Bool masks are inverted to PyTorch's
True = blocked convention; a per-batch key padding mask goes in as ``key_padding_mask``. Per-batch
key lengths and windows go into the mask; an additive ``attn_bias`` is the float ``attn_mask``
[B*H, Tq, Tk] (the bool rules folded in as ``-inf``), differentiable for ``grad_attn_bias``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mha_conformance.impls.adapter import Arrays, Divergence, Prepared, Spec, has_empty_rows
from mha_conformance.impls.torch.common import TorchAdapter, additive_mask, allowed_mask, input_leaves
from mha_conformance.impls.torch.convert import import_torch, to_numpy, to_torch, torch_dtype
from mha_conformance.impls.torch.timed import Built, bench_inputs

NAN_ROWS = (
    "rows with no allowed key: the softmax over all -inf scores gives NaN, where the reference "
    "(and the ONNX Attention errata) gives zeros"
)


class TorchMHA(TorchAdapter):
    name = "torch-mha"
    path = "nn.MultiheadAttention(need_weights=True, average_attn_weights=False), explicit softmax path"
    need_weights = True
    variants = frozenset({"attn_bias", "window", "kv_lengths"})
    cannot_express = {"softcap": "nn.MultiheadAttention has no logit softcap"}
    divergences = (
        Divergence(
            f"nn.MultiheadAttention need_weights=True: {NAN_ROWS}", check="golden", when=has_empty_rows
        ),
        Divergence(
            f"nn.MultiheadAttention need_weights=True backward: {NAN_ROWS}, and the NaN weights make every weight "
            "and bias gradient NaN",
            check="gradients",
            when=has_empty_rows,
        ),
    )

    def supports(self, spec: Spec, dtype: str, device: str) -> str | None:
        e, h = spec["d_in"], spec["num_heads"]
        if spec["num_kv_heads"] != h:
            return "nn.MultiheadAttention has no grouped-query attention (num_kv_heads must equal num_heads)"
        if not spec["out_proj"]:
            return "nn.MultiheadAttention always applies its output projection"
        if h * spec["head_dim"] != e or spec["v_head_dim"] != spec["head_dim"]:
            return (
                f"nn.MultiheadAttention fixes head_dim = embed_dim / num_heads; the case has "
                f"{h} heads of {spec['head_dim']} (v {spec['v_head_dim']}) with d_in {e}"
            )
        if spec["d_out"] != e:
            return f"nn.MultiheadAttention's out_proj maps embed_dim to embed_dim; the case has d_out {spec['d_out']} != {e}"
        if spec["scale"] is not None:
            return "nn.MultiheadAttention has no scale argument (always 1/sqrt(head_dim))"
        return super().supports(spec, dtype, device)

    def build(
        self, case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str, device: str, bias: bool
    ):
        t = import_torch()
        e = spec["d_in"]
        module = t.nn.MultiheadAttention(
            e,
            spec["num_heads"],
            dropout=spec["dropout"],
            bias=bias,
            kdim=spec["kdim"],
            vdim=spec["vdim"],
            batch_first=True,
            device=device,
            dtype=torch_dtype(dtype),
        )

        def weight(name: str):
            return to_torch(np.ascontiguousarray(case[name].T), dtype, device)

        def bias_or_zeros(name: str, width: int):
            # A missing bias is exactly a zero bias: x + 0 == x in every dtype.
            return (
                to_torch(case[name], dtype, device)
                if name in case
                else t.zeros(width, dtype=torch_dtype(dtype), device=device)
            )

        with t.no_grad():
            if module._qkv_same_embed_dim:
                module.in_proj_weight.copy_(t.cat([weight("w_q"), weight("w_k"), weight("w_v")]))
            else:
                module.q_proj_weight.copy_(weight("w_q"))
                module.k_proj_weight.copy_(weight("w_k"))
                module.v_proj_weight.copy_(weight("w_v"))
            module.out_proj.weight.copy_(weight("w_o"))
            if bias:
                module.in_proj_bias.copy_(t.cat([bias_or_zeros(n, e) for n in ("b_q", "b_k", "b_v")]))
                module.out_proj.bias.copy_(bias_or_zeros("b_o", e))
        return module.eval()

    def masks(self, spec: Mapping[str, Any], inputs: Mapping[str, np.ndarray], device: str, bias=None):
        """(attn_mask, key_padding_mask) in PyTorch's True = blocked convention, or, with an
        additive ``bias`` tensor, a float attn_mask [B*H, Tq, Tk] (``-inf`` where blocked)."""
        allowed = allowed_mask(spec, inputs.get("mask"), device)
        b, h, tq, tk = spec["batch"], spec["num_heads"], spec["q_len"], spec["kv_len"]
        if bias is not None:
            full = allowed if allowed is None else allowed.expand(b, h, tq, tk)
            return additive_mask(bias.expand(b, h, tq, tk), full).reshape(b * h, tq, tk), None
        if allowed is None:
            return None, None
        if not spec["causal"] and tuple(allowed.shape) == (b, 1, 1, tk):
            return None, ~allowed[:, 0, 0, :]
        return ~allowed.expand(b, h, tq, tk).reshape(b * h, tq, tk), None

    @staticmethod
    def bias(inputs: Mapping[str, np.ndarray], dtype: str, device: str, requires_grad: bool = False):
        """The case's additive ``attn_bias`` as a tensor, or None."""
        if "attn_bias" not in inputs:
            return None
        return to_torch(inputs["attn_bias"], dtype, device, requires_grad=requires_grad)

    def inputs(self, spec, inputs, dtype: str, device: str):
        q = to_torch(inputs["query"], dtype, device)
        if spec["self_attention"]:
            return q, q, q  # the same tensor three times, as self-attention callers pass it
        return q, to_torch(inputs["key"], dtype, device), to_torch(inputs["value"], dtype, device)

    def prepare_training(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        """module.train(): nn.MultiheadAttention's own dropout (spec dropout) on the attention weights."""
        return self.prepare(case, spec, dtype, device, training=True)

    def prepare(
        self, case: Arrays, spec: Spec, dtype: str, device: str, *, training: bool = False
    ) -> Prepared:
        module = self.build(case, spec, dtype, device, bias=spec["qkv_bias"] or spec["out_bias"])
        module.train(training)

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            q, k, v = self.inputs(spec, inputs, dtype, device)
            attn_mask, key_padding_mask = self.masks(spec, inputs, device, self.bias(inputs, dtype, device))
            out, weights = module(
                q,
                k,
                v,
                attn_mask=attn_mask,
                key_padding_mask=key_padding_mask,
                need_weights=self.need_weights,
                average_attn_weights=False,
            )
            result = {"output": to_numpy(out, dtype, device)}
            if weights is not None:
                result["attn_weights"] = to_numpy(weights, dtype, device)
            return result

        return run

    def prepare_backward(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        """Autograd through the module with query, key and value as three leaves (so the packed
        in-projection is split by PyTorch itself); parameter gradients come back in PyTorch's
        [out, in] layout and are transposed, the packed ones split in three."""
        module = self.build(case, spec, dtype, device, bias=spec["qkv_bias"] or spec["out_bias"])

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            module.zero_grad(set_to_none=True)
            leaves = input_leaves(inputs, dtype, device)
            bias = self.bias(inputs, dtype, device, requires_grad=True)
            if bias is not None:
                leaves["attn_bias"] = bias
            attn_mask, key_padding_mask = self.masks(spec, inputs, device, bias)
            out, _ = module(
                leaves["query"],
                leaves["key"],
                leaves["value"],
                attn_mask=attn_mask,
                key_padding_mask=key_padding_mask,
                need_weights=self.need_weights,
                average_attn_weights=False,
            )
            out.backward(to_torch(inputs["grad_output"], dtype, device))
            grads = {f"grad_{n}": leaf.grad for n, leaf in leaves.items()}
            if module._qkv_same_embed_dim:
                w_q, w_k, w_v = module.in_proj_weight.grad.chunk(3)
            else:
                w_q, w_k, w_v = (
                    module.q_proj_weight.grad,
                    module.k_proj_weight.grad,
                    module.v_proj_weight.grad,
                )
            grads.update(
                grad_w_q=w_q.T, grad_w_k=w_k.T, grad_w_v=w_v.T, grad_w_o=module.out_proj.weight.grad.T
            )
            if module.in_proj_bias is not None:  # zero-filled biases the case lacks are not returned
                for name, grad in zip(("b_q", "b_k", "b_v"), module.in_proj_bias.grad.chunk(3), strict=True):
                    if name in case:
                        grads[f"grad_{name}"] = grad
                if "b_o" in case:
                    grads["grad_b_o"] = module.out_proj.bias.grad
            return {name: to_numpy(grad, dtype, device) for name, grad in grads.items()}

        return run

    def timed_body(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Built:
        """The module its ``prepare`` builds, run with autograd on (what keeps it on the path it names)."""
        module = self.build(case, spec, dtype, device, bias=spec["qkv_bias"] or spec["out_bias"])
        attn_mask, key_padding_mask = self.masks(spec, case, device, self.bias(case, dtype, device))

        def run(q, k, v):
            out, _ = module(
                q,
                k,
                v,
                attn_mask=attn_mask,
                key_padding_mask=key_padding_mask,
                need_weights=self.need_weights,
                average_attn_weights=False,
            )
            return out

        q, k, v = bench_inputs(spec, case, dtype, device, grad=False)
        return (lambda: run(q, k, v)), (lambda: run(*bench_inputs(spec, case, dtype, device, grad=True)))


class TorchMHANoWeights(TorchMHA):
    name = "torch-mha-noweights"
    path = "nn.MultiheadAttention(need_weights=False): F.multi_head_attention_forward through SDPA"
    need_weights = False
    divergences = ()


class TorchMHAFastPath(TorchMHA):
    name = "torch-mha-fastpath"
    path = "nn.MultiheadAttention under inference_mode, query is key is value: torch._native_multi_head_attention"
    need_weights = False
    divergences = (
        Divergence(f"torch._native_multi_head_attention: {NAN_ROWS}", check="golden", when=has_empty_rows),
    )

    def supports(self, spec: Spec, dtype: str, device: str) -> str | None:
        if not spec["self_attention"]:
            return "the native fast path needs self-attention (query is key is value)"
        if spec["num_heads"] % 2:
            return "the native fast path needs an even number of heads"
        return super().supports(spec, dtype, device)

    def prepare_backward(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        raise NotImplementedError(
            "the native fast path runs only under torch.inference_mode (or with autograd off), which "
            "records no graph; with gradients required PyTorch takes torch-mha's Python path instead"
        )

    def prepare(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        t = import_torch()
        # The fast path requires in_proj_bias; a zero bias is exactly no bias.
        module = self.build(case, spec, dtype, device, bias=True)
        checked = []

        def call(inputs):
            q, k, v = self.inputs(spec, inputs, dtype, device)
            attn_mask, key_padding_mask = self.masks(spec, inputs, device, self.bias(inputs, dtype, device))
            with t.inference_mode():
                out, _ = module(
                    q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False
                )
            return out

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            if not checked:  # prove once that the native kernel is what runs
                with t.profiler.profile(activities=[t.profiler.ProfilerActivity.CPU]) as prof:
                    out = call(inputs)
                ops = {e.key for e in prof.key_averages()}
                if "aten::_native_multi_head_attention" not in ops:
                    raise NotImplementedError(
                        "PyTorch did not take the native fast path for this case (conditions in "
                        "nn.MultiheadAttention.forward not met)"
                    )
                checked.append(True)
            else:
                out = call(inputs)
            return {
                "output": to_numpy(out, dtype, device),
                "meta": {"kernel": "aten::_native_multi_head_attention"},
            }

        return run

    def prepare_training(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        raise NotImplementedError(
            "the native fast path runs only in eval mode (nn.MultiheadAttention.forward needs not training)"
        )

    def timed_body(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Built:
        """Under ``inference_mode``, as the fast path needs; refuses if PyTorch does not take it."""
        t = import_torch()
        module = self.build(case, spec, dtype, device, bias=True)  # the fast path needs in_proj_bias
        attn_mask, key_padding_mask = self.masks(spec, case, device, self.bias(case, dtype, device))
        q, k, v = bench_inputs(spec, case, dtype, device, grad=False)

        def forward():
            with t.inference_mode():
                out, _ = module(
                    q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False
                )
            return out

        with t.profiler.profile(activities=[t.profiler.ProfilerActivity.CPU]) as prof:
            forward()
        if "aten::_native_multi_head_attention" not in {e.key for e in prof.key_averages()}:
            raise NotImplementedError("PyTorch did not take the native fast path for this configuration")
        return forward, None  # inference_mode: no graph to backprop through
