"""The adapter contract: how an implementation of attention meets the conformance suite.

Two forms, both first-class (README, "Writing an adapter"):

* **A function** ``fn(case, spec, dtype, device) -> dict``. ``case`` holds the golden
  inputs and weights (names as in the vector contract) already cast to ``dtype``
  (bfloat16 as ml_dtypes arrays; ``mask`` stays bool); ``spec`` is the case's spec dict.
  The result has ``output`` and optionally ``attn_weights`` ([B, H, Tq, Tk]) as NumPy
  arrays in ``dtype``, and optionally ``meta`` (a dict of strings, e.g. the kernel that
  ran). Raising ``NotImplementedError("why")`` means unsupported: a skip with that reason.
  Optional attributes on the function: ``devices``, ``dtypes``, ``divergences``.
* **A class** deriving from :class:`Adapter`, which also states its devices and dtypes,
  prepares a module once per (case, dtype, device) and declares known divergences.

``divergences`` maps a pattern to a reason. The pattern is ``check:case:dtype:device``,
each part an fnmatch glob, trailing parts optional (``"golden:*fully_masked*"``). A
matching test is an expected failure carrying the reason; one that passes is reported.
"""

from __future__ import annotations

import importlib.util
import platform
from collections.abc import Callable, Mapping
from fnmatch import fnmatchcase
from typing import Any, ClassVar

import numpy as np

ALL_DTYPES = ("float64", "float32", "float16", "bfloat16")
#: Runtime inputs an adapter's prepared callable receives; weights are fixed at prepare time.
RUNTIME_INPUTS = ("query", "key", "value", "mask")

Result = dict[str, Any]
Prepared = Callable[[Mapping[str, np.ndarray]], Result]


class Adapter:
    """Base class for the full adapter form. Override :meth:`prepare`; the rest has defaults."""

    name: ClassVar[str] = ""
    #: Importable module the adapter needs (checked without importing it), and the pip extra
    #: that installs it, for the skip message when it is missing.
    framework: ClassVar[str | None] = None
    extra: ClassVar[str | None] = None
    dtypes: ClassVar[tuple[str, ...]] = ALL_DTYPES
    divergences: ClassVar[dict[str, str]] = {}
    #: A sentence for the README's adapter table: what code path this adapter runs.
    path: ClassVar[str] = ""
    #: Devices the adapter can use where present (``devices()`` says which are here).
    device_kinds: ClassVar[tuple[str, ...]] = ("cpu",)

    def missing(self) -> str | None:
        """Why the adapter cannot run at all here (framework not installed), else None."""
        if self.framework and importlib.util.find_spec(self.framework) is None:
            hint = f"pip install '.[{self.extra}]'" if self.extra else f"install {self.framework}"
            return f"{self.framework} is not installed: {hint}"
        return None

    def devices(self) -> list[str]:
        """Devices this adapter can reach on this machine."""
        return ["cpu"]

    def device_unavailable(self, device: str) -> str | None:
        """Why ``device`` cannot be used here, else None."""
        if device in self.devices():
            return None
        return (
            f"{self.name}: device {device!r} is not available on this machine (reachable: {self.devices()})"
        )

    def device_name(self, device: str) -> str:
        """A readable name of the hardware behind ``device``, for reports."""
        return cpu_name() if device == "cpu" else device

    def supports(self, spec: Mapping[str, Any], dtype: str, device: str) -> str | None:
        """Why this case cannot be expressed by the implementation, else None."""
        return None

    def prepare(
        self, case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str, device: str
    ) -> Prepared:
        """Build the module once for (case, dtype, device); return a callable taking the
        runtime inputs (``query key value`` and ``mask``) and returning the result dict."""
        raise NotImplementedError(f"{type(self).__name__}.prepare is not written")

    def bench(self, case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str, device: str):
        """Build once for timing and return an ``impls.bench.Bench`` (closures on device
        tensors, no host copies); NotImplementedError("why") makes the benchmark a skip."""
        raise NotImplementedError(f"{self.name or type(self).__name__} has no timed path (Adapter.bench)")

    def prepare_backward(
        self, case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str, device: str
    ) -> Prepared:
        """Like :meth:`prepare`, for gradients: the callable takes the runtime inputs plus
        ``grad_output`` and returns ``grad_<name>`` arrays (the gradients of
        ``sum(output * grad_output)`` with respect to query, key, value, weights and biases,
        names as in the vector contract). Raise NotImplementedError where the
        implementation cannot differentiate."""
        raise NotImplementedError(f"{self.name} does not compute gradients")

    def prepare_training(
        self, case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str, device: str
    ) -> Prepared:
        """Like :meth:`prepare`, but the module in training mode (dropout ``spec["dropout"]``
        active), for the dropout statistics of the convention probes (``conformance/probes.py``).
        Optional: the golden checks never call it. Raise NotImplementedError where the
        implementation has no training mode."""
        raise NotImplementedError(
            f"{self.name or type(self).__name__} has no training mode (Adapter.prepare_training)"
        )

    def prepare_decoder(
        self, case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str, device: str
    ) -> Callable[[], Prepared]:
        """An incremental (KV-cache) mode, for causal self-attention: return a factory that
        starts a new stream with an empty cache; the stream takes one token's ``query key
        value`` ([B, 1, d]) and returns ``{"output": [B, 1, d_out]}`` for that token, attending
        to every token fed so far. Raise NotImplementedError where there is no such mode."""
        raise NotImplementedError(f"{self.name} has no incremental decoding mode")

    def versions(self) -> dict[str, str]:
        """Framework versions to record in reports."""
        return {}

    def divergence(self, check: str, case_id: str, dtype: str, device: str) -> str | None:
        """The declared reason this test is expected to fail, else None."""
        return match_divergence(self.divergences, check, case_id, dtype, device)


def catalogue_ids(keep: Callable[[dict[str, Any]], bool]) -> list[str]:
    """Ids of the catalogue cases whose spec satisfies ``keep``: for declaring a divergence over
    exactly the cases a cause reaches, so none of them shows as a surprise pass."""
    from vectors.catalogue import CASES

    return [c["id"] for c in CASES if keep(c)]


def cpu_name() -> str:
    """The host CPU's model name."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def match_divergence(
    divergences: Mapping[str, str], check: str, case_id: str, dtype: str, device: str
) -> str | None:
    """The reason of the first ``check:case:dtype:device`` pattern that matches, else None."""
    subject = (check, case_id, dtype, device)
    for pattern, reason in divergences.items():
        parts = pattern.split(":")
        parts += ["*"] * (4 - len(parts))
        if all(fnmatchcase(s, p) for s, p in zip(subject, parts, strict=True)):
            return reason
    return None


class FunctionAdapter(Adapter):
    """The simple form: a plain function, wrapped so the suite treats it like any adapter."""

    def __init__(self, fn: Callable[..., Result], name: str) -> None:
        self.fn = fn
        self.name = name  # type: ignore[misc]  # instance names for function adapters
        self.dtypes = tuple(getattr(fn, "dtypes", ALL_DTYPES))  # type: ignore[misc]
        self.divergences = dict(getattr(fn, "divergences", {}))  # type: ignore[misc]
        self._devices = list(getattr(fn, "devices", ["cpu"]))

    def devices(self) -> list[str]:
        return self._devices

    def prepare(self, case, spec, dtype, device) -> Prepared:
        def run(inputs: Mapping[str, np.ndarray]) -> Result:
            return self.fn({**case, **inputs}, spec, dtype, device)

        return run

    def prepare_backward(self, case, spec, dtype, device) -> Prepared:
        """The simple form's optional backward: ``fn.backward(case, spec, dtype, device)``
        where ``case`` also holds ``grad_output``; returns ``grad_<name>`` arrays."""
        backward = getattr(self.fn, "backward", None)
        if backward is None:
            return super().prepare_backward(case, spec, dtype, device)

        def run(inputs: Mapping[str, np.ndarray]) -> Result:
            return backward({**case, **inputs}, spec, dtype, device)

        return run
