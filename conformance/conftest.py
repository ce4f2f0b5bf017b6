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
from conformance.harness import InProcess, Isolated
from conformance.properties import ADVISORY
from conformance.tolerance import DEFAULT_K
from conformance.worker import STARTUP_TIMEOUT, Worker
from impls.adapter import ALL_DTYPES, Adapter
from vectors import golden

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ("cpu", "cuda", "mps")
#: Generous for a first call that imports a framework and jit-compiles, short enough that a hung
#: adapter costs minutes, not the CI budget.
DEFAULT_CASE_TIMEOUT = 120.0
#: Exit codes: pytest's own (0 ok, 1 conformance failures, 4 usage error), and 3 when the harness
#: itself failed (a test errored outside the adapter's verdict, or the report could not be written).
HARNESS_ERROR = 3


class Target(NamedTuple):
    """What one test checks: a check (``golden``, ``gradients``, a property, ...) of one adapter
    on one device, dtype and case."""

    check: str
    adapter: str
    device: str
    dtype: str
    case: str

    @property
    def id(self) -> str:
        prefix = "" if self.check == "golden" else f"{self.check}-"
        return f"{prefix}{self.adapter}-{self.device}-{self.dtype}-{self.case}"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mha-conformance")
    add = group.addoption
    add(
        "--adapter",
        action="append",
        default=[],
        help="adapter to validate (repeatable): a built-in name or glob, an entry-point name "
        f"({registry.ENTRY_POINT_GROUP}), or package.module:attr. Default: every built-in "
        "whose framework is installed",
    )
    add(
        "--device",
        default="cpu",
        choices=[*DEVICES, "all"],
        help="device to run on; 'all' = every device each adapter can reach (default cpu)",
    )
    add(
        "--dtype",
        action="append",
        default=[],
        choices=ALL_DTYPES,
        help="dtype (repeatable); default: every dtype the case lists that the adapter supports",
    )
    add("--case", action="append", default=[], help="glob on case ids (repeatable)")
    add("--report", type=Path, help="write the JSON report here")
    add("--history", type=Path, help="also write the report into this history folder")
    add(
        "--k-factor",
        type=float,
        default=DEFAULT_K,
        help="tolerance factor k: error may be k x (precision baseline + floor) (default 2)",
    )
    add(
        "--case-timeout",
        type=float,
        default=DEFAULT_CASE_TIMEOUT,
        help=f"seconds one test's adapter call may take before it is killed and failed (default "
        f"{DEFAULT_CASE_TIMEOUT:g}; 0 = no limit; a fresh worker also gets {STARTUP_TIMEOUT:g} s for imports)",
    )
    add(
        "--isolation",
        choices=["process", "none"],
        default="process",
        help="run adapters in a worker process (default: a crash or hang fails one test) or in the "
        "test process (none: easier debugging)",
    )
    add(
        "--fuzz-examples",
        type=int,
        default=60,
        help="examples hypothesis draws per adapter and dtype in conformance/fuzz_attention.py",
    )
    add("--vectors", type=Path, default=golden.VECTORS_DIR,
        help="folder of golden vectors (default: the committed ones)")  # fmt: skip


class Suite:
    """State of one conformance run: adapters, parameters and the records of every test."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.k = config.getoption("--k-factor")
        # pytest's own --strict (strict mode) also turns the advisory probes' findings into failures.
        self.strict = bool(config.getoption("strict", False))
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
        self.vectors: Path = config.getoption("--vectors")
        self.cases = self.load_cases()
        self.worker: Worker | None = None
        if config.getoption("--isolation") == "process":
            self.worker = Worker(self.vectors, config.getoption("--case-timeout"))
            self.runner: InProcess | Isolated = Isolated(self.worker)
        else:
            self.runner = InProcess()

    def load_cases(self) -> list[golden.GoldenCase]:
        """Every selected case, validated now: bad vectors stop the run before any adapter runs."""
        from conformance.harness import load

        globs = self.config.getoption("--case") or ["*"]
        try:
            ids = [c for c in golden.case_ids(self.vectors) if any(fnmatchcase(c, g) for g in globs)]
            cases = [load(c, self.vectors) for c in ids]
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

    def params(self, check: str, keep: Any = None, dtypes: Any = None) -> list[Any]:
        """Every (adapter, device, dtype, case) for ``check``, with declared divergences as xfail.

        ``keep(spec)`` narrows the cases a check applies to; ``dtypes`` overrides the default
        (every dtype the case lists that the adapter supports, or ``--dtype``).
        """
        chosen = self.config.getoption("--dtype")
        out = []
        for adapter in self.adapters:
            for device in self.devices(adapter):
                for case in self.cases:
                    if keep is not None and not keep(case.spec):
                        continue
                    listed = [d for d in case.spec["dtypes"] if d in adapter.dtypes]
                    for dtype in chosen or [d for d in listed if dtypes is None or d in dtypes]:
                        p = Target(check, adapter.name, device, dtype, case.id)
                        # An advisory probe reports a finding rather than failing: nothing to declare.
                        advisory = check in ADVISORY and not self.strict
                        reason = None if advisory else adapter.divergence(check, case.id, dtype, device)
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
    suite = metafunc.config.stash[SUITE]
    if "golden" in metafunc.fixturenames:
        metafunc.parametrize("golden", suite.params("golden"))
    elif "target" in metafunc.fixturenames:
        # Other checks: the test module names its check (CHECK, or CHECKS = {name: select}) and,
        # optionally, which cases (select(spec) -> bool) and dtypes (DTYPES) it needs.
        module = metafunc.module
        checks = getattr(module, "CHECKS", None) or {module.CHECK: getattr(module, "select", None)}
        dtypes = getattr(module, "DTYPES", None)
        metafunc.parametrize(
            "target", [p for c, keep in checks.items() for p in suite.params(c, keep, dtypes)]
        )


@pytest.fixture
def suite(request: pytest.FixtureRequest) -> Suite:
    return request.config.stash[SUITE]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    rep = outcome.get_result()
    params = getattr(item, "callspec", None) and item.callspec.params
    found = [p for p in (params or {}).values() if isinstance(p, Target)]
    param = found[0] if found else None
    if param is None or (rep.when == "setup" and not rep.skipped) or rep.when == "teardown":
        return
    suite = item.config.stash[SUITE]
    rec = suite.records.setdefault(
        item.nodeid,
        report.TestRecord(item.nodeid, param.check, param.adapter, param.device, param.dtype, param.case),
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
    elif rep.passed and getattr(item, "mha_finding", None):
        rec.outcome = "finding"
        rec.reason = item.mha_finding
    else:
        rec.outcome = rep.outcome
        if rep.failed:
            rec.reason = str(call.excinfo.value) if call.excinfo else str(rep.longrepr)
            # A verdict fails with AssertionError; anything else is the harness failing.
            if rep.when != "call" or call.excinfo is None or not call.excinfo.errisinstance(AssertionError):
                rec.outcome = "error"


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
    findings = [r for r in records if r.outcome == "finding"]
    if findings:
        tr.write_line("")
        tr.write_line(
            f"Advisory findings ({len(findings)}; robustness probes a conforming implementation may fail, "
            "shown in the report; --strict makes them failures):"
        )
        by_check: dict[tuple[str, str], int] = {}
        for r in findings:
            by_check[(r.adapter, r.check)] = by_check.get((r.adapter, r.check), 0) + 1
        for (adapter, check), n in sorted(by_check.items()):
            tr.write_line(f"  {adapter}: {check} ({n} tests): {ADVISORY.get(check, '')[:100]}...")
    if suite.not_installed:
        tr.write_line("")
        tr.write_line("Not run (framework not installed): " + "; ".join(suite.not_installed))
    for path in getattr(suite, "written", []):
        tr.write_line(f"JSON report: {path}")
    for problem in getattr(suite, "write_errors", []):
        tr.write_line(f"HARNESS ERROR: could not write the report {problem}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    suite = session.config.stash[SUITE]
    if suite.worker is not None:
        suite.worker.stop()
    records = list(suite.records.values())
    if not records:
        return
    if any(r.outcome == "error" for r in records):
        session.exitstatus = HARNESS_ERROR
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
    targets = [session.config.getoption("--report")]
    history = session.config.getoption("--history")
    if history:
        targets.append(history / report.history_name(suite.started, run["commit"]))
    for target in filter(None, targets):
        try:
            report.write_json_atomic(target, data)
            suite.written.append(target)
        except OSError as exc:
            suite.write_errors = [*getattr(suite, "write_errors", []), f"{target}: {exc}"]
            session.exitstatus = HARNESS_ERROR
