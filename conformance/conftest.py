"""The conformance suite's options, parametrization, summary table and reports.

``python -m pytest conformance [--adapter NAME ...] [--device cpu|cuda|mps|all]
[--dtype D ...] [--case GLOB ...] [--report PATH] [--history DIR] [--k-factor K]``
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from conformance import registry, report
from conformance.tolerance import DEFAULT_K
from impls.adapter import ALL_DTYPES, Adapter
from vectors import golden

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ("cpu", "cuda", "mps")


class GoldenParam(NamedTuple):
    adapter: str
    device: str
    dtype: str
    case: str

    @property
    def id(self) -> str:
        return f"{self.adapter}-{self.device}-{self.dtype}-{self.case}"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mha-conformance")
    group.addoption("--adapter", action="append", default=[],
                    help="adapter to validate (repeatable): a built-in name or glob, an entry-point name "
                         f"({registry.ENTRY_POINT_GROUP}), or package.module:attr. Default: every built-in "
                         "whose framework is installed")  # fmt: skip
    group.addoption(
        "--device",
        default="cpu",
        choices=[*DEVICES, "all"],
        help="device to run on; 'all' = every device each adapter can reach (default cpu)",
    )
    group.addoption(
        "--dtype",
        action="append",
        default=[],
        choices=ALL_DTYPES,
        help="dtype (repeatable); default: every dtype the case lists that the adapter supports",
    )
    group.addoption("--case", action="append", default=[], help="glob on case ids (repeatable)")
    group.addoption("--report", type=Path, help="write the JSON report here")
    group.addoption("--history", type=Path, help="also write the report into this history folder")
    group.addoption(
        "--k-factor",
        type=float,
        default=DEFAULT_K,
        help="tolerance factor k: error may be k x (precision baseline + floor) (default 2)",
    )


class Suite:
    """State of one conformance run: adapters, parameters and the records of every test."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.k = config.getoption("--k-factor")
        self.started = datetime.now(timezone.utc)
        self.records: dict[str, report.TestRecord] = {}
        self.not_installed: list[str] = []
        refs = config.getoption("--adapter")
        try:
            if refs:
                self.adapters = registry.resolve(refs)
            else:
                every = [registry.builtin(n) for n in registry.BUILTINS]
                self.adapters = [a for a in every if not a.missing()]
                self.not_installed = [f"{a.name} ({a.missing()})" for a in every if a.missing()]
        except registry.AdapterError as exc:
            raise pytest.UsageError(str(exc)) from None
        self.by_name: dict[str, Adapter] = {a.name: a for a in self.adapters}

    def cases(self) -> list[golden.GoldenCase]:
        from conformance.harness import load

        globs = self.config.getoption("--case") or ["*"]
        try:
            ids = [c for c in golden.case_ids() if any(fnmatchcase(c, g) for g in globs)]
            cases = [load(c) for c in ids]
        except golden.VectorError as exc:
            raise pytest.UsageError(f"golden vectors: {exc}") from None
        if not cases:
            raise pytest.UsageError(f"--case {globs} matches no case id; see vectors/MANIFEST.json")
        return cases

    def devices(self, adapter: Adapter) -> list[str]:
        device = self.config.getoption("--device")
        if device != "all":
            return [device]
        return ["cpu"] if adapter.missing() else adapter.devices()

    def params(self) -> list[Any]:
        chosen = self.config.getoption("--dtype")
        out = []
        for adapter in self.adapters:
            for device in self.devices(adapter):
                for case in self.cases():
                    dtypes = chosen or [d for d in case.spec["dtypes"] if d in adapter.dtypes]
                    for dtype in dtypes:
                        p = GoldenParam(adapter.name, device, dtype, case.id)
                        reason = adapter.divergence("golden", case.id, dtype, device)
                        marks = (
                            [pytest.mark.xfail(reason=f"declared divergence: {reason}", strict=False)]
                            if reason
                            else []
                        )
                        out.append(pytest.param(p, id=p.id, marks=marks))
        return out

    def adapter_versions(self) -> dict[str, dict[str, str]]:
        versions = {}
        for a in self.adapters:
            info = {"path": a.path}
            if not a.missing():
                info.update(a.versions())
            versions[a.name] = info
        return versions


def pytest_configure(config: pytest.Config) -> None:
    config.stash[SUITE] = Suite(config)


SUITE = pytest.StashKey[Suite]()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "golden" in metafunc.fixturenames:
        metafunc.parametrize("golden", metafunc.config.stash[SUITE].params())


@pytest.fixture
def suite(request: pytest.FixtureRequest) -> Suite:
    return request.config.stash[SUITE]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    rep = outcome.get_result()
    param = getattr(item, "callspec", None) and item.callspec.params.get("golden")
    if param is None or (rep.when == "setup" and not rep.skipped) or rep.when == "teardown":
        return
    suite = item.config.stash[SUITE]
    rec = suite.records.setdefault(
        item.nodeid,
        report.TestRecord(item.nodeid, "golden", param.adapter, param.device, param.dtype, param.case),
    )
    found = getattr(item, "mha_record", None)
    if found is not None:
        rec.verdicts = [v.as_dict() for v in found.verdicts]
        rec.meta = dict(found.meta)
    rec.duration += rep.duration
    if hasattr(rep, "wasxfail"):
        rec.outcome = "xpassed" if rep.passed else "xfailed"
        rec.reason = rep.wasxfail
    elif rep.skipped:
        rec.outcome = "skipped"
        rec.reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rec.reason = rec.reason.removeprefix("Skipped: ")
    else:
        rec.outcome = rep.outcome
        if rep.failed:
            rec.reason = str(call.excinfo.value) if call.excinfo else str(rep.longrepr)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    suite = config.stash[SUITE]
    records = list(suite.records.values())
    if not records:
        return
    tr = terminalreporter
    tr.section("mha-conformance summary")
    tr.write_line(report.format_table(report.summarize(records), suite.k))
    xpassed = [r for r in records if r.outcome == "xpassed"]
    if xpassed:
        tr.write_line("")
        tr.write_line("Declared divergences that did NOT occur (update the adapter's divergences):")
        for r in xpassed:
            tr.write_line(f"  {r.nodeid}: {r.reason}")
    if suite.not_installed:
        tr.write_line("")
        tr.write_line("Not run (framework not installed): " + "; ".join(suite.not_installed))
    for path in getattr(suite, "written", []):
        tr.write_line(f"JSON report: {path}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    suite = session.config.stash[SUITE]
    records = list(suite.records.values())
    if not records:
        return
    run = {
        "started": suite.started.isoformat(),
        "finished": datetime.now(timezone.utc).isoformat(),
        "commit": report.git_commit(ROOT),
        "k_factor": suite.k,
        "args": session.config.invocation_params.args,
        "exit_status": int(exitstatus),
        "duration": time.time() - suite.started.timestamp(),
    }
    data = report.build_report(records, report.environment(suite.adapter_versions()), run)
    suite.written = []
    target = session.config.getoption("--report")
    if target:
        report.write_json_atomic(target, data)
        suite.written.append(target)
    history = session.config.getoption("--history")
    if history:
        path = history / report.history_name(suite.started, run["commit"])
        report.write_json_atomic(path, data)
        suite.written.append(path)
