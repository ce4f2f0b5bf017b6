"""The dashboard's plots as inline SVG (matplotlib, no files, no network).

Each function takes plain rows and returns an ``<svg>`` string, or None when there is
nothing to plot or matplotlib is not installed (the page then says so).
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from typing import Any

DTYPE_ORDER = ("float64", "float32", "bfloat16", "float16")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "mha-dashboard", "font.size": 9})
    import matplotlib.pyplot as plt

    return plt


def _svg(plt, fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})  # same input, same page
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prologue and doctype: inline SVG


def _panels(plt, keys: list[str], width: float = 4.2):
    fig, axes = plt.subplots(1, len(keys), figsize=(width * len(keys), 3.2), squeeze=False)
    return fig, dict(zip(keys, axes[0], strict=True))


def worst_by_length(points: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """The worst ratio per (adapter, sequence length) over dtypes, devices and cases."""
    worst: dict[tuple[str, int], float] = {}
    for p in points:
        key = (p["adapter"], p["seq_len"])
        worst[key] = max(worst.get(key, 0.0), p["ratio"])
    return worst


def ratio_plot(points: list[dict[str, Any]], k: float, frameworks: dict[str, str]) -> str | None:
    """Small multiples: one panel per framework, one line per adapter through its worst error
    ratio at each sequence length (keys), log axes; the dashed line is the pass limit k."""
    plt = _pyplot()
    if plt is None or not points:
        return None
    worst = worst_by_length(points)
    groups = sorted({frameworks.get(a, "other") for a, _ in worst})
    columns = min(3, len(groups))
    rows = -(-len(groups) // columns)
    fig, grid = plt.subplots(rows, columns, figsize=(4.4 * columns, 3.0 * rows), squeeze=False, sharey=True)
    for ax, group in zip(grid.flat, groups, strict=False):
        adapters = sorted({a for a, _ in worst if frameworks.get(a, "other") == group})
        for i, adapter in enumerate(adapters):
            lengths = sorted(n for a, n in worst if a == adapter)
            ax.plot(
                lengths,
                [max(worst[(adapter, n)], 1e-4) for n in lengths],
                marker="o",
                markersize=3,
                linewidth=1,
                color=plt.cm.tab10(i % 10),
                label=adapter,
            )
        ax.axhline(k, color="black", linestyle="--", linewidth=1)
        ax.set(xscale="log", yscale="log", title=group, xlabel="sequence length (keys)")
        ax.legend(fontsize=6, frameon=False, loc="lower right")
    for ax in grid.flat[len(groups) :]:
        ax.set_visible(False)
    for ax in grid[:, 0]:
        ax.set_ylabel("worst error / (baseline + floor)")
    return _svg(plt, fig)


def speed_plot(
    points: list[Any], machine: str, benchmark: str, ylabel: str, scale: float = 1.0
) -> str | None:
    """One asv benchmark on one machine against sequence length: one panel per dtype, one
    line per adapter and preset (solid causal, dashed without mask)."""
    plt = _pyplot()
    mine = [p for p in points if p.machine == machine and p.benchmark == benchmark]
    if plt is None or not mine:
        return None
    from matplotlib.ticker import FuncFormatter, LogLocator

    dtypes = [d for d in DTYPE_ORDER if any(p.params.get("dtype") == d for p in mine)]
    fig, axes = _panels(plt, dtypes)
    lines: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    for p in mine:
        match = re.fullmatch(r"(.+)-t(\d+)", p.params.get("shape", ""))
        if match:
            key = (p.params["dtype"], p.params["adapter"], match.group(1), p.params.get("causal"))
            lines[key].append((int(match.group(2)), p.value * scale))
    adapters = sorted({k[1] for k in lines})
    colours = {a: plt.cm.tab10(i % 10) for i, a in enumerate(adapters)}
    for (dtype, adapter, preset, causal), xy in sorted(lines.items()):
        xy.sort()
        axes[dtype].plot(
            [x for x, _ in xy],
            [y for _, y in xy],
            marker="o",
            markersize=3,
            color=colours[adapter],
            linestyle="-" if causal == "True" else "--",
            label=f"{adapter} {preset}{' causal' if causal == 'True' else ''}",
        )
    lengths = sorted({x for xy in lines.values() for x, _ in xy})
    for dtype, ax in axes.items():
        ax.set(xscale="log", yscale="log", title=f"{machine} {dtype}", xlabel="sequence length")
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.minorticks_off()
    list(axes.values())[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7, frameon=False)
    next(iter(axes.values())).set_ylabel(ylabel)
    return _svg(plt, fig)


def trend_plot(rows: list[dict[str, Any]], k: float) -> str | None:
    """Per run, oldest left: the worst error ratio (log, with the limit k) and the failures."""
    plt = _pyplot()
    if plt is None or not rows:
        return None
    from matplotlib.ticker import MaxNLocator

    fig, (ratio_ax, fail_ax) = plt.subplots(1, 2, figsize=(8.4, 2.8))
    x = list(range(1, len(rows) + 1))
    ratio_ax.plot(x, [r["worst_ratio"] or float("nan") for r in rows], marker="o", markersize=3)
    ratio_ax.axhline(k, color="black", linestyle="--", linewidth=1)
    ratio_ax.set(yscale="log", title="worst error ratio (passed or failed tests)", xlabel="run")
    failed = [r["failed"] + r.get("error", 0) for r in rows]
    fail_ax.bar(x, failed, color="tab:red", label="failed or error")
    fail_ax.bar(x, [r["xpassed"] for r in rows], bottom=failed, color="tab:orange", label="xpassed")
    top = max(1, *(f + r["xpassed"] for f, r in zip(failed, rows, strict=True)))
    fail_ax.set(title="failures per run", xlabel="run", ylim=(0, top))
    for ax in (ratio_ax, fail_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fail_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fail_ax.legend(frameon=False)
    return _svg(plt, fig)
