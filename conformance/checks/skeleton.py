"""The one skeleton every check runs through: refuse, run, validate, judge, report.

A check (golden, gradients, decoding, each property) says only what is specific to it: which
runs of the adapter it needs (:meth:`Check.runs`), what a result must hold
(:meth:`Check.expected`) and how the results are judged (:meth:`Check.judge`, with the
arithmetic of ``mha_conformance.tolerance``). :func:`run_check` does the rest, the same way for
all of them: the one refusal rule (``mha_conformance.impls.adapter.refusal``), the runner (in this process or a
worker), the guard in front of every judgement, and a failure that says where, what and how to
reproduce it. An advisory check's failure is a finding instead, unless strict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mha_conformance.execution.harness import NUMPY_DTYPES, InProcess, Runner, kind_of, load
from mha_conformance.impls.adapter import Adapter, refusal
from mha_conformance.tolerance import DEFAULT_K, Verdict
from mha_conformance.vectors import golden


@dataclass
class CheckRecord:
    """What a check found, filled in as it goes so a failure still leaves its figures."""

    verdicts: list[Verdict] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    #: An advisory check's failure, reported as a finding rather than failing the test.
    finding: str = ""


@dataclass(frozen=True)
class Run:
    """One call of the adapter a check needs: an operation on a case (a property may run a
    transformed copy) with its runtime inputs (None: the case's own)."""

    op: str
    case: golden.GoldenCase
    inputs: Mapping[str, np.ndarray] | None = None
    #: What the check needs to remember about this run (a property's compared rows, say).
    note: Any = None


@dataclass(frozen=True)
class Expected:
    """What one tensor of a result must be: its shape, and whether the result must hold it."""

    shape: tuple[int, ...]
    required: bool = True


class Check:
    """What one kind of check does; :func:`run_check` does everything around it."""

    #: The check's name (test ids, reports, divergence patterns).
    name: str = ""
    #: ``-k`` selecting its tests, for reproduce lines.
    selector: str = ""
    #: Why a conforming implementation may fail it: an advisory probe ("" = a conformance check).
    advisory: str = ""

    def applies(self, spec: Mapping[str, Any]) -> bool:
        """Whether the check has anything to say about a case of this spec."""
        return True

    def runs(self, case: golden.GoldenCase, dtype: str) -> list[Run]:
        raise NotImplementedError

    def expected(self, case: golden.GoldenCase, run: Run) -> dict[str, Expected]:
        """Every tensor a result of ``run`` may hold, with its shape."""
        raise NotImplementedError

    def extra(self, case: golden.GoldenCase, run: Run, names: set[str]) -> list[str]:
        """Problems with keys the result holds but the check does not expect: each is one (a
        misspelt name, or a tensor nobody would judge, must not pass unnoticed)."""
        allowed = ", ".join(self.expected(case, run))
        return [
            f"unexpected {n!r} in the result (this check reads {allowed} and meta)" for n in sorted(names)
        ]

    def judge(
        self, case: golden.GoldenCase, runs: list[Run], results: list[dict[str, Any]], dtype: str, k: float
    ) -> tuple[list[Verdict], str]:
        """The verdicts, and a headline for a failure (what went wrong, before the figures)."""
        raise NotImplementedError

    def what(self) -> str:
        """How a failure names the check after the case (e.g. ", property head-permutation")."""
        return ""

    def on(
        self,
        adapter: Adapter,
        case_id: str,
        dtype: str,
        device: str,
        k: float = DEFAULT_K,
        record: CheckRecord | None = None,
        runner: Runner | None = None,
        root: Path = golden.VECTORS_DIR,
    ) -> CheckRecord:
        """This check of ``adapter`` on the golden case ``case_id``, from Python (for
        ``parametrize_with_cases`` and tests): :func:`run_check` on the loaded case."""
        __tracebackhide__ = True
        return run_check(self, adapter, load(case_id, root), dtype, device, k=k, runner=runner, record=record)


def reproduce_line(
    check: Check, adapter: str, device: str, dtype: str, case_id: str, k: float = DEFAULT_K
) -> str:
    """The command that runs just this check again, installed or in a checkout."""
    k_arg = "" if k == DEFAULT_K else f" --k-factor {k:g}"
    return (
        f"python -m mha_conformance -k '{check.selector}' --adapter {adapter} --device {device} "
        f"--dtype {dtype} --case {case_id}{k_arg}"
    )


def forward_shapes(spec: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shapes of a forward result: ``output`` [B, Tq, d_out], ``attn_weights`` [B, H, Tq, Tk]."""
    b, tq, tk, h = spec["batch"], spec["q_len"], spec["kv_len"], spec["num_heads"]
    return {"output": (b, tq, spec["d_out"]), "attn_weights": (b, h, tq, tk)}


def output_problems(result: Any, spec: Mapping[str, Any], dtype: str) -> list[str]:
    """The guard for a forward result read only for its ``output`` (probes, the benchmarks' gate)."""
    return problems_in(result, {"output": Expected(forward_shapes(spec)["output"])}, dtype)


def problems_in(result: Any, expected: Mapping[str, Expected], dtype: str) -> list[str]:
    """The one guard in front of any arithmetic on an adapter's result (checks, probes, the
    benchmarks' correctness gate): a mapping whose expected tensors are NumPy arrays of the right
    shape and dtype, every required one present. Only reads attributes: nothing is converted."""
    if not isinstance(result, Mapping):
        what = "None" if result is None else f"a {kind_of(result)}"
        return [f"the adapter returned {what}, not a dict"]
    problems = []
    for name, want in expected.items():
        if name not in result:
            if want.required:
                problems.append(
                    f"'{name}' is missing from the result (keys: {', '.join(sorted(map(str, result))) or 'none'})"
                )
            continue
        value = result[name]
        if not isinstance(value, np.ndarray):
            problems.append(
                f"'{name}' is a {kind_of(value)}, not a numpy.ndarray; convert it (e.g. tensor.cpu().numpy())"
            )
        elif value.shape != want.shape:
            problems.append(f"{name}: shape {list(value.shape)}, expected {list(want.shape)}")
        elif value.dtype != np.dtype(NUMPY_DTYPES[dtype]):
            problems.append(f"{name}: dtype {value.dtype}, expected {dtype}")
    return problems


def result_problems(
    check: Check, case: golden.GoldenCase, run: Run, result: Mapping[str, Any], dtype: str
) -> list[str]:
    """The guard as a check applies it: :func:`problems_in`, and nothing unexpected (the check's
    :meth:`Check.extra`)."""
    expected = check.expected(case, run)
    problems = problems_in(result, expected, dtype)
    unexpected = {n for n in result if n != "meta"} - set(expected)
    return problems + check.extra(case, run, unexpected)


def run_check(
    check: Check,
    adapter: Adapter,
    case: golden.GoldenCase,
    dtype: str,
    device: str,
    *,
    k: float = DEFAULT_K,
    runner: Runner | None = None,
    record: CheckRecord | None = None,
    strict: bool = False,
    reproduce: str | None = None,
) -> CheckRecord:
    """Run ``check`` of ``adapter`` on ``case``: a skip with the reason it cannot run here, an
    AssertionError naming what differs and how to reproduce it, a finding for an advisory check
    (unless ``strict``), or the record of a pass. ``reproduce`` replaces the reproduce line (a
    drawn spec is reproduced by its spec, not by a case id)."""
    __tracebackhide__ = True  # a failure shows its message, not the skeleton's frames
    record = record if record is not None else CheckRecord()
    reason = refusal(adapter, case.spec, dtype, device)
    if reason:
        pytest.skip(reason)
    where = (
        f"{adapter.name} on {device} in {dtype}, case {case.id} ({case.spec['description']}){check.what()}"
    )
    repro = "Reproduce: " + (reproduce or reproduce_line(check, adapter.name, device, dtype, case.id, k))

    def fail(headline: str, lines: list[str]) -> CheckRecord:
        __tracebackhide__ = True
        message = "\n".join([f"{where}: {headline}", *(f"  {line}" for line in lines), repro])
        if check.advisory and not strict:
            record.finding = f"advisory finding ({check.advisory}): {message}"
            return record
        raise AssertionError(message)

    runs = check.runs(case, dtype)
    results = []
    for run in runs:
        ex = (runner or InProcess()).execute(adapter, run.case, dtype, device, run.op, run.inputs)
        if ex.status == "skip":
            pytest.skip(ex.message)
        if ex.status != "ok":
            record.meta["problem"] = ex.status
            return fail(ex.message, [])
        record.meta.update(ex.result.get("meta", {}))
        problems = result_problems(check, case, run, ex.result, dtype)
        if problems:
            record.meta["problem"] = "bad-result"
            return fail("the result is malformed", problems)
        results.append(ex.result)
    record.meta.setdefault("device_name", adapter.device_name(device))
    verdicts, headline = check.judge(case, runs, results, dtype, k)
    record.verdicts.extend(verdicts)
    failed = [v for v in verdicts if not v.passed]
    if failed:
        return fail(headline, [v.describe() for v in failed])
    return record
