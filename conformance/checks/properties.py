"""Metamorphic properties: relations any correct attention obeys, checked without a golden file.

Each property transforms a golden case's inputs (or weights) in a way that must leave some
part of the output unchanged, runs the adapter on both, and compares the parts. Only array
bookkeeping happens here (permuting, replacing, poisoning); the attention itself is always
the adapter's.

The comparison uses the case's precision baseline: each run may be ``k x (baseline + floor)``
from the truth, so two runs may differ by twice the baseline, and no more.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest

from mha_conformance.checks.skeleton import Check, Expected, Run, forward_shapes
from mha_conformance.execution.harness import cast_inputs
from mha_conformance.impls.adapter import RUNTIME_INPUTS
from mha_conformance.tolerance import Verdict, judge_relation
from mha_conformance.vectors import golden

Inputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class Transformed:
    """A property's second run: new runtime inputs and/or a synthetic case with new weights,
    and the output positions that must be unchanged (a boolean [B, Tq] selector)."""

    inputs: Inputs
    case: golden.GoldenCase | None
    compare: np.ndarray
    what: str


def _rng(case: golden.GoldenCase, salt: str) -> np.random.Generator:
    import hashlib

    return np.random.default_rng(
        int.from_bytes(hashlib.sha256(f"{case.id}/{salt}".encode()).digest()[:8], "little")
    )


def _all_rows(spec: dict[str, Any]) -> np.ndarray:
    return np.ones((spec["batch"], spec["q_len"]), dtype=bool)


def _fresh(like: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random values of the input's own scale and dtype."""
    scale = float(np.abs(like.astype(np.float64)).mean()) or 1.0
    return (rng.standard_normal(like.shape) * scale).astype(like.dtype)


def kv_permutation(case: golden.GoldenCase, inputs: Inputs) -> Transformed:
    """Permuting keys and values together (and a bias's key axis with them; no mask, window or
    lengths, not causal) changes nothing."""
    perm = _rng(case, "perm").permutation(case.spec["kv_len"])
    new = {**inputs, "key": inputs["key"][:, perm], "value": inputs["value"][:, perm]}
    if "attn_bias" in inputs:
        new["attn_bias"] = inputs["attn_bias"][..., perm]
    return Transformed(new, None, _all_rows(case.spec), f"keys and values permuted by {perm.tolist()}")


def future_tokens(case: golden.GoldenCase, inputs: Inputs) -> Transformed:
    """With causal attention, changing tokens after position t leaves outputs up to t unchanged."""
    spec = case.spec
    tq, tk = spec["q_len"], spec["kv_len"]
    t = (tq - 1) // 2
    rng = _rng(case, "future")
    new = dict(inputs)
    if spec["self_attention"]:
        x = inputs["query"].copy()
        x[:, t + 1 :] = _fresh(x[:, t + 1 :], rng)
        new.update(query=x, key=x, value=x)
    else:
        first_hidden = t + 1 + (tk - tq)  # query t sees keys up to t + Tk - Tq
        for name, start in (("query", t + 1), ("key", first_hidden), ("value", first_hidden)):
            arr = inputs[name].copy()
            arr[:, start:] = _fresh(arr[:, start:], rng)
            new[name] = arr
    compare = np.zeros((spec["batch"], tq), dtype=bool)
    compare[:, : t + 1] = True
    return Transformed(new, None, compare, f"tokens after query {t} replaced")


def never_attended_keys(case: golden.GoldenCase) -> np.ndarray | None:
    """[B, Tk] bool: keys no query of any head may attend in that batch row (None if none)."""
    spec, mask = case.spec, case.tensors.get("mask")
    if mask is None or spec["causal"]:
        return None
    shape = (spec["batch"], spec["num_heads"], spec["q_len"], spec["kv_len"])
    hidden = ~np.broadcast_to(mask, shape).any(axis=(1, 2))
    return hidden if hidden.any() else None


def masked_poison(poison: float) -> Callable[[golden.GoldenCase, Inputs], Transformed]:
    """Keys and values no query may attend, set to ``poison`` (huge, Inf or NaN), change nothing."""

    def transform(case: golden.GoldenCase, inputs: Inputs) -> Transformed:
        hidden = never_attended_keys(case)
        new = dict(inputs)
        names = ("query", "key", "value") if case.spec["self_attention"] else ("key", "value")
        poisoned = {n: inputs[n].copy() for n in names}
        for arr in poisoned.values():
            arr[hidden] = poison
        if case.spec["self_attention"]:
            x = poisoned["query"]
            new.update(query=x, key=x, value=x)
            compare = ~hidden  # a poisoned position's own query changed too
        else:
            new.update(poisoned)
            compare = _all_rows(case.spec)
        return Transformed(
            new, None, compare, f"{int(hidden.sum())} never-attended key/value rows set to {poison}"
        )

    return transform


def batch_independence(case: golden.GoldenCase, inputs: Inputs) -> Transformed:
    """Changing every other batch row's inputs leaves batch row 0 unchanged."""
    rng = _rng(case, "batch")
    new = dict(inputs)
    if case.spec["self_attention"]:
        x = inputs["query"].copy()
        x[1:] = _fresh(x[1:], rng)
        new.update(query=x, key=x, value=x)
    else:
        for name in ("query", "key", "value"):
            arr = inputs[name].copy()
            arr[1:] = _fresh(arr[1:], rng)
            new[name] = arr
    compare = np.zeros((case.spec["batch"], case.spec["q_len"]), dtype=bool)
    compare[0] = True
    return Transformed(new, None, compare, "batch rows 1.. replaced")


def head_permutation(case: golden.GoldenCase, inputs: Inputs) -> Transformed:
    """Renumbering heads consistently in W_q/b_q, W_k/b_k, W_v/b_v and W_o changes nothing.

    kv heads are permuted, and query heads within each group, so grouped-query structure
    (query head h reads kv head h // group) is preserved.
    """
    spec = case.spec
    h, hkv, hd, hdv = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"], spec["v_head_dim"]
    group = h // hkv
    rng = _rng(case, "heads")
    perm_kv, perm_in = rng.permutation(hkv), rng.permutation(group)
    q_heads = np.array([perm_kv[j] * group + perm_in[r] for j in range(hkv) for r in range(group)])

    def columns(heads: np.ndarray, width: int) -> np.ndarray:
        return (heads[:, None] * width + np.arange(width)[None, :]).ravel()

    t = dict(case.tensors)
    for short, heads, width in (("q", q_heads, hd), ("k", perm_kv, hd), ("v", perm_kv, hdv)):
        t[f"w_{short}"] = t[f"w_{short}"][:, columns(heads, width)]
        if f"b_{short}" in t:
            t[f"b_{short}"] = t[f"b_{short}"][columns(heads, width)]
    t["w_o"] = t["w_o"][columns(q_heads, hdv)]
    new_inputs = dict(inputs)
    for name in ("mask", "attn_bias"):  # a per-head mask or bias follows its head
        if name in inputs and inputs[name].shape[1] > 1:
            new_inputs[name] = inputs[name][:, q_heads]
    permuted = replace(
        case, spec={**spec, "id": f"{spec['id']}#heads-{_digest(q_heads)}"}, tensors=t, synthetic=True
    )
    return Transformed(new_inputs, permuted, _all_rows(spec), f"heads renumbered {q_heads.tolist()}")


def _digest(order: np.ndarray) -> str:
    """A short, file-name-safe name for a head order (adapters may cache by case id)."""
    import hashlib

    return hashlib.sha256(order.tobytes()).hexdigest()[:10]


def _no_empty_rows(spec: dict[str, Any]) -> bool:
    return not spec["fully_masked_rows"]


@dataclass(frozen=True)
class Property:
    """A relation checked on every adapter: which cases it applies to, the transformation, and,
    for an advisory robustness probe, why a conforming implementation may fail it."""

    applies: Callable[[dict[str, Any]], bool]
    transform: Callable[..., Transformed]
    advisory: str = ""


#: Why Inf and NaN poison are advisory: IEEE arithmetic itself leaks them.
POISON_LEAKS = (
    "keys and values hidden from every query still flow through the projections and P @ V, and in IEEE "
    "arithmetic 0 x Inf = NaN: an implementation of the reference semantics in the straightforward form (the "
    "reference itself included) leaks non-finite poison; excluding hidden keys before the product is a "
    "robustness choice, not conformance"
)

#: Property name -> Property. Conformance properties follow from the reference semantics; advisory
#: ones are robustness probes (findings in the report, failures only under ``--strict``).
PROPERTIES: dict[str, Property] = {
    "kv-permutation": Property(
        lambda s: (
            not s["causal"]
            and s["mask"] is None
            and s.get("window") is None
            and s.get("kv_lengths") is None
            and not s["self_attention"]
            and s["kv_len"] > 1
        ),
        kv_permutation,
    ),
    "future-tokens": Property(
        lambda s: s["causal"] and s["mask"] is None and s["q_len"] >= 2 and _no_empty_rows(s),
        future_tokens,
    ),
    "masked-poison-huge": Property(lambda s: _key_padding(s), masked_poison(1e4)),
    "masked-poison-inf": Property(lambda s: _key_padding(s), masked_poison(np.inf), advisory=POISON_LEAKS),
    "masked-poison-nan": Property(lambda s: _key_padding(s), masked_poison(np.nan), advisory=POISON_LEAKS),
    "batch-independence": Property(lambda s: s["batch"] >= 2 and _no_empty_rows(s), batch_independence),
    "head-permutation": Property(
        lambda s: s["num_heads"] >= 2 and s["out_proj"] and _no_empty_rows(s),
        head_permutation,
    ),
}
#: The advisory checks, by name, with the reason each may fail on a conforming implementation.
ADVISORY = {name: p.advisory for name, p in PROPERTIES.items() if p.advisory}


def _key_padding(spec: dict[str, Any]) -> bool:
    """Cases where some keys are hidden from every query of a batch row: key padding masks."""
    mask = spec.get("mask")
    return bool(mask) and mask["kind"] == "key_padding" and not spec["causal"]


class PropertyCheck(Check):
    """A property run through the check skeleton: the adapter on the case and on its transformed
    copy, the compared rows judged as a relation (``tolerance.judge_relation``)."""

    selector = "test_property"

    def __init__(self, name: str, prop: Property) -> None:
        self.name, self.prop, self.advisory = name, prop, prop.advisory
        self.selector = f"test_property and {name}-"

    def applies(self, spec):
        return self.prop.applies(spec)

    def runs(self, case, dtype):
        if self.name.startswith("masked-poison") and never_attended_keys(case) is None:
            pytest.skip(f"case {case.id} hides no key from every query")
        inputs = {n: a for n, a in cast_inputs(case, dtype).items() if n in RUNTIME_INPUTS}
        change = self.prop.transform(case, inputs)
        return [Run("forward", case, inputs), Run("forward", change.case or case, change.inputs, change)]

    def expected(self, case, run):
        shapes = forward_shapes(case.spec)
        return {"output": Expected(shapes["output"]), "attn_weights": Expected(shapes["attn_weights"], False)}

    def judge(self, case, runs, results, dtype, k) -> tuple[list[Verdict], str]:
        change: Transformed = runs[1].note
        keep = change.compare
        before, after = (r["output"] for r in results)
        verdict = judge_relation(
            after[keep],
            before[keep],
            case.tensors["output"][keep],
            dtype=dtype,
            baseline=case.baseline[dtype]["output"],
            error_scale=case.baseline["error_scale"]["output"],
            k=k,
        )
        return [verdict], f"the output changed after {change.what} (compared: {int(keep.sum())} query rows)"

    def what(self) -> str:
        return f", property {self.name}"


PROPERTY_CHECKS = {name: PropertyCheck(name, prop) for name, prop in PROPERTIES.items()}
