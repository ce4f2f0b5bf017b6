"""Per-test records, the end-of-run summary table, and the JSON report and history files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

REPORT_FORMAT = "1"
#: The most characters of one test's reason kept (an adapter's exception message can be any size).
REASON_LIMIT = 20_000


def clip(text: str, limit: int = REASON_LIMIT) -> str:
    """``text`` cut to about ``limit`` characters, keeping its head and its tail (where the
    reproduce line is), and saying how much was cut."""
    if len(text) <= limit:
        return text
    head, tail = limit * 3 // 4, limit // 4
    return f"{text[:head]}\n... [{len(text) - head - tail} characters cut] ...\n{text[-tail:]}"


OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed", "finding")


@dataclass
class TestRecord:
    """One test's outcome with every figure the report and dashboard need."""

    nodeid: str
    check: str
    adapter: str
    device: str
    dtype: str
    case: str
    outcome: str = "passed"
    reason: str = ""
    duration: float = 0.0
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def worst_ratio(self) -> float | None:
        ratios = [v["ratio"] for v in self.verdicts if v["ratio"] is not None]
        return max(ratios) if ratios else None


def summarize(records: Iterable[TestRecord]) -> list[dict[str, Any]]:
    """Rows of adapter x check x dtype x device with outcome counts and the worst error ratio."""
    rows: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for r in records:
        row = rows.setdefault(
            (r.adapter, r.check, r.dtype, r.device),
            {
                "adapter": r.adapter,
                "check": r.check,
                "dtype": r.dtype,
                "device": r.device,
                **dict.fromkeys(OUTCOMES, 0),
                "worst_ratio": None,
                "xfail_worst_rel_err": None,
            },
        )
        row[r.outcome] += 1
        if r.outcome == "xfailed":  # how far a declared divergence actually reaches
            rels = [v["max_rel_err"] for v in r.verdicts if v["max_rel_err"] is not None]
            if rels and (row["xfail_worst_rel_err"] is None or max(rels) > row["xfail_worst_rel_err"]):
                row["xfail_worst_rel_err"] = max(rels)
        ratio = r.worst_ratio
        if (
            ratio is not None
            and r.outcome in ("passed", "failed")
            and (row["worst_ratio"] is None or ratio > row["worst_ratio"])
        ):
            row["worst_ratio"] = ratio
    return [rows[k] for k in sorted(rows)]


def format_table(rows: list[dict[str, Any]], k: float) -> str:
    """The summary as aligned text; the ratio column is error / (baseline + floor), pass <= k."""
    header = [
        "adapter",
        "check",
        "dtype",
        "device",
        *OUTCOMES,
        f"worst ratio (pass <= {k:g})",
        "xfailed: worst rel err",
    ]
    body = [
        [
            r["adapter"],
            r.get("check", "golden"),
            r["dtype"],
            r["device"],
            *(str(r[o]) for o in OUTCOMES),
            "-" if r["worst_ratio"] is None else f"{r['worst_ratio']:.3g}",
            "-" if r.get("xfail_worst_rel_err") is None else f"{r['xfail_worst_rel_err']:.2g}",
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


#: The repository checkout the suite runs from, if it runs from one (None when installed).
CHECKOUT = Path(__file__).resolve().parents[2]


def source_root() -> Path | None:
    """The git checkout this code lives in, or None when it is an installed package."""
    return CHECKOUT if (CHECKOUT / ".git").exists() else None


def git_commit(root: Path | None = None) -> str:
    """The short commit of ``root`` (default: this code's checkout), with ``+dirty`` when its code
    or vectors have changes (not docs/: a generated table rewrites them, and does not change
    what the code computes); for an installed package, ``mha-conformance <version>``."""
    root = root or source_root()
    if root is None:
        return f"mha-conformance {package_versions(['mha-conformance']).get('mha-conformance', 'unknown')}"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def package_versions(names: Iterable[str]) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def environment(adapter_versions: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Where the run happened: interpreter, OS, host CPU and framework versions."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "packages": package_versions(["numpy", "safetensors", "ml_dtypes", "pytest"]),
        "adapters": adapter_versions,
    }


def build_report(records: list[TestRecord], env: dict, run: dict) -> dict[str, Any]:
    return {
        "format_version": REPORT_FORMAT,
        "run": run,
        "environment": env,
        "summary": summarize(records),
        "tests": [asdict(r) for r in records],
    }


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=1, default=str)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def history_name(started: datetime, commit: str) -> str:
    """``<UTC time>_<commit>_<random>.json``: sortable by time, unique across concurrent runs."""
    stamp = started.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}_{commit.replace('+', '-')}_{uuid.uuid4().hex[:8]}.json"
