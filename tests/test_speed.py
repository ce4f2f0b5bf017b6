"""The main job's speed features change no verdict: the quick tier still kills every mutant,
a run spread over pytest-xdist workers reports what a serial run reports, and a warm run (JAX's
persistent compilation cache filled) gives a cold run's verdicts.

Each runs the real suite in a subprocess, as a user would; docs/speed.md has the figures.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import pytest

from mha_conformance import __main__ as suite
from mha_conformance.audit import mutation
from mha_conformance.checks import CHECKS
from mha_conformance.execution import tiers
from mha_conformance.impls.variants import mutants
from mha_conformance.vectors import golden

pytestmark = pytest.mark.filterwarnings("ignore")
SPECS = {c: golden.load_case(c).spec for c in golden.read_manifest()["cases"]}


def every_test(check: str) -> list[tuple[str, str]]:
    return [(c, d) for c, spec in SPECS.items() if CHECKS[check].applies(spec) for d in spec["dtypes"]]


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_quick_tier_covers_every_axis_and_dtype_in_a_fraction(check):
    tests = every_test(check)
    chosen = tiers.cover(tests, SPECS)
    assert {a for c, _ in tests for a in tiers.axes(SPECS[c])} == {
        a for c, _ in chosen for a in tiers.axes(SPECS[c])
    }
    assert {d for _, d in tests} == {d for _, d in chosen}
    assert chosen == tiers.cover(tests, SPECS)  # deterministic: the same tests on every machine
    if len(tests) > 100:  # the big checks: about a tenth
        assert len(chosen) <= 0.15 * len(tests), (len(chosen), len(tests))


def test_quick_tier_kills_every_mutant():
    """Every shipped mutant dies in the quick tier too, and the correct twin passes it."""
    result = mutation.run(["--quick"])
    assert result.score == (len(mutants.MUTANTS), len(mutants.MUTANTS)), mutation.format_table(result)
    assert result.twin_passes, mutation.format_table(result)
    quick_tests = sum(result.twin.counts.values())
    assert 0 < quick_tests <= 0.15 * sum(len(every_test(c)) for c in CHECKS)


def outcomes(report: Path) -> dict[str, tuple]:
    """Each test's verdict as the report gives it: outcome, reason and the figures."""
    tests = json.loads(report.read_text())["tests"]
    return {
        t["nodeid"]: (t["outcome"], t["reason"], json.dumps(t["verdicts"], sort_keys=True)) for t in tests
    }


def test_a_run_over_xdist_workers_reports_what_a_serial_run_reports(tmp_path):
    """``-n 2``: the same tests with the same verdicts (failures and skips included), one report,
    one history file and the summary table, written by the controller alone."""
    adapters = [mutants.Correct, mutants.CausalOffByOne, mutants.NanEmptyRows]
    args = ["--quick", "-p", "no:randomly"]
    args += [a for cls in adapters for a in ("--adapter", mutants.ref(cls))]
    runs, workers = {}, {}
    for name, extra in (("serial", []), ("xdist", ["-n", "2"]), ("load", ["-n", "2", "--dist", "load"])):
        report, history = tmp_path / f"{name}.json", tmp_path / f"{name}-history"
        done = suite.run([*args, *extra, "--report", str(report), "--history", str(history)])
        assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]  # the mutants fail
        assert "mha-conformance summary" in done.stdout
        assert len(list(history.iterdir())) == 1
        runs[name] = outcomes(report)
        data = json.loads(report.read_text())
        assert data["run"]["xdist_workers"] == (2 if extra else 0)
        assert data["run"]["xdist_dist"] == {"serial": "no", "xdist": "adapter-dtype", "load": "load"}[name]
        workers[name] = defaultdict(set)
        for t in data["tests"]:
            workers[name][t["adapter"], t["dtype"]].add(t["meta"].get("xdist_worker"))
    assert runs["xdist"] == runs["serial"] == runs["load"]
    assert {o for o, _, _ in runs["serial"].values()} >= {"passed", "failed", "skipped"}
    # -n alone keeps each adapter's dtype on one worker (it traces and compiles its structures
    # once); an explicit --dist is the user's choice, and spreads them.
    assert all(len(w) == 1 and None not in w for w in workers["xdist"].values()), workers["xdist"]
    assert any(len(w) == 2 for w in workers["load"].values()), workers["load"]


def test_xdist_scopes_are_an_adapters_dtypes():
    """What pytest-xdist hands a worker whole: every test of one adapter, device and dtype,
    whatever the check or property in front of its name; a longer built-in name is never read as
    a shorter one."""
    from mha_conformance.plugin import adapter_scope

    scope = adapter_scope(["torch-*"])
    ids = {
        "conformance/test_golden.py::test_golden[torch-flex-compiled-cpu-float32-seed_a]": "torch-flex-compiled-cpu-float32",
        "conformance/test_golden.py::test_golden[torch-flex-cpu-float32-seed_a]": "torch-flex-cpu-float32",
        "conformance/test_properties.py::test_property[masked-poison-nan-torch-flex-cpu-bfloat16-v_b]": "torch-flex-cpu-bfloat16",
        "conformance/test_decoding.py::test_decoding[decoding-torch-mha-noweights-cpu-float64-c]": "torch-mha-noweights-cpu-float64",
    }
    assert {nodeid: scope(nodeid) for nodeid in ids} == ids
    mine = adapter_scope([mutants.ref(mutants.Correct)])  # a user's adapter, by its own name
    assert (
        mine("t.py::test_property[batch-mutant-correct-twin-cpu-float16-c]")
        == "mutant-correct-twin-cpu-float16"
    )
    assert (
        mine("t.py::test_golden[other-cuda-float16-case]") == "other-cuda-float16"
    )  # unknown: up to the case
    assert mine("tests/test_docs.py::test_links") == "tests/test_docs.py::test_links"


def test_the_main_job_spreads_over_the_cores_unless_told_otherwise():
    """``nox -s conformance`` on the CPU: one pytest-xdist worker per core (at most eight, none on
    one core), unless the user names a worker count, a dispatch, a debugger or a device."""
    pytest.importorskip("nox")  # the noxfile imports it
    from importlib.util import module_from_spec, spec_from_file_location

    found = spec_from_file_location("noxfile", Path(__file__).parents[1] / "noxfile.py")
    noxfile = module_from_spec(found)
    found.loader.exec_module(noxfile)
    cores = min(os.cpu_count() or 1, noxfile.MAX_WORKERS)
    default = ["-n", str(cores)] if cores > 1 else []
    assert noxfile.default_workers([]) == default
    assert noxfile.default_workers(["--quick", "--device", "cpu", "--no-header", "-rfE"]) == default
    for given in (
        ["-n", "0"],
        ["-n3"],
        ["--numprocesses=4"],
        ["--dist", "load"],
        ["-p", "no:xdist"],
        ["--pdb"],
    ):
        assert noxfile.default_workers(given) == [], given
    for device in ("cuda", "mps", "all"):
        assert noxfile.default_workers(["--device", device]) == [], device


def test_a_warm_parallel_run_gives_a_cold_serial_runs_verdicts(tmp_path):
    """JAX's persistent compilation cache (impls/cache.py) in a fresh ``MHA_CACHE_DIR``: the
    cold serial run fills it, the warm run over two xdist workers compiles nothing new (the cache
    gains no entry) and gives the same verdicts."""
    pytest.importorskip("jax")
    env = dict(os.environ, MHA_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    args = ["--quick", "--adapter", "jax-sdpa"]
    entries = []
    runs = []
    for name, extra in (("cold", []), ("warm", ["-n", "2"])):
        report = tmp_path / f"{name}.json"
        done = suite.run([*args, *extra, "--report", str(report)], env=env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        runs.append(outcomes(report))
        entries.append(sorted(p.name for p in (tmp_path / "cache" / "jax").iterdir()))
    assert runs[0] == runs[1]
    assert len(entries[0]) > 10  # the cold run compiled and kept its executables
    assert entries[1] == entries[0]  # the warm run found every one of them


def test_timing_tables_flag_a_changed_verdict(tmp_path):
    """``nox -s conformance -- --timing``'s tables come from the reports it wrote, and a test two kinds judge
    differently is a difference (exit 1), whatever the kinds."""
    from mha_conformance.audit import timing

    def write(kind: str, outcome: str, duration: float, added: int) -> None:
        tests = [
            {
                "nodeid": "t[a]",
                "check": "golden",
                "adapter": "x",
                "duration": 1.0,
                "outcome": "passed",
                "reason": "",
            },
            {
                "nodeid": "t[b]",
                "check": "gradients",
                "adapter": "x",
                "duration": 2.0,
                "outcome": outcome,
                "reason": "",
            },
        ]
        run = {"duration": duration, "cache_added": added}
        (tmp_path / f"jax-{kind}.json").write_text(json.dumps({"run": run, "tests": tests}))

    write("cold", "passed", 30.0, 120)
    write("warm", "passed", 10.0, 0)
    assert timing.main(["--out", str(tmp_path), "--markdown", str(tmp_path / "t.md")]) == 0
    table = (tmp_path / "t.md").read_text()
    assert "| jax | 30 (+120 cached) | 10 | 2 / - | identical |" in table
    write("quick", "failed", 2.0, 0)
    assert timing.main(["--out", str(tmp_path)]) == 1
    assert timing.differences(timing.load(tmp_path)["jax"]) == ["cold vs quick: t[b]: passed vs failed"]


def test_xdist_workers_share_the_cores():
    """Each of N xdist workers' adapter processes gets cores // N threads in the pools sized from
    the environment, unless the user chose; a serial run leaves them alone."""
    from mha_conformance.execution.worker import THREAD_VARIABLES, shared_core_threads

    cores = os.cpu_count() or 1
    assert shared_core_threads({}) == {} and shared_core_threads({"PYTEST_XDIST_WORKER_COUNT": "1"}) == {}
    two = shared_core_threads({"PYTEST_XDIST_WORKER_COUNT": "2"})
    assert two == {name: str(max(1, cores // 2)) for name in THREAD_VARIABLES}
    many = shared_core_threads({"PYTEST_XDIST_WORKER_COUNT": str(4 * cores), "OMP_NUM_THREADS": "3"})
    assert many == {"TF_NUM_INTRAOP_THREADS": "1"}  # at least one; the user's OMP_NUM_THREADS stays


def test_first_run_kinds_start_cold_with_and_without_the_caches(tmp_path):
    """``cold-quick`` and ``uncached-quick`` both start from an empty cache folder (not this
    machine's); the first writes JAX's executables there, the second runs with the persistent
    caches off and writes none. Their reports parse back under the right label, and they agree."""
    pytest.importorskip("jax")
    from mha_conformance.audit import timing

    args = ["--label", "keras-x", "--out", str(tmp_path), "--kind", "cold-quick", "--kind", "uncached-quick"]
    assert timing.main([*args, "--adapter", "jax-sdpa", "--case", "batch1_self_t8", "-k", "golden"]) == 0
    found = timing.load(tmp_path)
    assert set(found) == {"keras-x"} and set(found["keras-x"]) == {"cold-quick", "uncached-quick"}
    cold, uncached = (found["keras-x"][k]["run"] for k in ("cold-quick", "uncached-quick"))
    assert cold["cache_added"] > 0, cold
    assert uncached["cache_added"] == 0, uncached
    assert timing.differences(found["keras-x"]) == []
