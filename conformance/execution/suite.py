"""One conformance run's state: the adapters, the cases (validated at the start, then loaded when
their tests run, in one form from load to verdict), the runner, every test's parameters and
every test's record."""

from __future__ import annotations

import math
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from mha_conformance.checks import CHECKS
from mha_conformance.checks.skeleton import CheckRecord, run_check
from mha_conformance.execution import tiers
from mha_conformance.execution.harness import InProcess, Isolated, Runner
from mha_conformance.execution.worker import Worker
from mha_conformance.impls import cache, registry
from mha_conformance.impls.adapter import Adapter
from mha_conformance.results import report
from mha_conformance.vectors import golden, kernels, materialize

#: Cases whose tensors the suite keeps loaded at once (a property's second run may need another).
CASES_HELD = 2
#: The checks the kernel tier runs: what a kernel computes, at its shapes. The properties (relations
#: between two runs) are semantic and need no kernel-scale case to show.
KERNEL_CHECKS = ("golden", "gradients", "decoding")


def positive(option: str, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise pytest.UsageError(f"{option} must be a positive number (got {value:g}); the default is 2")
    return value


def non_negative(option: str, value: float) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise pytest.UsageError(f"{option} must be a number of seconds >= 0, 0 for no limit (got {value:g})")
    return value


def writable(option: str, path: Path, folder: bool) -> None:
    """Fail now, before any test runs, if the report (or the history folder) cannot be written:
    an hour of results must not be lost at the end."""
    where = path if folder else path.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=where, prefix=".mha-write-check-"):
            pass
        if not folder and path.is_dir():
            raise IsADirectoryError(f"{path} is a directory")
    except OSError as exc:
        raise pytest.UsageError(
            f"{option} {path}: cannot write there ({exc}); choose a writable path"
        ) from None


class Target(NamedTuple):
    """What one test checks: a check of one adapter on one device, dtype and case."""

    check: str
    adapter: str
    device: str
    dtype: str
    case: str

    @property
    def id(self) -> str:
        prefix = "" if self.check == "golden" else f"{self.check}-"
        return f"{prefix}{self.adapter}-{self.device}-{self.dtype}-{self.case}"


class Suite:
    """State of one conformance run, built from the command line's options."""

    def __init__(self, config: pytest.Config) -> None:
        option = config.getoption
        self.k = positive("--k-factor", option("--k-factor"))
        # pytest's own --strict (strict mode) also turns the advisory probes' findings into failures.
        self.strict = bool(option("strict", False))
        self.device = option("--device")
        self.dtypes: list[str] = option("--dtype")
        self.quick: bool = option("--quick")
        kernel = option("--kernel-scale")
        # On a GPU the tiled kernels are what runs: the kernel tier is the default there (unless
        # --case names cases, which then are the committed ones' ids).
        self.kernel: bool = kernel if kernel is not None else self.device == "cuda" and not option("--case")
        self.memory_budget = positive("--memory-budget", option("--memory-budget"))
        #: Where the kernel tier's first use reports its progress (the plugin sets the terminal).
        self.progress: Callable[[str], None] | None = None
        self.started = datetime.now(timezone.utc)
        self.cache_entries = cache.entries()
        self.records: dict[str, report.TestRecord] = {}
        self.not_installed: list[str] = []
        self.adapters = self.resolve(option("--adapter"))
        self.by_name: dict[str, Adapter] = {a.name: a for a in self.adapters}
        self.vectors: Path = option("--vectors")
        timeouts = [non_negative(name, option(name)) for name in ("--case-timeout", "--startup-timeout")]
        for name in ("--report", "--history"):
            if option(name) is not None:
                writable(name, option(name), folder=name == "--history")
        self.manifest: dict[str, Any] = {}
        self.specs: dict[str, dict[str, Any]] = self.validate_cases(option("--case") or ["*"])
        self.loaded: OrderedDict[str, golden.GoldenCase] = OrderedDict()
        self.worker: Worker | None = None
        self.runner: Runner = InProcess()
        if option("--isolation") == "process":
            self.worker = Worker(*timeouts)
            self.runner = Isolated(self.worker)
        self.written: list[Path] = []
        self.write_errors: list[str] = []

    def resolve(self, refs: Sequence[str]) -> list[Adapter]:
        try:
            if refs:
                return registry.resolve(refs)
            every = [registry.builtin(n) for n in registry.BUILTINS]
        except registry.AdapterError as exc:
            raise pytest.UsageError(str(exc)) from None
        self.not_installed = [f"{a.name} ({a.missing()})" for a in every if a.missing()]
        return [a for a in every if not a.missing()]

    def validate_cases(self, globs: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Every selected case, validated now (bad vectors stop the run before any adapter runs);
        only the specs are kept: a case's tensors are loaded when its tests run. The kernel tier's
        cases come from ``vectors/KERNELS.json``, their specs checked against ``vectors/kernels.py``."""
        try:
            if self.kernel:
                return self.kernel_cases(globs)
            self.manifest = golden.read_manifest(self.vectors)
            unmatched = [g for g in globs if not any(fnmatchcase(c, g) for c in self.manifest["cases"])]
            if unmatched:
                raise pytest.UsageError(
                    f"--case {', '.join(repr(g) for g in unmatched)} matches no case id; the ids are "
                    f"the keys of {self.vectors / golden.MANIFEST} (e.g. {next(iter(self.manifest['cases']), '-')})"
                )
            ids = [c for c in self.manifest["cases"] if any(fnmatchcase(c, g) for g in globs)]
            return {c: golden.load_case(c, self.vectors, self.manifest).spec for c in ids}
        except golden.VectorError as exc:
            raise pytest.UsageError(f"golden vectors: {exc}") from None

    def kernel_cases(self, globs: Sequence[str]) -> dict[str, dict[str, Any]]:
        self.manifest = materialize.read_kernel_manifest(self.vectors / materialize.KERNEL_MANIFEST.name)
        catalogue = {c["id"]: c for c in kernels.KERNEL_CASES}
        stale = [
            c
            for c, entry in self.manifest["cases"].items()
            if {k: v for k, v in entry["spec"].items() if k != "fully_masked_rows"} != catalogue.get(c)
        ] + sorted(set(catalogue) - set(self.manifest["cases"]))
        if stale:
            raise golden.VectorError(
                f"vectors/KERNELS.json does not match vectors/kernels.py for {', '.join(stale[:3])}"
                f"{' ...' if len(stale) > 3 else ''}; restore both with `git checkout vectors/` or regenerate "
                "(python -m mha_conformance.vectors generate --kernel)"
            )
        unmatched = [g for g in globs if not any(fnmatchcase(c, g) for c in self.manifest["cases"])]
        if unmatched:
            raise pytest.UsageError(
                f"--case {', '.join(repr(g) for g in unmatched)} matches no kernel-scale case id; the ids are "
                f"the keys of vectors/KERNELS.json (e.g. {next(iter(self.manifest['cases']), '-')})"
            )
        return {
            c: dict(entry["spec"])
            for c, entry in self.manifest["cases"].items()
            if any(fnmatchcase(c, g) for g in globs)
        }

    def materialize_kernel_truths(self) -> None:
        """Compute (or find cached) every selected kernel-scale truth once, before any test runs,
        with a progress line for each computed: xdist workers then read the cache instead of
        computing the same truth side by side (a case the memory budget excludes is left out)."""
        todo = [
            c
            for c, s in self.specs.items()
            if kernels.memory_needed(s, "float64", "golden") <= self.memory_budget
        ]
        say = self.progress
        for n, case_id in enumerate(todo, 1):

            def heard(line: str, n: int = n, case_id: str = case_id) -> None:
                if say:
                    say(f"[{n}/{len(todo)}] {case_id}: computing its float64 truth, {line}")

            try:
                materialize.load_kernel_case(case_id, self.manifest, heard)
            except golden.VectorError as exc:
                raise pytest.UsageError(f"kernel-scale vectors: {exc}") from None

    def case(self, case_id: str) -> golden.GoldenCase:
        """A case's tensors, loaded (and re-verified) when its tests run; the suite keeps the last
        few, and runs each case's tests together (``order``), so memory stays flat."""
        if case_id in self.loaded:
            self.loaded.move_to_end(case_id)
            return self.loaded[case_id]
        if self.kernel:
            say = self.progress
            heard = (lambda line: say(f"{case_id}: computing its float64 truth, {line}")) if say else None
            self.loaded[case_id] = materialize.load_kernel_case(case_id, self.manifest, heard)
        else:
            self.loaded[case_id] = golden.load_case(case_id, self.vectors, self.manifest)
        while len(self.loaded) > CASES_HELD:
            self.loaded.popitem(last=False)
        return self.loaded[case_id]

    def order(self, items: list[pytest.Item]) -> None:
        """Within each test module, every test of one case together (catalogue order), so each
        case is loaded once per module; the modules keep their order."""
        rank = {c: i for i, c in enumerate(self.specs)}

        def key(pair: tuple[int, pytest.Item]) -> tuple[Any, ...]:
            index, item = pair
            params = getattr(item, "callspec", None) and item.callspec.params
            target = (params or {}).get("target")
            case_rank = rank.get(target.case, -1) if isinstance(target, Target) else -1
            return (str(item.path), case_rank, index)

        items[:] = [item for _, item in sorted(enumerate(items), key=key)]

    def devices(self, adapter: Adapter) -> list[str]:
        if self.device != "all":
            return [self.device]
        return ["cpu"] if adapter.missing() else adapter.devices()

    def params(self, checks: Sequence[str]) -> list[Any]:
        """Every (check, adapter, device, dtype, case) the checks apply to, declared divergences as xfail."""
        out = []
        for name in checks:
            if self.kernel and name not in KERNEL_CHECKS:
                continue
            check = CHECKS[name]
            for adapter in self.adapters:
                tests = [
                    (case_id, dtype)
                    for case_id, spec in self.specs.items()
                    if check.applies(spec)
                    for dtype in self.dtypes or [d for d in spec["dtypes"] if d in adapter.dtypes]
                ]
                if self.quick:
                    chosen = tiers.quick(tests, self.specs)
                    tests = [t for t in tests if t in chosen]
                for device in self.devices(adapter):
                    for case_id, dtype in tests:
                        spec = self.specs[case_id]
                        target = Target(name, adapter.name, device, dtype, case_id)
                        # An advisory probe reports a finding rather than failing: nothing to declare.
                        advisory = check.advisory and not self.strict
                        reason = None if advisory else adapter.divergence(name, spec, dtype, device)
                        marks = [pytest.mark.xfail(reason=f"declared divergence: {reason}", strict=False)]
                        out.append(pytest.param(target, id=target.id, marks=marks if reason else []))
        return out

    def run(self, target: Target, record: CheckRecord) -> CheckRecord:
        """Run one test's check through the skeleton (a kernel-scale case past the memory budget is
        a skip that says so)."""
        __tracebackhide__ = True
        if self.kernel:
            needed = kernels.memory_needed(self.specs[target.case], target.dtype, target.check)
            if needed > self.memory_budget:
                pytest.skip(
                    f"case {target.case} needs about {needed:.1f} GB here (its truth and the adapter's "
                    f"score matrices), over the memory budget of {self.memory_budget:g} GB; raise it with "
                    "--memory-budget GB"
                )
        return run_check(
            CHECKS[target.check],
            self.by_name[target.adapter],
            self.case(target.case),
            target.dtype,
            target.device,
            k=self.k,
            runner=self.runner,
            record=record,
            strict=self.strict,
        )

    def adapter_versions(self) -> dict[str, dict[str, str]]:
        versions = {}
        for a in self.adapters:
            info = {"path": a.path}
            if not a.missing():
                info.update(a.versions())
            versions[a.name] = info
        return versions

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
