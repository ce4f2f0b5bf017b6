"""What a commit's benchmark runs measured on one machine, as a table for the docs.

``python -m benchmarks.measured [--machine M] [--commit C] [--markdown PATH]`` reads the run logs
the runner keeps (``.asv/runs/<machine>-<time>.json``, each with a ``run`` section: commit,
label, quick or not, asv's wall time) and asv's results files for the commit
(``.asv/results/<machine>/<commit>-*.json``), and writes:

* per label (one per ``nox -s benchmarks`` backend), the newest full run's configurations and
  wall time and the newest ``--quick`` run's wall time, with the totals: what the full CPU
  matrix and ``asv run --quick`` over the suite cost on this machine;
* the spread of the full runs' timings (``benchmarks.spread``: IQR / median, median and 90th
  percentile across configurations);
* every configuration's median forward time and the worst gate ratio per adapter.

``nox -s benchmarks -- --markdown PATH`` renders it after each backend's run, so the last one
writes the whole table (docs/generated/benchmarks-cpu.md on the development machine). Only JSON
is read; nothing here imports a framework (asv imports every module of ``benchmarks/``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from . import spread

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / ".asv" / "runs"
RESULTS = ROOT / ".asv" / "results"


def record_run(cache_file: Path, info: dict[str, Any]) -> None:
    """Add the run's own facts (``info``: commit, label, quick, seconds, ...) to its run log."""
    data = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    data["run"] = info
    cache_file.write_text(json.dumps(data, indent=1, sort_keys=True))


def quick_seconds(machine: str, runs: Path = RUNS, wanted: set[str] | None = None) -> dict[str, float]:
    """What each configuration cost (seconds of its benchmark processes, by run-cache key) in the
    newest ``--quick`` run on ``machine`` that ran it: how the runner deals the next one out.
    With ``wanted`` keys, older logs are not read once every one of them is found."""
    found: dict[str, float] = {}
    for path in sorted(runs.glob(f"{machine}-*.json"), reverse=True):  # newest first
        if wanted is not None and wanted <= found.keys():
            break
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        run = data.get("run") if isinstance(data, dict) else None
        configs = data.get("configs") if isinstance(data, dict) else None
        if not isinstance(run, dict) or not run.get("quick") or not isinstance(configs, dict):
            continue
        for key, entry in configs.items():
            seconds = entry.get("seconds") if isinstance(entry, dict) else None
            if isinstance(seconds, float) and seconds > 0:
                found.setdefault(key, seconds)
    return found


def head() -> str:
    """HEAD's full hash ('' outside a git checkout)."""
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def runs_of(machine: str, commit: str, runs: Path = RUNS) -> dict[str, dict[str, dict[str, Any]]]:
    """The newest full and quick run log per label for ``commit`` on ``machine``:
    ``{label: {"full": log, "quick": log}}`` (a log is the run cache with its ``run`` section)."""
    found: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for path in sorted(runs.glob(f"{machine}-*.json")):  # names sort by start time
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        run = data.get("run") if isinstance(data, dict) else None
        if not isinstance(run, dict) or run.get("commit") != commit:
            continue
        found[run.get("label", "?")]["quick" if run.get("quick") else "full"] = data
    return dict(found)


def render(machine: str, commit: str, runs: Path = RUNS, results: Path = RESULTS) -> str:
    """The markdown body for ``commit`` on ``machine`` (raises LookupError when nothing ran)."""
    logs = runs_of(machine, commit, runs)
    if not logs:
        raise LookupError(
            f"no benchmark run of commit {commit[:12]} on machine {machine} in {runs}: "
            "run nox -s benchmarks (a clean work tree records the commit) first"
        )
    lines = [
        f"Machine `{machine}`, commit {commit[:12]}: the newest full run (results recorded) and "
        "`--quick` run of each backend.",
        "",
        "| backend | configurations | full run (s) | quick run (s) | gates |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    total_full = total_quick = 0.0
    configs: dict[str, dict[str, Any]] = {}
    for label in sorted(logs):
        full, quick = logs[label].get("full", {}), logs[label].get("quick", {})
        f_run, q_run = full.get("run", {}), quick.get("run", {})
        entries = full.get("configs") or quick.get("configs") or {}
        configs.update(full.get("configs", {}))
        statuses = defaultdict(int)
        for entry in entries.values():
            statuses[entry.get("status", "?")] += 1
        gates = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
        total_full += f_run.get("seconds", 0.0)
        total_quick += q_run.get("seconds", 0.0)
        lines.append(
            f"| {label} | {f_run.get('configurations', q_run.get('configurations', '-'))} | "
            f"{_seconds(f_run)} | {_seconds(q_run)} | {gates or '-'} |"
        )
    lines.append(f"| **all** | | **{total_full:.0f}** | **{total_quick:.0f}** | |")
    lines += [
        "",
        "Wall time is asv's (from its start to its exit, every benchmark process included), as the "
        "runner prints it; `nox -s benchmarks` adds a few seconds per backend for pip and the plan. "
        "A `--quick` run goes as several asv runs side by side, one per core (`--jobs`), each pinned "
        "to its share of the cores, since it records nothing.",
    ]
    files = sorted((results / machine).glob(f"{commit[:8]}-*.json"))
    spreads = [s for f in files for s in spread.read_spreads(f)]
    if spreads:
        lines += [
            "",
            "Spread of the recorded timings (IQR / median per configuration; aim: "
            f"{spread.GOALS['median']:.0%} at the median, {spread.GOALS['p90']:.0%} at the 90th percentile):",
            "",
        ]
        lines += ["```", spread.format_summary(spread.summarize(spreads)), "```"]
    lines += ["", *_forward_table(configs)]
    return "\n".join(lines)


def _seconds(run: dict[str, Any]) -> str:
    """A run's wall time, and how many asv runs went side by side when more than one (``--jobs``)."""
    if "seconds" not in run:
        return "-"
    jobs = run.get("jobs") or 1
    return f"{run['seconds']:.0f}" + (f" ({jobs} side by side)" if jobs > 1 else "")


def _forward_table(configs: dict[str, dict[str, Any]]) -> list[str]:
    """Median forward time (ms) per adapter and shape, with the adapter's worst gate ratio."""
    medians: dict[str, dict[str, float]] = defaultdict(dict)
    worst: dict[str, float] = defaultdict(float)
    for key, entry in configs.items():
        adapter, shape = key.split("|")[:2]
        if entry.get("forward_median"):
            medians[adapter][shape] = entry["forward_median"] * 1e3
        if entry.get("gate_ratio") is not None:
            worst[adapter] = max(worst[adapter], entry["gate_ratio"])
    if not medians:
        return []
    shapes = sorted({s for m in medians.values() for s in m}, key=_shape_order)
    out = [
        "Median forward time (ms) per configuration, and each adapter's worst gate ratio (its error "
        "over the float32 baseline on the checked rows; above 2 fails):",
        "",
        f"| adapter | {' | '.join(shapes)} | worst gate ratio |",
        f"| --- | {' | '.join('---:' for _ in shapes)} | ---: |",
    ]
    for adapter in sorted(medians):
        cells = [f"{medians[adapter][s]:.1f}" if s in medians[adapter] else "-" for s in shapes]
        out.append(f"| `{adapter}` | {' | '.join(cells)} | {worst[adapter]:.2f} |")
    return out


def _shape_order(shape: str) -> tuple[str, int]:
    preset, _, n = shape.rpartition("-t")
    return preset, int(n) if n.isdigit() else 0


def main(argv: list[str] | None = None) -> int:
    from mha_conformance.results.tables import write_markdown

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.measured", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--machine", default=None, help="asv machine name (default: <host>-cpu)")
    parser.add_argument("--commit", default=None, help="full commit hash (default: HEAD)")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here (else print it)")
    args = parser.parse_args(argv)
    if args.machine is None:
        import platform

        args.machine = f"{platform.node() or 'host'}-cpu"  # as the runner names a CPU machine
    commit = args.commit or head()
    try:
        body = render(args.machine, commit)
    except LookupError as exc:
        print(f"benchmarks.measured: {exc}", file=sys.stderr)
        return 1
    command = "python -m benchmarks.measured" + (f" --markdown {args.markdown}" if args.markdown else "")
    text = write_markdown(args.markdown, command, body)
    print(text if args.markdown is None else f"benchmarks.measured: wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
