"""The conformance history: reading it, the latest matrix, the trend, merging machines' runs.

Layout (``conformance/results/report.py``): one JSON report per run,
``results/conformance/<UTC time>_<commit>_<random>.json``. Reports are only ever added, so
histories from several machines merge by copying files; the functions below are the
policies for what the dashboard shows from them. Nothing here prints or unpickles: a file
that cannot be read becomes a :class:`Problem` naming it, and is passed over.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mha_conformance.results.report import OUTCOMES

HISTORY_NAME = re.compile(r"^(?P<time>\d{8}T\d{6}Z)_(?P<commit>.+)_(?P<token>[0-9a-f]{8})\.json$")
REQUIRED = ("format_version", "run", "environment", "summary", "tests")


@dataclass(frozen=True)
class Problem:
    """A history file that could not be used, and why."""

    path: str
    message: str


@dataclass
class Run:
    """One conformance run as the dashboard needs it."""

    name: str
    started: str
    commit: str
    host: str
    report: dict[str, Any] = field(repr=False)

    @property
    def tests(self) -> list[dict[str, Any]]:
        return self.report["tests"]

    @property
    def summary(self) -> list[dict[str, Any]]:
        return self.report["summary"]


def parse_name(name: str) -> dict[str, str] | None:
    """``<UTC time>_<commit>_<random>.json`` -> its parts, or None for other names.

    The time prefix makes file names sort by start time; the random token makes names from
    concurrent runs and from different machines unique, which is what lets histories
    merge by plain copying.
    """
    match = HISTORY_NAME.match(name)
    return match.groupdict() if match else None


def read_report(path: Path) -> Run:
    """Read and check one history file; ValueError names the file, the defect and the fix."""
    fix = "delete or restore the file (a run that was killed mid-write, or a damaged copy)"
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot be read ({exc}); {fix}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        ended = exc.msg.startswith("Unterminated") or exc.pos >= len(text.rstrip()) - 1
        what = "truncated" if ended else "not valid JSON"
        raise ValueError(f"{path}: {what} ({exc.msg} at line {exc.lineno}); {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a conformance report (a JSON {type(data).__name__}); {fix}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ValueError(f"{path}: not a conformance report (no {', '.join(missing)}); {fix}")
    run, env = data["run"], data["environment"]
    if not isinstance(run, dict) or not isinstance(env, dict) or not isinstance(data["tests"], list):
        raise ValueError(f"{path}: malformed report (run, environment or tests has the wrong type); {fix}")
    for i, test in enumerate(data["tests"]):
        if not isinstance(test, dict) or not {"adapter", "dtype", "device", "outcome"} <= test.keys():
            raise ValueError(f"{path}: test record {i} lacks adapter/dtype/device/outcome; {fix}")
        if test["outcome"] not in OUTCOMES:
            raise ValueError(f"{path}: test record {i} has unknown outcome {test['outcome']!r}; {fix}")
    parts = parse_name(path.name) or {}
    started = str(run.get("started") or parts.get("time") or "")
    return Run(
        path.name,
        started,
        str(run.get("commit", parts.get("commit", "unknown"))),
        str(env.get("hostname", "unknown")),
        data,
    )


def read_history(folder: Path) -> tuple[list[Run], list[Problem]]:
    """Every readable run in ``folder`` in the order they started, and the problems met.

    Order is the report's own start time, ties broken by file name: file times are reset
    by copying, and merged folders interleave machines.
    """
    runs, problems = [], []
    if not folder.is_dir():
        return [], [
            Problem(str(folder), f"{folder}: no such folder; run `nox -s conformance` to start a history")
        ]
    for path in sorted(folder.glob("*.json")):
        try:
            runs.append(read_report(path))
        except ValueError as exc:
            problems.append(Problem(str(path), str(exc)))
    runs.sort(key=lambda r: (r.started, r.name))
    return runs, problems


Cell = tuple[str, str, str, str, str]  # adapter, check, dtype, device, host


def latest_matrix(runs: list[Run]) -> list[dict[str, Any]]:
    """Per adapter x check x dtype x device x host, the summary row of the newest run that has it.

    A run may cover a part of the matrix (``--adapter torch-sdpa``, another backend's
    environment, a GPU machine), so the newest run wins cell by cell, never run by run: a
    quick run of one adapter must not hide the others. The host is part of the cell because
    "cpu" on two machines is two different processors. Each row names its run and its tier
    (``quick`` for a ``--quick`` run, whose cells hold fewer tests). Reports
    from before checks and the error outcome existed read as check "golden", 0 errors.
    """
    cells: dict[Cell, dict[str, Any]] = {}
    for run in runs:  # oldest first: later runs overwrite
        for row in run.summary:
            check = row.get("check", "golden")
            key = (row["adapter"], check, row["dtype"], row["device"], run.host)
            counts = {o: int(row.get(o, 0) or 0) for o in OUTCOMES}
            cells[key] = {
                **row,
                **counts,
                "check": check,
                "host": run.host,
                "run": run.name,
                "started": run.started,
                "commit": run.commit,
                "tier": "quick" if (run.report.get("run") or {}).get("quick") else "full",
            }
    return [cells[k] for k in sorted(cells)]


def cell_tests(runs: list[Run], row: dict[str, Any]) -> list[dict[str, Any]]:
    """The test records behind one matrix row (from the run the row names), worst first."""
    run = next((r for r in runs if r.name == row["run"]), None)
    if run is None:
        return []
    order = {"failed": 0, "error": 0, "xpassed": 1, "finding": 1, "xfailed": 2, "passed": 3, "skipped": 4}
    where = (row["adapter"], row.get("check", "golden"), row["dtype"], row["device"])
    tests = [
        t for t in run.tests if (t["adapter"], t.get("check", "golden"), t["dtype"], t["device"]) == where
    ]
    return sorted(
        tests, key=lambda t: (order.get(t["outcome"], 5), -(worst_ratio(t) or 0.0), t.get("case", ""))
    )


def worst_ratio(test: dict[str, Any]) -> float | None:
    """A test's largest error ratio (error / (baseline + floor)), None when nothing was judged."""
    ratios = [v.get("ratio") for v in test.get("verdicts") or [] if isinstance(v, dict)]
    finite = [r for r in ratios if isinstance(r, (int, float))]
    return max(finite) if finite else None


def totals(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Outcome counts summed over summary rows."""
    out = dict.fromkeys(OUTCOMES, 0)
    for row in rows:
        for outcome in OUTCOMES:
            out[outcome] += int(row.get(outcome, 0) or 0)
    return out


def trend(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per run, oldest first: when, which commit and host, outcome totals, the worst
    ratio among judged tests and the exit status: how conformance moved over time."""
    out = []
    for run in runs:
        ratios = [r["worst_ratio"] for r in run.summary if r.get("worst_ratio") is not None]
        out.append(
            {
                "run": run.name,
                "started": run.started,
                "commit": run.commit,
                "host": run.host,
                **totals(run.summary),
                "worst_ratio": max(ratios) if ratios else None,
                "exit_status": run.report["run"].get("exit_status"),
                "k_factor": run.report["run"].get("k_factor"),
            }
        )
    return out


def ratio_points(runs: list[Run], kv_lens: dict[str, int]) -> list[dict[str, Any]]:
    """(adapter, dtype, sequence length, worst ratio) for every judged test of each matrix
    cell's newest run: the data of the error-against-sequence-length plot. Declared
    divergences that occurred (xfailed) are left out: their ratios (NaN rows, 1e6) say
    nothing about how error grows with length. So are cases missing from ``kv_lens`` (an
    older catalogue)."""
    points = []
    by_run = {run.name: run for run in runs}
    grouped: dict[str, dict[tuple, list[dict[str, Any]]]] = {}
    for row in latest_matrix(runs):
        if row["run"] not in grouped:  # each run's tests indexed once, not searched per row
            index: dict[tuple, list[dict[str, Any]]] = {}
            for t in by_run[row["run"]].tests:
                index.setdefault(
                    (t["adapter"], t.get("check", "golden"), t["dtype"], t["device"]), []
                ).append(t)
            grouped[row["run"]] = index
        where = (row["adapter"], row.get("check", "golden"), row["dtype"], row["device"])
        for test in grouped[row["run"]].get(where, []):
            ratio, n = worst_ratio(test), kv_lens.get(test.get("case", ""))
            if (
                ratio is not None
                and n is not None
                and test["outcome"] in ("passed", "failed", "xfailed", "xpassed")
            ):
                points.append(
                    {
                        "adapter": test["adapter"],
                        "dtype": test["dtype"],
                        "device": test["device"],
                        "seq_len": n,
                        "ratio": ratio,
                        "case": test["case"],
                    }
                )
    return points


def history_action(incoming: bytes, existing: bytes | None) -> str:
    """What merging one history file does: ``copy`` (new here), ``same`` (already here) or
    ``conflict`` (same name, other bytes).

    Names are unique per run (time, commit, random token), so a conflict means one copy is
    damaged: the file already here is kept and the conflict reported, never overwritten,
    because history is append-only.
    """
    if existing is None:
        return "copy"
    return "same" if existing == incoming else "conflict"


def merge_history(source: Path, dest: Path) -> dict[str, list[str]]:
    """Copy ``source``'s history files into ``dest`` by :func:`history_action`; returns the
    file names per action. Files that are not history reports are left alone."""
    done: dict[str, list[str]] = {"copy": [], "same": [], "conflict": []}
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.json")):
        if parse_name(path.name) is None:
            continue
        target = dest / path.name
        incoming = path.read_bytes()
        action = history_action(incoming, target.read_bytes() if target.exists() else None)
        if action == "copy":
            target.write_bytes(incoming)
        done[action].append(path.name)
    return done
