"""The history reader, the latest-matrix and trend policies, and merging machines' results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mha_conformance.dashboard import asv_results
from mha_conformance.results import history
from tests.history_fixtures import asv_results as make_asv_results
from tests.history_fixtures import record, small_history, write_run


def test_parse_name():
    assert history.parse_name("20261123T212307Z_b23cf4b45169-dirty_1617c4f8.json") == {
        "time": "20261123T212307Z",
        "commit": "b23cf4b45169-dirty",
        "token": "1617c4f8",
    }
    assert history.parse_name("notes.json") is None
    assert history.parse_name("20261123T212307Z_abc_XYZ.json") is None


def test_read_history_orders_runs_and_reports_damaged_files(tmp_path):
    expected = small_history(tmp_path)
    runs, problems = history.read_history(tmp_path)
    assert [r.started[:10] for r in runs] == ["2026-01-01", "2026-01-01", "2026-01-02"]
    assert [r.host for r in runs] == ["alpha", "beta", "alpha"]
    assert len(problems) == expected["problems"]
    truncated, not_report = sorted(problems, key=lambda p: p.path)
    assert "20260103T100000Z_abc123_0000dddd.json" in truncated.message and "truncated" in truncated.message
    assert "not a conformance report" in not_report.message and "delete or restore" in not_report.message


def test_read_history_rejects_unknown_outcomes_and_missing_folder(tmp_path):
    path = write_run(tmp_path, "2026-01-01T10:00:00+00:00", "alpha", [record("a", "float32", "c", "passed")])
    data = json.loads(path.read_text())
    data["tests"][0]["outcome"] = "exploded"
    path.write_text(json.dumps(data))
    runs, problems = history.read_history(tmp_path)
    assert runs == [] and "unknown outcome 'exploded'" in problems[0].message
    runs, problems = history.read_history(tmp_path / "nowhere")
    assert runs == [] and "nox -s conformance" in problems[0].message


def test_latest_matrix_takes_the_newest_run_per_cell(tmp_path):
    expected = small_history(tmp_path)
    runs, _ = history.read_history(tmp_path)
    rows = history.latest_matrix(runs)
    keys = ("adapter", "check", "dtype", "device", "host")
    got = {tuple(r[k] for k in keys): {o: r[o] for o in expected["total"]} for r in rows}
    assert got == expected["matrix"]
    sdpa = next(r for r in rows if r["adapter"] == "torch-sdpa" and r["dtype"] == "float32")
    assert sdpa["commit"] == "def456" and sdpa["worst_ratio"] == pytest.approx(1.9)  # the failure was fixed
    mha = next(r for r in rows if r["adapter"] == "torch-mha" and r["host"] == "alpha")
    assert mha["commit"] == "abc123"  # a partial later run does not hide it
    assert history.totals(rows) == expected["total"]


def test_a_quick_runs_cells_say_so(tmp_path):
    """A ``--quick`` run is newest for its cells (its verdicts are the latest news) and its rows
    say they come from the quick tier, so a cell's fewer tests read as a tier, not as lost tests."""
    write_run(tmp_path, "2026-01-01T10:00:00+00:00", "alpha", [record("x", "float32", "a", "passed")])
    write_run(
        tmp_path,
        "2026-01-02T10:00:00+00:00",
        "alpha",
        [record("x", "float32", "b", "failed", 9.0)],
        quick=True,
    )
    write_run(
        tmp_path, "2026-01-01T10:00:00+00:00", "beta", [record("y", "float32", "a", "passed")], token="1"
    )
    runs, _ = history.read_history(tmp_path)
    tiers = {r["adapter"]: (r["tier"], r["failed"]) for r in history.latest_matrix(runs)}
    assert tiers == {"x": ("quick", 1), "y": ("full", 0)}


def test_cell_tests_put_failures_first(tmp_path):
    write_run(
        tmp_path,
        "2026-01-01T10:00:00+00:00",
        "alpha",
        [
            record("x", "float32", "a_case", "passed", 0.1),
            record("x", "float32", "b_case", "skipped"),
            record("x", "float32", "c_case", "failed", 9.0),
            record("x", "float32", "d_case", "passed", 1.2),
        ],
    )
    runs, _ = history.read_history(tmp_path)
    tests = history.cell_tests(runs, history.latest_matrix(runs)[0])
    assert [t["case"] for t in tests] == ["c_case", "d_case", "a_case", "b_case"]


def test_trend_and_ratio_points(tmp_path):
    small_history(tmp_path)
    runs, _ = history.read_history(tmp_path)
    rows = history.trend(runs)
    assert [(r["host"], r["failed"], r["exit_status"]) for r in rows] == [
        ("alpha", 1, 1),
        ("beta", 0, 0),
        ("alpha", 0, 0),
    ]
    assert rows[0]["worst_ratio"] == pytest.approx(7.0)
    points = history.ratio_points(runs, {"self_basic_b2_t8_d16_h4": 8, "causal_long_t512_h2_hd8": 512})
    assert {(p["adapter"], p["seq_len"]) for p in points} == {
        ("torch-mha", 8),
        ("torch-sdpa", 8),
        ("torch-sdpa", 512),
    }
    assert all(p["ratio"] < 1e3 for p in points)  # the xfailed 1e6 is not an error-growth figure


def test_history_merge_policy(tmp_path):
    assert history.history_action(b"a", None) == "copy"
    assert history.history_action(b"a", b"a") == "same"
    assert history.history_action(b"a", b"b") == "conflict"
    here, there = tmp_path / "here", tmp_path / "there"
    small_history(here)
    write_run(
        there,
        "2026-02-01T10:00:00+00:00",
        "gamma",
        [record("torch-mha", "float32", "c", "passed")],
        token="1111ffff",
    )
    (there / "README.json").write_text("{}")  # not a history file: left alone
    same = here / "20260101T100000Z_abc123_0000aaaa.json"
    (there / same.name).write_bytes(same.read_bytes())
    (there / "20260101T120000Z_abc123_0000cccc.json").write_text("damaged copy")
    before = (here / "20260101T120000Z_abc123_0000cccc.json").read_bytes()
    done = history.merge_history(there, here)
    assert done["copy"] == ["20260201T100000Z_abc123_1111ffff.json"]
    assert done["same"] == [same.name]
    assert done["conflict"] == ["20260101T120000Z_abc123_0000cccc.json"]
    assert (here / "20260101T120000Z_abc123_0000cccc.json").read_bytes() == before  # never overwritten
    assert not (here / "README.json").exists()
    runs, _ = history.read_history(here)
    assert {r.host for r in runs} == {"alpha", "beta", "gamma"}


def test_asv_points_and_newest_figure_wins(tmp_path):
    make_asv_results(tmp_path, started_at=1000)
    newer = make_asv_results(tmp_path / "other", started_at=2000)
    data = json.loads(newer.read_text())
    data["results"]["bench_attention.Forward.time_forward"][0][0] = 0.5
    (tmp_path / "alpha-cpu" / "def456-existing-py.json").write_text(
        json.dumps({**data, "commit_hash": "def456"})
    )
    (tmp_path / "alpha-cpu" / "broken-existing-py.json").write_text("{")
    points, problems = asv_results.read_points(tmp_path, ["adapter", "shape", "dtype", "causal"])
    assert len(problems) == 1 and "broken-existing-py.json" in problems[0]
    latest = asv_results.latest_points(points)
    mha = [
        p
        for p in latest
        if p.machine == "alpha-cpu"
        and p.benchmark.endswith("time_forward")
        and p.params == {"adapter": "torch-mha", "shape": "gpt-t128", "dtype": "float32", "causal": "True"}
    ]
    assert [(p.value, p.commit) for p in mha] == [(0.5, "def456")]


def test_merge_result_file_keeps_the_newer_measurement():
    columns = ["result", "params", "version", "started_at"]
    old = {
        "result_columns": columns,
        "results": {"a": [1.0, [], "1", 100], "b": [2.0, [], "1", 100]},
        "durations": {},
    }
    new = {
        "result_columns": columns,
        "results": {"a": [9.0, [], "1", 50], "b": [8.0, [], "1", 200], "c": [7.0, [], "1", 10]},
        "durations": {"<build>": 1},
    }
    merged = asv_results.merge_result_file(old, new)
    assert {k: v[0] for k, v in merged["results"].items()} == {"a": 1.0, "b": 8.0, "c": 7.0}
    with pytest.raises(ValueError, match="different asv result formats"):
        asv_results.merge_result_file(old, {**new, "result_columns": ["result"]})


def test_merge_results_folders(tmp_path: Path):
    here, there = tmp_path / "here", tmp_path / "there"
    make_asv_results(here, "alpha-cpu", started_at=1000)
    make_asv_results(there, "alpha-cpu", started_at=2000)  # same machine and commit, re-measured
    make_asv_results(there, "beta-cuda", started_at=1500)  # another machine
    (there / "alpha-cpu" / "machine.json").write_text(json.dumps({"machine": "alpha-cpu", "cpu": "other"}))
    (here / "benchmarks.json").write_text(json.dumps({"a": 1, "version": 2}))
    (there / "benchmarks.json").write_text(json.dumps({"b": 2, "version": 2}))
    done = asv_results.merge_results(there, here)
    assert sorted(done["copy"]) == ["beta-cuda/abc123-existing-py.json", "beta-cuda/machine.json"]
    assert sorted(done["merge"]) == ["alpha-cpu/abc123-existing-py.json", "benchmarks.json"]
    assert done["conflict"] == ["alpha-cpu/machine.json (kept the one already here)"]
    merged = json.loads((here / "alpha-cpu" / "abc123-existing-py.json").read_text())
    assert merged["results"]["bench_attention.Forward.time_forward"][3] == 2000
    assert json.loads((here / "benchmarks.json").read_text()) == {"a": 1, "b": 2, "version": 2}
    points, _ = asv_results.read_points(here, ["adapter", "shape", "dtype", "causal"])
    assert {p.machine for p in points} == {"alpha-cpu", "beta-cuda"}


def test_reports_from_before_checks_and_errors_still_read(tmp_path):
    """Older reports have no 'check' and no 'error' count; newer ones split rows by check."""
    old = write_run(tmp_path, "2026-01-01T10:00:00+00:00", "alpha", [record("x", "float32", "c", "passed")])
    data = json.loads(old.read_text())
    for row in data["summary"]:
        row.pop("check", None), row.pop("error", None)
    for test in data["tests"]:
        test.pop("check", None)
    old.write_text(json.dumps(data))
    grad = record("x", "float32", "c", "failed", 5.0)
    grad.check = "gradient"
    write_run(tmp_path, "2026-01-02T10:00:00+00:00", "alpha", [grad], token="2222aaaa")
    runs, problems = history.read_history(tmp_path)
    assert problems == []
    rows = {r["check"]: r for r in history.latest_matrix(runs)}
    assert set(rows) == {"golden", "gradient"}
    assert (rows["golden"]["passed"], rows["golden"]["error"]) == (1, 0)
    assert rows["gradient"]["failed"] == 1
    assert [t["case"] for t in history.cell_tests(runs, rows["golden"])] == ["c"]
