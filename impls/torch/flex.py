"""``torch-flex``: explicit projections plus ``torch.nn.attention.flex_attention``, eager.

FlexAttention states attention as two functions: a ``score_mod(score, b, h, q_idx, kv_idx)``
applied to each scaled score, and a ``mask_mod(b, h, q_idx, kv_idx)`` compiled into a
``BlockMask``. Every variant of contract v2 is one of them:

* ``score_mod``: the softcap ``c * tanh(score / c)``, then the additive ``attn_bias`` (ALiBi and
  T5 biases are such tensors), indexed by the batch and head it broadcasts along;
* ``mask_mod``: the case's bool mask, the causal rule, the window and the per-batch key lengths,
  each row bottom-right aligned to its own length, and the bias's ``-inf`` entries.

Grouped-query attention is ``enable_gqa``. Eager FlexAttention runs on the CPU unfused (about
2 s for a first call); its backward is not implemented on the CPU (torch 2.13 raises
"FlexAttention does not support backward on CPU"), so gradients are a skip there with that
reason, and run on cuda. Decoding goes through a block mask over the cache: each step's lone
query attends the cached keys under the same ``mask_mod`` and ``score_mod``, at its position.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mha_conformance.impls.adapter import Adapter, Arrays, Prepared, Spec
from mha_conformance.impls.torch.common import TorchAdapter, input_leaves, merge_and_project, project_heads
from mha_conformance.impls.torch.convert import import_torch, to_numpy, to_torch


def _index(tensor, b, h, q_idx, kv_idx):
    """``tensor[b, h, q, kv]`` for a tensor broadcast along its size-1 batch and head axes."""
    zero = b * 0
    return tensor[b if tensor.shape[0] > 1 else zero, h if tensor.shape[1] > 1 else zero, q_idx, kv_idx]


def mods(spec: Mapping[str, Any], mask, bias, device: str, q_offset: int = 0, q_len: int | None = None):
    """``(score_mod, block_mask)`` for one call: ``q_offset`` is the first query's row in the case
    (a decoding step's), ``q_len`` the number of queries in the call (default: the case's)."""
    t = import_torch()
    from torch.nn.attention.flex_attention import create_block_mask

    b, tq, tk = spec["batch"], spec["q_len"], spec["kv_len"]
    q_len = tq if q_len is None else q_len
    cap = spec.get("softcap")
    lengths = spec.get("kv_lengths")
    ends = t.tensor(lengths if lengths is not None else [tk] * b, device=device)
    left, right = spec.get("window") or (-1, -1)

    def score_mod(score, bb, hh, q_idx, kv_idx):
        if cap is not None:
            score = cap * t.tanh(score / cap)
        if bias is not None:
            score = score + _index(bias, bb, hh, q_idx + q_offset, kv_idx)
        return score

    def mask_mod(bb, hh, q_idx, kv_idx):
        row = q_idx + q_offset
        position = row + ends[bb] - tq  # the query's position among its row's keys
        ok = kv_idx < ends[bb]
        if spec["causal"]:
            ok = ok & (kv_idx <= position)
        if left >= 0:
            ok = ok & (kv_idx >= position - left)
        if right >= 0:
            ok = ok & (kv_idx <= position + right)
        if mask is not None:
            ok = ok & _index(mask, bb, hh, row if mask.shape[2] > 1 else row * 0, kv_idx)
        if bias is not None:
            ok = ok & (_index(bias, bb, hh, row, kv_idx) != float("-inf"))
        return ok

    kv_len = tk if q_len == tq else q_offset + q_len  # a decoding step sees the cache so far
    block_mask = create_block_mask(mask_mod, b, spec["num_heads"], q_len, kv_len, device=device)
    return (score_mod if cap is not None or bias is not None else None), block_mask


class TorchFlex(TorchAdapter):
    name = "torch-flex"
    path = (
        "x @ W + b projections, torch.nn.attention.flex_attention eager: score_mod (softcap, bias), "
        "BlockMask from mask_mod (causal, window, lengths, mask), enable_gqa"
    )
    variants = frozenset({"attn_bias", "softcap", "window", "kv_lengths"})
    bench = Adapter.bench  # no timed path yet (the compiled FlexAttention is the one worth timing)

    def attend(self, params, query, key, value, spec: Mapping[str, Any], mask, bias, device: str):
        """Projections, FlexAttention and the output projection, on tensors."""
        from torch.nn.attention.flex_attention import flex_attention

        h, hkv, hd, hdv = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"], spec["v_head_dim"]
        q = project_heads(params, query, "q", h, hd)
        k, v = project_heads(params, key, "k", hkv, hd), project_heads(params, value, "v", hkv, hdv)
        score_mod, block_mask = mods(spec, mask, bias, device)
        ctx = flex_attention(
            q, k, v, score_mod=score_mod, block_mask=block_mask, scale=spec["scale"], enable_gqa=hkv != h
        )
        return merge_and_project(params, ctx, spec)

    @staticmethod
    def extras(inputs: Mapping[str, np.ndarray], dtype: str, device: str, grad: bool = False):
        """The case's bool mask and additive bias as tensors (None where absent)."""
        t = import_torch()
        mask = inputs.get("mask")
        mask = None if mask is None else t.from_numpy(np.ascontiguousarray(mask)).to(device)
        bias = inputs.get("attn_bias")
        bias = None if bias is None else to_torch(bias, dtype, device, requires_grad=grad)
        return mask, bias

    def prepare(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        t = import_torch()
        params = {n: to_torch(a, dtype, device) for n, a in case.items() if n[:2] in ("w_", "b_")}

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            q, k, v = (to_torch(inputs[n], dtype, device) for n in ("query", "key", "value"))
            with t.no_grad():
                out = self.attend(params, q, k, v, spec, *self.extras(inputs, dtype, device), device)
            return {"output": to_numpy(out, dtype, device), "meta": {"flex_attention": "eager"}}

        return run

    def prepare_backward(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        """Autograd through the same computation; the bias is a leaf, for ``grad_attn_bias``."""
        if device == "cpu":
            raise NotImplementedError(
                f"FlexAttention has no backward on the CPU (torch {import_torch().__version__}: 'FlexAttention "
                "does not support backward on CPU'); gradients run on cuda"
            )
        names = [n for n in case if n[:2] in ("w_", "b_")]

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            leaves = {n: to_torch(case[n], dtype, device, requires_grad=True) for n in names}
            leaves.update(input_leaves(inputs, dtype, device))
            mask, bias = self.extras(inputs, dtype, device, grad=True)
            if bias is not None:
                leaves["attn_bias"] = bias
            out = self.attend(
                leaves, leaves["query"], leaves["key"], leaves["value"], spec, mask, bias, device
            )
            out.backward(to_torch(inputs["grad_output"], dtype, device))
            return {f"grad_{n}": to_numpy(leaf.grad, dtype, device) for n, leaf in leaves.items()}

        return run

    def prepare_decoder(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Callable[[], Prepared]:
        """A cache of projected keys and values; each step's query attends it through a block mask
        over the cache (its position the step's index), with the case's score_mod."""
        from torch.nn.attention.flex_attention import flex_attention

        t = import_torch()
        params = {n: to_torch(a, dtype, device) for n, a in case.items() if n[:2] in ("w_", "b_")}
        mask, bias = self.extras(case, dtype, device)
        h, hkv, hd, hdv = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"], spec["v_head_dim"]

        def new_stream() -> Prepared:
            keys: list[Any] = []
            values: list[Any] = []

            def step(token: Mapping[str, np.ndarray]) -> dict[str, Any]:
                with t.no_grad():
                    x = {n: to_torch(token[n], dtype, device) for n in ("query", "key", "value")}
                    keys.append(project_heads(params, x["key"], "k", hkv, hd))
                    values.append(project_heads(params, x["value"], "v", hkv, hdv))
                    row = len(keys) - 1
                    score_mod, block_mask = mods(spec, mask, bias, device, q_offset=row, q_len=1)
                    ctx = flex_attention(
                        project_heads(params, x["query"], "q", h, hd),
                        t.cat(keys, dim=2),
                        t.cat(values, dim=2),
                        score_mod=score_mod,
                        block_mask=block_mask,
                        scale=spec["scale"],
                        enable_gqa=hkv != h,
                    )
                    out = merge_and_project(params, ctx, spec)
                return {"output": to_numpy(out, dtype, device), "meta": {"cache_length": str(row + 1)}}

            return step

        return new_stream
