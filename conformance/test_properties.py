"""Metamorphic properties on every adapter: ``test_property[<property>-<adapter>-<device>-<dtype>-<case>]``."""

from __future__ import annotations

import numpy as np
import pytest

from conformance.harness import CheckRecord, cast_inputs, load_supported, reproduce_line
from conformance.properties import PROPERTIES, never_attended_keys
from conformance.tolerance import judge
from impls.adapter import RUNTIME_INPUTS

CHECKS = {name: prop.applies for name, prop in PROPERTIES.items()}


def test_property(target, suite, request):
    record = request.node.mha_record = CheckRecord()
    adapter = suite.by_name[target.adapter]
    case = load_supported(adapter, target.case, target.dtype, target.device, suite.vectors)
    if target.check.startswith("masked-poison") and never_attended_keys(case) is None:
        pytest.skip(f"case {case.id} hides no key from every query")
    inputs = {n: a for n, a in cast_inputs(case, target.dtype).items() if n in RUNTIME_INPUTS}
    change = PROPERTIES[target.check].transform(case, inputs)
    where = f"{adapter.name} on {target.device} in {target.dtype}, case {case.id}, property {target.check}"
    test = f"conformance/test_properties.py -k '{target.check}-'"
    repro = "Reproduce: " + reproduce_line(
        adapter.name, target.device, target.dtype, case.id, suite.k, test=test
    )
    advisory = PROPERTIES[target.check].advisory

    def fail(message: str) -> None:
        """A failure; an advisory probe's is a finding instead, unless --strict."""
        if advisory and not suite.strict:
            request.node.mha_finding = f"advisory finding ({advisory}): {message}"
            return
        raise AssertionError(message)

    runs = []
    for run_case, run_inputs in ((case, inputs), (change.case or case, change.inputs)):
        ex = suite.runner.execute(adapter, run_case, target.dtype, target.device, "forward", run_inputs)
        if ex.status == "skip":
            pytest.skip(ex.message)
        if ex.status != "ok":
            return fail(f"{where}: {ex.message}\n{repro}")
        runs.append(ex.result["output"])
        record.meta.update(ex.result.get("meta", {}))
    before, after = runs
    keep = change.compare
    base = case.baseline[target.dtype]["output"]
    # Two runs may each be k x (baseline + floor) from the truth, so they may differ by twice the
    # baseline; and where the first run is further from the truth than that (a precision finding the
    # golden check reports), each run may be as far off as it actually is: the property is about
    # the relation, not the precision.
    reached = float(
        np.max(np.abs(before[keep].astype(np.float64) - case.tensors["output"][keep]), initial=0.0)
    )
    verdict = judge(
        after[keep], before[keep].astype(np.float64), tensor="output", dtype=target.dtype,
        baseline=2 * base + 2 * reached / suite.k,
        error_scale=case.baseline["error_scale"]["output"], k=suite.k,
    )  # fmt: skip
    record.verdicts.append(verdict)
    if not verdict.passed:
        fail(
            f"{where}: the output changed after {change.what} (compared: {int(keep.sum())} query rows)\n"
            f"  {verdict.describe()}\n{repro}"
        )
