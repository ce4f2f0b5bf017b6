"""Hypothesis strategies for random attention specs: every axis the catalogue names, mixed freely.

Specs are built with the catalogue's own ``spec()`` so they carry exactly the fields a golden
case carries; the fuzzer then generates inputs and the truth exactly as the generator does.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from hypothesis import strategies as st

from mha_conformance.vectors.catalogue import spec as make_spec


@st.composite
def specs(draw: st.DrawFn, dtype: str = "float32", variants: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A random but valid spec: shapes, heads and GQA groups, widths, masks, biases, scale, and
    the contract-v2 ``variants`` an adapter expresses (each drawn in or out)."""
    batch = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, 4))
    group = draw(st.integers(1, 3))
    head_dim = draw(st.integers(1, 16))
    v_head_dim = draw(st.one_of(st.just(head_dim), st.integers(1, 16)))
    self_attention = draw(st.booleans())
    q_len = draw(st.integers(1, 12))
    kv_len = q_len if self_attention else draw(st.integers(1, 12))
    d_in = draw(st.integers(1, 24))
    kdim = d_in if self_attention else draw(st.integers(1, 24))
    vdim = d_in if self_attention else draw(st.integers(1, 24))
    out_proj = draw(st.booleans())
    fields: dict[str, Any] = dict(
        batch=batch,
        q_len=q_len,
        kv_len=kv_len,
        d_in=d_in,
        kdim=kdim,
        vdim=vdim,
        num_heads=hkv * group,
        num_kv_heads=hkv,
        head_dim=head_dim,
        v_head_dim=v_head_dim,
        causal=draw(st.booleans()),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0).map(lambda x: round(x, 3)))),
        qkv_bias=draw(st.booleans()),
        out_proj=out_proj,
        out_bias=out_proj and draw(st.booleans()),
        self_attention=self_attention,
        dtypes=(dtype,),
    )
    if out_proj:
        fields["d_out"] = draw(st.integers(1, 24))
    kind = draw(st.sampled_from(["none", "key_padding", "random"]))
    if kind == "key_padding":
        fields["mask"] = {"kind": "key_padding", "shape": [batch, 1, 1, kv_len]}
    elif kind == "random":
        shape = [draw(st.sampled_from([1, batch])), draw(st.sampled_from([1, hkv * group])), q_len, kv_len]
        fields["mask"] = {"kind": "random", "shape": shape, "keep": draw(st.sampled_from([0.3, 0.6, 0.9]))}
    heads = hkv * group
    if "attn_bias" in variants and draw(st.booleans()):
        kind = draw(st.sampled_from(["alibi", "t5", "random"]))
        shape = (
            [1, heads, q_len, kv_len]
            if kind != "random"
            else [draw(st.sampled_from([1, batch])), draw(st.sampled_from([1, heads])), q_len, kv_len]
        )
        fields["attn_bias"] = {"kind": kind, "shape": shape, "grad": True}
        if kind == "random":
            fields["attn_bias"]["neginf"] = draw(st.sampled_from([0.0, 0.3]))
    if "softcap" in variants and draw(st.booleans()):
        fields["softcap"] = draw(st.sampled_from([1.0, 5.0, 20.0, 50.0]))
    if "window" in variants and draw(st.booleans()):
        fields["window"] = [draw(st.integers(-1, kv_len)), draw(st.integers(-1, kv_len))]
    if "kv_lengths" in variants and draw(st.booleans()):
        fields["kv_lengths"] = [draw(st.integers(0, kv_len)) for _ in range(batch)]
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    return make_spec(f"fuzz_{digest}", "drawn by hypothesis", **fields)
