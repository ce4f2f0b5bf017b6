"""``onnx-contrib-mha``: a graph built around onnxruntime's ``com.microsoft.MultiHeadAttention``.

This contrib op is the fused kernel onnxruntime's transformer optimizer rewrites attention
subgraphs into, and what runs on GPUs. The graph: ``MatMul`` projections with the case's
weights, the Q/K/V biases packed into the op's ``bias`` input (added inside the kernel), one
``MultiHeadAttention`` node, and the output projection. Masks go in the way the op takes them:

* a key padding mask [B|1, 1, 1, Tk] as the int32 ``key_padding_mask`` [B, Tk];
* a mask shared by the heads [B|1, 1, Tq, Tk] as the 3-D ``key_padding_mask`` [B, Tq, Tk];
* a per-head mask as ``attention_bias`` (0 where allowed, -inf where not), [B|1, H, Tq, Tk].

The op masks by adding ``mask_filter_value`` (default -10000) to masked scores, and its
``unidirectional`` causal mask is aligned to the past cache: query i sees key j when
j <= past_length + i. So Tq < Tk causal cases put the first Tk - Tq keys and values into
``past_key``/``past_value`` (with ``present_*`` outputs, which the kernel needs to take the
past length; biases are then added before the split), which is the bottom-right rule.
Contract v2: ``attn_bias`` is the op's ``attention_bias`` (added to a per-head mask's, where
both); per-batch key lengths and windows go into the mask, causal with them (``unidirectional``
aligns to the cache, not to each row's length). The op has no softcap.
What the op cannot express is a skip with the reason; where it disagrees, a divergence.
Incremental decoding feeds the op's ``present_key``/``present_value`` back as the next
``past_key``/``past_value`` (from a zero-length past), as ``onnx-attention`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mha_conformance.impls.adapter import Arrays, Divergence, Prepared, Spec, has_empty_rows, rule_mask
from mha_conformance.impls.onnx.attention import cache_streams, step_model
from mha_conformance.impls.onnx.common import Graph, OnnxRuntimeAdapter
from mha_conformance.impls.onnx.runtime import (
    DEFAULT_OPSET,
    MS_DOMAIN,
    Session,
    from_io,
    onnx,
    ort_version,
    to_io,
)


def contrib_model(
    case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str
) -> tuple[Any, list[str]]:
    """The ModelProto for one case in ``dtype`` and the names of its runtime inputs."""
    b, tq, tk = spec["batch"], spec["q_len"], spec["kv_len"]
    h, hd, hdv = spec["num_heads"], spec["head_dim"], spec["v_head_dim"]
    g = Graph(dtype)
    masks = folded_masks(spec, case)
    names = ["query", "key", "value", *masks] + (["attn_bias"] if "attn_bias" in case else [])
    causal = spec["causal"] and not rules_in_mask(spec)
    past = causal and tq < tk
    # Biases go into the kernel's packed bias input, except with a past cache, which must hold
    # finished (biased) keys and values.
    q = g.linear(g.input("query", case["query"]), case, "q", bias=past)
    k = g.linear(g.input("key", case["key"]), case, "k", bias=past)
    v = g.linear(g.input("value", case["value"]), case, "v", bias=past)
    bias = ""
    if spec["qkv_bias"] and not past:
        bias = g.const("bias_qkv", np.concatenate([case["b_q"], case["b_k"], case["b_v"]]))
    key_padding = attention_bias = ""
    if masks:
        key_padding, attention_bias = mask_inputs(
            g, g.input("mask", masks["mask"]), masks["mask"].shape, spec
        )
    if "attn_bias" in case:
        given = g.input("attn_bias", case["attn_bias"])
        attention_bias = g.node("Add", [attention_bias, given])[0] if attention_bias else given
    attrs: dict[str, Any] = {"num_heads": h}
    if spec["scale"] is not None:
        attrs["scale"] = float(spec["scale"])
    if causal:
        attrs["unidirectional"] = 1
    past_k = past_v = ""
    if past:  # the leading Tk - Tq keys are the cache: unidirectional then aligns bottom-right
        p = tk - tq
        past_k = g.heads(g.seq_slice(k, 0, p), b, p, h, hd)
        past_v = g.heads(g.seq_slice(v, 0, p), b, p, h, hdv)
        k, v = g.seq_slice(k, p, tk), g.seq_slice(v, p, tk)
    inputs = [q, k, v, bias, key_padding, attention_bias, past_k, past_v]
    y = g.node("MultiHeadAttention", inputs, n_out=3 if past else 1, domain=MS_DOMAIN, **attrs)[0]
    if spec["out_proj"]:
        y = g.linear(y, case, "o")
    g.output(y, "output", [b, tq, spec["d_out"]])
    return g.model({"": DEFAULT_OPSET, MS_DOMAIN: 1}), names


def rules_in_mask(spec: Mapping[str, Any]) -> bool:
    """Per-batch lengths or a window: the mask then carries them and causal, each row aligned to
    its own length (``unidirectional`` aligns to the past cache alone)."""
    return spec.get("kv_lengths") is not None or spec.get("window") is not None


def folded_masks(spec: Mapping[str, Any], inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ``mask`` input the model takes (none when the case has no mask and no rule to fold)."""
    if rules_in_mask(spec):
        return {"mask": rule_mask(spec, inputs.get("mask"))}
    return {"mask": inputs["mask"]} if "mask" in inputs else {}


def contrib_decoder_model(case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str) -> Any:
    """One decoding step through the contrib op: the new token's biased projections (a cache
    holds finished keys and values, so the biases are added before the op, as for Tq < Tk),
    ``past_key``/``past_value`` [B, H, P, hd] in, ``present_key``/``present_value`` out;
    ``unidirectional`` aligns the lone query at the past length, so it sees every key."""
    attrs: dict[str, Any] = {"num_heads": spec["num_heads"], "unidirectional": 1}  # no GQA: supports()
    if spec["scale"] is not None:
        attrs["scale"] = float(spec["scale"])

    def attend(g: Graph, q: str, k: str, v: str, past_k: str, past_v: str) -> list[str]:
        inputs = [q, k, v, "", "", "", past_k, past_v]
        return g.node("MultiHeadAttention", inputs, n_out=3, domain=MS_DOMAIN, **attrs)

    return step_model(case, spec, dtype, attend, {"": DEFAULT_OPSET, MS_DOMAIN: 1})


def mask_inputs(g: Graph, mask: str, shape: tuple[int, ...], spec: Mapping[str, Any]) -> tuple[str, str]:
    """(key_padding_mask, attention_bias) graph values for the bool ``mask`` of ``shape``."""
    b, tq, tk = spec["batch"], spec["q_len"], spec["kv_len"]
    if shape[1] == 1:
        ints = g.node("Cast", [mask], to=onnx().TensorProto.INT32)[0]
        full = g.node("Expand", [ints, g.ints("shape", [b, 1, shape[2], tk])])[0]
        flat = [b, tk] if shape[2] == 1 else [b, tq, tk]
        return g.node("Reshape", [full, g.ints("shape", flat)])[0], ""
    zero, blocked = (
        g.const("allowed", np.zeros(1, np.float32)),
        g.const("blocked", np.full(1, -np.inf, np.float32)),
    )
    return "", g.node("Where", [mask, zero, blocked])[0]


FULLY_MASKED = (
    "com.microsoft.MultiHeadAttention masks by adding mask_filter_value (-10000) to masked scores, so a "
    "query row with no allowed key gets the softmax of its unmasked scores (the row attends every key as "
    "if unmasked), or NaN where the row's additive attention_bias is -inf at every key (a softmax over a row "
    "of -inf is 0/0), where the reference (and the ONNX Attention specification) gives zeros"
)
TOP_LEFT_CAUSAL = (
    "unidirectional=1 without a past cache masks key j > i (top-left); with Tq 7 > Tk 4 the bottom-right "
    "rule (j <= i - 3) leaves query rows 0-2 with no key (zeros expected), but the kernel lets row i attend "
    "keys 0..i; no past/present split can express a negative offset"
)


def causal_with_more_queries_than_keys(spec: Mapping[str, Any]) -> bool:
    """Causal with Tq > Tk: where top-left and bottom-right alignment differ without a past cache."""
    return spec["causal"] and spec["q_len"] > spec["kv_len"] and not rules_in_mask(spec)


class OnnxContribMHA(OnnxRuntimeAdapter):
    name = "onnx-contrib-mha"
    path = (
        "hand-built graph: MatMul projections, then onnxruntime's com.microsoft.MultiHeadAttention (packed "
        "bias, int32 key_padding_mask 2-D/3-D, -inf attention_bias for per-head masks, unidirectional with "
        "past_key/past_value for Tq < Tk)"
    )
    kernel = ("MultiHeadAttention", MS_DOMAIN)
    variants = frozenset({"attn_bias", "window", "kv_lengths"})
    cannot_express = {"softcap": "com.microsoft.MultiHeadAttention has no logit softcap"}
    divergences = (
        Divergence(
            TOP_LEFT_CAUSAL,
            check="golden",
            when=causal_with_more_queries_than_keys,
        ),
        Divergence(FULLY_MASKED, check="golden", when=has_empty_rows),
        Divergence(
            "the key padding mask is applied by adding -10000 to the scores, not by excluding the keys, so hidden "
            "keys set to 1e4 score far above that and take the attention: the mask is not a hard exclusion",
            check="masked-poison-huge",
        ),
    )

    def supports(self, spec: Spec, dtype: str, device: str) -> str | None:
        if spec["num_kv_heads"] != spec["num_heads"]:
            return (
                "com.microsoft.MultiHeadAttention has one K/V head per query head (grouped-query attention "
                "is the separate com.microsoft.GroupQueryAttention op)"
            )
        past = spec["causal"] and spec["q_len"] < spec["kv_len"] and not rules_in_mask(spec)
        if past and spec["v_head_dim"] != spec["head_dim"]:
            return "com.microsoft.MultiHeadAttention's past_value must have head_size = the key's head_size"
        return self.kernel_problem(dtype, device)

    def prepare(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        model, names = contrib_model(case, spec, dtype)
        session = Session(model, device, self.kernel, f"{self.name}: case {spec['id']} in {dtype}")

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            feeds = {**inputs, **self.runtime_feeds(spec, inputs)}
            (out,) = session.run({n: to_io(feeds[n], dtype) for n in names}, ["output"])
            meta = {**session.meta, "onnxruntime": ort_version()}
            return {"output": from_io(out, dtype), "meta": meta}

        return run

    def runtime_feeds(self, spec, inputs):
        return folded_masks(spec, inputs)

    def timed_model(self, case, spec, dtype):
        model, names = contrib_model(case, spec, dtype)
        return model, names, {}

    def prepare_decoder(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Callable[[], Prepared]:
        """past_key/past_value in, present_key/present_value out, fed back step by step; the
        first step with an empty past."""
        if rules_in_mask(spec) or spec.get("attn_bias") is not None:
            raise NotImplementedError(
                "decoding through the op's cache with a window or a bias would need a mask per step"
            )
        if spec["v_head_dim"] != spec["head_dim"]:
            raise NotImplementedError(
                f"{self.name}: case {spec['id']}: com.microsoft.MultiHeadAttention's past_value must have the "
                f"key's head size ({spec['head_dim']}), not {spec['v_head_dim']}; onnx-attention decodes it"
            )
        what = f"{self.name}: case {spec['id']} in {dtype}, decoding"
        session = Session(contrib_decoder_model(case, spec, dtype), device, self.kernel, what)
        about = {"onnxruntime": ort_version(), "cache": "past_key/past_value -> present"}
        return cache_streams(session, spec, dtype, about)
