"""The compatibility matrix the conformance page opens on: adapters by checks, a status per dtype.

Built from the history's newest run per cell (``history.latest_matrix``): a row per adapter
(grouped by framework, with its version and the code path it runs), a column per check, and in
each cell one status per dtype, worst first over devices and hosts:

* ``fail``: a failed test or an error;
* ``xpass``: a declared divergence that did not occur (the declaration is stale);
* ``divergent``: a declared divergence that occurred (xfailed);
* ``finding``: an advisory probe that found something;
* ``pass``: tests passed and nothing above;
* ``skip``: every test skipped (not expressible, or not runnable here);
* ``none``: not run.

The tests behind a cell are not in the page: each cell's go to ``cells/<n>.js``, loaded when
the cell is opened (a script element, so the page works from ``file://`` as from a server).
Declared divergences are grouped by reason, each with its anchor, its adapters and cases, and
whether it still occurs run by run.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from mha_conformance.results import history

STATUSES = ("fail", "xpass", "divergent", "finding", "pass", "skip", "none")
#: What each status means, for the legend and hover text.
STATUS_TEXT = {
    "fail": "failed or error",
    "xpass": "declared divergence did not occur",
    "divergent": "declared divergence",
    "finding": "advisory finding",
    "pass": "passed",
    "skip": "not expressible / not run here (skipped)",
    "none": "not run",
}
DTYPES = ("float64", "float32", "float16", "bfloat16")
#: Test records a cell's data keeps in full; passes and skips are counted (skips by reason).
KEPT = ("failed", "error", "xpassed", "finding", "xfailed")


def status_of(counts: dict[str, int]) -> str:
    """One status for outcome counts (see the module docstring)."""
    if counts.get("failed") or counts.get("error"):
        return "fail"
    for outcome, status in (("xpassed", "xpass"), ("xfailed", "divergent"), ("finding", "finding")):
        if counts.get(outcome):
            return status
    if counts.get("passed"):
        return "pass"
    return "skip" if counts.get("skipped") else "none"


def check_order(checks: Iterable[str]) -> list[str]:
    """Columns: golden, gradients, decoding, then the properties and probes as the suite lists them."""
    from mha_conformance.checks import CHECKS

    known = [c for c in CHECKS if c in set(checks)]
    return known + sorted(set(checks) - set(known))


def adapter_info(name: str, versions: dict[str, Any]) -> dict[str, str]:
    """Framework, version and code path of an adapter: the built-in's class where it is one,
    else what the run recorded."""
    from mha_conformance.impls import registry

    framework, path = "other", ""
    if name in registry.BUILTINS:
        try:
            adapter = registry.builtin(name)
            framework, path = adapter.framework or "other", adapter.path
        except Exception:  # a built-in that cannot load here still has its recorded versions
            pass
    recorded = versions.get(name) if isinstance(versions.get(name), dict) else {}
    key = {"onnxruntime": "onnxruntime", "torch": "torch", "jax": "jax", "keras": "keras"}.get(framework, "")
    version = str(recorded.get(key) or recorded.get(framework) or "")
    if not version and recorded:
        version = ", ".join(f"{k} {v}" for k, v in list(recorded.items())[:2])
    return {"framework": framework, "version": version, "path": path}


def divergence_reason(test: dict[str, Any]) -> str:
    """The declared divergence a test met (its reason), as the divergences view groups it."""
    return str(test.get("reason") or "(no reason recorded)")


def divergence_id(reason: str) -> str:
    return "divergence-" + hashlib.sha1(reason.encode()).hexdigest()[:10]


def reproduce(test: dict[str, Any]) -> str:
    """The command that runs this one test again."""
    from mha_conformance.checks import CHECKS
    from mha_conformance.checks.skeleton import reproduce_line

    check = CHECKS.get(test.get("check", "golden"))
    args = (test.get("adapter", ""), test.get("device", ""), test.get("dtype", ""), test.get("case", ""))
    if check is not None:
        return reproduce_line(check, *args)
    adapter, device, dtype, case = args
    return f"python -m mha_conformance --adapter {adapter} --device {device} --dtype {dtype} --case {case}"


def build(runs: list[history.Run]) -> dict[str, Any]:
    """The matrix, the per-cell test data and the divergences, from the history's runs."""
    rows = history.latest_matrix(runs)
    by_run = {run.name: run for run in runs}
    index: dict[str, dict[tuple, list[dict[str, Any]]]] = {}
    versions: dict[str, Any] = {}
    for run in runs:
        versions.update((run.report.get("environment") or {}).get("adapters") or {})

    def tests_of(row: dict[str, Any]) -> list[dict[str, Any]]:
        if row["run"] not in index:
            grouped: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
            for t in by_run[row["run"]].tests:
                grouped[(t["adapter"], t.get("check", "golden"), t["dtype"], t["device"])].append(t)
            index[row["run"]] = grouped
        return index[row["run"]].get((row["adapter"], row["check"], row["dtype"], row["device"]), [])

    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        cell = cells.setdefault(
            (row["adapter"], row["check"]),
            {"counts": dict.fromkeys(history.OUTCOMES, 0), "dtypes": {}, "worst_ratio": None, "tests": []},
        )
        for outcome in history.OUTCOMES:
            cell["counts"][outcome] += int(row[outcome])
        per = cell["dtypes"].setdefault(row["dtype"], dict.fromkeys(history.OUTCOMES, 0))
        for outcome in history.OUTCOMES:
            per[outcome] += int(row[outcome])
        judged = [
            history.worst_ratio(t) for t in tests_of(row) if t["outcome"] in ("passed", "failed", "error")
        ]
        judged = [r for r in judged if r is not None]
        if judged:
            cell["worst_ratio"] = max(judged + [cell["worst_ratio"] or 0.0])
        for t in tests_of(row):
            cell["tests"].append(
                {
                    **t,
                    "host": row["host"],
                    "started": row["started"],
                    "commit": row["commit"],
                    "tier": row["tier"],
                }
            )

    adapters = sorted({a for a, _ in cells})
    info = {a: adapter_info(a, versions) for a in adapters}
    adapters.sort(key=lambda a: (info[a]["framework"], a))
    checks = check_order({c for _, c in cells})
    out_cells = []
    for n, ((adapter, check), cell) in enumerate(sorted(cells.items(), key=lambda kv: kv[0])):
        cell["id"] = n
        out_cells.append((adapter, check, cell))
    return {
        "adapters": [{"name": a, **info[a]} for a in adapters],
        "checks": checks,
        "cells": {(a, c): cell for a, c, cell in out_cells},
        "divergences": divergences(runs),
    }


def cell_data(adapter: str, check: str, cell: dict[str, Any]) -> dict[str, Any]:
    """What ``cells/<n>.js`` holds: the failing, divergent and advisory tests in full (message,
    reason, reproduce line), passes counted, skips counted by reason, and what ran (the tests'
    meta: kernels, providers, compile states) counted by value."""
    kept, skips, ran = [], defaultdict(int), defaultdict(int)
    for t in cell["tests"]:
        meta = t.get("meta") or {}
        shown = {k: v for k, v in meta.items() if k not in ("device_name", "cache_length")}
        if shown:
            ran[", ".join(f"{k}={v}" for k, v in sorted(shown.items()))[:300]] += 1
        if t["outcome"] in KEPT:
            reason = str(t.get("reason") or "")
            kept.append(
                {
                    "case": t.get("case"),
                    "dtype": t["dtype"],
                    "device": t["device"],
                    "host": t["host"],
                    "outcome": t["outcome"],
                    "ratio": history.worst_ratio(t),
                    "reason": reason,
                    "divergence": divergence_id(divergence_reason(t))
                    if t["outcome"] in ("xfailed", "xpassed")
                    else "",
                    "reproduce": reproduce(t),
                    "run": f"{t['started'][:19]} {t['commit']}"
                    + (" (quick tier)" if t["tier"] == "quick" else ""),
                }
            )
        elif t["outcome"] == "skipped":
            skips[str(t.get("reason") or "")[:300]] += 1
    order = {o: i for i, o in enumerate(KEPT)}
    kept.sort(key=lambda k: (order[k["outcome"]], -(k["ratio"] or 0.0), k["case"] or ""))
    return {
        "adapter": adapter,
        "check": check,
        "counts": cell["counts"],
        "tests": kept,
        "skips": sorted(({"reason": r, "count": c} for r, c in skips.items()), key=lambda s: -s["count"]),
        "ran": sorted(({"meta": m, "count": c} for m, c in ran.items()), key=lambda r: -r["count"])[:20],
    }


def cell_script(n: int, data: dict[str, Any]) -> str:
    """``cells/<n>.js``: the data handed to the page's ``mhaCell``; JSON with ``<`` escaped."""
    text = json.dumps(data, separators=(",", ":"), default=str).replace("<", "\\u003c")
    return f"mhaCell({n},{text});\n"


def divergences(runs: list[history.Run]) -> list[dict[str, Any]]:
    """Every declared divergence met in the history, by reason: the adapters and cases it
    covers, and per run how many tests it held (xfailed) and how many no longer diverged
    (xpassed), newest run last."""
    found: dict[str, dict[str, Any]] = {}
    for run in runs:
        for t in run.tests:
            if t["outcome"] not in ("xfailed", "xpassed"):
                continue
            reason = divergence_reason(t)
            entry = found.setdefault(
                reason,
                {
                    "id": divergence_id(reason),
                    "reason": reason,
                    "adapters": set(),
                    "cases": set(),
                    "runs": {},
                },
            )
            entry["adapters"].add(t["adapter"])
            entry["cases"].add(t.get("case") or "")
            per = entry["runs"].setdefault(
                run.name, {"started": run.started, "host": run.host, "xfailed": 0, "xpassed": 0}
            )
            per[t["outcome"]] += 1
    out = []
    for entry in found.values():
        out.append(
            {
                **entry,
                "adapters": sorted(entry["adapters"]),
                "cases": sorted(entry["cases"]),
                "runs": sorted(entry["runs"].values(), key=lambda r: r["started"]),
            }
        )
    return sorted(out, key=lambda e: (e["adapters"], e["reason"]))
