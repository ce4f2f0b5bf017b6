"""Running one adapter on one golden case and judging what comes back.

Used by the suite (``conformance/test_golden.py``) and by third parties through
``conformance.parametrize_with_cases``. Unsupported means ``pytest.skip`` with the reason;
a wrong result means ``AssertionError`` with the figures and a line that reproduces it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from conformance.tolerance import DEFAULT_K, Verdict, judge
from conformance.worker import Execution
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
def load(case_id: str, root: Path = golden.VECTORS_DIR) -> golden.GoldenCase:
    """A validated golden case, read once per process."""
    return golden.load_case(case_id, root)


def cast_inputs(case: golden.GoldenCase, dtype: str) -> dict[str, np.ndarray]:
    """Inputs and weights in ``dtype`` (exact: the stored values are representable); mask stays bool."""
    return {
        name: arr if arr.dtype == np.bool_ else arr.astype(NUMPY_DTYPES[dtype])
        for name, arr in case.inputs().items()
    }


def reproduce_line(
    adapter: str,
    device: str,
    dtype: str,
    case_id: str,
    k: float = DEFAULT_K,
    test: str = "conformance/test_golden.py",
) -> str:
    """The command that runs just this check again (``test``: the test module and any ``-k``)."""
    k_arg = "" if k == DEFAULT_K else f" --k-factor {k:g}"
    return (
        f"python -m pytest {test} --adapter {adapter} --device {device} --dtype {dtype} "
        f"--case {case_id}{k_arg}"
    )


@dataclass
class CheckRecord:
    """What a check found, filled in as it goes so a failure still leaves its figures."""

    verdicts: list[Verdict] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)


_prepared: OrderedDict[tuple, Any] = OrderedDict()


def prepared(adapter: Adapter, case: golden.GoldenCase, dtype: str, device: str, op: str = "forward"):
    """The adapter's prepared callable for (case, dtype, device) and op (``forward`` or
    ``backward``), built once and cached."""
    key = (id(adapter), case.id, dtype, device, op)
    if key in _prepared:
        _prepared.move_to_end(key)
        return _prepared[key]
    build = {
        "forward": adapter.prepare,
        "backward": adapter.prepare_backward,
        "decode": adapter.prepare_decoder,
    }[op]
    fn = build(cast_inputs(case, dtype), case.spec, dtype, device)
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


def _result_problem(result: Any, op: str = "forward") -> str | None:
    wanted = "grad_<name> arrays" if op == "backward" else "'output'"
    if result is None:
        return f"the adapter returned None; return a dict with {wanted}"
    if not isinstance(result, dict):
        return f"the adapter returned a {type(result).__name__}; return a dict with {wanted}"
    if op != "backward" and "output" not in result:
        return f"the adapter's result has no 'output' (keys: {sorted(result)})"
    for name in judged_names(result, op):
        if not isinstance(result[name], np.ndarray):
            kind = f"{type(result[name]).__module__}.{type(result[name]).__name__}"
            return f"'{name}' is a {kind}, not a numpy.ndarray; convert it (e.g. tensor.cpu().numpy())"
    return None


def judged_names(result: dict[str, Any], op: str) -> list[str]:
    """The arrays a result holds for judging: output/attn_weights, or grad_* for backward."""
    if op != "backward":
        return [n for n in JUDGED if n in result]
    return [n for n in result if n.startswith("grad_")]


def runtime_inputs(case: golden.GoldenCase, dtype: str, op: str = "forward") -> dict[str, np.ndarray]:
    """What a prepared callable receives: query/key/value/mask (and grad_output for backward)."""
    cast = cast_inputs(case, dtype)
    if op == "backward":
        cast["grad_output"] = case.tensors["grad_output"].astype(NUMPY_DTYPES[dtype])
    return {n: a for n, a in cast.items() if n in RUNTIME_INPUTS or n == "grad_output"}


def decode_tokens(new_stream: Any, inputs: dict[str, np.ndarray]) -> Any:
    """Feed a decoder one token at a time: token t's query, key and value, against everything
    the adapter cached so far; return the outputs stacked like a full pass's."""
    step = new_stream()  # a fresh cache for every run
    outputs, meta = [], {}
    for t in range(inputs["query"].shape[1]):
        result = step({n: inputs[n][:, t : t + 1] for n in ("query", "key", "value")})
        problem = _result_problem(result)
        if problem:
            return result  # reported as a bad result by the caller
        outputs.append(result["output"])
        meta.update(result.get("meta") or {})  # what ran (kernel, provider), as the steps report it
    return {"output": np.concatenate(outputs, axis=1), "meta": {**meta, "steps": str(len(outputs))}}


def execute(
    adapter: Adapter,
    case: golden.GoldenCase,
    dtype: str,
    device: str,
    op: str = "forward",
    inputs: dict[str, np.ndarray] | None = None,
) -> Execution:
    """Prepare (once) and run the adapter on a case's runtime inputs (or on ``inputs``, e.g.
    transformed ones for a property check), in this process.

    Whatever the adapter does comes back as an Execution: its result, a skip for
    NotImplementedError, or the exception or malformed result it produced.
    """
    runtime = runtime_inputs(case, dtype, op) if inputs is None else inputs
    try:
        built = prepared(adapter, case, dtype, device, op)
        result = decode_tokens(built, runtime) if op == "decode" else built(runtime)
    except NotImplementedError as exc:
        return Execution("skip", message=f"{adapter.name}: {exc}")
    except Exception as exc:
        import traceback

        frames = "".join(traceback.format_exception(exc, limit=-3)).rstrip()
        return Execution("error", message=f"the adapter raised {type(exc).__name__}: {exc}\n{frames}")
    problem = _result_problem(result, op)
    if problem:
        return Execution("bad-result", message=problem)
    meta = {str(a): str(b) for a, b in (result.get("meta") or {}).items()}
    return Execution("ok", {**{n: result[n] for n in judged_names(result, op)}, "meta": meta})


class InProcess:
    """Runs adapters in the test process (no protection against crashes or hangs)."""

    def execute(self, adapter: Adapter, case: golden.GoldenCase, dtype: str, device: str, op: str = "forward",
                inputs: dict[str, np.ndarray] | None = None) -> Execution:  # fmt: skip
        return execute(adapter, case, dtype, device, op, inputs)


class Isolated:
    """Runs adapters in a worker process (``conformance/worker.py``) when they can be
    re-created there from a reference; adapters given as Python objects run in-process."""

    def __init__(self, worker) -> None:
        self.worker = worker

    def execute(self, adapter: Adapter, case: golden.GoldenCase, dtype: str, device: str, op: str = "forward",
                inputs: dict[str, np.ndarray] | None = None) -> Execution:  # fmt: skip
        ref = getattr(adapter, "ref", None)
        if ref is None:
            return execute(adapter, case, dtype, device, op, inputs)
        return self.worker.execute(ref, case, dtype, device, op, inputs)


def load_supported(
    adapter: Adapter, case_id: str, dtype: str, device: str, root: Path = golden.VECTORS_DIR
) -> golden.GoldenCase:
    """The golden case, or a skip with the reason ``adapter`` cannot run it here: every check's
    first step."""
    case = load(case_id, root)
    reason = unsupported(adapter, case, dtype, device)
    if reason:
        pytest.skip(reason)
    return case


def judge_golden(actual: Any, case: golden.GoldenCase, name: str, dtype: str, k: float) -> Verdict:
    """``actual`` against the case's golden tensor ``name``, with the case's baseline for ``dtype``
    and its error scale: the one rule (``conformance/tolerance.py``) every check applies."""
    return judge(
        actual, case.tensors[name], tensor=name, dtype=dtype, baseline=case.baseline[dtype][name],
        error_scale=case.baseline["error_scale"][name], k=k,
    )  # fmt: skip


def check_golden(
    adapter: Adapter,
    case_id: str,
    dtype: str,
    device: str,
    k: float = DEFAULT_K,
    record: CheckRecord | None = None,
    runner: InProcess | Isolated | None = None,
    root: Path = golden.VECTORS_DIR,
) -> CheckRecord:
    """Run ``adapter`` on a golden case and judge ``output`` (and ``attn_weights`` if returned)."""
    record = record if record is not None else CheckRecord()
    case = load_supported(adapter, case_id, dtype, device, root)
    ex = (runner or InProcess()).execute(adapter, case, dtype, device)
    if ex.status == "skip":
        pytest.skip(ex.message)
    where = f"{adapter.name} on {device} in {dtype}, case {case_id} ({case.spec['description']})"
    repro = f"Reproduce: {reproduce_line(adapter.name, device, dtype, case_id, k)}"
    if ex.status != "ok":
        record.meta["problem"] = ex.status
        raise AssertionError(f"{where}: {ex.message}\n{repro}")
    record.meta["device_name"] = adapter.device_name(device)
    record.meta.update(ex.result.get("meta", {}))
    for name in JUDGED:
        if name in ex.result:
            record.verdicts.append(judge_golden(ex.result[name], case, name, dtype, k))
    failed = [v for v in record.verdicts if not v.passed]
    if failed:
        lines = "\n".join(f"  {v.describe()}" for v in failed)
        raise AssertionError(f"{where}:\n{lines}\n{repro}")
    return record
