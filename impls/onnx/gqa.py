"""``onnx-contrib-gqa``: a graph built around onnxruntime's ``com.microsoft.GroupQueryAttention``.

The op onnxruntime's LLM exports (onnxruntime-genai, the transformer optimizer's GQA fusion)
run: decoder-only attention, causal by construction, over query heads sharing ``kv_num_heads``
key/value heads, with a KV cache in ``past_key``/``past_value`` [B, Hkv, P, hd] and
``present_key``/``present_value`` out. The graph: ``MatMul`` projections (biases added, as a
cache holds finished keys and values), the past's keys and values projected and split into
heads, one ``GroupQueryAttention`` node, and the output projection. The variants go in natively:

* ``softcap``: the op's ``softcap`` attribute (measured: applied before ``attention_bias``, the
  contract's order);
* a window ``[l, r]``: ``local_window_size = l + 1`` (measured: the op counts the query's own
  key; ``r`` is moot under the causal rule);
* ``kv_lengths`` and Tq < Tk: ``seqlens_k`` (the total length minus one) and
  ``total_sequence_length``, with each batch row's first ``len - Tq`` keys as its past and the
  next ``Tq`` as the new tokens. The op puts query i of a row at ``past + i``: the bottom-right
  rule. A prompt with no past aligns a shorter ``seqlens_k`` top-left (right padding:
  measured), so lengths always go through a past;
* ``attn_bias`` and the case's bool mask: the op's ``attention_bias`` [B|1, H|1, Tq, total],
  ``-inf`` where the mask forbids a key (a row of ``-inf`` gives zeros: measured).

onnxruntime 1.32's CPU kernel takes one batch row when a past and several queries meet ("batch_size
must be 1 when sequence_length > 1 and past context is given"), so such cases run row by row
through the same session; a whole batch runs in one call otherwise. Not expressible, each a skip
with its reason: a case without the causal rule, value heads narrower or wider than key heads,
and a row with fewer keys than queries (its first queries see no key: no past can be negative).
The CPU kernel takes head sizes that are multiples of 8 ("head_size must be a multiple of 8"),
so narrower heads are padded with zero weight columns (:func:`padded_weights`: the scores and
outputs are unchanged; the meta says ``head_size``). Decoding feeds ``present_key``/``present_value`` back as the next step's past, the bias row
and mask row of the step as its ``attention_bias``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mha_conformance.impls.adapter import Arrays, Prepared, Spec, refusal
from mha_conformance.impls.onnx import timed
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

OPSETS = {"": DEFAULT_OPSET, MS_DOMAIN: 1}


def row_lengths(spec: Mapping[str, Any]) -> list[int]:
    """Each batch row's key count (``kv_lengths``, else the case's Tk)."""
    lengths = spec.get("kv_lengths")
    return list(lengths) if lengths is not None else [spec["kv_len"]] * spec["batch"]


def additive(spec: Mapping[str, Any], inputs: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The op's ``attention_bias``: the case's ``attn_bias`` plus ``-inf`` where its bool mask
    forbids a key, [B|1, H|1, Tq, Tk] float64; None when the case has neither."""
    bias, mask = inputs.get("attn_bias"), inputs.get("mask")
    if bias is None and mask is None:
        return None
    total = np.zeros((1, 1, 1, 1)) if bias is None else np.asarray(bias, np.float64)
    if mask is not None:
        total = np.where(mask, total, -np.inf)
    b, h = total.shape[:2]
    return np.broadcast_to(total, (b, h, spec["q_len"], spec["kv_len"]))


#: onnxruntime's CPU GroupQueryAttention takes head sizes that are multiples of this.
HEAD_MULTIPLE = 8


def head_size(spec: Mapping[str, Any]) -> int:
    """The head size the op runs with: the case's, rounded up to :data:`HEAD_MULTIPLE`."""
    return -(-spec["head_dim"] // HEAD_MULTIPLE) * HEAD_MULTIPLE


def padded_weights(case: Mapping[str, np.ndarray], spec: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The projection weights with each head widened to a multiple of :data:`HEAD_MULTIPLE` by
    zero columns (and ``w_o`` by zero rows): the padded query and key columns add 0 to every
    score and the padded value columns give 0 outputs that the output projection ignores, so
    the attention is unchanged (the scale is passed explicitly, from the true head size)."""
    hd, wide = spec["head_dim"], head_size(spec)
    out = dict(case)
    for short, heads in (("q", spec["num_heads"]), ("k", spec["num_kv_heads"]), ("v", spec["num_kv_heads"])):
        for name in (f"w_{short}", f"b_{short}"):
            if name in case:
                a = np.asarray(case[name])
                split = a.reshape(*a.shape[:-1], heads, hd)
                pad = [(0, 0)] * (split.ndim - 1) + [(0, wide - hd)]
                out[name] = np.pad(split, pad).reshape(*a.shape[:-1], heads * wide)
    if spec["out_proj"]:
        w = np.asarray(case["w_o"]).reshape(spec["num_heads"], hd, -1)
        out["w_o"] = np.pad(w, [(0, 0), (0, wide - hd), (0, 0)]).reshape(spec["num_heads"] * wide, -1)
    return out


def gqa_model(case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str, cache: bool) -> Any:
    """The ModelProto: ``query`` [B, Tq, d], new ``key``/``value`` [B, N, d], the past as raw
    ``key_past``/``value_past`` [B, P, d] projected in the graph (``cache`` False) or as the op's
    own cache ``past_key``/``past_value`` [B, Hkv, P, hd] (``cache`` True, decoding; presents are
    outputs), ``seqlens_k`` [B] and ``total_sequence_length`` (int32), and ``attention_bias`` where
    the case has a bias or a mask. Every length is a named dimension, so one session serves every
    call of the case."""
    h, hkv, true_hd = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"]
    hd = head_size(spec)
    if hd != true_hd:
        case = {**case, **padded_weights(case, spec)}
    g = Graph(dtype)
    q = g.linear(g.input("query", case["query"], shape=["batch", "queries", spec["d_in"]]), case, "q")
    k = g.linear(g.input("key", case["key"], shape=["batch", "new", spec["kdim"]]), case, "k")
    v = g.linear(g.input("value", case["value"], shape=["batch", "new", spec["vdim"]]), case, "v")
    if cache:
        past_k, past_v = (
            g.input(n, np.zeros((1, 1, 1, 1), np.float32), shape=["batch", hkv, "past", hd])
            for n in ("past_key", "past_value")
        )
    else:
        raw = {
            n: g.input(f"{n}_past", case[n], shape=["batch", "past", spec[d]])
            for n, d in (("key", "kdim"), ("value", "vdim"))
        }
        past_k = g.heads(g.linear(raw["key"], case, "k"), 0, -1, hkv, hd)
        past_v = g.heads(g.linear(raw["value"], case, "v"), 0, -1, hkv, hd)
    int32 = onnx().TensorProto.INT32
    lens = g.input("seqlens_k", np.zeros(1, np.int32), shape=["batch"], elem_type=int32)
    total = g.input("total_sequence_length", np.zeros((), np.int32), shape=[], elem_type=int32)
    bias = ""
    if "attn_bias" in case or "mask" in case:
        folded = additive(spec, case)
        bias = g.input("attention_bias", folded, shape=["bias_batch", folded.shape[1], "queries", "total"])
    attrs: dict[str, Any] = {"num_heads": h, "kv_num_heads": hkv}
    attrs["scale"] = float(spec["scale"] if spec["scale"] is not None else true_hd**-0.5)
    if spec.get("softcap") is not None:
        attrs["softcap"] = float(spec["softcap"])
    left = (spec.get("window") or (-1, -1))[0]
    if left >= 0:
        attrs["local_window_size"] = left + 1
    inputs = [q, k, v, past_k, past_v, lens, total, "", "", "", bias]
    y, present_k, present_v = g.node("GroupQueryAttention", inputs, n_out=3, domain=MS_DOMAIN, **attrs)
    if spec["out_proj"]:
        y = g.linear(y, case, "o")
    elif hd != true_hd:  # drop the padded columns of each head
        y = g.node("Reshape", [y, g.ints("shape", [0, 0, h, hd])])[0]
        y = g.node("Slice", [y, g.ints("starts", [0]), g.ints("ends", [true_hd]), g.ints("axes", [3])])[0]
        y = g.node("Reshape", [y, g.ints("shape", [0, 0, h * true_hd])])[0]
    g.output(y, "output", ["batch", "queries", spec["d_out"]])
    if cache:
        g.output(present_k, "present_key", ["batch", hkv, "total", hd])
        g.output(present_v, "present_value", ["batch", hkv, "total", hd])
    return g.model(OPSETS)


def calls(spec: Mapping[str, Any]) -> list[tuple[slice, int]]:
    """The op calls a case takes: (batch rows, their key count). One call for the whole batch
    when every row has the same length and either no past or a lone query; else row by row."""
    lengths, tq = row_lengths(spec), spec["q_len"]
    if len(set(lengths)) == 1 and (lengths[0] == tq or tq == 1):
        return [(slice(None), lengths[0])]
    return [(slice(b, b + 1), n) for b, n in enumerate(lengths)]


def call_feeds(spec: Mapping[str, Any], inputs: Mapping[str, np.ndarray], rows: slice, n: int, dtype: str):
    """One call's feeds: rows ``rows`` with ``n`` keys each, the first ``n - Tq`` as the past."""
    tq = spec["q_len"]
    p = n - tq
    batch = len(range(*rows.indices(spec["batch"])))
    key = inputs["key"][rows] if inputs["key"].shape[0] > 1 else inputs["key"]
    value = inputs["value"][rows] if inputs["value"].shape[0] > 1 else inputs["value"]
    feeds = {
        "query": inputs["query"][rows],
        "key_past": key[:, :p],
        "value_past": value[:, :p],
        "key": key[:, p:n],
        "value": value[:, p:n],
    }
    feeds = {name: to_io(a, dtype) for name, a in feeds.items()}
    feeds["seqlens_k"] = np.full(batch, n - 1, np.int32)
    feeds["total_sequence_length"] = np.array(n, np.int32)
    folded = additive(spec, inputs)
    if folded is not None:
        feeds["attention_bias"] = to_io(folded[rows if folded.shape[0] > 1 else slice(None), :, :, :n], dtype)
    return feeds


class OnnxContribGQA(OnnxRuntimeAdapter):
    name = "onnx-contrib-gqa"
    path = (
        "hand-built graph: MatMul projections, then onnxruntime's com.microsoft.GroupQueryAttention (kv_num_heads, "
        "softcap, local_window_size, seqlens_k/total_sequence_length with the past as past_key/past_value, "
        "attention_bias)"
    )
    kernel = ("GroupQueryAttention", MS_DOMAIN)
    variants = frozenset({"attn_bias", "softcap", "window", "kv_lengths"})

    def supports(self, spec: Spec, dtype: str, device: str) -> str | None:
        if not spec["causal"]:
            return (
                "com.microsoft.GroupQueryAttention is causal by construction (decoder-only attention); a case "
                "without the causal rule is not expressible"
            )
        if spec["v_head_dim"] != spec["head_dim"]:
            return "com.microsoft.GroupQueryAttention's values have the keys' head size"
        short = [n for n in row_lengths(spec) if n < spec["q_len"]]
        if short:
            return (
                f"a batch row with {min(short)} keys for {spec['q_len']} queries: its first queries see no key, "
                "and GroupQueryAttention's past length (seqlens_k + 1 - Tq) cannot be negative"
            )
        return self.kernel_problem(dtype, device)

    def prepare(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        session = Session(
            gqa_model(case, spec, dtype, cache=False),
            device,
            self.kernel,
            f"{self.name}: case {spec['id']} in {dtype}",
        )
        plan = calls(spec)
        about = {"head_size": str(head_size(spec))}

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            outs = [session.run(call_feeds(spec, inputs, rows, n, dtype), ["output"])[0] for rows, n in plan]
            meta = {**session.meta, "onnxruntime": ort_version(), "calls": str(len(plan)), **about}
            return {"output": from_io(np.concatenate(outs), dtype), "meta": meta}

        return run

    def bench(self, case: Arrays, spec: Spec, dtype: str, device: str):
        """The timed path: the conformance graph, one call for the whole batch (the benchmark
        configurations have no past), inputs prepared once."""
        reason = refusal(self, spec, dtype, device)
        if reason:
            raise NotImplementedError(reason)
        if len(calls(spec)) != 1:
            raise NotImplementedError(f"{self.name}: a benchmark needing row-by-row calls is not timed")
        feeds = call_feeds(spec, case, *calls(spec)[0], dtype)
        model = gqa_model(case, spec, dtype, cache=False)
        return timed.bench_session(self, model, feeds, {}, spec, dtype, device)

    def prepare_decoder(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Callable[[], Prepared]:
        """``present_key``/``present_value`` fed back as the next step's past (an empty past first);
        each step's ``attention_bias`` is its rows of the case's bias and mask (a prefill's N rows)."""
        what = f"{self.name}: case {spec['id']} in {dtype}, decoding"
        session = Session(gqa_model(case, spec, dtype, cache=True), device, self.kernel, what)
        b, hkv, hd = spec["batch"], spec["num_kv_heads"], head_size(spec)
        folded = additive(spec, case)
        about = {"head_size": str(hd)}

        def new_stream() -> Prepared:
            cache = {
                n: to_io(np.zeros((b, hkv, 0, hd), np.float32), dtype) for n in ("past_key", "past_value")
            }

            def step(token: Mapping[str, np.ndarray]) -> dict[str, Any]:
                t, n = cache["past_key"].shape[2], token["query"].shape[1]  # n > 1: a prefill
                feeds = {name: to_io(token[name], dtype) for name in ("query", "key", "value")}
                feeds["seqlens_k"] = np.full(b, t + n - 1, np.int32)
                feeds["total_sequence_length"] = np.array(t + n, np.int32)
                if folded is not None:
                    feeds["attention_bias"] = to_io(folded[:, :, t : t + n, : t + n], dtype)
                out, cache["past_key"], cache["past_value"] = session.run(
                    {**feeds, **cache}, ["output", "present_key", "present_value"]
                )
                meta = {**session.meta, "onnxruntime": ort_version(), "cache_length": str(t + n), **about}
                return {"output": from_io(out, dtype), "meta": meta}

            return step

        return new_stream
