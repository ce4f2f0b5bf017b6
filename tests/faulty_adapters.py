"""Adapters that misbehave in every ordinary way the harness must survive, and one that behaves.

Each faulty adapter is a correct float64 NumPy attention (the reference, in every mode the suite
calls: forward, backward and token-by-token decoding) whose every result, in every mode, goes
through one fault: it raises, spoils the result (NaN, Inf, wrong shape or dtype, a list, None, a
missing or extra key, a 0-d array, an object whose ``__array__`` raises), changes the caller's
inputs in place, hangs, exits, segfaults or exhausts memory. ``tests/test_reliability.py`` runs
them all through every check kind with ``--adapter tests.faulty_adapters:<Class>``.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np

from mha_conformance.impls import reference
from mha_conformance.impls.adapter import ALL_DTYPES, Adapter, Arrays, Prepared, Result, Spec
from tests.loop_impls import per_head


def good(case, spec, dtype, device):
    """A correct adapter written independently of the reference (head by head, explicit loops),
    for every variant of contract v2."""
    f64 = {k: v if v.dtype == np.bool_ else v.astype(np.float64) for k, v in case.items()}
    out, _ = per_head(spec, f64)
    return {"output": out.astype(case["query"].dtype)}


good.variants = reference.VARIANTS


def returns_tensor(case, spec, dtype, device):
    import torch

    return {"output": torch.zeros((spec["batch"], spec["q_len"], spec["d_out"]))}


def _f64(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: a if a.dtype == np.bool_ else a.astype(np.float64) for n, a in arrays.items()}


class Faulty(Adapter):
    """The correct attention in every mode; subclasses override :meth:`fault`, which receives each
    result (and the inputs the suite passed) and returns what the adapter hands back."""

    dtypes = ALL_DTYPES
    variants = frozenset(reference.VARIANTS)
    #: How the fault shows, as the test expects to read it in the failure message.
    shows: ClassVar[str] = ""
    #: The fault ends or stops the process: out of scope with --isolation none.
    kills: ClassVar[bool] = False

    def fault(self, result: Result, inputs: dict[str, np.ndarray]) -> Any:
        return result

    @staticmethod
    def main(result: Result) -> str:
        """The tensor a fault strikes: the output, or the query's gradient."""
        return "output" if "output" in result else "grad_query"

    def prepare(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        weights = _f64({n: a for n, a in case.items() if n[:2] in ("w_", "b_")})

        def run(inputs: Arrays) -> Result:
            out = reference.forward({**weights, **_f64(inputs)}, spec).output
            return self.fault({"output": out.astype(inputs["query"].dtype)}, inputs)

        return run

    def prepare_backward(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        weights = _f64({n: a for n, a in case.items() if n[:2] in ("w_", "b_")})

        def run(inputs: Arrays) -> Result:
            given = _f64({n: a for n, a in inputs.items() if n != "grad_output"})
            grads = reference.backward({**weights, **given}, spec, inputs["grad_output"].astype(np.float64))
            return self.fault({n: g.astype(inputs["query"].dtype) for n, g in grads.items()}, inputs)

        return run

    def prepare_decoder(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Callable[[], Prepared]:
        weights = _f64({n: a for n, a in case.items() if n[:2] in ("w_", "b_")})

        def stream() -> Prepared:
            seen: dict[str, list[np.ndarray]] = {"query": [], "key": [], "value": []}

            def step(token: Arrays) -> Result:
                for name in seen:
                    seen[name].append(token[name].astype(np.float64))
                prefix = {n: np.concatenate(a, axis=1) for n, a in seen.items()}
                t = prefix["query"].shape[1]
                if "attn_bias" in case:  # the rows and keys of the tokens so far
                    prefix["attn_bias"] = case["attn_bias"][..., :t, :t].astype(np.float64)
                out = reference.forward({**weights, **prefix}, {**spec, "q_len": t, "kv_len": t}).output
                return self.fault({"output": out[:, -1:].astype(token["query"].dtype)}, token)

            return step

        return stream


class Correct(Faulty):
    """No fault: it runs after the faulty ones and must pass everything."""

    name = "correct"


class Raises(Faulty):
    name = "raises"
    shows = "the adapter raised RuntimeError: kernel launch failed"

    def fault(self, result, inputs):
        raise RuntimeError("kernel launch failed: invalid configuration argument")


class ReturnsNaN(Faulty):
    name = "returns-nan"
    shows = "non-finite value(s)"

    def fault(self, result, inputs):
        result[self.main(result)].flat[0] = np.nan
        return result


class ReturnsInf(Faulty):
    name = "returns-inf"
    shows = "non-finite value(s)"

    def fault(self, result, inputs):
        result[self.main(result)].flat[0] = np.inf
        return result


class WrongShape(Faulty):
    name = "wrong-shape"
    shows = ": shape ["

    def fault(self, result, inputs):
        main = self.main(result)
        result[main] = np.zeros((*result[main].shape, 1), result[main].dtype)
        return result


class WrongDtype(Faulty):
    name = "wrong-dtype"
    shows = ": dtype "

    def fault(self, result, inputs):
        main = self.main(result)
        result[main] = result[main].astype(np.float16 if result[main].dtype != np.float16 else np.float32)
        return result


class ReturnsList(Faulty):
    name = "returns-list"
    shows = "the adapter returned a list, not a dict"

    def fault(self, result, inputs):
        return list(result.values())


class ReturnsNone(Faulty):
    name = "returns-none"
    shows = "the adapter returned None, not a dict"

    def fault(self, result, inputs):
        return None


class MissingKey(Faulty):
    name = "missing-key"
    shows = "is missing from the result"

    def fault(self, result, inputs):
        del result[self.main(result)]
        return result


class ExtraKey(Faulty):
    name = "extra-key"
    shows = "unexpected 'outptu' in the result"

    def fault(self, result, inputs):
        result["outptu"] = result[self.main(result)].copy()
        return result


class ZeroDim(Faulty):
    name = "zero-dim"
    shows = ": shape [], expected"

    def fault(self, result, inputs):
        main = self.main(result)
        result[main] = np.array(1.0, result[main].dtype)
        return result


class ArrayRaises(Faulty):
    """An array-like whose conversion fails: the suite must never try to convert it."""

    name = "array-raises"
    shows = "is a tests.faulty_adapters.Unconvertible, not a numpy.ndarray"

    def fault(self, result, inputs):
        result[self.main(result)] = Unconvertible()
        return result


class Unconvertible:
    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise RuntimeError("device memory was freed")

    def __len__(self) -> int:
        raise RuntimeError("device memory was freed")


class MutatesInputs(Faulty):
    name = "mutates-inputs"
    shows = "the adapter changed its input 'query' in place"

    def fault(self, result, inputs):
        inputs["query"][...] = 0  # type: ignore[index]
        return result


class Garbage(Faulty):
    """Writes garbage, frame-like bytes included, to stdout and stderr, then returns a correct
    result: harmless, so its tests pass (the worker's protocol has its own descriptor)."""

    name = "garbage"

    def fault(self, result, inputs):
        junk = b"\x00\x00\x00\x00\x00\x00\x00\x10{not a frame}\xff\xfe garbage \x1b[31m"
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
            os.write(stream.fileno(), junk * 64)
        print("garbage" * 100, flush=True)
        return result


class Hangs(Faulty):
    name = "hangs"
    shows = "the adapter call did not finish within"
    kills = True

    def fault(self, result, inputs):
        time.sleep(3600)


class Exits(Faulty):
    name = "exits"
    shows = "worker process died with exit code 3"
    kills = True

    def fault(self, result, inputs):
        os._exit(3)


class Segfaults(Faulty):
    name = "segfaults"
    shows = "worker process died with signal SIGSEGV"
    kills = True

    def fault(self, result, inputs):
        os.kill(os.getpid(), signal.SIGSEGV)


class OutOfMemory(Faulty):
    """A real allocation failure under an address-space limit, lifted again afterwards."""

    name = "out-of-memory"
    shows = "the adapter raised MemoryError"

    def fault(self, result, inputs):
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, hard))
        try:
            hog = np.ones((1 << 40) // 8)  # 1 TiB
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        result[self.main(result)] = hog
        return result


FAULTY: tuple[type[Faulty], ...] = (
    Raises,
    ReturnsNaN,
    ReturnsInf,
    WrongShape,
    WrongDtype,
    ReturnsList,
    ReturnsNone,
    MissingKey,
    ExtraKey,
    ZeroDim,
    ArrayRaises,
    MutatesInputs,
    Garbage,
    Hangs,
    Exits,
    Segfaults,
    OutOfMemory,
)


class HangsInPrepare(Faulty):
    """Hangs while building its module (startup), not in the call."""

    name = "hangs-in-prepare"

    def prepare(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        time.sleep(3600)
        raise AssertionError("unreachable")


#: Markup an adapter controls (its name, its exception messages, its meta) that must stay text.
PAYLOADS = {
    "name": "<img src=x onerror=alert(1)>",
    "message": "</script><script>window.__xss = 'message'</script>",
    "meta": "<img src=x onerror=\"window.__xss = 'meta'\">",
}


class Hostile(Faulty):
    """Correct on every case but ``bias_none``, where it raises with markup in the message; its
    name and its meta are markup too."""

    name = PAYLOADS["name"]

    def prepare(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        correct = super().prepare(case, spec, dtype, device)

        def run(inputs: Arrays) -> Result:
            if spec["id"] == "bias_none":
                raise RuntimeError(PAYLOADS["message"])
            return {**correct(inputs), "meta": {"kernel": PAYLOADS["meta"]}}

        return run


class HugeMessage(Faulty):
    """Raises with a 10 MB message."""

    name = "huge-message"

    def fault(self, result, inputs):
        raise RuntimeError("x" * (10 << 20))


class Slow(Faulty):
    """Correct, and a quarter of a second per call: a run long enough to interrupt. With
    ``MHA_SLOW_CALLS`` set, each finished call appends a line to that file (what a test waits on)."""

    name = "slow"

    def fault(self, result, inputs):
        time.sleep(0.25)
        log = os.environ.get("MHA_SLOW_CALLS")
        if log:
            with open(log, "a") as calls:
                calls.write("call\n")
        return result
