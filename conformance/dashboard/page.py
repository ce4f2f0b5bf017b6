"""The dashboards: ``asv publish`` for speed, plus a static conformance page next to it.

``python -m mha_conformance.dashboard [--history results/conformance] [--results .asv/results]
[--html .asv/html] [--merge DIR ...] [--no-publish] [--serve [--port 8080]]``

The conformance page (``<html>/conformance/index.html``) opens on the compatibility matrix:
adapters (grouped by framework) by checks, a coloured square per dtype and the worst error
ratio in each cell (``mha_conformance.dashboard.matrix``); a click on a cell loads that cell's
tests from ``cells/<n>.js`` (failing and divergent tests with message, reason and reproduce
line; passes counted, skips counted by reason). Below: the convention probes, every declared
divergence with its own anchor and its history, the speed against sequence length from asv's
results, the error ratio against sequence length and the trend across runs. Static files (inline
SVG and script, no network), so the folder opens from disk or any static server. A history file
that cannot be read is listed on the page and in the log, and passed over.

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

from mha_conformance.dashboard import asv_offline, asv_results, matrix, plots
from mha_conformance.results import history
from mha_conformance.results.report import OUTCOMES
from mha_conformance.tolerance import DEFAULT_K

PARAM_NAMES = ["adapter", "shape", "dtype", "causal"]
SPEED = (
    ("bench_attention.Forward.time_forward", "forward time (ms)", 1e3),
    ("bench_attention.Roofline.track_gflops", "achieved GFLOP/s", 1.0),
    ("bench_attention.Roofline.track_peak_fraction", "fraction of the measured GEMM peak (roofline)", 1.0),
)
STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1400px;color:#222;padding:0 1em}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}th,td{border:1px solid #ccc;padding:2px 6px;text-align:left}
td.count,td.ratio{text-align:right;font-variant-numeric:tabular-nums}tr.bad{background:#fde2e2}
tr.warn{background:#fff3cd}.problem{color:#a00}details{margin:.3em 0}summary{cursor:pointer}
code{background:#f4f4f4;padding:0 3px}svg{max-width:100%;height:auto}.muted{color:#666}
#matrix-table th.adapter{font-weight:normal;white-space:nowrap}#matrix-table th.adapter .path{font-size:11px;color:#666;
max-width:28em;white-space:normal}#matrix-table tr.group th{background:#eef;text-align:left}
td.cell{cursor:pointer;white-space:nowrap;min-width:5.5em}td.cell:focus,td.cell.open{outline:2px solid #333}
.sq{display:inline-block;width:11px;height:11px;margin-right:2px;border:1px solid #0003;vertical-align:middle}
.s-fail{background:#d62728}.s-xpass{background:#ff7f0e}.s-divergent{background:#9467bd}.s-finding{background:#e7ba52}
.s-pass{background:#2ca02c}.s-skip{background:#c7c7c7}.s-none{background:#fff}
td.cell .ratio{font-size:11px;color:#444;margin-left:3px}
#matrix-table.only-float64 .sq:not([data-dtype=float64]),#matrix-table.only-float32 .sq:not([data-dtype=float32]),
#matrix-table.only-float16 .sq:not([data-dtype=float16]),#matrix-table.only-bfloat16 .sq:not([data-dtype=bfloat16]){display:none}
#cell-panel{border:1px solid #999;padding:.5em 1em;margin:1em 0;background:#fafafa}
#cell-tests td.reason{max-width:40em;white-space:pre-wrap;font-size:12px}#cell-tests td.repro code{font-size:11px}
article.divergence{border-left:4px solid #9467bd;padding-left:.8em;margin:1em 0}
"""
SCRIPT = """
const table = document.getElementById('matrix-table');
const box = document.getElementById('filter');
const dtype = document.getElementById('dtype');
const shown = document.getElementById('shown');
function applyFilter() {
  const needle = box.value.trim().toLowerCase();
  let count = 0;
  table.querySelectorAll('tbody tr[data-adapter]').forEach(function (row) {
    const hit = !needle || row.querySelector('th').textContent.toLowerCase().includes(needle)
      || row.dataset.framework.toLowerCase().includes(needle);
    row.hidden = !hit;
    if (hit) { count += 1; }
  });
  shown.textContent = String(count);
  table.className = dtype.value ? 'only-' + dtype.value : '';
}
box.addEventListener('input', applyFilter);
dtype.addEventListener('change', applyFilter);
applyFilter();
const loaded = {};
let wanted = null;
const panel = document.getElementById('cell-panel');
function text(tag, value, cls) {
  const el = document.createElement(tag);
  el.textContent = value === null || value === undefined ? '' : String(value);
  if (cls) { el.className = cls; }
  return el;
}
function show(data) {
  panel.hidden = false;
  panel.scrollIntoView({block: 'start'});
  document.getElementById('cell-title').textContent = data.adapter + ' \u00b7 ' + data.check;
  const c = data.counts;
  document.getElementById('cell-counts').textContent = Object.keys(c).filter(function (k) { return c[k]; })
    .map(function (k) { return c[k] + ' ' + k; }).join(', ') || 'no tests';
  const body = document.querySelector('#cell-tests tbody');
  body.replaceChildren();
  data.tests.forEach(function (t) {
    const tr = document.createElement('tr');
    tr.dataset.outcome = t.outcome;
    tr.className = (t.outcome === 'failed' || t.outcome === 'error') ? 'bad' : 'warn';
    [t.case, t.dtype, t.device + ' on ' + t.host, t.outcome,
     t.ratio === null ? '-' : Number(t.ratio).toPrecision(3)].forEach(function (v) { tr.appendChild(text('td', v)); });
    const why = text('td', t.reason, 'reason');
    if (t.divergence) {
      const a = text('a', ' (divergence)');
      a.href = '#' + t.divergence;
      why.appendChild(a);
    }
    tr.appendChild(why);
    const repro = document.createElement('td');
    repro.className = 'repro';
    repro.appendChild(text('code', t.reproduce));
    tr.appendChild(repro);
    tr.appendChild(text('td', t.run, 'muted'));
    body.appendChild(tr);
  });
  document.getElementById('cell-none').hidden = data.tests.length > 0;
  const skips = document.getElementById('cell-skips');
  skips.replaceChildren();
  data.skips.forEach(function (s) { skips.appendChild(text('li', s.count + ' skipped: ' + s.reason)); });
  const ran = document.getElementById('cell-ran');
  ran.replaceChildren();
  data.ran.forEach(function (r) { ran.appendChild(text('li', r.count + ' x ' + r.meta)); });
}
function openCell(td) {
  table.querySelectorAll('td.cell.open').forEach(function (o) { o.classList.remove('open'); });
  td.classList.add('open');
  const n = Number(td.dataset.cell);
  wanted = n;
  if (loaded[n]) { show(loaded[n]); return; }
  const script = document.createElement('script');
  script.src = 'cells/' + n + '.js';
  script.onerror = function () {
    panel.hidden = false;
    document.getElementById('cell-title').textContent = 'cells/' + n + '.js is missing: rebuild with nox -s dashboard';
  };
  document.head.appendChild(script);
}
function mhaCell(n, data) { loaded[n] = data; if (wanted === n) { show(data); } }
table.addEventListener('click', function (e) { const td = e.target.closest('td.cell'); if (td) { openCell(td); } });
table.addEventListener('keydown', function (e) {
  const td = e.target.closest('td.cell');
  if (td && (e.key === 'Enter' || e.key === ' ')) { e.preventDefault(); openCell(td); }
});
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def matrix_section(model: dict[str, Any], k: float) -> str:
    """The compatibility matrix: adapters (grouped by framework) by checks, a square per dtype."""
    checks = model["checks"]
    head = "".join(f"<th>{esc(c)}</th>" for c in checks)
    body, group = [], None
    for a in model["adapters"]:
        if a["framework"] != group:
            group = a["framework"]
            body.append(f'<tr class="group"><th colspan="{len(checks) + 1}">{esc(group)}</th></tr>')
        cells = []
        for check in checks:
            cell = model["cells"].get((a["name"], check))
            if cell is None:
                cells.append(f'<td data-check="{esc(check)}" data-status="none" class="muted">-</td>')
                continue
            squares = []
            for dtype in matrix.DTYPES:
                counts = cell["dtypes"].get(dtype)
                status = matrix.status_of(counts) if counts else "none"
                said = ", ".join(f"{v} {o}" for o, v in (counts or {}).items() if v) or "not run"
                squares.append(
                    f'<span class="sq s-{status}" data-dtype="{dtype}" data-status="{status}" '
                    f'title="{dtype}: {esc(matrix.STATUS_TEXT[status])} ({esc(said)})"></span>'
                )
            status = matrix.status_of(cell["counts"])
            ratio = cell["worst_ratio"]
            cells.append(
                f'<td class="cell" tabindex="0" data-cell="{cell["id"]}" data-check="{esc(check)}" '
                f'data-status="{status}" title="{esc(a["name"])} {esc(check)}: {esc(matrix.STATUS_TEXT[status])}; '
                f'worst ratio {ratio_text(ratio)} (pass &le; {k:g}); click for the tests">{"".join(squares)}'
                f'<span class="ratio">{ratio_text(ratio)}</span></td>'
            )
        version = f' <span class="muted">{esc(a["version"])}</span>' if a["version"] else ""
        body.append(
            f'<tr data-adapter="{esc(a["name"])}" data-framework="{esc(a["framework"])}">'
            f'<th class="adapter">{esc(a["name"])}{version}<div class="path">{esc(a["path"])}</div></th>'
            f"{''.join(cells)}</tr>"
        )
    legend = " ".join(f'<span class="sq s-{s}"></span>{esc(matrix.STATUS_TEXT[s])}' for s in matrix.STATUSES)
    options = "".join(f'<option value="{d}">{d}</option>' for d in matrix.DTYPES)
    n = len(model["adapters"])
    return (
        f'<p class="muted">Squares, left to right: {", ".join(matrix.DTYPES)}. {legend}. The number is the '
        f"worst error ratio of the cell's judged tests. Click a cell for its tests.</p>"
        f'<p><input id="filter" type="search" placeholder="filter adapters: name, framework, path..." '
        f'aria-label="filter adapters"> dtype <select id="dtype" aria-label="dtype"><option value="">all</option>'
        f'{options}</select> <span id="shown">{n}</span> of {n} adapters shown</p>'
        f'<table id="matrix-table"><thead><tr><th>adapter</th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
        '<section id="cell-panel" hidden><h3 id="cell-title"></h3><p id="cell-counts"></p>'
        '<p id="cell-none" class="muted">Nothing failed, diverged or was found here.</p>'
        '<table id="cell-tests"><thead><tr><th>case</th><th>dtype</th><th>where</th><th>outcome</th><th>ratio</th>'
        "<th>message and reason</th><th>reproduce</th><th>run</th></tr></thead><tbody></tbody></table>"
        '<ul id="cell-skips" class="muted"></ul><h4>What ran</h4><ul id="cell-ran" class="muted"></ul></section>'
    )


def divergences_section(found: list[dict[str, Any]]) -> str:
    """Every declared divergence with its own anchor: reason, adapters, cases, and per run
    whether it still occurs (xfailed) or no longer does (xpassed)."""
    if not found:
        return '<p class="muted">No declared divergence occurred in the history.</p>'
    parts = []
    for d in found:
        cases = d["cases"][:20]
        more = f" and {len(d['cases']) - 20} more" if len(d["cases"]) > 20 else ""
        runs = "".join(
            f"<tr><td>{esc(r['started'][:19])}</td><td>{esc(r['host'])}</td>"
            f'<td class="count">{r["xfailed"]}</td><td class="count">{r["xpassed"]}</td></tr>'
            for r in d["runs"][-10:]
        )
        parts.append(
            f'<article class="divergence" id="{d["id"]}"><h3><a href="#{d["id"]}">#</a> '
            f"{esc(', '.join(d['adapters']))}</h3><p>{esc(d['reason'])}</p>"
            f'<p class="muted">{len(d["cases"])} case(s): {esc(", ".join(cases))}{more}</p>'
            "<table><thead><tr><th>run</th><th>host</th><th>still diverges (xfailed)</th>"
            f"<th>no longer (xpassed)</th></tr></thead><tbody>{runs}</tbody></table></article>"
        )
    return "".join(parts)


def ratio_figure(svg: str | None, points: list[dict[str, Any]], frameworks: dict[str, str], k: float) -> str:
    """The small multiples with their data as a table beside them (the plot's text equivalent)."""
    if svg is None:
        return '<p class="muted">nothing to plot</p>'
    worst = plots.worst_by_length(points)
    rows = "".join(
        f'<tr><td>{esc(frameworks.get(a, "other"))}</td><td>{esc(a)}</td><td class="count">{n}</td>'
        f'<td class="ratio">{ratio_text(r)}</td></tr>'
        for (a, n), r in sorted(worst.items(), key=lambda kv: (frameworks.get(kv[0][0], "other"), kv[0]))
    )
    return (
        f'<figure role="img" aria-label="Worst error ratio against sequence length, one panel per framework, '
        f'one line per adapter; the dashed line is the pass limit k = {k:g}">{svg}</figure>'
        '<details id="errors-data"><summary>the plotted data</summary><table><thead><tr><th>framework</th>'
        f"<th>adapter</th><th>keys</th><th>worst ratio</th></tr></thead><tbody>{rows}</tbody></table></details>"
    )


def write_cells(model: dict[str, Any], folder: Path) -> int:
    """One ``cells/<n>.js`` per matrix cell (stale files removed); returns the bytes written."""
    cells = folder / "cells"
    if cells.is_dir():
        shutil.rmtree(cells)
    cells.mkdir(parents=True)
    size = 0
    for (adapter, check), cell in model["cells"].items():
        script = matrix.cell_script(cell["id"], matrix.cell_data(adapter, check, cell))
        (cells / f"{cell['id']}.js").write_text(script)
        size += len(script.encode())
    return size


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
                alt = f"{label} against sequence length on {machine}, one line per adapter, shape and dtype"
                parts.append(
                    f'<figure data-machine="{esc(machine)}" data-benchmark="{esc(name)}" role="img" '
                    f'aria-label="{esc(alt)}">{svg}</figure>'
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


def build_page(
    history_dir: Path, results_dir: Path, asv_index: bool = False, cells_dir: Path | None = None
) -> tuple[str, list[str]]:
    """The conformance page's HTML and the problems met (unreadable files), for the log;
    with ``cells_dir``, each matrix cell's tests are written there (``cells/<n>.js``)."""
    runs, bad_runs = history.read_history(history_dir)
    problems = [p.message for p in bad_runs]
    model = matrix.build(runs)
    if cells_dir is not None:
        write_cells(model, cells_dir)
    k = float(runs[-1].report["run"].get("k_factor") or DEFAULT_K) if runs else DEFAULT_K
    trend = history.trend(runs)
    speed = speed_section(results_dir, problems)
    conventions = conventions_section(history_dir.parent / "probes", problems)
    points = history.ratio_points(runs, kv_lens())
    frameworks = {a["name"]: a["framework"] for a in model["adapters"]}
    ratio_svg = plots.ratio_plot(points, k, frameworks)
    trend_svg = plots.trend_plot(trend, k)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    link = ' &middot; <a id="asv-link" href="../index.html">speed dashboard (asv)</a>' if asv_index else ""
    problem_list = "".join(f'<li class="problem">{esc(p)}</li>' for p in problems)
    landing = (
        matrix_section(model, k)
        if model["adapters"]
        else "<p>No runs yet: <code>nox -s conformance</code>.</p>"
    )
    body = f"""<header><h1>Multi-head attention: conformance</h1>
<p>Generated {stamp} from <span id="run-count">{len(runs)}</span> run(s) in <code>{esc(history_dir)}</code>{link}.
Ratio = max abs error / (precision baseline + floor); a test passes when it is at most k = {k:g}.</p></header>
<nav><a href="#matrix">matrix</a> &middot; <a href="#conventions">conventions</a> &middot;
<a href="#divergences">divergences</a> &middot; <a href="#speed">speed</a> &middot; <a href="#errors">error ratio</a>
&middot; <a href="#trend">trend</a> &middot; <a href="#problems">problems</a></nav>
<section id="matrix"><h2>Which implementation conforms on what</h2><p class="muted">Each cell is the newest run
that covered that adapter and check, per dtype, device and host.</p>{landing}</section>
<section id="conventions"><h2>Conventions</h2><p class="muted">What each adapter does where conventions differ
(<code>nox -s probes</code>, or <code>python -m mha_conformance.probes --json results/probes/&lt;env&gt;.json</code> in a
backend's environment); hover a cell for the evidence.</p>{conventions}</section>
<section id="divergences"><h2>Declared divergences</h2><p class="muted">Semantic differences the adapters declare,
each with its own link, and whether it still occurs run by run.</p>{divergences_section(model["divergences"])}</section>
<section id="speed"><h2>Speed against sequence length</h2><p class="muted">Newest asv result per machine
(<code>&lt;host&gt;-&lt;device&gt;</code>) and configuration; solid lines causal, dashed without mask.</p>{speed}</section>
<section id="errors"><h2>Error ratio against sequence length</h2>{ratio_figure(ratio_svg, points, frameworks, k)}</section>
<section id="trend"><h2>Trend across runs</h2>{trend_svg or ""}{trend_table(trend)}</section>
<section id="problems"><h2>Problems reading the history (<span id="problem-count">{len(problems)}</span>)</h2>
<ul>{problem_list or "<li>none</li>"}</ul></section>"""
    script = f"<script>{SCRIPT}</script>" if model["adapters"] else ""
    page = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>MHA conformance dashboard</title>'
        f'<link rel="icon" href="data:,"><style>{STYLE}</style></head><body>{body}{script}</body></html>\n'
    )
    return page, problems


def write_page(history_dir: Path, results_dir: Path, html_dir: Path) -> tuple[Path, list[str]]:
    """Write ``<html_dir>/conformance/index.html``; returns its path and the problems."""
    target = html_dir / "conformance" / "index.html"
    asv_index = (html_dir / "index.html").is_file()
    page, problems = build_page(history_dir, results_dir, asv_index=asv_index, cells_dir=target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page)
    return target, problems


def publish(results_dir: Path, html_dir: Path) -> str:
    """``asv publish`` when there are results, then its pages pointed at local copies of their
    scripts (``asv_offline``); returns what happened, for the log."""
    if not any(results_dir.glob("*/machine.json")):
        return f"asv publish skipped: no results in {results_dir} yet (nox -s benchmarks on a clean tree)"
    asv = shutil.which("asv")
    if asv is None:
        return "asv publish skipped: asv is not installed (pip install '.[bench]')"
    done = subprocess.run([asv, "publish"], capture_output=True, text=True)
    if done.returncode:
        return f"asv publish failed (exit {done.returncode}): {done.stdout[-1500:]}{done.stderr[-1500:]}"
    left = asv_offline.localize(html_dir)
    if left:
        return (
            "asv publish: speed dashboard written; external scripts left (it needs a network): "
            + ", ".join(left)
        )
    return f"asv publish: speed dashboard written, its scripts local ({html_dir / 'vendor'})"


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
        print(publish(args.results, args.html))
    page, problems = write_page(args.history, args.results, args.html)
    for problem in problems:
        print(f"dashboard: skipped {problem}")
    print(f"dashboard: conformance page {page}")
    if args.serve:
        serve(args.html, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
