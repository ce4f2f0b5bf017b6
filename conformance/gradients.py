"""The gradients check: an adapter's backward against the golden gradients.

The adapter returns the gradients of ``sum(output * grad_output)`` (``grad_output`` from the
case) with respect to query, key, value, weights and biases; each one the case holds
(``spec["gradients"]``) is judged with the same rule as the forward, against the per-dtype
gradient baselines the generator stores. Mirrors :func:`conformance.harness.check_golden`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conformance.harness import (
    CheckRecord,
    InProcess,
    Isolated,
    judge_golden,
    load_supported,
    reproduce_line,
)
from conformance.tolerance import DEFAULT_K
from impls.adapter import Adapter
from vectors import golden

CHECK = "gradients"
#: The test module, so a reproduce line runs only the gradients test, not the golden one too.
TEST_MODULE = "conformance/test_gradients.py"


def gradient_names(case: golden.GoldenCase) -> set[str]:
    """Every gradient an adapter could return for this case: one per input, weight and bias it
    has (a bias the adapter fills with zeros because the case has none is not among them)."""
    return {f"grad_{name}" for name in case.inputs() if name != "mask"}


def check_gradients(
    adapter: Adapter,
    case_id: str,
    dtype: str,
    device: str,
    k: float = DEFAULT_K,
    record: CheckRecord | None = None,
    runner: InProcess | Isolated | None = None,
    root: Path = golden.VECTORS_DIR,
) -> CheckRecord:
    """Run ``adapter``'s backward on a golden case and judge every gradient the case holds.

    A gradient the case holds but the adapter did not return fails (the contract asks for
    all of them); one the adapter returned that the case does not store (the wide cases keep
    only input gradients) is not judged; one for a tensor the case does not have (a zero
    bias the adapter made up) fails, since no caller could map it to anything.
    """
    record = record if record is not None else CheckRecord()
    case = load_supported(adapter, case_id, dtype, device, root)
    ex = (runner or InProcess()).execute(adapter, case, dtype, device, "backward")
    if ex.status == "skip":
        pytest.skip(ex.message)
    where = f"{adapter.name} gradients on {device} in {dtype}, case {case_id} ({case.spec['description']})"
    repro = "Reproduce: " + reproduce_line(adapter.name, device, dtype, case_id, k, test=TEST_MODULE)
    if ex.status != "ok":
        record.meta["problem"] = ex.status
        raise AssertionError(f"{where}: {ex.message}\n{repro}")
    record.meta["device_name"] = adapter.device_name(device)
    record.meta.update(ex.result.get("meta", {}))
    returned = {n for n in ex.result if n.startswith("grad_")}
    held = case.spec["gradients"]
    problems = []
    missing = [n for n in held if n not in returned]
    if missing:
        problems.append(
            f"  missing gradients: {', '.join(missing)} (returned: {', '.join(sorted(returned)) or 'none'})"
        )
    unknown = sorted(returned - gradient_names(case))
    if unknown:
        problems.append(
            f"  returned {', '.join(unknown)} for tensors the case does not have (a bias filled with zeros "
            "because the case has none must not be returned)"
        )
    for name in held:
        if name in returned:
            record.verdicts.append(judge_golden(ex.result[name], case, name, dtype, k))
    problems += [f"  {v.describe()}" for v in record.verdicts if not v.passed]
    if problems:
        lines = "\n".join(problems)
        raise AssertionError(f"{where}:\n{lines}\n{repro}")
    return record
