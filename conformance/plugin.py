"""The pytest plugin: the suite's options, parametrization, summary table and reports.

Loaded by name (``-p mha_conformance.plugin``; ``python -m mha_conformance`` does it), never
automatically, so it touches no other pytest run. It only wires pytest to the suite: the state
of a run is ``execution/suite.py``, a check's steps ``checks/skeleton.py``, the report
``results/report.py``.
"""

from __future__ import annotations

import argparse
import re
import resource
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import pytest

from mha_conformance.checks.properties import ADVISORY
from mha_conformance.checks.skeleton import CheckRecord
from mha_conformance.execution.suite import Suite, Target
from mha_conformance.execution.worker import STARTUP_TIMEOUT
from mha_conformance.impls import cache, registry
from mha_conformance.impls.adapter import ALL_DTYPES
from mha_conformance.results import report as reports
from mha_conformance.tolerance import DEFAULT_K
from mha_conformance.vectors import golden

DEVICES = ("cpu", "cuda", "mps")
#: Generous for a first call that imports a framework and jit-compiles, short enough that a hung
#: adapter costs minutes, not the CI budget.
DEFAULT_CASE_TIMEOUT = 120.0
#: Exit codes: pytest's own (0 ok, 1 conformance failures, 4 usage error), and 3 when the harness
#: itself failed (a test errored outside the adapter's verdict, or the report could not be written).
HARNESS_ERROR = 3
SUITE = pytest.StashKey[Suite]()
#: The configs of the pytest sessions under way in this process (one, but for nested runs), for the
#: hooks that pytest calls without one.
CONFIG: list[pytest.Config] = []


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
    add(
        "--quick",
        action="store_true",
        help="the quick tier: for each check and adapter, the fewest cases that still cover every "
        "semantic axis in every dtype (about a tenth of the tests; docs/speed.md)",
    )
    add(
        "--kernel-scale",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the kernel tier: the kernel-scale cases (vectors/kernels.py: tile tails, head dims to 256, "
        "GQA, long decodes; generated and cached on first use) instead of the committed ones; the default "
        "with --device cuda and no --case (--no-kernel-scale: the committed ones there)",
    )
    add(
        "--memory-budget",
        type=float,
        default=4.0,
        help="GB a kernel-scale test may need (its truth, the adapter's score matrices); a case over it "
        "is a skip that says so (default 4)",
    )
    add("--report", type=Path, help="write the JSON report here")
    add("--history", type=Path, help="also write the report into this history folder")
    add(
        "--label",
        default="",
        help="a name for this run in the report and history (nox -s conformance gives each "
        "backend's run its backend's name; python -m mha_conformance.audit.timing groups by it)",
    )
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
        help=f"seconds one adapter call may take before its worker is killed and the test fails "
        f"(default {DEFAULT_CASE_TIMEOUT:g}; 0 = no limit); startup has its own limit",
    )
    add(
        "--startup-timeout",
        type=float,
        default=STARTUP_TIMEOUT,
        help=f"seconds a worker may take to start, import the adapter and prepare its module "
        f"(default {STARTUP_TIMEOUT:g}; 0 = no limit)",
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
        help="examples hypothesis draws per adapter and dtype in the fuzzing run (mha_conformance.fuzzing)",
    )
    add(
        "--vectors",
        type=Path,
        default=golden.VECTORS_DIR,
        help="folder of golden vectors (default: the committed ones)",
    )


def pytest_configure(config: pytest.Config) -> None:
    CONFIG.append(config)


#: Whether pytest-xdist's workers get each adapter's dtypes whole (``-n`` without ``--dist``).
BY_ADAPTER_DTYPE = pytest.StashKey[bool]()


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``-n`` without ``--dist``: every test of one adapter, device and dtype on one worker, these
    units handed out largest first as workers come free (pytest-xdist's scope scheduling, the
    scope being :func:`adapter_scope`'s). Spread test by test, each worker would trace and compile
    nearly every structure again (FlexAttention's dynamo traces, XLA's executables): torch's warm
    run took 288 s over two workers against 170 s in one. Every trace and executable is one
    dtype's, so a worker per dtype repeats none of them, and an adapter's dtypes share the
    workers (whole adapters left the longest adapter's worker running alone: FlexAttention, Keras
    on JAX). An explicit ``--dist`` is the user's choice."""
    given = any(a == "--dist" or a.startswith(("--dist=", "-d=")) for a in config.invocation_params.args)
    if given or config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    scope = adapter_scope(config.getoption("--adapter") or ["*"])

    class ByAdapterDtype(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope(nodeid)

    config.stash[BY_ADAPTER_DTYPE] = True
    return ByAdapterDtype(config, log)


def adapter_scope(refs: list[str]) -> Callable[[str], str]:
    """The ``<adapter>-<device>-<dtype>`` a test id belongs to, for the ``--adapter`` values ``refs``.

    A test id is ``[<check or property->]<adapter>-<device>-<dtype>-<case>``: the names are the
    adapters ``refs`` resolve to (longest first, so that ``torch-flex-compiled`` is never read as
    ``torch-flex``); an id with none of them is grouped by what comes before its case (its
    check or property, adapter, device and dtype). Only the adapters are resolved here, not the
    suite: a suite built on the controller while the workers collect made their collections
    differ (about one run in four)."""
    try:
        resolved = [a.name for a in registry.resolve(refs)]
    except (registry.AdapterError, ImportError, AttributeError):
        resolved = []  # the workers report the bad --adapter value
    names = sorted(resolved, key=len, reverse=True)
    dtype = rf"-[^-\]]+-(?:{'|'.join(map(re.escape, ALL_DTYPES))})(?=-)"
    builtin = re.compile(rf"[\[-]((?:{'|'.join(map(re.escape, names)) or '$^'}){dtype})")
    stem = re.compile(rf"\[(.+?{dtype})")

    def scope(nodeid: str) -> str:
        start = nodeid.find("[")
        if start < 0:
            return nodeid
        found = builtin.search(nodeid, start) or stem.search(nodeid, start)
        return found.group(1) if found else nodeid

    return scope


def pytest_unconfigure(config: pytest.Config) -> None:
    CONFIG.remove(config)


def is_xdist_worker(config: pytest.Config) -> bool:
    """A pytest-xdist worker: it runs tests and sends their records to the controller, which
    writes the one summary, report and history file."""
    return hasattr(config, "workerinput")


def xdist_workers(config: pytest.Config) -> int:
    """How many pytest-xdist workers ran the tests (0: none, the tests ran in this process)."""
    n = getattr(config.option, "numprocesses", None)
    return n if isinstance(n, int) and getattr(config.option, "dist", "no") != "no" else 0


def suite_of(config: pytest.Config) -> Suite:
    """The run's suite, built once, before collection (so a bad option is a usage error, exit 4)."""
    if SUITE not in config.stash:
        config.stash[SUITE] = Suite(config)
    return config.stash[SUITE]


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """The kernel tier's truths, computed once in the main process before any xdist worker starts
    (a worker then reads the cache), each with a progress line."""
    kernel = session.config.getoption("--kernel-scale", None)
    if kernel is None:  # the default on a GPU without --case (Suite.kernel)
        kernel = session.config.getoption("--device", None) == "cuda" and not session.config.getoption(
            "--case"
        )
    if is_xdist_worker(session.config) or not kernel:
        return
    suite = suite_of(session.config)
    terminal = session.config.pluginmanager.get_plugin("terminalreporter")
    if terminal is not None:
        suite.progress = lambda line: terminal.write_line(f"mha-conformance: {line}")
    if suite.kernel and not session.config.option.collectonly:
        suite.materialize_kernel_truths()


def pytest_collection(session: pytest.Session) -> None:
    suite = suite_of(session.config)
    terminal = session.config.pluginmanager.get_plugin("terminalreporter")
    if terminal is not None and not is_xdist_worker(session.config):
        suite.progress = lambda line: terminal.write_line(f"mha-conformance: {line}")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    suite = built(config)
    if suite is not None:
        suite.order(items)


def built(config: pytest.Config) -> Suite | None:
    return config.stash.get(SUITE, None)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test module names the checks it runs (``CHECKS``); its ``target`` argument gets every
    (check, adapter, device, dtype, case) they apply to."""
    checks = getattr(metafunc.module, "CHECKS", None)
    if checks and "target" in metafunc.fixturenames:
        metafunc.parametrize("target", suite_of(metafunc.config).params(checks))


@pytest.fixture
def suite(request: pytest.FixtureRequest) -> Suite:
    return suite_of(request.config)


@pytest.fixture
def check(target: Target, suite: Suite, request: pytest.FixtureRequest):
    """Runs the test's check; its record is on the test item, for the report, even on failure."""
    record = request.node.mha_record = CheckRecord()

    def run() -> CheckRecord:
        __tracebackhide__ = True
        return suite.run(target, record)

    return run


#: The key under which a test's record travels on its report (``user_properties``, which
#: pytest-xdist carries from a worker to the controller with the rest of the report).
RECORD = "mha_record"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Where the test ran (this process, or an xdist worker): its outcome as the report records
    it, attached to pytest's report; :func:`pytest_runtest_logreport` files it."""
    outcome = yield
    rep = outcome.get_result()
    params = getattr(item, "callspec", None) and item.callspec.params
    found = [p for p in (params or {}).values() if isinstance(p, Target)]
    param = found[0] if found else None
    if param is None or (rep.when == "setup" and not rep.skipped) or rep.when == "teardown":
        return
    rec = reports.TestRecord(item.nodeid, param.check, param.adapter, param.device, param.dtype, param.case)
    found = getattr(item, "mha_record", None)
    if found is not None:
        rec.verdicts = [v.as_dict() for v in found.verdicts]
        rec.meta = dict(found.meta)
    if is_xdist_worker(item.config):
        rec.meta["xdist_worker"] = item.config.workerinput["workerid"]
    finding = found.finding if found is not None else ""
    if hasattr(rep, "wasxfail"):
        rec.outcome = "xpassed" if rep.passed else "xfailed"
        rec.reason = rep.wasxfail
    elif rep.skipped:
        rec.outcome = "skipped"
        rec.reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rec.reason = rec.reason.removeprefix("Skipped: ")
    elif rep.passed and finding:
        rec.outcome = "finding"
        rec.reason = finding
    else:
        rec.outcome = rep.outcome
        if rep.failed:
            rec.reason = reports.clip(str(call.excinfo.value) if call.excinfo else str(rep.longrepr))
            # A verdict fails with AssertionError; anything else is the harness failing.
            if rep.when != "call" or call.excinfo is None or not call.excinfo.errisinstance(AssertionError):
                rec.outcome = "error"
    rep.user_properties.append((RECORD, asdict(rec)))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Where the run is reported (the only process, or the xdist controller): file each test's
    record, its durations summed over its phases."""
    found = [value for key, value in report.user_properties if key == RECORD]
    if not found or not CONFIG:
        return
    suite = suite_of(CONFIG[-1])
    rec = reports.TestRecord(**found[-1])
    previous = suite.records.get(rec.nodeid)
    if previous is not None:
        rec.duration += previous.duration
    rec.duration += report.duration
    suite.records[rec.nodeid] = rec


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    suite = built(config)
    if suite is None:
        return
    records = list(suite.records.values())
    if not records:
        return
    tr = terminalreporter
    tr.section("mha-conformance summary")
    tr.write_line(reports.format_table(reports.summarize(records), suite.k))
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
    for path in suite.written:
        tr.write_line(f"JSON report: {path}")
    for problem in suite.write_errors:
        tr.write_line(f"HARNESS ERROR: could not write the report {problem}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    suite = built(session.config)
    if suite is None:
        return
    suite.close()
    # In test-id order: a run spread over xdist workers writes the same report as a serial one.
    records = sorted(suite.records.values(), key=lambda r: r.nodeid)
    if not records or is_xdist_worker(session.config):
        return
    if any(r.outcome == "error" for r in records):
        session.exitstatus = HARNESS_ERROR
    run = {
        "started": suite.started.isoformat(),
        "finished": datetime.now(timezone.utc).isoformat(),
        "commit": reports.git_commit(),
        "k_factor": suite.k,
        "label": session.config.getoption("--label"),
        "quick": suite.quick,
        "kernel_scale": suite.kernel,
        "xdist_workers": xdist_workers(session.config),
        "xdist_dist": "adapter-dtype"
        if session.config.stash.get(BY_ADAPTER_DTYPE, False)
        else getattr(session.config.option, "dist", "no"),  # "no" also without pytest-xdist installed
        # Files the run added to the compilation caches (impls/cache.py): 0 for a warm run.
        "cache_added": cache.entries() - suite.cache_entries,
        "args": session.config.invocation_params.args,
        "exit_status": int(exitstatus),
        "duration": time.time() - suite.started.timestamp(),
        # The suite process's peak resident memory (the adapters' workers not included).
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    data = reports.build_report(records, reports.environment(suite.adapter_versions()), run)
    targets = [session.config.getoption("--report")]
    history = session.config.getoption("--history")
    if history:
        targets.append(history / reports.history_name(suite.started, run["commit"]))
    for target in filter(None, targets):
        try:
            reports.write_json_atomic(target, data)
            suite.written.append(target)
        except OSError as exc:
            suite.write_errors.append(f"{target}: {exc}")
            session.exitstatus = HARNESS_ERROR
