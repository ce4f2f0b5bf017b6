"""Running one adapter on one golden case and judging what comes back.

Used by the suite (``conformance/test_golden.py``) and by third parties through
``conformance.parametrize_with_cases``. Unsupported means ``pytest.skip`` with the reason;
a wrong result means ``AssertionError`` with the figures and a line that reproduces it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from conformance.tolerance import DEFAULT_K, Verdict, judge
from impls.adapter import RUNTIME_INPUTS, Adapter
from vectors import golden

NUMPY_DTYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
}
JUDGED = ("output", "attn_weights")
#: Prepared modules kept per process; each is reused for every check on its (case, dtype, device).
PREPARED_CACHE_SIZE = 8


@cache
def load(case_id: str) -> golden.GoldenCase:
    """A validated golden case, read once per process."""
    return golden.load_case(case_id)


def cast_inputs(case: golden.GoldenCase, dtype: str) -> dict[str, np.ndarray]:
    """Inputs and weights in ``dtype`` (exact: the stored values are representable); mask stays bool."""
    return {
        name: arr if arr.dtype == np.bool_ else arr.astype(NUMPY_DTYPES[dtype])
        for name, arr in case.inputs().items()
    }


def reproduce_line(adapter: str, device: str, dtype: str, case_id: str, k: float = DEFAULT_K) -> str:
    k_arg = "" if k == DEFAULT_K else f" --k-factor {k:g}"
    return (
        f"python -m pytest conformance --adapter {adapter} --device {device} --dtype {dtype} "
        f"--case {case_id}{k_arg}"
    )


@dataclass
class CheckRecord:
    """What a check found, filled in as it goes so a failure still leaves its figures."""

    verdicts: list[Verdict] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)


_prepared: OrderedDict[tuple, Any] = OrderedDict()


def prepared(adapter: Adapter, case: golden.GoldenCase, dtype: str, device: str):
    """The adapter's prepared callable for (case, dtype, device), built once and cached."""
    key = (id(adapter), case.id, dtype, device)
    if key in _prepared:
        _prepared.move_to_end(key)
        return _prepared[key]
    fn = adapter.prepare(cast_inputs(case, dtype), case.spec, dtype, device)
    _prepared[key] = fn
    while len(_prepared) > PREPARED_CACHE_SIZE:
        _prepared.popitem(last=False)
    return fn


def unsupported(adapter: Adapter, case: golden.GoldenCase, dtype: str, device: str) -> str | None:
    """Why this (adapter, case, dtype, device) cannot run here, else None."""
    return (
        adapter.missing()
        or adapter.device_unavailable(device)
        or (None if dtype in case.spec["dtypes"] else f"case {case.id} does not list {dtype}")
        or (None if dtype in adapter.dtypes else f"{adapter.name} does not support {dtype}")
        or adapter.supports(case.spec, dtype, device)
    )


def _result_problem(result: Any) -> str | None:
    if result is None:
        return "the adapter returned None; return a dict with at least 'output'"
    if not isinstance(result, dict):
        return f"the adapter returned a {type(result).__name__}; return a dict with at least 'output'"
    if "output" not in result:
        return f"the adapter's result has no 'output' (keys: {sorted(result)})"
    for name in JUDGED:
        if name in result and not isinstance(result[name], np.ndarray):
            kind = f"{type(result[name]).__module__}.{type(result[name]).__name__}"
            return f"'{name}' is a {kind}, not a numpy.ndarray; convert it (e.g. tensor.cpu().numpy())"
    return None


def check_golden(
    adapter: Adapter,
    case_id: str,
    dtype: str,
    device: str,
    k: float = DEFAULT_K,
    record: CheckRecord | None = None,
) -> CheckRecord:
    """Run ``adapter`` on a golden case and judge ``output`` (and ``attn_weights`` if returned)."""
    record = record if record is not None else CheckRecord()
    case = load(case_id)
    reason = unsupported(adapter, case, dtype, device)
    if reason:
        pytest.skip(reason)
    runtime = {n: a for n, a in cast_inputs(case, dtype).items() if n in RUNTIME_INPUTS}
    try:
        result = prepared(adapter, case, dtype, device)(runtime)
    except NotImplementedError as exc:
        pytest.skip(f"{adapter.name}: {exc}")
    where = f"{adapter.name} on {device} in {dtype}, case {case_id} ({case.spec['description']})"
    repro = f"Reproduce: {reproduce_line(adapter.name, device, dtype, case_id, k)}"
    problem = _result_problem(result)
    if problem:
        raise AssertionError(f"{where}: {problem}\n{repro}")
    record.meta["device_name"] = adapter.device_name(device)
    record.meta.update({str(a): str(b) for a, b in (result.get("meta") or {}).items()})
    for name in JUDGED:
        if name in result:
            record.verdicts.append(
                judge(
                    result[name],
                    case.tensors[name],
                    tensor=name,
                    dtype=dtype,
                    baseline=case.baseline[dtype][name],
                    error_scale=case.baseline["error_scale"][name],
                    k=k,
                )  # fmt: skip
            )
    failed = [v for v in record.verdicts if not v.passed]
    if failed:
        lines = "\n".join(f"  {v.describe()}" for v in failed)
        raise AssertionError(f"{where}:\n{lines}\n{repro}")
    return record
