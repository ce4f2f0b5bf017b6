"""The adapter contract: how an implementation of attention meets the conformance suite.

Two forms, both first-class (docs/adapters.md, "Writing an adapter"):

* **A function** ``fn(case, spec, dtype, device) -> dict``. ``case`` holds the golden
  inputs and weights (names as in the vector contract) already cast to ``dtype``
  (bfloat16 as ml_dtypes arrays; ``mask`` stays bool); ``spec`` is the case's spec dict.
  The result has ``output`` and optionally ``attn_weights`` ([B, H, Tq, Tk]) as NumPy
  arrays in ``dtype``, and optionally ``meta`` (a dict of strings, e.g. the kernel that
  ran). Raising ``NotImplementedError("why")`` means unsupported: a skip with that reason.
  Optional attributes on the function: ``devices``, ``dtypes``, ``divergences``, ``variants``.
* **A class** deriving from :class:`Adapter`, which also states its devices and dtypes,
  prepares a module once per (case, dtype, device) and declares known divergences.

``variants`` lists the attention variants of contract v2 the implementation expresses
(``attn_bias``, ``softcap``, ``window``, ``kv_lengths``; impls/reference.py): a case that uses
any other is a skip naming what is missing, so an adapter written for contract v1 keeps passing.

``divergences`` declares where an implementation is known to differ from the reference in
semantics, and why: a list of :class:`Divergence` (a reason, fnmatch globs on the check, case id,
dtype and device, and a predicate on the case's spec), or, in the simple form, a dict from a
pattern ``check:case:dtype:device`` (each part a glob, trailing parts optional) to a reason. A
matching test is an expected failure carrying the reason; one that passes is reported.
"""

from __future__ import annotations

import importlib.util
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, ClassVar

import numpy as np

from mha_conformance.impls.reference import VARIANTS, case_variants

ALL_DTYPES = ("float64", "float32", "float16", "bfloat16")
#: Runtime inputs an adapter's prepared callable receives; weights are fixed at prepare time.
RUNTIME_INPUTS = ("query", "key", "value", "mask", "attn_bias")

Result = dict[str, Any]
Prepared = Callable[[Mapping[str, np.ndarray]], Result]
Spec = Mapping[str, Any]
#: A case's tensors by name (inputs, weights, biases; cast to the dtype under test).
Arrays = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Divergence:
    """A declared semantic divergence: where it shows (globs on the check, case id, dtype and
    device, and a predicate on what the case *is*) and why. Data with a reason, never a looser
    tolerance: a numeric amplification is the tolerance model's business, not a divergence.

    ``upstream`` names a standalone reproducer (``docs/repro/...``) where the difference is not a
    semantic choice but a framework's wrong result that the suite cannot make deterministic (an
    out-of-bounds read, say): declared so that the verdict does not depend on what lies in memory
    next to a tensor, and reported as an upstream bug with its reproducer."""

    reason: str
    check: str = "*"
    case: str = "*"
    dtype: str = "*"
    device: str = "*"
    when: Callable[[Spec], bool] | None = None
    upstream: str = ""

    @property
    def stated(self) -> str:
        """The reason as reported: an upstream bug says so and names its reproducer."""
        return f"upstream bug ({self.upstream}): {self.reason}" if self.upstream else self.reason

    def matches(self, check: str, spec: Spec, dtype: str, device: str) -> bool:
        globs = ((self.check, check), (self.case, spec["id"]), (self.dtype, dtype), (self.device, device))
        return all(fnmatchcase(value, glob) for glob, value in globs) and (
            self.when is None or self.when(spec)
        )

    @classmethod
    def from_pattern(cls, pattern: str, reason: str) -> Divergence:
        """``check:case:dtype:device`` (each part a glob, trailing parts optional)."""
        parts = pattern.split(":") + ["*"] * 3
        return cls(reason, *parts[:4])


Divergences = Sequence[Divergence] | Mapping[str, str]


def has_empty_rows(spec: Spec) -> bool:
    """Some query row has no allowed key (where conventions differ most: zeros, NaN or uniform)."""
    return bool(spec["fully_masked_rows"])


def rule_mask(
    spec: Spec, mask: np.ndarray | None, *, causal: bool = True, window: bool = True, lengths: bool = True
) -> np.ndarray | None:
    """Bool [B|1, H|1, Tq, Tk], True = may attend: the case's mask AND the rules an API without
    them needs folded into its mask: the causal rule, the ``window`` and each batch row's
    ``kv_lengths``, aligned bottom-right to the row's length as the contract says
    (docs/semantics.md#variants). ``causal``, ``window`` or ``lengths`` False leaves that rule to
    the API. None when nothing is masked."""
    b, tq, tk = spec["batch"], spec["q_len"], spec["kv_len"]
    row_lengths = spec.get("kv_lengths")
    left, right = (spec.get("window") or (-1, -1)) if window else (-1, -1)
    causal = causal and spec["causal"]
    exclude = lengths and row_lengths is not None
    if not (causal or exclude or left >= 0 or right >= 0):
        return mask
    ends = np.asarray(row_lengths if row_lengths is not None else [tk] * b)[:, None, None]
    key = np.arange(tk)[None, None, :]
    position = np.arange(tq)[None, :, None] + ends - tq  # query i's position in its row, [B, Tq, 1]
    rule = np.ones((b, tq, tk), bool)
    if exclude:
        rule &= key < ends
    if causal:
        rule &= key <= position
    if left >= 0:
        rule &= key >= position - left
    if right >= 0:
        rule &= key <= position + right
    rule = (rule if row_lengths is not None else rule[:1])[:, None]  # one row serves every batch row
    return rule if mask is None else np.asarray(mask, bool) & rule


def as_divergences(declared: Divergences) -> list[Divergence]:
    """The declared divergences as a list, whether given as Divergence objects or patterns."""
    if isinstance(declared, Mapping):
        return [Divergence.from_pattern(p, r) for p, r in declared.items()]
    return list(declared)


def refusal(adapter: Adapter, spec: Spec, dtype: str, device: str) -> str | None:
    """Why ``adapter`` cannot run ``spec`` in ``dtype`` on ``device`` here, else None: the one rule
    every check, probe, fuzz run and benchmark applies (framework installed, device present, the
    case lists the dtype, the adapter supports it, the adapter can express the case)."""
    listed = spec.get("dtypes")
    return (
        adapter.missing()
        or adapter.device_unavailable(device)
        or (
            f"case {spec['id']} does not list {dtype}" if listed is not None and dtype not in listed else None
        )
        or (None if dtype in adapter.dtypes else f"{adapter.name} does not support {dtype}")
        or unexpressed(adapter, spec)
        or adapter.supports(spec, dtype, device)
    )


def unexpressed(adapter: Adapter, spec: Spec) -> str | None:
    """Why ``adapter`` cannot run a case for the variants it uses, else None."""
    missing = [v for v in case_variants(spec) if v not in adapter.variants]
    if not missing:
        return None
    why = [adapter.cannot_express[v] for v in missing if v in adapter.cannot_express]
    if why:
        return f"{adapter.name}: " + "; ".join(why)
    return (
        f"{adapter.name} does not express {' or '.join(missing)} (case {spec['id']} uses "
        f"{', '.join(case_variants(spec))}; the adapter's `variants` lists {sorted(adapter.variants) or 'none'}; "
        "docs/semantics.md#variants)"
    )


class Adapter:
    """Base class for the full adapter form. Override :meth:`prepare`; the rest has defaults."""

    name: ClassVar[str] = ""
    #: Importable module the adapter needs (checked without importing it), and the pip extra
    #: that installs it, for the skip message when it is missing.
    framework: ClassVar[str | None] = None
    extra: ClassVar[str | None] = None
    dtypes: ClassVar[tuple[str, ...]] = ALL_DTYPES
    #: The contract-v2 variants the implementation expresses (a subset of ``VARIANTS``).
    variants: ClassVar[frozenset[str]] = frozenset()
    #: For a variant it does not express, why (the skip's reason): the API's own limit.
    cannot_express: ClassVar[Mapping[str, str]] = {}
    divergences: ClassVar[Divergences] = ()
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

    def supports(self, spec: Spec, dtype: str, device: str) -> str | None:
        """Why this case cannot be expressed by the implementation, else None."""
        return None

    def prepare(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        """Build the module once for (case, dtype, device); return a callable taking the
        runtime inputs (``query key value``, and ``mask`` and ``attn_bias`` where the case has them)
        and returning the result dict. ``spec`` states the other variants (``softcap``, ``window``,
        ``kv_lengths``)."""
        raise NotImplementedError(f"{type(self).__name__}.prepare is not written")

    def bench(self, case: Arrays, spec: Spec, dtype: str, device: str):
        """Build once for timing and return an ``mha_conformance.impls.bench.Bench`` (closures on device
        tensors, no host copies); NotImplementedError("why") makes the benchmark a skip."""
        raise NotImplementedError(f"{self.name or type(self).__name__} has no timed path (Adapter.bench)")

    def prepare_backward(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        """Like :meth:`prepare`, for gradients: the callable takes the runtime inputs plus
        ``grad_output`` and returns ``grad_<name>`` arrays (the gradients of
        ``sum(output * grad_output)`` with respect to query, key, value, weights and biases,
        names as in the vector contract). Raise NotImplementedError where the
        implementation cannot differentiate."""
        raise NotImplementedError(f"{self.name} does not compute gradients")

    def prepare_training(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        """Like :meth:`prepare`, but the module in training mode (dropout ``spec["dropout"]``
        active), for the dropout statistics of the convention probes (``conformance/probes/conventions.py``).
        Optional: the golden checks never call it. Raise NotImplementedError where the
        implementation has no training mode."""
        raise NotImplementedError(
            f"{self.name or type(self).__name__} has no training mode (Adapter.prepare_training)"
        )

    def prepare_decoder(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Callable[[], Prepared]:
        """An incremental (KV-cache) mode, for causal self-attention: return a factory that
        starts a new stream with an empty cache; the stream takes one token's ``query key
        value`` ([B, 1, d]) and returns ``{"output": [B, 1, d_out]}`` for that token, attending
        to every token fed so far (with the case's softcap and window, and row t of its
        ``attn_bias`` for token t). A case with ``spec["decode_prefill"] = P`` (kernel scale)
        first sends the first P tokens in one call ([B, P, d], causal among themselves: a
        prefill), then one token a call. Raise NotImplementedError where there is no such mode."""
        raise NotImplementedError(f"{self.name} has no incremental decoding mode")

    def versions(self) -> dict[str, str]:
        """Framework versions to record in reports."""
        return {}

    def divergence(self, check: str, spec: Spec, dtype: str, device: str) -> str | None:
        """The declared reason this test is expected to fail, else None."""
        return match_divergence(self.divergences, check, spec, dtype, device)


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


def match_divergence(divergences: Divergences, check: str, spec: Spec, dtype: str, device: str) -> str | None:
    """The reason of the first declared divergence that matches, else None."""
    for divergence in as_divergences(divergences):
        if divergence.matches(check, spec, dtype, device):
            return divergence.stated
    return None


class FunctionAdapter(Adapter):
    """The simple form: a plain function, wrapped so the suite treats it like any adapter."""

    def __init__(self, fn: Callable[..., Result], name: str) -> None:
        self.fn = fn
        self.name = name  # type: ignore[misc]  # instance names for function adapters
        self.dtypes = tuple(getattr(fn, "dtypes", ALL_DTYPES))  # type: ignore[misc]
        self.divergences = as_divergences(getattr(fn, "divergences", {}))  # type: ignore[misc]
        self.variants = frozenset(getattr(fn, "variants", ()))  # type: ignore[misc]
        unknown = sorted(self.variants - set(VARIANTS))
        if unknown:
            raise ValueError(f"adapter {name}: unknown variants {unknown}; the contract has {list(VARIANTS)}")
        self._devices = list(getattr(fn, "devices", ["cpu"]))

    def devices(self) -> list[str]:
        return self._devices

    def prepare(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        def run(inputs: Mapping[str, np.ndarray]) -> Result:
            return self.fn({**case, **inputs}, spec, dtype, device)

        return run

    def prepare_backward(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        """The simple form's optional backward: ``fn.backward(case, spec, dtype, device)``
        where ``case`` also holds ``grad_output``; returns ``grad_<name>`` arrays."""
        backward = getattr(self.fn, "backward", None)
        if backward is None:
            return super().prepare_backward(case, spec, dtype, device)

        def run(inputs: Mapping[str, np.ndarray]) -> Result:
            return backward({**case, **inputs}, spec, dtype, device)

        return run
