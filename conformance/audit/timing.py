"""The main job's time, measured: where a run's minutes go, cold and warm, and whether the ways of
making it faster change any verdict.

``python -m mha_conformance.audit.timing --label NAME [--kind KIND ...] [--out DIR] [--markdown PATH]
[pytest args: --adapter GLOB ...]`` runs the suite on the given adapters once per kind, in order,
each in its own process as ``nox -s conformance`` runs it. A kind that starts cold gets a fresh,
empty cache folder (``MHA_CACHE_DIR``, so it is cold whatever this machine has cached), which the
kinds after it then use; without one, the runs use this machine's own caches:

* ``cold``: empty caches (JAX's executables, inductor's kernels, exported ONNX models);
* ``warm``: the same command again (what a second ``nox -s conformance`` costs);
* ``quick``: the quick tier (``--quick``), warm;
* ``serial`` / ``n1`` / ``n2``: warm, in one process and over 1 and 2 pytest-xdist workers
  (``-n 0`` / ``-n 1`` / ``-n 2``, in place of any worker count given);
* ``cold-quick`` / ``uncached-quick``: the quick tier from empty caches, with the persistent caches
  on (writing what they compile) and off (JAX's compilation cache and inductor's FX-graph and
  autograd caches disabled, as before the suite kept caches): whether the first run pays for
  the caches. A kind after ``uncached-quick`` that does not start cold uses its folder, which
  holds next to nothing;
* ``kernel-cold`` / ``kernel-warm``: the kernel tier (``--kernel-scale``) from an empty cache
  folder (every kernel-scale truth computed first: the tier's first use) and again, warm.

Every run also records the peak resident memory of the largest process it ran (the suite, an
xdist worker or an adapter's worker), as the operating system counts it for the finished
process tree.

Each run's JSON report goes to ``DIR/<label>-<kind>.json``; then the tables are rendered from
every report in ``DIR`` (so one label per backend, each from its own environment, adds up to one
table: ``nox -s conformance -- --timing``). Exit status 1 when two kinds give any shared test a different verdict
(a quick test's verdict is the full run's; a warm or parallel run's is the cold serial run's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mha_conformance import __main__ as suite
from mha_conformance.impls import cache as caches
from mha_conformance.results.tables import write_markdown

#: With these, a run keeps no compiled code between processes (the ``uncached`` kinds).
NO_CACHES = {
    "JAX_ENABLE_COMPILATION_CACHE": "false",
    "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
    "TORCHINDUCTOR_AUTOGRAD_CACHE": "0",
}


@dataclass(frozen=True)
class Kind:
    """How one kind of run is made: its extra pytest arguments, whether it starts from a fresh
    empty cache folder, and its extra environment."""

    args: tuple[str, ...] = ()
    fresh: bool = False
    env: tuple[tuple[str, str], ...] = ()


KINDS = {
    "cold": Kind(fresh=True),
    "warm": Kind(),
    "quick": Kind(("--quick",)),
    "serial": Kind(("-n", "0")),
    "n1": Kind(("-n", "1")),
    "n2": Kind(("-n", "2")),
    "cold-quick": Kind(("--quick",), fresh=True),
    "uncached-quick": Kind(("--quick",), fresh=True, env=tuple(NO_CACHES.items())),
    "kernel-cold": Kind(("--kernel-scale",), fresh=True),
    "kernel-warm": Kind(("--kernel-scale",)),
}
KERNEL_KINDS = ("kernel-cold", "kernel-warm")
#: Runs a command and prints the peak resident memory (kB) of its largest process, waited for.
PEAK = (
    "import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
    "print(f'peak-rss-kb {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr); "
    "sys.exit(done.returncode)"
)
DEFAULT_KINDS = ("cold", "warm", "quick")
OUT = Path("results/timing")


def measure(label: str, kinds: Sequence[str], pytest_args: Sequence[str], out: Path) -> None:
    """Run the suite once per kind, writing ``out/<label>-<kind>.json``: from this machine's
    caches, or from a fresh folder from the first kind that starts cold on."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mha-timing-cache-") as scratch:
        folder = caches.root()
        for i, name in enumerate(kinds, 1):
            kind = KINDS[name]
            if kind.fresh:
                folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=scratch))
            env = {**os.environ, "MHA_CACHE_DIR": str(folder), **dict(kind.env)}
            env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the suite's cache folder decides
            run_kind(label, name, [*pytest_args, *kind.args], out, env, f"[{i}/{len(kinds)}]")


def run_kind(
    label: str, kind: str, pytest_args: Sequence[str], out: Path, env: dict[str, str], step: str
) -> None:
    """One run of the suite, its report into ``out/<label>-<kind>.json``."""
    report = out / f"{label}-{kind}.json"
    report.unlink(missing_ok=True)
    print(f"{step} {label}: {kind} run ...", flush=True)
    args = ["-q", "--no-header", "--tb=no", "-p", "no:randomly", "--label", label, "--report", str(report)]
    start = time.monotonic()
    cmd = [sys.executable, "-c", PEAK, *suite.command([*args, *pytest_args])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if not report.exists():
        raise SystemExit(
            f"the {kind} run wrote no report (exit {proc.returncode}):\n"
            f"{proc.stdout[-3000:]}{proc.stderr[-2000:]}"
        )
    data = json.loads(report.read_text())
    run = data["run"]
    peaks = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("peak-rss-kb ")]
    if peaks:
        run["peak_rss_largest_mb"] = round(int(peaks[-1]) / 1024, 1)
        report.write_text(json.dumps(data, indent=1, default=str))
    print(
        f"    {time.monotonic() - start:.0f} s wall, {run['duration']:.0f} s test time, "
        f"{run['cache_added']} cache files added, largest process {run.get('peak_rss_largest_mb', '-')} MB",
        flush=True,
    )


def load(out: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Every report in ``out``, by label and kind."""
    found: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for path in sorted(out.glob("*.json")):
        kind = next((k for k in sorted(KINDS, key=len, reverse=True) if path.stem.endswith(f"-{k}")), None)
        if kind is not None:
            found[path.stem.removesuffix(f"-{kind}")][kind] = json.loads(path.read_text())
    return dict(found)


def verdicts(report: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {t["nodeid"]: (t["outcome"], t["reason"]) for t in report["tests"]}


def differences(reports: dict[str, dict[str, Any]]) -> list[str]:
    """Tests two kinds of one label both ran but judged differently."""
    kinds = list(reports)
    out = []
    base = verdicts(reports[kinds[0]])
    for kind in kinds[1:]:
        other = verdicts(reports[kind])
        for nodeid in sorted(base.keys() & other.keys()):
            if base[nodeid] != other[nodeid]:
                out.append(f"{kinds[0]} vs {kind}: {nodeid}: {base[nodeid][0]} vs {other[nodeid][0]}")
    return out


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def kernel_table(found: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown: per label, the kernel tier's first use and warm run, its tests and outcomes, and
    the peak memory of the suite process and of the largest process."""
    lines = [
        "| backend | first use (s) | warm (s) | tests | outcomes (warm) | suite peak (MB) | largest process (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, reports in sorted(found.items()):
        cold, warm = reports.get("kernel-cold"), reports.get("kernel-warm")
        last = warm or cold
        if last is None:
            continue
        counts: dict[str, int] = defaultdict(int)
        for t in last["tests"]:
            counts[t["outcome"]] += 1
        peak = max((r["run"].get("peak_rss_largest_mb", 0) for r in (cold, warm) if r), default=0)
        suite_peak = max(r["run"]["peak_rss_mb"] for r in (cold, warm) if r)
        lines.append(
            f"| {label} | {seconds(cold and cold['run']['duration'])} | {seconds(warm and warm['run']['duration'])} "
            f"| {len(last['tests'])} | {', '.join(f'{n} {o}' for o, n in sorted(counts.items()))} "
            f"| {suite_peak:.0f} | {peak:.0f} |"
        )
    lines += [
        "",
        "First use starts from an empty cache folder, so it computes every kernel-scale truth "
        "(vectors/materialize.py) and compiles what the adapters compile; warm is the same command "
        "again. The largest process is the peak resident memory of the biggest process of the run "
        "(the suite, an xdist worker or an adapter's worker) as the kernel counts it.",
    ]
    return "\n".join(lines)


def tables(found: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown: per label, each kind's test time and test count; then, for each label's warm
    (else cold) run, where the test time goes by check and the slowest adapters (the kernel
    tier's runs: :func:`kernel_table`)."""
    if all(set(r) <= set(KERNEL_KINDS) for r in found.values()):
        return kernel_table(found)
    kinds = [k for k in KINDS if any(k in r for r in found.values())]
    head = "| backend | " + " | ".join(f"{k} (s)" for k in kinds) + " | tests (full / quick) | verdicts |"
    lines = [head, "|" + " --- |" * (len(kinds) + 3)]
    totals: dict[str, float] = defaultdict(float)
    for label, reports in sorted(found.items()):
        cells = []
        for kind in kinds:
            run = reports.get(kind, {}).get("run")
            added = (run or {}).get("cache_added") or 0
            cells.append(seconds(run and run["duration"]) + (f" (+{added} cached)" if added > 0 else ""))
            if run:
                totals[kind] += run["duration"]
        full = next((reports[k] for k in ("warm", "cold", "serial", "n1", "n2") if k in reports), None)
        counts = f"{len(full['tests']) if full else '-'} / {len(reports['quick']['tests']) if 'quick' in reports else '-'}"
        diff = differences(reports)
        lines.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | {counts} | {'identical' if not diff else f'{len(diff)} differ'} |"
        )
    every = {k: all(k in r for r in found.values()) for k in kinds}  # a sum over every backend only
    lines.append(
        "| **all** | " + " | ".join(f"**{totals[k]:.0f}**" if every[k] else "-" for k in kinds) + " | | |"
    )
    workers = sorted(
        {
            r["run"].get("xdist_workers", 0)
            for rs in found.values()
            for k, r in rs.items()
            if k in DEFAULT_KINDS
        }
    )
    lines += [
        "",
        "Test time is pytest's session (collection, worker start-up and every test), as the run's "
        "report records it; `cold` starts from empty caches, `warm` is the same command again; "
        f"`cold`, `warm` and `quick` ran as `nox -s conformance` runs them (pytest-xdist workers: "
        f"{', '.join(map(str, workers)) or '-'}; 0 is one process), `serial` in one process, `n1` and "
        "`n2` over one and two workers; "
        "(+N cached) counts the files a run added to the compilation caches (a warm run adds none).",
        "",
        "Where the warm run's test time goes (the tests' own durations summed by check, every "
        "property and probe under properties; the rest of the session is collection and start-up):",
        "",
    ]
    checks = ["golden", "gradients", "decoding", "properties"]
    lines.append("| backend | session (s) | " + " | ".join(checks) + " | slowest adapters (s) |")
    lines.append("|" + " --- |" * (len(checks) + 3))
    for label, reports in sorted(found.items()):
        report = reports.get("warm") or reports.get("cold")
        if report is None:
            continue
        by_check: dict[str, float] = defaultdict(float)
        by_adapter: dict[str, float] = defaultdict(float)
        for t in report["tests"]:
            by_check[t["check"] if t["check"] in checks else "properties"] += t["duration"]
            by_adapter[t["adapter"]] += t["duration"]
        slow = ", ".join(f"{a} {s:.0f}" for a, s in sorted(by_adapter.items(), key=lambda x: -x[1])[:3])
        cells = " | ".join(f"{by_check[c]:.0f}" if c in by_check else "-" for c in checks)
        lines.append(f"| {label} | {report['run']['duration']:.0f} | {cells} | {slow} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mha_conformance.audit.timing", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--label", help="this run's name in the table (nox: the backend)")
    parser.add_argument(
        "--kind",
        action="append",
        choices=list(KINDS),
        help=f"runs, in order (default {' '.join(DEFAULT_KINDS)})",
    )
    parser.add_argument("--out", type=Path, default=OUT, help=f"the reports' folder (default {OUT})")
    parser.add_argument("--markdown", type=Path, help="also write the tables, stamped, here")
    args, pytest_args = parser.parse_known_args(argv)
    kinds = args.kind or DEFAULT_KINDS
    if args.label:
        measure(args.label, kinds, pytest_args, args.out)
    found = load(args.out)
    if not found:
        print(f"no reports in {args.out}; give --label and the adapters to measure")
        return 1
    body = tables(found)
    print(body)
    if args.markdown:
        command = (
            "nox -s conformance -- --timing (per backend: python -m mha_conformance.audit.timing "
            f"--out {args.out} --markdown {args.markdown})"
        )
        if all(set(r) <= set(KERNEL_KINDS) for r in found.values()):
            command = (
                "nox -s conformance -- --timing --kind kernel-cold --kind kernel-warm --out "
                f"{args.out} --markdown {args.markdown} --adapter ... (per backend)"
            )
        write_markdown(args.markdown, command, body)
    diff = [f"{label}: {d}" for label, reports in found.items() for d in differences(reports)]
    for line in diff:
        print(f"VERDICT DIFFERS: {line}")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
