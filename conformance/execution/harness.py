"""Running an adapter on a golden case: preparing it once, calling it, and catching what it does.

Whatever the adapter does comes back as an :class:`Execution`: its result, a skip (it raised
NotImplementedError), or the exception or malformed result it produced. The checks judge
(``mha_conformance.checks``); this module only runs. :class:`InProcess` runs adapters in the
test process; :class:`Isolated` sends them to a worker process (``execution/worker.py``).
"""

from __future__ import annotations

import traceback
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import ml_dtypes
import numpy as np

from mha_conformance.impls.adapter import RUNTIME_INPUTS, Adapter
from mha_conformance.results.report import clip
from mha_conformance.vectors import golden

NUMPY_DTYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
}
#: What each operation's prepared callable is built by.
BUILDERS: dict[str, Callable[[Adapter], Callable[..., Any]]] = {
    "forward": lambda a: a.prepare,
    "backward": lambda a: a.prepare_backward,
    "decode": lambda a: a.prepare_decoder,
}
#: Longest string kept of one ``meta`` value, and of an adapter's exception message.
META_LIMIT = 1000
META_KEYS = 50
MESSAGE_LIMIT = 4000
#: Prepared modules kept per process; each is reused for every check on its (case, dtype, device).
PREPARED_CACHE_SIZE = 8


@dataclass
class Execution:
    """What running an adapter produced: ``ok`` with a result, ``skip`` with a reason, or a
    problem (``error``, ``bad-result``, ``timeout``, ``crash``) with a message."""

    status: str
    result: dict[str, Any] = field(default_factory=dict)
    message: str = ""


@dataclass(frozen=True)
class NotAnArray:
    """Stands, across the worker's pipe, for a result value that is not a NumPy array (only arrays
    cross it), so the check can still say what the adapter returned."""

    kind: str  # e.g. "torch.Tensor"


def kind_of(value: Any) -> str:
    """A value's type as a user would write it (``torch.Tensor``, ``builtins.list``)."""
    if isinstance(value, NotAnArray):
        return value.kind
    return f"{type(value).__module__}.{type(value).__name__}"


@cache
def load(case_id: str, root: Path = golden.VECTORS_DIR) -> golden.GoldenCase:
    """A validated golden case, read once per process."""
    return golden.load_case(case_id, root)


def cast_inputs(case: golden.GoldenCase, dtype: str) -> dict[str, np.ndarray]:
    """Inputs and weights in ``dtype`` (exact: the stored values are representable); mask stays
    bool. Always fresh copies: what an adapter does to them cannot reach the case."""
    return {
        name: arr.copy() if arr.dtype == np.bool_ else arr.astype(NUMPY_DTYPES[dtype])
        for name, arr in case.inputs().items()
    }


def runtime_inputs(case: golden.GoldenCase, dtype: str, op: str = "forward") -> dict[str, np.ndarray]:
    """What a prepared callable receives: query/key/value/mask (and grad_output for backward)."""
    cast = cast_inputs(case, dtype)
    if op == "backward":
        cast["grad_output"] = case.tensors["grad_output"].astype(NUMPY_DTYPES[dtype])
    return {n: a for n, a in cast.items() if n in RUNTIME_INPUTS or n == "grad_output"}


_prepared: OrderedDict[tuple, Any] = OrderedDict()


def prepared(adapter: Adapter, case: golden.GoldenCase, dtype: str, device: str, op: str = "forward"):
    """The adapter's prepared callable for (case, dtype, device) and op, built once and cached."""
    key = (id(adapter), case.id, dtype, device, op)
    if key in _prepared:
        _prepared.move_to_end(key)
        return _prepared[key]
    fn = BUILDERS[op](adapter)(cast_inputs(case, dtype), case.spec, dtype, device)
    _prepared[key] = fn
    while len(_prepared) > PREPARED_CACHE_SIZE:
        _prepared.popitem(last=False)
    return fn


def decode_tokens(new_stream: Any, inputs: Mapping[str, np.ndarray], prefill: int = 0) -> Any:
    """Feed a decoder one token at a time (after one call with the first ``prefill`` tokens, when
    the case fills its cache that way): each call's query, key and value, against everything the
    adapter cached so far; return the calls' tensors stacked like a full pass's (every key a
    call returned, so the check sees what it did not ask for). A call that returns something
    else is returned as it is, for the check to judge malformed."""
    step = new_stream()  # a fresh cache for every run
    steps, meta = [], {}
    total = inputs["query"].shape[1]
    bounds = ([(0, prefill)] if prefill else []) + [(t, t + 1) for t in range(prefill, total)]
    for start, stop in bounds:
        result = step({n: inputs[n][:, start:stop] for n in ("query", "key", "value")})
        tensors = result if isinstance(result, Mapping) else {}
        arrays = {n: v for n, v in tensors.items() if n != "meta"}
        if not tensors or not all(isinstance(v, np.ndarray) and v.ndim >= 2 for v in arrays.values()):
            return result
        steps.append(arrays)
        meta.update(tensors.get("meta") or {})  # what ran (kernel, provider), as the steps report it
    try:
        stacked = {n: np.concatenate([s[n] for s in steps], axis=1) for n in steps[0]}
    except (KeyError, ValueError):  # steps disagree on their keys or shapes
        return steps[0]
    return {**stacked, "meta": {**meta, "steps": str(len(steps))}}


def failure(adapter: Adapter, exc: BaseException, phase: str) -> Execution:
    """What an exception from the adapter becomes: a skip for NotImplementedError, else an error
    naming the phase (``prepare`` builds the module, ``call`` runs it)."""
    if isinstance(exc, NotImplementedError):
        return Execution("skip", message=f"{adapter.name}: {clip(str(exc), MESSAGE_LIMIT)}")
    frames = clip("".join(traceback.format_exception(exc, limit=-3)).rstrip(), MESSAGE_LIMIT)
    where = " while preparing the module" if phase == "prepare" else ""
    text = clip(str(exc), MESSAGE_LIMIT)
    return Execution("error", message=f"the adapter raised {type(exc).__name__}{where}: {text}\n{frames}")


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality (NaN payloads included, any dtype)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def prepare(
    adapter: Adapter, case: golden.GoldenCase, dtype: str, device: str, op: str = "forward"
) -> Callable[..., Any] | Execution:
    """The startup phase: the adapter's prepared callable (built once, cached), or the Execution
    its failure becomes."""
    try:
        return prepared(adapter, case, dtype, device, op)
    except Exception as exc:
        return failure(adapter, exc, "prepare")


def call(
    adapter: Adapter,
    built: Callable[..., Any],
    case: golden.GoldenCase,
    dtype: str,
    op: str = "forward",
    inputs: Mapping[str, np.ndarray] | None = None,
) -> Execution:
    """The call phase: run a prepared callable on the case's runtime inputs (or on ``inputs``,
    e.g. transformed ones for a property check). The adapter gets its own copies, so it cannot
    change what later tests read; one that changes them in place fails, since a caller's
    arrays are not the callee's to overwrite."""
    given = runtime_inputs(case, dtype, op) if inputs is None else dict(inputs)
    runtime = {n: np.array(a, copy=True) for n, a in given.items()}
    try:
        if op == "decode":
            result = decode_tokens(built, runtime, case.spec.get("decode_prefill") or 0)
        else:
            result = built(runtime)
    except Exception as exc:
        return failure(adapter, exc, "call")
    changed = [n for n, a in runtime.items() if not same_bits(a, np.asarray(given[n]))]
    if changed:
        return Execution(
            "bad-result",
            message=f"the adapter changed its input {', '.join(repr(n) for n in changed)} in place; "
            "an implementation must not overwrite the caller's arrays (copy them first)",
        )
    if not isinstance(result, Mapping):
        what = "None" if result is None else f"a {type(result).__name__}"
        return Execution("bad-result", message=f"the adapter returned {what}, not a dict")
    try:
        given_meta = dict(result.get("meta") or {})
        meta = {str(a)[:100]: str(b)[:META_LIMIT] for a, b in list(given_meta.items())[:META_KEYS]}
    except Exception as exc:
        return Execution("bad-result", message=f"the result's 'meta' is not a dict of strings: {exc!r}")
    return Execution("ok", {**{str(n): v for n, v in result.items() if n != "meta"}, "meta": meta})


def execute(
    adapter: Adapter,
    case: golden.GoldenCase,
    dtype: str,
    device: str,
    op: str = "forward",
    inputs: Mapping[str, np.ndarray] | None = None,
) -> Execution:
    """Prepare (once) and call the adapter, in this process."""
    built = prepare(adapter, case, dtype, device, op)
    if isinstance(built, Execution):
        return built
    return call(adapter, built, case, dtype, op, inputs)


class Runner(Protocol):
    """Where adapters run: in this process, or in a worker process."""

    def execute(
        self,
        adapter: Adapter,
        case: golden.GoldenCase,
        dtype: str,
        device: str,
        op: str = "forward",
        inputs: Mapping[str, np.ndarray] | None = None,
    ) -> Execution: ...


class InProcess:
    """Runs adapters in the test process (no protection against crashes or hangs)."""

    def execute(self, adapter, case, dtype, device, op="forward", inputs=None) -> Execution:
        return execute(adapter, case, dtype, device, op, inputs)


class Isolated:
    """Runs adapters in a worker process when they can be re-created there from a reference
    (``--adapter`` values); adapters given as Python objects run in this process."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker

    def execute(self, adapter, case, dtype, device, op="forward", inputs=None) -> Execution:
        ref = getattr(adapter, "ref", None)
        if ref is None:
            return execute(adapter, case, dtype, device, op, inputs)
        return self.worker.execute(ref, case, dtype, device, op, inputs)
