"""The dashboards: ``asv publish`` for speed, plus a static conformance page next to it.

``python -m mha_conformance.dashboard [--history results/conformance] [--results .asv/results]
[--html .asv/html] [--merge DIR ...] [--no-publish] [--serve [--port 8080]]``

The conformance page (``<html>/conformance/index.html``) holds the latest matrix of
adapter x dtype x device (x host) with outcome counts and worst error ratios, per-test
details, the trend across runs, the error ratio against sequence length and the speed
against sequence length from asv's results. It is one self-contained file (inline SVG, a
few lines of inline script, no network), so it opens from disk or any static server. A
history file that cannot be read is listed on the page and in the log, and passed over.

``--merge DIR`` first copies another machine's runs in: ``DIR/results/conformance`` into
the history and ``DIR/.asv/results`` into the asv results (``mha_conformance.results.history`` and
``mha_conformance.dashboard.asv_results`` hold the merge policies). That is how several machines (say a
CPU box and a GPU box) end up on one dashboard.
"""

from __future__ import annotations

import argparse
import functools
import html
import http.server
import json
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mha_conformance.dashboard import asv_results, plots
from mha_conformance.results import history
from mha_conformance.results.report import OUTCOMES
from mha_conformance.tolerance import DEFAULT_K

PARAM_NAMES = ["adapter", "shape", "dtype", "causal"]
SPEED = (
    ("bench_attention.Forward.time_forward", "forward time (ms)", 1e3),
    ("bench_attention.Roofline.track_gflops", "achieved GFLOP/s", 1.0),
)
STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1300px;color:#222;padding:0 1em}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}th,td{border:1px solid #ccc;padding:2px 6px;text-align:left}
td.count,td.ratio{text-align:right;font-variant-numeric:tabular-nums}tr.bad{background:#fde2e2}
tr.warn{background:#fff3cd}.problem{color:#a00}details{margin:.3em 0}summary{cursor:pointer}
code{background:#f4f4f4;padding:0 3px}svg{max-width:100%;height:auto}.muted{color:#666}
"""
SCRIPT = """
const box = document.getElementById('filter');
const shown = document.getElementById('shown');
function applyFilter() {
  const needle = box.value.trim().toLowerCase();
  let count = 0;
  document.querySelectorAll('table.tests tbody tr').forEach(function (row) {
    const hit = !needle || row.textContent.toLowerCase().includes(needle);
    row.hidden = !hit;
    if (hit) { count += 1; }
  });
  shown.textContent = String(count);
  if (needle) { document.querySelectorAll('#details details').forEach(function (d) { d.open = true; }); }
}
box.addEventListener('input', applyFilter);
applyFilter();
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def matrix_table(rows: list[dict[str, Any]], k: float) -> str:
    """The latest matrix: one row per adapter x check x dtype x device x host, counts and worst ratio."""
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "adapter",
            "check",
            "dtype",
            "device",
            "host",
            *OUTCOMES,
            f"worst ratio (pass &le; {k:g})",
            "run",
        )
    )
    body = []
    for r in rows:
        kind = "bad" if r["failed"] or r["error"] else ("warn" if r["xpassed"] or r.get("finding") else "")
        counts = "".join(f'<td class="count" data-outcome="{o}">{int(r[o])}</td>' for o in OUTCOMES)
        body.append(
            f'<tr class="{kind}" data-adapter="{esc(r["adapter"])}" data-check="{esc(r["check"])}" '
            f'data-dtype="{esc(r["dtype"])}" data-device="{esc(r["device"])}" data-host="{esc(r["host"])}">'
            f"<td>{esc(r['adapter'])}</td><td>{esc(r['check'])}</td><td>{esc(r['dtype'])}</td>"
            f"<td>{esc(r['device'])}</td><td>{esc(r['host'])}</td>{counts}"
            f'<td class="ratio">{ratio_text(r.get("worst_ratio"))}</td>'
            f'<td class="muted">{esc(r["started"][:19])} {esc(r["commit"])}</td></tr>'
        )
    total = history.totals(rows)
    foot = "".join(f'<td class="count" data-outcome="{o}">{total[o]}</td>' for o in OUTCOMES)
    return (
        f'<table id="matrix-table"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
        f'<tfoot><tr id="matrix-total"><th colspan="5">total</th>{foot}<td></td><td></td></tr></tfoot></table>'
    )


def test_rows(tests: list[dict[str, Any]]) -> str:
    out = []
    for t in tests:
        verdicts = "; ".join(
            f"{v.get('tensor')}: abs {v.get('max_abs_err', float('nan')):.3g}, ratio {ratio_text(v.get('ratio'))}"
            for v in t.get("verdicts") or []
            if isinstance(v, dict) and isinstance(v.get("max_abs_err"), (int, float))
        )
        meta = ", ".join(f"{k}={v}" for k, v in (t.get("meta") or {}).items())
        kind = {"failed": "bad", "error": "bad", "xpassed": "warn", "finding": "warn"}.get(t["outcome"], "")
        reason = str(t.get("reason") or "")
        out.append(
            f'<tr class="{kind}" data-outcome="{esc(t["outcome"])}"><td>{esc(t.get("case"))}</td>'
            f'<td>{esc(t["outcome"])}</td><td class="ratio">{ratio_text(history.worst_ratio(t))}</td>'
            f"<td>{esc(verdicts)}</td><td>{esc(meta)}</td>"
            f'<td title="{esc(reason)}">{esc(reason[:240])}{"..." if len(reason) > 240 else ""}</td></tr>'
        )
    return "".join(out)


def details(runs: list[history.Run], rows: list[dict[str, Any]]) -> str:
    """Per matrix row, its tests (worst first) in a collapsible block."""
    blocks = []
    for r in rows:
        tests = history.cell_tests(runs, r)
        counts = ", ".join(f"{r[o]} {o}" for o in OUTCOMES if r[o])
        blocks.append(
            f'<details data-cell="{esc(r["adapter"])}|{esc(r["check"])}|{esc(r["dtype"])}|{esc(r["device"])}|'
            f'{esc(r["host"])}"{" open" if r["failed"] or r["error"] else ""}><summary>{esc(r["adapter"])} '
            f"{esc(r['check'])} {esc(r['dtype'])} "
            f"{esc(r['device'])} on {esc(r['host'])}: {esc(counts)}</summary>"
            '<table class="tests"><thead><tr><th>case</th><th>outcome</th><th>worst ratio</th><th>verdicts</th>'
            f"<th>what ran</th><th>reason</th></tr></thead><tbody>{test_rows(tests)}</tbody></table></details>"
        )
    return "".join(blocks)


def trend_table(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("started", "commit", "host", *OUTCOMES, "worst ratio", "exit"))
    body = "".join(
        f'<tr class="{"bad" if r["failed"] or r["error"] else ""}"><td>{esc(r["started"][:19])}</td><td>{esc(r["commit"])}</td>'
        f"<td>{esc(r['host'])}</td>"
        + "".join(f'<td class="count">{r[o]}</td>' for o in OUTCOMES)
        + f'<td class="ratio">{ratio_text(r["worst_ratio"])}</td><td>{esc(r["exit_status"])}</td></tr>'
        for r in reversed(rows)
    )
    return f'<table id="trend-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def kv_lens() -> dict[str, int]:
    """Each catalogue case's number of keys, for the error-against-length plot."""
    from mha_conformance.vectors.catalogue import CASES

    return {c["id"]: int(c["kv_len"]) for c in CASES}


def speed_section(results_dir: Path, problems: list[str]) -> str:
    points, bad = asv_results.read_points(results_dir, PARAM_NAMES)
    problems.extend(bad)
    latest = asv_results.latest_points(points)
    machines = sorted({p.machine for p in latest})
    if not machines:
        return (
            f'<p class="muted">No benchmark results in <code>{esc(results_dir)}</code> yet: run '
            "<code>nox -s benchmarks</code> on a clean work tree (asv records results per commit).</p>"
        )
    parts = []
    for machine in machines:
        for name, label, scale in SPEED:
            svg = plots.speed_plot(latest, machine, name, label, scale)
            if svg:
                parts.append(
                    f'<figure data-machine="{esc(machine)}" data-benchmark="{esc(name)}">{svg}</figure>'
                )
    return "".join(parts) or '<p class="muted">matplotlib is not installed: pip install ".[bench]"</p>'


def conventions_section(probes_dir: Path, problems: list[str]) -> str:
    """The convention-probe matrix (``python -m mha_conformance.probes --json results/probes/<env>.json``):
    adapter x probe, later files winning on an adapter; unreadable files are problems, not fatal."""
    from mha_conformance.probes.conventions import COLUMNS

    adapters: dict[str, Any] = {}
    for path in sorted(probes_dir.glob("*.json")) if probes_dir.is_dir() else []:
        try:
            adapters.update(json.loads(path.read_text())["adapters"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(
                f"{path}: not a probe result ({exc.__class__.__name__}); rerun python -m mha_conformance.probes"
            )
    if not adapters:
        return '<p class="muted">No probe results yet: <code>nox -s probes</code>.</p>'
    head = "".join(f"<th>{esc(title)}</th>" for title in COLUMNS.values())
    body = "".join(
        f"<tr><td>{esc(name)}</td>"
        + "".join(
            f'<td title="{esc(entry["probes"].get(c, {}).get("detail", ""))}">{esc(entry["probes"].get(c, {}).get("verdict", "-"))}</td>'
            for c in COLUMNS
        )
        + "</tr>"
        for name, entry in sorted(adapters.items())
    )
    return f'<table id="conventions-table"><tr><th>adapter</th>{head}</tr>{body}</table>'


def build_page(history_dir: Path, results_dir: Path, asv_index: bool = False) -> tuple[str, list[str]]:
    """The conformance page's HTML and the problems met (unreadable files), for the log."""
    runs, bad_runs = history.read_history(history_dir)
    problems = [p.message for p in bad_runs]
    rows = history.latest_matrix(runs)
    k = float(runs[-1].report["run"].get("k_factor") or DEFAULT_K) if runs else DEFAULT_K
    trend = history.trend(runs)
    speed = speed_section(results_dir, problems)
    conventions = conventions_section(history_dir.parent / "probes", problems)
    ratio_svg = plots.ratio_plot(history.ratio_points(runs, kv_lens()), k)
    trend_svg = plots.trend_plot(trend, k)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    link = ' &middot; <a id="asv-link" href="../index.html">speed dashboard (asv)</a>' if asv_index else ""
    problem_list = "".join(f'<li class="problem">{esc(p)}</li>' for p in problems)
    total_tests = sum(len(history.cell_tests(runs, r)) for r in rows)
    body = f"""<header><h1>Multi-head attention: conformance</h1>
<p>Generated {stamp} from <span id="run-count">{len(runs)}</span> run(s) in <code>{esc(history_dir)}</code>{link}.
Ratio = max abs error / (precision baseline + floor); a test passes when it is at most k = {k:g}.</p></header>
<nav><a href="#matrix">latest matrix</a> &middot; <a href="#speed">speed</a> &middot; <a href="#errors">error ratio</a>
&middot; <a href="#trend">trend</a> &middot; <a href="#conventions">conventions</a>
&middot; <a href="#details">per-test details</a></nav>
<section id="problems"><h2>Problems reading the history (<span id="problem-count">{len(problems)}</span>)</h2>
<ul>{problem_list or "<li>none</li>"}</ul></section>
<section id="matrix"><h2>Latest results</h2><p class="muted">Each row is the newest run that covered that adapter,
dtype, device and host.</p>{matrix_table(rows, k) if rows else "<p>No runs yet: <code>nox -s conformance</code>.</p>"}</section>
<section id="speed"><h2>Speed against sequence length</h2><p class="muted">Newest asv result per machine
(<code>&lt;host&gt;-&lt;device&gt;</code>) and configuration; solid lines causal, dashed without mask.</p>{speed}</section>
<section id="errors"><h2>Error ratio against sequence length</h2>{ratio_svg or '<p class="muted">nothing to plot</p>'}</section>
<section id="trend"><h2>Trend across runs</h2>{trend_svg or ""}{trend_table(trend)}</section>
<section id="conventions"><h2>Conventions</h2><p class="muted">What each adapter does where conventions differ
(<code>python -m mha_conformance.probes</code>); hover a cell for the evidence.</p>{conventions}</section>
<section id="details"><h2>Per-test details</h2><p><input id="filter" type="search" placeholder="filter: case, outcome, kernel..."
 aria-label="filter tests"> <span id="shown">{total_tests}</span> of {total_tests} tests shown</p>{details(runs, rows)}</section>"""
    page = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>MHA conformance dashboard</title>'
        f'<link rel="icon" href="data:,"><style>{STYLE}</style></head><body>{body}<script>{SCRIPT}</script></body></html>\n'
    )
    return page, problems


def write_page(history_dir: Path, results_dir: Path, html_dir: Path) -> tuple[Path, list[str]]:
    """Write ``<html_dir>/conformance/index.html``; returns its path and the problems."""
    page, problems = build_page(history_dir, results_dir, asv_index=(html_dir / "index.html").is_file())
    target = html_dir / "conformance" / "index.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page)
    return target, problems


def publish(results_dir: Path) -> str:
    """``asv publish`` when there are results; returns what happened, for the log."""
    if not any(results_dir.glob("*/machine.json")):
        return f"asv publish skipped: no results in {results_dir} yet (nox -s benchmarks on a clean tree)"
    asv = shutil.which("asv")
    if asv is None:
        return "asv publish skipped: asv is not installed (pip install '.[bench]')"
    done = subprocess.run([asv, "publish"], capture_output=True, text=True)
    if done.returncode:
        return f"asv publish failed (exit {done.returncode}): {done.stdout[-1500:]}{done.stderr[-1500:]}"
    return "asv publish: speed dashboard written"


def serve(html_dir: Path, port: int) -> None:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(html_dir))
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
        print(
            f"serving {html_dir} on http://127.0.0.1:{port}/ (asv) and "
            f"http://127.0.0.1:{port}/conformance/ (conformance); Ctrl-C stops",
            flush=True,
        )
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mha_conformance.dashboard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--history", type=Path, default=Path("results") / "conformance")
    parser.add_argument("--results", type=Path, default=Path(".asv") / "results", help="asv results folder")
    parser.add_argument("--html", type=Path, default=Path(".asv") / "html", help="asv html folder")
    parser.add_argument(
        "--merge",
        type=Path,
        action="append",
        default=[],
        help="another checkout (or copy) whose results/conformance and .asv/results to merge in",
    )
    parser.add_argument("--no-publish", action="store_true", help="do not run asv publish")
    parser.add_argument("--serve", action="store_true", help="serve the html folder on 127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    for source in args.merge:
        done = history.merge_history(source / "results" / "conformance", args.history)
        print(
            f"merge {source}: history {len(done['copy'])} copied, {len(done['same'])} already here, "
            f"{len(done['conflict'])} conflicts {done['conflict'] or ''}"
        )
        if (source / ".asv" / "results").is_dir():
            done = asv_results.merge_results(source / ".asv" / "results", args.results)
            print(f"merge {source}: asv results " + ", ".join(f"{len(v)} {k}" for k, v in done.items()))
            for conflict in done["conflict"]:
                print(f"  conflict: {conflict}")
    if not args.no_publish:
        print(publish(args.results))
    page, problems = write_page(args.history, args.results, args.html)
    for problem in problems:
        print(f"dashboard: skipped {problem}")
    print(f"dashboard: conformance page {page}")
    if args.serve:
        serve(args.html, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
