"""Small conformance histories and asv results for the history and dashboard tests.

Reports are built with the suite's own ``mha_conformance.results.report.build_report``, so the fixtures
follow the real format; the counts each fixture implies are returned for the assertions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mha_conformance.results import report
from mha_conformance.results.report import OUTCOMES


def counts(**given: int) -> dict[str, int]:
    """Outcome counts with every outcome the report format knows (zeros unless given)."""
    return {o: given.get(o, 0) for o in OUTCOMES}


VERDICT = {
    "tensor": "output",
    "passed": True,
    "problem": "",
    "max_abs_err": 1e-7,
    "max_rel_err": 1e-7,
    "worst_index": [0, 0, 0],
    "actual_at_worst": 0.5,
    "expected_at_worst": 0.5,
    "baseline": 1e-7,
    "floor": 1e-8,
    "tolerance": 2.2e-7,
    "ratio": 0.9,
    "nonfinite": 0,
    "where_over": "",
}


def record(adapter: str, dtype: str, case: str, outcome: str, ratio: float | None = 0.9, device: str = "cpu"):
    rec = report.TestRecord(
        f"conformance/test_golden.py::test_golden[{adapter}-{device}-{dtype}-{case}]",
        "golden",
        adapter,
        device,
        dtype,
        case,
        outcome,
    )
    if outcome in ("passed", "failed", "xfailed", "xpassed") and ratio is not None:
        rec.verdicts = [{**VERDICT, "ratio": ratio, "passed": ratio <= 2}]
    if outcome == "skipped":
        rec.reason = "nn.MultiheadAttention has no grouped-query attention"
    if outcome == "failed":
        rec.reason = "output: max abs err 4.9e-01 at index [0, 6, 13]"
    rec.meta = {"device_name": "Test CPU", "kernel": "aten::_scaled_dot_product_flash_attention_for_cpu"}
    return rec


def write_run(
    folder: Path,
    started: str,
    host: str,
    records: list,
    commit: str = "abc123",
    token: str = "0000aaaa",
    quick: bool = False,
):
    """One history file named as the suite names them; returns its path."""
    env = report.environment({})
    env["hostname"] = host
    run = {
        "started": started,
        "finished": started,
        "commit": commit,
        "k_factor": 2.0,
        "args": [],
        "exit_status": 1 if any(r.outcome == "failed" for r in records) else 0,
        "duration": 1.0,
        "quick": quick,
    }
    stamp = started[:19].replace("-", "").replace(":", "") + "Z"
    path = folder / f"{stamp}_{commit}_{token}.json"
    report.write_json_atomic(path, report.build_report(records, env, run))
    return path


def small_history(folder: Path) -> dict[str, Any]:
    """Two runs on host 'alpha' (the second covers torch-sdpa only), one run on host 'beta',
    plus a truncated file and a JSON file that is not a report."""
    folder.mkdir(parents=True, exist_ok=True)
    write_run(
        folder,
        "2026-01-01T10:00:00+00:00",
        "alpha",
        [
            record("torch-mha", "float32", "self_basic_b2_t8_d16_h4", "passed", 0.5),
            record("torch-mha", "float32", "gqa_h8_kv2", "skipped"),
            record("torch-mha", "float32", "mask_fully_masked_query_rows", "xfailed", 1e6),
            record("torch-sdpa", "float32", "self_basic_b2_t8_d16_h4", "passed", 1.5),
            record("torch-sdpa", "float32", "causal_long_t512_h2_hd8", "failed", 7.0),
        ],
        token="0000aaaa",
    )
    write_run(
        folder,
        "2026-01-02T10:00:00+00:00",
        "alpha",
        [
            record("torch-sdpa", "float32", "self_basic_b2_t8_d16_h4", "passed", 1.1),
            record("torch-sdpa", "float32", "causal_long_t512_h2_hd8", "passed", 1.9),
            record("torch-sdpa", "bfloat16", "causal_long_t512_h2_hd8", "xpassed", 0.7),
        ],
        commit="def456",
        token="0000bbbb",
    )
    write_run(
        folder,
        "2026-01-01T12:00:00+00:00",
        "beta",
        [
            record("torch-mha", "float32", "self_basic_b2_t8_d16_h4", "passed", 0.4),
            record("torch-mha", "float32", "decode_tq1_tk1024_long_cache", "passed", 0.8),
        ],
        token="0000cccc",
    )
    (folder / "20260103T100000Z_abc123_0000dddd.json").write_text('{"format_version": "1", "run": {"sta')
    (folder / "20260104T100000Z_abc123_0000eeee.json").write_text(json.dumps({"hello": "world"}))
    return {
        # (adapter, check, dtype, device, host) -> counts of the newest run covering it
        "matrix": {
            ("torch-mha", "golden", "float32", "cpu", "alpha"): counts(passed=1, skipped=1, xfailed=1),
            ("torch-mha", "golden", "float32", "cpu", "beta"): counts(passed=2),
            ("torch-sdpa", "golden", "bfloat16", "cpu", "alpha"): counts(xpassed=1),
            ("torch-sdpa", "golden", "float32", "cpu", "alpha"): counts(passed=2),
        },
        "total": counts(passed=5, skipped=1, xfailed=1, xpassed=1),
        "runs": 3,
        "problems": 2,
    }


COLUMNS = [
    "result",
    "params",
    "version",
    "started_at",
    "duration",
    "stats_ci_99_a",
    "stats_ci_99_b",
    "stats_q_25",
    "stats_q_75",
    "stats_number",
    "stats_repeat",
    "samples",
    "profile",
]


def asv_results(folder: Path, machine: str = "alpha-cpu", started_at: int = 1_767_261_600_000) -> Path:
    """An asv results folder (format 2) with time_forward and track_gflops for two adapters."""
    params = [
        ["'torch-mha'", "'torch-sdpa'"],
        ["'gpt-t128'", "'gpt-t512'", "'gpt-t2048'"],
        ["'float32'"],
        ["True"],
    ]
    times = [0.004, 0.02, 0.3, 0.002, 0.01, 0.1]  # mha x 3 lengths, then sdpa
    gflops = [20.0, 25.0, 18.0, 40.0, 50.0, 60.0]
    data = {
        "commit_hash": "abc123",
        "env_name": "existing-py",
        "date": started_at,
        "params": {"machine": machine},
        "python": "3.11",
        "requirements": {},
        "env_vars": {},
        "result_columns": COLUMNS,
        "durations": {},
        "results": {
            "bench_attention.Forward.time_forward": [times, params, "1", started_at, 10.0],
            "bench_attention.Roofline.track_gflops": [gflops, params, "1", started_at, 5.0],
        },
        "version": 2,
    }
    target = folder / machine
    target.mkdir(parents=True, exist_ok=True)
    (target / "machine.json").write_text(json.dumps({"machine": machine, "version": 1}))
    path = target / "abc123-existing-py.json"
    path.write_text(json.dumps(data))
    return path


def large_history(folder: Path, runs: int, tests: int) -> None:
    """``runs`` runs of ``tests`` tests each (24 adapters x 10 checks x 4 dtypes x cases; mostly
    passes, with skips, declared divergences and a failure), for the dashboard's size and load
    time at scale. One report is serialised once and written ``runs`` times under other dates."""
    from mha_conformance.checks import CHECKS

    folder.mkdir(parents=True, exist_ok=True)
    adapters = [f"adapter-{i:02d}" for i in range(24)]
    checks = list(CHECKS)[:10]
    dtypes = ["float64", "float32", "float16", "bfloat16"]
    per_cell = -(-tests // (len(adapters) * len(checks) * len(dtypes)))
    records = []
    for a in adapters:
        for check in checks:
            for dtype in dtypes:
                for n in range(per_cell):
                    outcome = ("passed",) * 6 + ("skipped", "skipped", "xfailed", "passed")
                    rec = record(a, dtype, f"case_{n:03d}", outcome[n % 10], ratio=0.1 + (n % 17) / 10)
                    rec.check = check
                    if rec.outcome == "xfailed":
                        rec.reason = f"declared divergence {n % 7} of {a}: a semantic difference"
                    records.append(rec)
    records[0].outcome, records[0].reason = "failed", "output: max abs err 4.9e-01 at index [0, 6, 13]"
    env = report.environment({})
    run = {"started": "STARTED", "finished": "STARTED", "commit": "abc123", "k_factor": 2.0, "args": []}
    text = json.dumps(report.build_report(records, env, {**run, "exit_status": 1, "duration": 1.0}))
    for i in range(runs):
        started = f"2026-02-{1 + i // 24:02d}T{i % 24:02d}:00:00+00:00"
        stamp = started[:19].replace("-", "").replace(":", "") + "Z"
        (folder / f"{stamp}_abc123_{i:08x}.json").write_text(text.replace("STARTED", started))
