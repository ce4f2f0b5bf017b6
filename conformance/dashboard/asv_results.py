"""asv's benchmark results: reading the figures the dashboard plots, and merging machines.

asv keeps ``.asv/results/<machine>/machine.json`` and one ``<commit>-<env>.json`` per
commit and environment (format version 2: ``result_columns`` names the columns of every
``results[benchmark]`` row; a parameterised result is a list over the parameter product),
plus ``.asv/results/benchmarks.json`` describing the suite. Machines are named
``<host>-<device>``, so several machines' folders sit side by side; merging copies them into
one results folder by the policies below, and ``asv publish`` then shows them all.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Point:
    """One benchmark figure: machine, benchmark name, parameters, value, when it was measured."""

    machine: str
    benchmark: str
    params: dict[str, str]
    value: float
    started_at: int
    commit: str


def _row(data: dict[str, Any], name: str) -> dict[str, Any]:
    return dict(zip(data.get("result_columns", []), data["results"][name], strict=False))


def read_points(results_dir: Path, param_names: list[str]) -> tuple[list[Point], list[str]]:
    """Every parameterised figure in ``results_dir`` (all machines, all commits) and the
    problems met; unreadable files are reported and passed over."""
    points, problems = [], []
    for path in sorted(results_dir.glob("*/*.json")):
        if path.name == "machine.json":
            continue
        try:
            data = json.loads(path.read_text())
            for name in data["results"]:
                row = _row(data, name)
                values, params = row.get("result"), row.get("params")
                if not isinstance(values, list) or not params:
                    continue
                for combo, value in zip(itertools.product(*params), values, strict=False):
                    if isinstance(value, (int, float)) and value == value:  # NaN = skipped or failed
                        labels = dict(zip(param_names, (p.strip("'") for p in combo), strict=False))
                        points.append(
                            Point(
                                path.parent.name,
                                name,
                                labels,
                                float(value),
                                int(row.get("started_at") or 0),
                                str(data.get("commit_hash", "")),
                            )
                        )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            problems.append(f"{path}: cannot be read as asv results ({exc}); delete it or re-run asv")
    return points, problems


def latest_points(points: list[Point]) -> list[Point]:
    """The newest figure per machine, benchmark and parameters: what the dashboard plots."""
    newest: dict[tuple, Point] = {}
    for p in points:
        key = (p.machine, p.benchmark, tuple(sorted(p.params.items())))
        if key not in newest or p.started_at >= newest[key].started_at:
            newest[key] = p
    return list(newest.values())


def merge_result_file(existing: dict[str, Any], incoming: dict[str, Any]) -> dict[str, Any]:
    """Merge two results files of one machine, commit and environment, benchmark by benchmark.

    The newer measurement (``started_at``) of each benchmark wins: that is what asv itself
    does when it re-runs a benchmark on the same commit, so merging two copies gives what
    one machine would have recorded. Benchmarks only one side has are kept.
    """
    if existing.get("result_columns") != incoming.get("result_columns"):
        raise ValueError("the two files use different asv result formats; re-run asv on one machine")
    merged = dict(existing)
    results = dict(existing.get("results", {}))
    for name, row in incoming.get("results", {}).items():
        if name not in results or (_row(incoming, name).get("started_at") or 0) > (
            _row(existing, name).get("started_at") or 0
        ):
            results[name] = row
    merged["results"] = results
    merged["durations"] = {**existing.get("durations", {}), **incoming.get("durations", {})}
    return merged


def merge_benchmarks_json(existing: dict[str, Any], incoming: dict[str, Any]) -> dict[str, Any]:
    """The suite description after a merge: the union by benchmark name, entries already
    here kept (``asv run`` rewrites the file from the code on every run anyway)."""
    return {**incoming, **existing}


def merge_results(source: Path, dest: Path) -> dict[str, list[str]]:
    """Merge the asv results folder ``source`` into ``dest``; returns the files per action
    (copied, merged, same, conflict). ``machine.json`` of a machine already here is kept."""
    done: dict[str, list[str]] = {"copy": [], "merge": [], "same": [], "conflict": []}
    for path in sorted(source.rglob("*.json")):
        rel = path.relative_to(source)
        target = dest / rel
        incoming = path.read_bytes()
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(incoming)
            done["copy"].append(str(rel))
            continue
        if target.read_bytes() == incoming:
            done["same"].append(str(rel))
            continue
        try:
            old, new = json.loads(target.read_text()), json.loads(incoming)
            if rel.name == "machine.json":
                done["conflict"].append(f"{rel} (kept the one already here)")
                continue
            merged = merge_benchmarks_json(old, new) if len(rel.parts) == 1 else merge_result_file(old, new)
        except ValueError as exc:
            done["conflict"].append(f"{rel} ({exc})")
            continue
        target.write_text(json.dumps(merged, sort_keys=True))
        done["merge"].append(str(rel))
    return done
