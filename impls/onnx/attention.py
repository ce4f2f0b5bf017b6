"""``onnx-attention``: a graph built around the standard ONNX ``Attention`` op, run by onnxruntime.

The projections are plain ``MatMul``/``Add`` nodes with the case's weights; then one
``Attention`` node (opset 24) takes 3-D Q [B, Tq, H*hd], K and V [B, Tk, Hkv*hd] with
``q_num_heads``/``kv_num_heads`` (grouped-query attention included), ``scale`` when the case
has one, the case's bool mask as ``attn_mask`` (True = may attend, the op's convention), and
``is_causal``. The op aligns causal masking bottom-right by an offset, which it takes from
its inputs rather than from Tq and Tk:

* Tq < Tk: the first Tk - Tq keys and values go in as ``past_key``/``past_value`` (4-D, the
  KV-cache inputs; ``present_key``/``present_value`` come out), so offset = past length;
* Tq > Tk: ``nonpad_kv_seqlen`` = Tk gives offset Tk - Tq < 0: the leading query rows have
  no key and the specification says they give zeros;
* Tq == Tk: offset 0, plain ``is_causal``.

Contract v2: ``softcap`` is the op's attribute; ``attn_bias`` its float ``attn_mask`` (with the
bool rules folded in by ``Where(mask, bias, -inf)``); ``kv_lengths`` its ``nonpad_kv_seqlen``,
whose offset ``nonpad_kv_seqlen[b] - Tq`` is exactly the contract's per-row alignment. Windows are
the op's ``left_window_size``/``right_window_size`` only from opset 25, which onnxruntime 1.32's
CPU provider runs as the function body, not a kernel (probed): they go into the bool mask.

``qk_matmul_output_mode=3`` returns the softmax weights, judged as ``attn_weights``. The
first run is profiled to prove that onnxruntime's ``Attention`` kernel ran (it inlines the
op's ONNX function body where it has no kernel, e.g. float64 on the CPU provider: a skip).

Incremental decoding (``prepare_decoder``) is the op's own KV-cache use: a one-step model
takes the new token's query, key and value with ``past_key``/``past_value`` and returns the
token's output with ``present_key``/``present_value`` (past plus the token), which the
stream feeds back as the next past, starting from a zero-length past. With ``is_causal`` the
offset is the past length, so the lone query attends every cached key and its own. The timed
path (``bench``, ``impls/onnx/timed.py``) runs :func:`attention_model` without the weights
output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mha_conformance.impls.adapter import Adapter, Arrays, Divergence, Prepared, Spec, rule_mask
from mha_conformance.impls.onnx.common import Graph, OnnxRuntimeAdapter
from mha_conformance.impls.onnx.runtime import Session, from_io, ort_version, to_io

OPSET = 24


def key_padding_shaped(spec: Mapping[str, Any]) -> bool:
    """A mask of shape [B|1, H|1, 1, Tk] broadcast over more than one query (key padding)."""
    mask = spec.get("mask")
    return bool(mask) and mask["shape"][2] == 1 and spec["q_len"] > 1


KEY_PADDING_REJECTED = (
    "onnxruntime's CPU Attention kernel rejects a key padding attn_mask of shape [B, 1, 1, Tk], which the "
    "specification allows (broadcastable to [B, q_num_heads, Tq, Tk]): the run fails with 'inconsistent "
    "q_sequence_length (between attn_mask and Q)' (attention_helper.h requires dim -2 == Tq); the same "
    "mask expanded to [B, 1, Tq, Tk] passes every such case (worst ratio 1.02, onnxruntime 1.32.0)"
)


def attention_model(
    case: Mapping[str, np.ndarray],
    spec: Mapping[str, Any],
    dtype: str,
    weights: bool = True,
    native_window: bool = False,
) -> tuple[Any, list[str]]:
    """The ModelProto for one case in ``dtype`` and the names of its runtime inputs; with
    ``weights`` the softmax weights are a second output (``qk_matmul_output_mode=3``). With
    ``native_window`` a window is the op's ``left_window_size``/``right_window_size`` (opset 25)
    rather than folded into the mask."""
    b, tq, tk = spec["batch"], spec["q_len"], spec["kv_len"]
    h, hkv, hd, hdv = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"], spec["v_head_dim"]
    g = Graph(dtype)
    window = spec.get("window") if native_window else None
    folded = runtime_mask({**spec, "window": None} if native_window else spec, case)
    names = ["query", "key", "value", *folded] + (["attn_bias"] if "attn_bias" in case else [])
    q = g.linear(g.input("query", case["query"]), case, "q")
    k = g.linear(g.input("key", case["key"]), case, "k")
    v = g.linear(g.input("value", case["value"]), case, "v")
    mask = g.input("mask", folded["mask"]) if folded else ""
    if "attn_bias" in case:
        bias = g.input("attn_bias", case["attn_bias"])
        mask = g.node("Where", [mask, bias, g.const("neg_inf", np.array(-np.inf))])[0] if mask else bias
    attrs: dict[str, Any] = {"q_num_heads": h, "kv_num_heads": hkv}
    if spec.get("softcap") is not None:
        attrs["softcap"] = float(spec["softcap"])
    if window is not None:
        attrs["left_window_size"], attrs["right_window_size"] = window
    if weights:
        attrs["qk_matmul_output_mode"] = 3
    if spec["scale"] is not None:
        attrs["scale"] = float(spec["scale"])
    past_k = past_v = nonpad = ""
    if spec.get("kv_lengths") is not None:  # offset = length - Tq per row: the contract's alignment
        nonpad = g.ints("nonpad_kv_seqlen", spec["kv_lengths"])
        attrs["is_causal"] = int(spec["causal"])
    elif spec["causal"] or window is not None:  # the op aligns both by the cache's offset
        attrs["is_causal"] = int(spec["causal"])
        if tq < tk:  # the leading keys become the cache: offset = past length = Tk - Tq
            p = tk - tq
            past_k = g.heads(g.seq_slice(k, 0, p), b, p, hkv, hd)
            past_v = g.heads(g.seq_slice(v, 0, p), b, p, hkv, hdv)
            k, v = g.seq_slice(k, p, tk), g.seq_slice(v, p, tk)
        elif tq > tk:  # offset = nonpad_kv_seqlen - Tq < 0
            nonpad = g.ints("nonpad_kv_seqlen", [tk] * b)
    n_out = 4 if weights else 3 if past_k else 1
    unused = (1, 2) if not past_k else ()
    y, *outs = g.node(
        "Attention", [q, k, v, mask, past_k, past_v, nonpad], n_out=n_out, unused=unused, **attrs
    )
    if spec["out_proj"]:
        y = g.linear(y, case, "o")
    g.output(y, "output", [b, tq, spec["d_out"]])
    if weights:
        g.output(outs[-1], "attn_weights", [b, h, tq, tk])
    return g.model({"": 25 if window is not None else OPSET}), names


def folded_mask(case: Mapping[str, np.ndarray], spec: Mapping[str, Any]) -> np.ndarray:
    """The bool ``attn_mask``: the case's mask with the window folded in (onnxruntime has no kernel
    for the opset-25 window attributes), at least [.., Tq, Tk] (the CPU kernel wants dim -2 = Tq)."""
    if spec.get("window") is None:
        return case["mask"]
    folded = rule_mask(spec, case["mask"], causal=False, lengths=False)
    shape = folded.shape[:2] + (spec["q_len"], spec["kv_len"])
    return np.broadcast_to(folded, shape).copy()


def runtime_mask(spec: Mapping[str, Any], inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ``mask`` input the model takes: the case's (or an all-True one) with the window
    folded in, where the case has a mask or a window."""
    if "mask" not in inputs and spec.get("window") is None:
        return {}
    given = inputs.get("mask")
    if given is None:
        given = np.ones((1, 1, spec["q_len"], spec["kv_len"]), bool)
    return {"mask": folded_mask({"mask": given}, spec)}


def decoder_model(case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str) -> Any:
    """One decoding step: the new tokens' query, key and value [B, N, d] (N = 1, or a prefill's
    length on an empty cache) and the cache
    ``past_key``/``past_value`` [B, Hkv, P, hd] (P grows: a named dimension) in; the token's
    ``output`` and ``present_key``/``present_value`` (the cache with the token's projected key
    and value appended, P + 1 long) out. The same projections as :func:`attention_model`; the
    op's bottom-right causal rule puts the lone query at offset P, so it attends every cached
    key and its own."""
    attrs: dict[str, Any] = {
        "q_num_heads": spec["num_heads"],
        "kv_num_heads": spec["num_kv_heads"],
        "is_causal": 1,
    }
    if spec["scale"] is not None:
        attrs["scale"] = float(spec["scale"])
    if spec.get("softcap") is not None:
        attrs["softcap"] = float(spec["softcap"])

    def attend(g: Graph, q: str, k: str, v: str, past_k: str, past_v: str) -> list[str]:
        return g.node("Attention", [q, k, v, "", past_k, past_v], n_out=3, **attrs)

    return step_model(case, spec, dtype, attend, {"": OPSET})


def step_model(
    case: Mapping[str, np.ndarray],
    spec: Mapping[str, Any],
    dtype: str,
    attend: Callable[..., list[str]],
    opsets: dict[str, int],
) -> Any:
    """The graph of one decoding step around ``attend(g, q, k, v, past_key, past_value)``, which
    adds the attention node and returns its (output, present_key, present_value): the new tokens'
    projections in ([B, N, d], N a named dimension: one token, or a prefill on an empty cache),
    the output projection and the presents [B, Hkv, P + N, hd] out."""
    b, hkv = spec["batch"], spec["num_kv_heads"]
    g = Graph(dtype)
    widths = {"query": spec["d_in"], "key": spec["kdim"], "value": spec["vdim"]}
    q, k, v = (
        g.linear(g.input(n, case[n][:, :1], shape=[b, "new", widths[n]]), case, n[0])
        for n in ("query", "key", "value")
    )
    past_k, past_v = (
        g.input(name, empty, shape=[b, hkv, "past", empty.shape[-1]])
        for name, empty in empty_cache(spec).items()
    )
    y, present_k, present_v = attend(g, q, k, v, past_k, past_v)
    if spec["out_proj"]:
        y = g.linear(y, case, "o")
    g.output(y, "output", [b, "new", spec["d_out"]])
    g.output(present_k, "present_key", [b, hkv, "total", spec["head_dim"]])
    g.output(present_v, "present_value", [b, hkv, "total", spec["v_head_dim"]])
    return g.model(opsets)


def empty_cache(spec: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``past_key``/``past_value`` of length 0 [B, Hkv, 0, hd]: a stream's first step (onnxruntime
    1.32's CPU Attention and MultiHeadAttention kernels take a zero-length past: measured)."""
    b, hkv = spec["batch"], spec["num_kv_heads"]
    return {
        "past_key": np.zeros((b, hkv, 0, spec["head_dim"]), np.float32),
        "past_value": np.zeros((b, hkv, 0, spec["v_head_dim"]), np.float32),
    }


def cache_streams(
    session: Session, spec: Mapping[str, Any], dtype: str, about: Mapping[str, str]
) -> Callable[[], Prepared]:
    """The decoder factory over a one-step model (:func:`decoder_model` or the contrib op's):
    each stream starts from an empty cache, feeds one token's query, key and value with the
    cache it holds, and keeps the presents the model returns as the next step's past."""

    def new_stream() -> Prepared:
        cache = {n: to_io(a, dtype) for n, a in empty_cache(spec).items()}

        def step(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            feeds = {**{n: to_io(inputs[n], dtype) for n in ("query", "key", "value")}, **cache}
            out, cache["past_key"], cache["past_value"] = session.run(
                feeds, ["output", "present_key", "present_value"]
            )
            meta = {**session.meta, **about, "cache_length": str(cache["past_key"].shape[2])}
            return {"output": from_io(out, dtype), "meta": meta}

        return step

    return new_stream


class OnnxAttention(OnnxRuntimeAdapter):
    name = "onnx-attention"
    variants = frozenset({"attn_bias", "softcap", "window", "kv_lengths"})
    path = (
        f"hand-built graph: MatMul/Add projections, then the standard ONNX Attention op (opset {OPSET}: "
        "q_num_heads/kv_num_heads, scale, bool attn_mask, is_causal with past_key/past_value or "
        "nonpad_kv_seqlen for the bottom-right offset, qk_matmul_output_mode=3 weights)"
    )
    kernel = ("Attention", "")
    # The kernel rejects the mask itself, so every check on those cases meets it first.
    divergences = (Divergence(KEY_PADDING_REJECTED, device="cpu", when=key_padding_shaped),)

    def supports(self, spec: Spec, dtype: str, device: str) -> str | None:
        return self.kernel_problem(dtype, device)

    def prepare(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        model, names = attention_model(case, spec, dtype)
        session = Session(model, device, self.kernel, f"{self.name}: case {spec['id']} in {dtype}")

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            feeds = {**inputs, **self.runtime_feeds(spec, inputs)}
            out, weights = session.run({n: to_io(feeds[n], dtype) for n in names})
            meta = {**session.meta, "opset": str(OPSET), "onnxruntime": ort_version()}
            return {"output": from_io(out, dtype), "attn_weights": from_io(weights, dtype), "meta": meta}

        return run

    def runtime_feeds(self, spec, inputs):
        return runtime_mask(spec, inputs)

    def timed_model(self, case, spec, dtype):
        model, names = attention_model(case, spec, dtype, weights=False)
        return model, names, {"opset": str(OPSET)}

    def prepare_decoder(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Callable[[], Prepared]:
        """past_key/past_value in, present_key/present_value out (the op's own cache update),
        fed back step by step; the first step with an empty past."""
        if spec.get("window") is not None or spec.get("attn_bias") is not None:
            raise NotImplementedError(
                "decoding through the op's cache with a window or a bias would need a mask per step (the "
                "window attributes need opset 25, which onnxruntime runs only as a function body)"
            )
        what = f"{self.name}: case {spec['id']} in {dtype}, decoding"
        session = Session(decoder_model(case, spec, dtype), device, self.kernel, what)
        about = {"opset": str(OPSET), "onnxruntime": ort_version(), "cache": "past_key/past_value -> present"}
        return cache_streams(session, spec, dtype, about)


def keys_a_row_sums(spec: Mapping[str, Any]) -> int:
    """The most keys one query row's softmax sums over: the key length, or a window's width."""
    left, right = spec.get("window") or (-1, -1)
    if left < 0:
        return spec["kv_len"]
    after = 0 if spec["causal"] and right < 0 else (right if right >= 0 else spec["kv_len"])
    return min(spec["kv_len"], left + 1 + after)


class OnnxReference(OnnxAttention):
    """The same graph, run by ``onnx.reference.ReferenceEvaluator``: the ONNX project's own
    NumPy implementation of the op, independent of this suite's reference and of onnxruntime."""

    name = "onnx-reference"
    framework = "onnx"
    extra = "onnx"
    kernel = None
    divergences = (
        Divergence(
            "ONNX float attributes are 32-bit (AttributeProto.f): a float64 graph's scale is the float32 nearest "
            "the case's (0.3 becomes 0.30000001192092896), a float32 step inside a float64 computation",
            check="golden",
            dtype="float64",
            when=lambda s: s["scale"] is not None and float(np.float32(s["scale"])) != s["scale"],
        ),
        Divergence(
            "onnx.reference runs a bfloat16 graph in NumPy on ml_dtypes.bfloat16 arrays: the softmax's row sums "
            "(np.sum) round every partial sum to bfloat16 instead of accumulating in float32, so over hundreds "
            "of keys the normaliser drifts by several bfloat16 ulps (measured: 8x the tolerance at 512 and 1024 "
            "keys, 21x at 16384; within it up to 301); the contract's half-precision arithmetic accumulates in "
            "float32",
            check="golden",
            dtype="bfloat16",
            when=lambda s: keys_a_row_sums(s) >= 512,
        ),
    )
    path = (
        "the onnx-attention graph (windows as the opset-25 left/right_window_size attributes) run by "
        "onnx.reference.ReferenceEvaluator, the ONNX project's own NumPy implementation"
    )

    def devices(self) -> list[str]:
        return ["cpu"]

    def versions(self) -> dict[str, str]:
        from mha_conformance.impls.onnx.runtime import onnx

        return {"onnx": onnx().__version__}

    def supports(self, spec: Spec, dtype: str, device: str) -> str | None:
        return None

    def prepare(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        from onnx.reference import ReferenceEvaluator

        model, names = attention_model(case, spec, dtype, native_window=True)
        evaluator = ReferenceEvaluator(model)
        opset = str(model.opset_import[0].version)

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            feeds = {**inputs, **runtime_mask({**spec, "window": None}, inputs)}
            out, weights = evaluator.run(None, {n: to_io(feeds[n], dtype) for n in names})
            meta = {"evaluator": "onnx.reference.ReferenceEvaluator", "opset": opset}
            return {"output": from_io(out, dtype), "attn_weights": from_io(weights, dtype), "meta": meta}

        return run

    def prepare_decoder(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Callable[[], Prepared]:
        raise NotImplementedError("onnx-reference is checked on whole passes; onnx-attention decodes the op")

    #: A NumPy reference implementation, not a runtime to time: no timed path.
    bench = Adapter.bench
