"""How repeatable asv's timings are: IQR / median per configuration, from asv's results files.

``python -m benchmarks.spread [PATH ...] [--check]`` (default ``.asv/results``): for every
``time_`` benchmark and parameter combination with a result, the interquartile range of its
samples (asv's ``stats_q_25``/``stats_q_75``) over its median (``result``); then, per benchmark
and over all of them, the median and 90th percentile across configurations and the worst one.
The suite aims at 5% at the median and 15% at the 90th percentile (``GOALS``); ``--check``
exits 1 when a run misses them.

Only JSON is read (asv's format 2 results: ``result_columns`` names each row's fields). Nothing
here imports a framework: asv imports every module in ``benchmarks/`` to discover it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The spread the suite aims at (IQR / median): at the median configuration, and at the 90th
#: percentile of configurations.
GOALS = {"median": 0.05, "p90": 0.15}


@dataclass(frozen=True)
class Spread:
    """One configuration's IQR / median."""

    benchmark: str  # e.g. bench_attention.Forward.time_forward
    params: tuple[str, ...]  # asv's parameter values, as asv writes them ("'torch-sdpa'", "True")
    median: float  # seconds
    iqr: float  # seconds
    samples: int | None

    @property
    def ratio(self) -> float:
        return self.iqr / self.median

    @property
    def values(self) -> tuple[str, ...]:
        """The parameter values without asv's quotes: ``('torch-sdpa', 'gpt-t128', 'float32', 'True')``."""
        return tuple(p.strip("'") for p in self.params)

    @property
    def label(self) -> str:
        return f"{self.benchmark.rsplit('.', 1)[-1]}({', '.join(self.values)})"


def read_spreads(path: Path) -> list[Spread]:
    """Every timed configuration of one asv results file (skipped and failed ones have no result
    and are left out). Raises ValueError for a file that is not asv results."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "results" not in data or "result_columns" not in data:
        raise ValueError(f"{path}: not an asv results file (no 'results' or 'result_columns')")
    columns = data["result_columns"]
    spreads = []
    for name, row in sorted(data["results"].items()):
        if ".time_" not in name and not name.split(".")[-1].startswith("time_"):
            continue  # peakmem_ and track_ values are single numbers, without a spread
        fields: dict[str, Any] = dict(zip(columns, row, strict=False))
        params = fields.get("params") or []
        combos = list(itertools.product(*params)) if params else [()]
        for i, combo in enumerate(combos):
            median = _at(fields.get("result"), i)
            q25, q75 = _at(fields.get("stats_q_25"), i), _at(fields.get("stats_q_75"), i)
            if median is None or q25 is None or q75 is None or median <= 0:
                continue
            repeat = _at(fields.get("stats_repeat"), i)
            spreads.append(Spread(name, tuple(combo), median, q75 - q25, int(repeat) if repeat else None))
    return spreads


def _at(values: Any, i: int) -> float | None:
    """The i-th finite number of a results column (a list per parameter combination, or a bare
    value for an unparameterised benchmark), else None."""
    value = values[i] if isinstance(values, list) and i < len(values) else values
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def results_files(paths: list[Path]) -> list[Path]:
    """The results files under ``paths`` (files, or folders searched recursively), leaving out
    asv's ``machine.json`` and ``benchmarks.json``."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(
                p for p in path.rglob("*.json") if p.name not in ("machine.json", "benchmarks.json")
            )
        else:
            found.append(path)
    return found


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics
    (NumPy's default), so the figure does not jump with one configuration more or less."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(spreads: list[Spread]) -> dict[str, dict[str, Any]]:
    """Per benchmark (its last name part, e.g. ``time_forward``) and ``all``: how many
    configurations, the median, 90th percentile and worst IQR / median, and the worst's label."""
    groups: dict[str, list[Spread]] = {}
    for s in spreads:
        groups.setdefault(s.benchmark.rsplit(".", 1)[-1], []).append(s)
    if spreads:
        groups["all"] = list(spreads)
    table = {}
    for name, group in groups.items():
        ratios = [s.ratio for s in group]
        worst = max(group, key=lambda s: s.ratio)
        table[name] = {
            "configurations": len(group),
            "median": percentile(ratios, 50),
            "p90": percentile(ratios, 90),
            "worst": worst.ratio,
            "worst_configuration": worst.label,
            "samples_median": percentile([float(s.samples) for s in group if s.samples], 50)
            if any(s.samples for s in group)
            else None,
        }
    return table


def meets_goals(summary: dict[str, dict[str, Any]]) -> bool:
    """Whether every timed configuration together meets ``GOALS``."""
    overall = summary.get("all")
    return bool(overall) and overall["median"] <= GOALS["median"] and overall["p90"] <= GOALS["p90"]


def format_summary(summary: dict[str, dict[str, Any]]) -> str:
    rows = [
        ("benchmark", "configurations", "median", "p90", "worst", "samples (median)", "worst configuration")
    ]
    for name, s in summary.items():
        samples = s["samples_median"]
        rows.append(
            (
                name,
                str(s["configurations"]),
                f"{s['median']:.1%}",
                f"{s['p90']:.1%}",
                f"{s['worst']:.1%}",
                f"{samples:g}" if samples is not None else "-",
                s["worst_configuration"],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.spread",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "paths", nargs="*", type=Path, help="asv results files or folders (default .asv/results)"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"exit 1 unless IQR/median is at most {GOALS['median']:.0%} at the median configuration "
        f"and {GOALS['p90']:.0%} at the 90th percentile",
    )
    args = parser.parse_args(argv)
    files = results_files(args.paths or [Path(".asv/results")])
    spreads = [s for f in files for s in read_spreads(f)]
    if not spreads:
        print(f"benchmarks.spread: no timed results in {', '.join(map(str, files)) or 'nothing'}")
        return 1 if args.check else 0
    summary = summarize(spreads)
    print(json.dumps(summary, indent=1) if args.json else format_summary(summary))
    if args.check and not meets_goals(summary):
        print(
            f"benchmarks.spread: IQR/median {summary['all']['median']:.1%} at the median, "
            f"{summary['all']['p90']:.1%} at the 90th percentile: above the goals "
            f"({GOALS['median']:.0%}, {GOALS['p90']:.0%})"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
