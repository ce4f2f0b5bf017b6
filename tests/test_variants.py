"""Contract v2's variants through the suite: an adapter written for v1 skips them with a reason, a
correct variant adapter passes every check on them, and each way of getting a variant wrong fails
exactly where that variant is used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mha_conformance.impls import reference
from mha_conformance.vectors import golden
from mha_conformance.vectors.catalogue import CASES
from tests.runs import run_suite

VARIANT_CASES = [c for c in CASES if reference.case_variants(c)]


def _uses(variant: str) -> set[str]:
    return {c["id"] for c in VARIANT_CASES if c.get(variant) is not None}


def _misaligned() -> set[str]:
    """Cases where a top-left alignment (query i at position i) differs from the contract's
    bottom-right one: a causal or windowed case where a row's length differs from Tq."""
    return {
        c["id"]
        for c in VARIANT_CASES
        if (c["causal"] or c.get("window"))
        and any(n != c["q_len"] for n in (c.get("kv_lengths") or [c["kv_len"]]))
    }


def _outcomes(tmp_path: Path, adapter: str, *args: str, test: str = "conformance/test_golden.py") -> dict:
    report = tmp_path / f"{adapter.rsplit(':', 1)[-1]}.json"
    run_suite("--adapter", adapter, "--case", "variant_*", "--report", str(report), *args, test=test)
    tests = json.loads(report.read_text())["tests"]
    assert tests, f"{adapter}: no test ran"
    return {t["case"]: t for t in tests if t["dtype"] in ("float64", "float32")}


def test_the_catalogue_has_30_variant_cases_over_every_axis_with_gradients():
    assert len(VARIANT_CASES) >= 30
    for variant in reference.VARIANTS:
        assert len(_uses(variant)) >= 5, variant
    for spec in VARIANT_CASES:
        assert "grad_query" in spec["gradients"], spec["id"]
        if spec.get("attn_bias") is not None and spec["attn_bias"]["grad"]:
            assert "grad_attn_bias" in spec["gradients"], spec["id"]
    bias = {c["attn_bias"]["kind"] for c in VARIANT_CASES if c.get("attn_bias")}
    assert bias == {"alibi", "t5", "random"}
    assert {c["softcap"] for c in VARIANT_CASES if c.get("softcap")} >= {20.0, 50.0}
    windows = [tuple(c["window"]) for c in VARIANT_CASES if c.get("window")]
    assert (0, 0) in windows and any(r == -1 for _, r in windows) and any(left >= 8 for left, _ in windows)
    lengths = [n for c in VARIANT_CASES if c.get("kv_lengths") for n in c["kv_lengths"]]
    assert 0 in lengths


def test_variant_files_are_format_3_and_older_files_keep_their_format():
    for case_id, fmt in (
        ("variant_softcap20_self", "3"),
        ("self_basic_b2_t8_d16_h4", "1"),
        ("precision_f64_inputs_self_b2_t8_d16_h4", "2"),
    ):
        case = golden.load_case(case_id)
        header = golden._parse_header(case.path, case.path.read_bytes())
        assert header["__metadata__"]["format_version"] == fmt, case_id


def test_an_adapter_without_variants_skips_every_variant_case_with_the_reason(tmp_path):
    seen = _outcomes(tmp_path, "tests.faulty_adapters:returns_tensor")
    assert set(seen) == {c["id"] for c in VARIANT_CASES}
    for case_id, t in seen.items():
        assert t["outcome"] == "skipped", (case_id, t["outcome"])
        assert "does not express" in t["reason"] and "docs/semantics.md#variants" in t["reason"], t["reason"]


def test_a_correct_variant_adapter_passes_every_check_on_every_variant_case(tmp_path):
    loops = _outcomes(tmp_path, "tests.variant_adapters:loops")
    assert {t["outcome"] for t in loops.values()} == {"passed"}, {
        c: t["reason"][:300] for c, t in loops.items() if t["outcome"] != "passed"
    }
    report = tmp_path / "all.json"
    res = run_suite(
        *("--adapter", "tests.faulty_adapters:Correct", "--case", "variant_*", "--dtype", "float32"),
        *("--report", str(report)),
        test="conformance",
    )
    tests = json.loads(report.read_text())["tests"]
    assert res.returncode == 0, res.stdout[-3000:]
    checks = {t["check"] for t in tests if t["outcome"] == "passed"}
    assert {"golden", "gradients", "decoding", "head-permutation", "kv-permutation"} <= checks, checks


@pytest.mark.parametrize(
    ("adapter", "variant"),
    [
        ("softcap_after_bias", "softcap"),
        ("top_left", "window"),
        ("lengths_ignored", "kv_lengths"),
        ("bias_ignored", "attn_bias"),
    ],
)
def test_each_wrong_variant_fails_where_it_is_used(adapter, variant, tmp_path):
    seen = _outcomes(tmp_path, f"tests.variant_adapters:{adapter}")
    failed = {c for c, t in seen.items() if t["outcome"] == "failed"}
    assert failed, f"{adapter} passed every variant case"
    where = {
        "softcap": _uses("softcap") & _uses("attn_bias"),  # the order matters only where both meet
        "window": _misaligned(),
    }.get(variant, _uses(variant))
    assert failed <= where, sorted(failed)
    assert len(failed) >= len(where) // 2, sorted(failed)


@pytest.mark.parametrize(
    ("adapter", "variant"), [("SoftcapGradientIgnored", "softcap"), ("BiasGradientNotSummed", "attn_bias")]
)
def test_each_wrong_variant_gradient_fails(adapter, variant, tmp_path):
    seen = _outcomes(tmp_path, f"tests.variant_adapters:{adapter}", test="conformance/test_gradients.py")
    failed = {c for c, t in seen.items() if t["outcome"] == "failed"}
    assert failed and failed <= _uses(variant), sorted(failed)


def test_every_builtin_names_why_it_cannot_express_a_variant():
    """Each variant a built-in adapter does not express has its own reason (the API's limit), which
    is the skip's message."""
    from mha_conformance.impls.adapter import refusal
    from mha_conformance.impls.registry import BUILTINS, builtin

    for name in BUILTINS:
        adapter = builtin(name)
        for variant in set(reference.VARIANTS) - set(adapter.variants):
            assert adapter.cannot_express.get(variant), (name, variant)
        missing = set(reference.VARIANTS) - set(adapter.variants)
        if missing and adapter.missing() is None:
            spec = next(c for c in VARIANT_CASES if set(reference.case_variants(c)) <= missing)
            reason = refusal(adapter, spec, "float32", "cpu")
            assert reason and any(adapter.cannot_express[v] in reason for v in missing), (name, reason)
