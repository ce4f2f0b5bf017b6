"""One conformance run's state: the adapters, the cases (loaded once, in one form from load to
verdict), the runner, every test's parameters and every test's record."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from mha_conformance.checks import CHECKS
from mha_conformance.checks.skeleton import CheckRecord, run_check
from mha_conformance.execution.harness import InProcess, Isolated, Runner
from mha_conformance.execution.worker import Worker
from mha_conformance.impls import registry
from mha_conformance.impls.adapter import Adapter
from mha_conformance.results import report
from mha_conformance.vectors import golden


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
        self.k = option("--k-factor")
        # pytest's own --strict (strict mode) also turns the advisory probes' findings into failures.
        self.strict = bool(option("strict", False))
        self.device = option("--device")
        self.dtypes: list[str] = option("--dtype")
        self.started = datetime.now(timezone.utc)
        self.records: dict[str, report.TestRecord] = {}
        self.not_installed: list[str] = []
        self.adapters = self.resolve(option("--adapter"))
        self.by_name: dict[str, Adapter] = {a.name: a for a in self.adapters}
        self.vectors: Path = option("--vectors")
        self.cases: dict[str, golden.GoldenCase] = self.load_cases(option("--case") or ["*"])
        self.worker: Worker | None = None
        self.runner: Runner = InProcess()
        if option("--isolation") == "process":
            self.worker = Worker(option("--case-timeout"))
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

    def load_cases(self, globs: Sequence[str]) -> dict[str, golden.GoldenCase]:
        """Every selected case, validated now: bad vectors stop the run before any adapter runs."""
        try:
            manifest = golden.read_manifest(self.vectors)
            ids = [c for c in manifest["cases"] if any(fnmatchcase(c, g) for g in globs)]
            cases = {c: golden.load_case(c, self.vectors, manifest) for c in ids}
        except golden.VectorError as exc:
            raise pytest.UsageError(f"golden vectors: {exc}") from None
        if not cases:
            raise pytest.UsageError(f"--case {list(globs)} matches no case id; see vectors/MANIFEST.json")
        return cases

    def devices(self, adapter: Adapter) -> list[str]:
        if self.device != "all":
            return [self.device]
        return ["cpu"] if adapter.missing() else adapter.devices()

    def params(self, checks: Sequence[str]) -> list[Any]:
        """Every (check, adapter, device, dtype, case) the checks apply to, declared divergences as xfail."""
        out = []
        for name in checks:
            check = CHECKS[name]
            for adapter in self.adapters:
                for device in self.devices(adapter):
                    for case in self.cases.values():
                        if not check.applies(case.spec):
                            continue
                        listed = [d for d in case.spec["dtypes"] if d in adapter.dtypes]
                        for dtype in self.dtypes or listed:
                            target = Target(name, adapter.name, device, dtype, case.id)
                            # An advisory probe reports a finding rather than failing: nothing to declare.
                            advisory = check.advisory and not self.strict
                            reason = None if advisory else adapter.divergence(name, case.spec, dtype, device)
                            marks = [pytest.mark.xfail(reason=f"declared divergence: {reason}", strict=False)]
                            out.append(pytest.param(target, id=target.id, marks=marks if reason else []))
        return out

    def run(self, target: Target, record: CheckRecord) -> CheckRecord:
        """Run one test's check through the skeleton."""
        __tracebackhide__ = True
        return run_check(
            CHECKS[target.check],
            self.by_name[target.adapter],
            self.cases[target.case],
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
