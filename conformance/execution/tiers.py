"""The quick tier (``--quick``): for every check and adapter, few (case, dtype) tests that still
cover every semantic axis of the catalogue and every dtype.

An axis is a feature of a case's spec that an implementation can get wrong on its own: causal
alignment, cross attention, GQA, each mask kind and broadcast, each bias kind, softcap, each window
form, per-batch lengths, missing biases or projections, odd widths, extreme values, stored-input
precision and so on (:func:`axes`). The quick tier covers every axis and every dtype the full run
covers, spreading the axes over the dtypes, by a greedy set cover in catalogue order
(deterministic: the same tests on every machine), which takes about a tenth of the tests. ``tests/test_quick.py`` checks that it still kills every
shipped mutant; docs/speed.md says when to use which tier.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Spec = Mapping[str, Any]


def axes(spec: Spec) -> set[str]:
    """The semantic axes a case exercises (names, for coverage; a baseline self-attention case
    has the axis ``baseline``)."""
    b, h, hkv = spec["batch"], spec["num_heads"], spec["num_kv_heads"]
    tq, tk, d = spec["q_len"], spec["kv_len"], spec["head_dim"]
    out: set[str] = {"baseline"}
    flags = {
        "causal": spec["causal"],
        "cross": not spec["self_attention"],
        "tq>tk": tq > tk,
        "tq<tk": tq < tk,
        "one-query": tq == 1,
        "one-key": tk == 1,
        "batch-1": b == 1,
        "batch>2": b > 2,
        "single-head": h == 1,
        "many-heads": h >= 16,
        "gqa": 1 < hkv < h,
        "mqa": hkv == 1 < h,
        "head-dim-1": d == 1,
        "head-dim-wide": d >= 64,
        "odd-widths": any(n % 2 for n in (d, spec["d_in"], h)),
        "v-head-dim": spec["v_head_dim"] != d,
        "kdim-vdim": (spec["kdim"], spec["vdim"]) != (spec["d_in"], spec["d_in"]),
        "d-out": spec["out_proj"] and spec["d_out"] != spec["d_in"],
        "no-qkv-bias": not spec["qkv_bias"],
        "no-out-bias": spec["out_proj"] and not spec["out_bias"],
        "no-out-proj": not spec["out_proj"],
        "scale": spec["scale"] is not None,
        "long": max(tq, tk) >= 256,
        "huge-inputs": spec["input_scale"] >= 10,
        "tiny-inputs": spec["input_scale"] * spec["weight_scale"] < 1e-3,
        "wide-inputs": spec["input_scale"] > 1 and spec["weight_scale"] < 1,
        "dropout": spec["dropout"] > 0,
        "softcap": spec.get("softcap") is not None,
        "kv-lengths": spec.get("kv_lengths") is not None,
        "kv-length-0": 0 in (spec.get("kv_lengths") or ()),
        "kv-length<tq": any(n < tq for n in (spec.get("kv_lengths") or ())),
        "fully-masked-rows": bool(spec.get("fully_masked_rows")),
    }
    out |= {name for name, on in flags.items() if on}
    if len(spec["dtypes"]) == 1:  # inputs at that dtype's full precision (docs/vectors.md)
        out.add(f"precision-{spec['dtypes'][0]}")
    if spec.get("input_grid"):
        out.add(f"grid-{spec['input_grid']}")
    mask = spec.get("mask")
    if mask:
        out.add(f"mask-{mask['kind']}")
        out |= {f"mask-broadcast-{axis}" for axis, n in zip("bh", mask["shape"][:2], strict=True) if n == 1}
    bias = spec.get("attn_bias")
    if bias:
        out.add(f"bias-{bias['kind']}")
        out |= {f"bias-broadcast-{axis}" for axis, n in zip("bh", bias["shape"][:2], strict=True) if n == 1}
        out |= {f"bias-{key}" for key in ("neginf", "rows") if bias.get(key)}
        out |= {f"bias-with-{other}" for other in ("mask", "softcap") if spec.get(other)}
    window = spec.get("window")
    if window:
        left, right = window
        out.add("window-" + "-".join(side for side, n in (("left", left), ("right", right)) if n >= 0))
        if (left, right) == (0, 0):
            out.add("window-diagonal")
        if min(left, right) >= max(tq, tk):
            out.add("window-wider")
    return out


def cover(tests: Sequence[tuple[str, str]], specs: Mapping[str, Spec]) -> list[tuple[str, str]]:
    """The (case, dtype) pairs of ``tests`` that cover every axis and every dtype they cover,
    chosen greedily: most new axes first, then the dtype chosen least so far (so the axes spread
    over the dtypes), then the order given. In the order given."""
    items = {t: axes(specs[t[0]]) | {f"dtype-{t[1]}"} for t in tests}
    left = set().union(*items.values()) if items else set()
    chosen: list[tuple[str, str]] = []
    used: dict[str, int] = {}
    while left:
        best = min(tests, key=lambda t: (-len(items[t] & left), used.get(t[1], 0)))
        chosen.append(best)
        used[best[1]] = used.get(best[1], 0) + 1
        left -= items[best]
    order = {t: i for i, t in enumerate(tests)}
    return sorted(chosen, key=order.__getitem__)


def quick(tests: Iterable[tuple[str, str]], specs: Mapping[str, Spec]) -> set[tuple[str, str]]:
    """:func:`cover` as a set, for filtering."""
    return set(cover(list(tests), specs))
