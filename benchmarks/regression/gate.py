"""The regression gate's decision: is a benchmark of this run slower than its baseline?

Every run is saved by pytest-benchmark with its raw samples (``--benchmark-save-data``: one
duration per round in ``stats.data``). Each benchmark of a new run is compared with the same
benchmark in its *baseline*: the newest earlier saved result of it, timed with the same clock
and thread count, that the gate did not flag (a flagged result, or one with an injected
slowdown, is never a baseline; ``--accept`` makes a flagged run one).

A benchmark is **slower** when both hold:

* significance: a one-sided Mann-Whitney U test on the two sets of samples gives p < ``ALPHA``
  (the new samples tend to be larger; normal approximation with tie and continuity corrections);
* effect: the Hodges-Lehmann ratio, the median of new / baseline over every pair of samples,
  is at least ``MIN_RATIO``.

The test alone would flag about half the runs of an unchanged commit: the rounds of one process
agree more closely than two processes of one commit do (docs/benchmarks.md measures both), so
with tens of rounds small drift is "significant". The effect threshold sits above the drift
measured between runs of one commit and below the slowdown the gate must always catch (1.5x);
the test keeps a few noisy rounds from tripping it (it needs at least 5 rounds a side to reach
p < 0.01; the gate runs at least 10). Faster is reported the same way and never fails.

NumPy only (no SciPy); JSON in, JSON out.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Significance level of the one-sided test.
ALPHA = 0.01
#: The smallest slowdown (Hodges-Lehmann ratio) the gate calls a regression.
MIN_RATIO = 1.25
#: Where the gate writes its verdict in a saved run.
KEY = "mha_speed_gate"
#: Samples kept per side for the Hodges-Lehmann ratio (quantiles beyond this, to bound n * m).
MAX_PAIRS_SIDE = 2000


def clock(device: str) -> str:
    """The timer pytest-benchmark uses: CPU time of the process on CPU (the time the process
    computed, not the time other processes on the machine took from it), wall time on an
    accelerator (the work is on the device and the host waits)."""
    return "time.process_time" if device == "cpu" else "time.perf_counter"


def ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    positions = np.empty(len(values))
    positions[order] = np.arange(1, len(values) + 1)
    _, group = np.unique(values, return_inverse=True)
    return (np.bincount(group, positions) / np.bincount(group))[group]


def mann_whitney_p(baseline: np.ndarray, new: np.ndarray) -> float:
    """One-sided Mann-Whitney U p-value for "``new`` tends to be larger than ``baseline``"."""
    x, y = np.asarray(baseline, float), np.asarray(new, float)
    n, m = len(x), len(y)
    both = np.concatenate([x, y])
    u = ranks(both)[n:].sum() - m * (m + 1) / 2  # pairs with y > x, ties counting a half
    _, counts = np.unique(both, return_counts=True)
    variance = n * m / 12 * ((n + m + 1) - (counts**3 - counts).sum() / ((n + m) * (n + m - 1)))
    if variance <= 0:  # every sample equal: no evidence either way
        return 1.0
    z = (u - n * m / 2 - 0.5) / math.sqrt(variance)
    return 0.5 * math.erfc(z / math.sqrt(2))


def hodges_lehmann_ratio(baseline: np.ndarray, new: np.ndarray) -> float:
    """The median of ``new[j] / baseline[i]`` over every pair (on logs: the Hodges-Lehmann shift)."""

    def thin(a: np.ndarray) -> np.ndarray:
        a = np.log(np.maximum(np.asarray(a, float), 1e-12))
        if len(a) <= MAX_PAIRS_SIDE:
            return a
        return np.quantile(a, (np.arange(MAX_PAIRS_SIDE) + 0.5) / MAX_PAIRS_SIDE)

    return float(np.exp(np.median(thin(new)[None, :] - thin(baseline)[:, None])))


@dataclass
class Comparison:
    """One benchmark of the new run against its baseline."""

    name: str
    new_median: float
    baseline_median: float | None = None
    ratio: float | None = None
    p_slower: float | None = None
    p_faster: float | None = None
    baseline_run: str | None = None
    injected: float | None = None

    @property
    def verdict(self) -> str:
        if self.ratio is None:
            return "new"
        if self.p_slower < ALPHA and self.ratio >= MIN_RATIO:
            return "SLOWER"
        if self.p_faster < ALPHA and self.ratio <= 1 / MIN_RATIO:
            return "faster"
        return "same"


def judge(name: str, baseline: list[float] | None, new: list[float]) -> Comparison:
    """Compare the raw samples of one benchmark (``baseline`` None: nothing to compare with)."""
    row = Comparison(name, float(np.median(new)))
    if baseline:
        row.baseline_median = float(np.median(baseline))
        row.ratio = hodges_lehmann_ratio(np.asarray(baseline), np.asarray(new))
        row.p_slower = mann_whitney_p(np.asarray(baseline), np.asarray(new))
        row.p_faster = mann_whitney_p(np.asarray(new), np.asarray(baseline))
    return row


def comparable(bench: dict[str, Any]) -> tuple:
    """What two samples of one benchmark must share to be compared: name, clock, threads."""
    return (
        bench["name"],
        bench.get("options", {}).get("timer"),
        str(bench.get("extra_info", {}).get("threads")),
    )


def saved_runs(storage: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every saved run under ``storage``, oldest first; unreadable files are passed over."""
    runs = []
    for path in storage.rglob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("benchmarks"), list):
            runs.append((path, data))
    return sorted(runs, key=lambda run: (str(run[1].get("datetime", "")), run[0].name))


def is_baseline(data: dict[str, Any], bench: dict[str, Any]) -> bool:
    """Whether a saved result may be a baseline: it has raw samples, no injected slowdown, and
    the gate did not flag it (or its run was accepted with ``--accept``)."""
    if not bench.get("stats", {}).get("data") or bench.get("extra_info", {}).get("injected"):
        return False
    gate = data.get(KEY, {})
    flagged = gate.get("benchmarks", {}).get(bench["name"], {}).get("verdict") == "SLOWER"
    return not flagged or gate.get("verdict") == "accepted"


def compare(storage: Path, new_path: Path) -> list[Comparison]:
    """Each benchmark of the run saved at ``new_path`` against its baseline in ``storage``."""
    runs = saved_runs(storage)
    new = next(data for path, data in runs if path == new_path)
    baselines: dict[tuple, tuple[Path, dict[str, Any]]] = {}
    for path, data in runs:  # oldest first: the newest baseline wins
        if path != new_path:
            for bench in data["benchmarks"]:
                if is_baseline(data, bench):
                    baselines[comparable(bench)] = (path, bench)
    rows = []
    for bench in sorted(new["benchmarks"], key=lambda b: b["name"]):
        if not bench.get("stats", {}).get("data"):
            continue
        path, old = baselines.get(comparable(bench), (None, None))
        row = judge(bench["name"], old["stats"]["data"] if old else None, bench["stats"]["data"])
        row.baseline_run = path.name if path else None
        row.injected = bench.get("extra_info", {}).get("injected")
        rows.append(row)
    return rows


def record(new_path: Path, rows: list[Comparison], accepted: bool) -> str:
    """Write the gate's verdicts into the saved run (what may be a baseline later) and return the
    run's: ``slower``, ``accepted`` (slower, and made a baseline by ``--accept``) or ``pass``."""
    slower = any(row.verdict == "SLOWER" for row in rows)
    verdict = ("accepted" if accepted else "slower") if slower else "pass"
    data = json.loads(new_path.read_text())
    data[KEY] = {
        "verdict": verdict,
        "alpha": ALPHA,
        "min_ratio": MIN_RATIO,
        "benchmarks": {
            row.name: {
                "verdict": row.verdict,
                "ratio": row.ratio,
                "p_slower": row.p_slower,
                "baseline_run": row.baseline_run,
            }
            for row in rows
        },
    }
    new_path.write_text(json.dumps(data, indent=4))
    return verdict


def table(rows: list[Comparison], clock_name: str) -> str:
    """The comparison as a plain-text table (medians in ms of ``clock_name``)."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1e3:.2f}"

    header = ("benchmark", "baseline median", "new median", "ratio", "p-value", "verdict")
    lines = [
        (
            row.name.removeprefix("test_forward[").removesuffix("]")
            + (f" (injected {row.injected:g}x)" if row.injected else ""),
            ms(row.baseline_median),
            ms(row.new_median),
            "-" if row.ratio is None else f"{row.ratio:.3f}",
            "-" if row.ratio is None else f"{row.p_slower if row.ratio >= 1 else row.p_faster:.1e}",
            row.verdict,
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]

    def fmt(cells: tuple) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "-" * len(fmt(header))
    unit = "CPU time of the process" if clock_name == "time.process_time" else "wall time"
    return "\n".join(
        [
            f"speed: each benchmark against its baseline (medians in ms of {unit}; ratio: Hodges-Lehmann,",
            f"new / baseline; p-value: one-sided Mann-Whitney U toward the ratio's side; SLOWER: p < {ALPHA:g}"
            f" and ratio >= {MIN_RATIO:g})",
            rule,
            fmt(header),
            rule,
            *map(fmt, lines),
            rule,
        ]
    )


def summary(storage: Path) -> str:
    """The gate's record in ``storage``: each run's verdict, then over every comparison the spread
    of the ratios and how many were flagged, apart for each injected slowdown."""
    lines, groups = [], {}
    for path, data in saved_runs(storage):
        gate = data.get(KEY)
        if not gate:
            continue
        injected = {b["name"]: b.get("extra_info", {}).get("injected") for b in data["benchmarks"]}
        slower = sorted(name for name, row in gate["benchmarks"].items() if row["verdict"] == "SLOWER")
        named = f": {', '.join(slower)}" if 0 < len(slower) <= 3 else ""
        lines.append(
            f"{path.name}: {gate['verdict']}, {len(slower)} of {len(gate['benchmarks'])} slower{named}"
        )
        for name, row in gate["benchmarks"].items():
            if row["ratio"] is not None:
                groups.setdefault(injected.get(name), []).append((row["ratio"], row["verdict"] == "SLOWER"))
    for factor, found in sorted(groups.items(), key=lambda item: item[0] or 0):
        ratios = np.array([ratio for ratio, _ in found])
        lines.append(
            f"{f'injected {factor:g}x' if factor else 'no injection'}: {len(found)} comparisons, "
            f"{sum(flagged for _, flagged in found)} flagged; ratio min {ratios.min():.3f}, "
            f"median {np.median(ratios):.3f}, max {ratios.max():.3f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    # python benchmarks/regression/gate.py STORAGE: the record of the runs saved there.
    print(summary(Path(sys.argv[1])))
