"""Incremental decoding: feeding one token at a time through an adapter's KV cache gives the
full causal pass's output (``test_decoding[decoding-<adapter>-<device>-<dtype>-<case>]``)."""

from __future__ import annotations

import pytest

from conformance.harness import CheckRecord, judge_golden, load_supported, reproduce_line

CHECK = "decoding"


def select(spec: dict) -> bool:
    """Causal self-attention without an extra mask, short enough to step through token by token."""
    return (
        spec["causal"] and spec["self_attention"] and spec["mask"] is None
        and 2 <= spec["q_len"] <= 64 and not spec["fully_masked_rows"]
    )  # fmt: skip


def test_decoding(target, suite, request):
    record = request.node.mha_record = CheckRecord()
    adapter = suite.by_name[target.adapter]
    case = load_supported(adapter, target.case, target.dtype, target.device, suite.vectors)
    ex = suite.runner.execute(adapter, case, target.dtype, target.device, "decode")
    if ex.status == "skip":
        pytest.skip(ex.message)
    where = f"{adapter.name} on {target.device} in {target.dtype}, case {case.id}, decoding token by token"
    test = "conformance/test_decoding.py"
    repro = "Reproduce: " + reproduce_line(
        adapter.name, target.device, target.dtype, case.id, suite.k, test=test
    )
    if ex.status != "ok":
        raise AssertionError(f"{where}: {ex.message}\n{repro}")
    record.meta.update(ex.result.get("meta", {}))
    verdict = judge_golden(ex.result["output"], case, "output", target.dtype, suite.k)
    record.verdicts.append(verdict)
    if not verdict.passed:
        raise AssertionError(f"{where}: differs from the full causal pass\n  {verdict.describe()}\n{repro}")
