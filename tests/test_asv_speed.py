"""How the asv suite is kept fast and repeatable: the spread of a real run read from asv's results
file, the sampling each configuration gets, the forkserver's preload and launch method per
backend, and the stores that spare each benchmark process the gate's reference and slow inputs."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import common, runner, spread
from tests.runs import asv_setup

ROOT = Path(__file__).resolve().parents[1]
needs_asv = pytest.mark.skipif(
    shutil.which("asv") is None and not (Path(sys.executable).parent / "asv").exists(),
    reason="asv is not installed: pip install '.[bench]'",
)


@needs_asv
def test_spread_of_a_real_asv_results_file(tmp_path):
    """A real asv run (forkserver, as asv.conf.json says) of one configuration's forward and
    backward, results saved with their raw samples: the spread read from the results file is
    asv's own quartiles over its median, equal to what the samples give; a short call is sampled
    several at a time (``common.calls_per_sample``); the command prints the summary."""
    pytest.importorskip("torch")
    asv, env = asv_setup(tmp_path, ROOT, "spread")
    env[common.PRELOAD_ENV] = "torch"
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    args = ("torch-sdpa", "gpt-t128", "float32", True)
    selection = runner.param_regex(*args).replace(r"(Forward|Gradients|Roofline)\.\w+", r"\w+\.time_\w+")
    done = subprocess.run(
        [*asv, "run", "--python=same", "--machine", "spread", "--set-commit-hash", head]
        + ["--record-samples", "--launch-method", "forkserver", "--bench", selection],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # a hang guard: about 30 s here
    )
    assert done.returncode == 0, done.stdout[-3000:]
    (results,) = spread.results_files([tmp_path / "results"])
    found = {s.benchmark: s for s in spread.read_spreads(results)}
    forward, backward = "bench_attention.Forward.time_forward", "bench_attention.Gradients.time_backward"
    assert set(found) == {forward, backward}
    data = json.loads(results.read_text())
    rows = {name: dict(zip(data["result_columns"], data["results"][name], strict=False)) for name in found}
    for name, s in found.items():
        assert s.values == ("torch-sdpa", "gpt-t128", "float32", "True")
        ran = [i for i, r in enumerate(rows[name]["result"]) if r is not None and not math.isnan(r)]
        assert len(ran) == 1
        samples = np.array(rows[name]["samples"][ran[0]])
        assert len(samples) == s.samples >= common.REPEAT[0]
        q25, q50, q75 = np.percentile(samples, [25, 50, 75])  # asv's quantiles interpolate linearly
        assert s.median == pytest.approx(q50, rel=1e-3)
        assert s.ratio == pytest.approx((q75 - q25) / q50, rel=1e-2, abs=1e-4)
        assert s.ratio >= 0  # how large it is depends on how busy the machine was: benchmarks' business
    entry = json.loads((tmp_path / "run.json").read_text())["configs"][common.config_key(*args, "cpu")]
    for name, kind in ((forward, "forward"), (backward, "backward")):
        # asv's number is calls_per_sample of the calibrated call, whatever the machine's speed
        (number,) = [n for n in rows[name]["stats_number"] if n]
        assert number == common.calls_per_sample(entry[f"{kind}_call_seconds"]), (name, entry)
    assert entry["status"] == "ok" and entry["gate_ratio"] <= 2 and entry["samples"] >= common.REPEAT[0]
    shown = subprocess.run(
        [sys.executable, "-m", "benchmarks.spread", str(tmp_path / "results"), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    summary = json.loads(shown.stdout)
    assert summary["all"]["configurations"] == 2
    assert summary["all"]["median"] == pytest.approx(np.median([s.ratio for s in found.values()]))
    check = subprocess.run(
        [sys.executable, "-m", "benchmarks.spread", str(results), "--check"], cwd=ROOT, capture_output=True
    )
    assert check.returncode == (0 if spread.meets_goals(summary) else 1)


def test_spread_summary_and_percentiles(tmp_path):
    """The figures on known values: linear-interpolated percentiles, per benchmark and overall,
    skipped and failed configurations left out, peakmem and track values never counted."""
    assert spread.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert spread.percentile([float(i) for i in range(11)], 90) == pytest.approx(9.0)
    assert spread.percentile([5.0], 90) == 5.0
    params = [["'a'", "'b'"], ["True"]]
    columns = ["result", "params", "version", "started_at", "duration", "stats_ci_99_a", "stats_ci_99_b"]
    columns += ["stats_q_25", "stats_q_75", "stats_number", "stats_repeat"]
    nan = float("nan")
    data = {
        "result_columns": columns,
        "results": {
            "bench_attention.Forward.time_forward": [
                [0.010, nan],  # 'b' skipped
                params,
                "1",
                0,
                1.0,
                None,
                None,
                [0.0099, None],
                [0.0103, None],
                [4, None],
                [7, None],
            ],
            "bench_attention.Gradients.time_backward": [[0.1, 0.2], params, "1", 0, 1.0, None, None]
            + [[0.09, 0.19], [0.11, 0.23], [1, 1], [5, 5]],
            "bench_attention.Forward.peakmem_forward": [[3e8, 3e8], params, "2"],
            "bench_attention.Roofline.track_gflops": [[50.0, 60.0], params, "1"],
        },
    }
    path = tmp_path / "abc-env.json"
    path.write_text(json.dumps(data))
    found = spread.read_spreads(path)
    assert sorted((s.label, round(s.ratio, 6)) for s in found) == [
        ("time_backward(a, True)", 0.2),
        ("time_backward(b, True)", 0.2),
        ("time_forward(a, True)", 0.04),
    ]
    summary = spread.summarize(found)
    assert summary["time_forward"]["configurations"] == 1
    assert summary["all"]["median"] == pytest.approx(0.2) and summary["all"]["worst"] == pytest.approx(0.2)
    assert not spread.meets_goals(summary)
    assert spread.results_files([tmp_path]) == [path]
    (tmp_path / "machine.json").write_text("{}")
    assert spread.results_files([tmp_path]) == [path]  # asv's machine file is not results
    with pytest.raises(ValueError, match="not an asv results file"):
        spread.read_spreads(tmp_path / "machine.json")


def test_calls_per_sample_fit_each_call_length():
    """Short calls are averaged over several calls per sample, long ones are their own sample."""
    assert common.calls_per_sample(0.015) * 0.015 == pytest.approx(common.SAMPLE_SECONDS, rel=0.2)
    assert common.calls_per_sample(0.4) == 1 and common.calls_per_sample(1e-5) == common.MAX_NUMBER
    assert common.calls_per_sample(0.0) == 1 and common.calls_per_sample(float("nan")) == 1


def test_launch_method_per_backend_and_device(monkeypatch):
    """forkserver on CPUs, with the environment's frameworks to preload; spawn on GPUs and for a
    framework listed as not tolerating a fork."""
    from mha_conformance.impls import registry

    torch_adapters = [registry.builtin("torch-sdpa"), registry.builtin("torch-flex-compiled")]
    assert runner.launch_method(torch_adapters, "cpu")[0] == "forkserver"
    assert runner.launch_method(torch_adapters, "cuda")[0] == "spawn"
    monkeypatch.setitem(runner.NO_FORK, "torch", "a test says so")
    method, why = runner.launch_method(torch_adapters, "cpu")
    assert method == "spawn" and "a test says so" in why
    assert common.preload_modules(["torch-sdpa"]) == ["torch"]
    flex = common.preload_modules(["torch-sdpa", "torch-flex-compiled"])
    assert flex[0] == "torch" and "torch._inductor.compile_fx" in flex
    assert flex[-1] == "mha_conformance.impls.torch.flex:probe_cpu_compiler"  # after its imports
    assert common.preload_modules(["keras-mha-jax", "flax-mha"]) == ["keras", "jax", "flax.nnx"]


def test_plan_preloads_the_environment_not_the_selection():
    """The preload is part of every benchmark process (and of peakmem_forward): it follows what
    is installed, not the --adapter patterns of a run."""
    pytest.importorskip("torch")
    one, every = runner.plan("cpu", ["torch-sdpa"]), runner.plan("cpu", ["torch-*"])
    assert one["launch_method"] == every["launch_method"] == "forkserver"
    assert one["preload"] == every["preload"] and "torch" in one["preload"]
    # torch-sdpa: GPT causal, the Transformer without a mask, ALiBi causal (no softcap: no Gemma 2)
    runs = [("gpt", True), ("transformer", False), ("alibi", True)]
    expected = [["torch-sdpa", f"{p}-t{n}", "float32", c] for p, c in runs for n in common.SEQ_LENS]
    assert sorted(one["configurations"]) == sorted(expected)
    assert runner.plan("cpu", ["torch-sdpa"], shapes=["gpt-*"])["configurations"] == [
        ["torch-sdpa", f"gpt-t{n}", "float32", True] for n in common.SEQ_LENS
    ]


def test_preload_imports_only_in_the_forkserver(monkeypatch, tmp_path):
    """``MHA_BENCH_PRELOAD`` is honoured in asv's forkserver (``benchmark.py run_server``) only:
    asv's discovery and a spawned benchmark would pay for the imports and gain nothing. A
    ``module:function`` entry also runs the module's probe there."""
    (tmp_path / "preload_probe.py").write_text("CALLS = []\ndef probe():\n    CALLS.append(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(common.PRELOAD_ENV, "json, xml.dom.minidom, preload_probe:probe")
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "discover", "dir", "out"])
    assert common.preload() == []
    assert "preload_probe" not in sys.modules
    monkeypatch.delitem(sys.modules, "xml.dom.minidom", raising=False)
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "run_server", "dir", "socket"])
    assert common.preload() == ["json", "xml.dom.minidom", "preload_probe:probe"]
    assert "xml.dom.minidom" in sys.modules and sys.modules["preload_probe"].CALLS == [1]
    monkeypatch.delitem(sys.modules, "preload_probe")


def test_gate_reference_store(tmp_path, monkeypatch):
    """The gate's reference side is computed once and read back bit for bit; the verdict is the
    same either way, a wrong kernel is still stopped, and other inputs are another entry."""
    monkeypatch.setenv("MHA_CACHE_DIR", str(tmp_path))
    spec = common.config_spec("gpt-t128", True)
    inputs = common.inputs_of(spec)
    first = common.gate_reference(inputs, spec, "float32")
    again = common.gate_reference(inputs, spec, "float32")
    assert not first.stored and again.stored
    assert np.array_equal(first.truth, again.truth) and first.truth.dtype == again.truth.dtype
    assert (first.baseline, first.error_scale) == (again.baseline, again.error_scale)
    assert list(first.rows) == list(again.rows)
    assert len(list(common.gate_store().glob("*.json"))) == 1
    from tests.test_benchmarks import numpy_bench

    assert common.gate(numpy_bench(spec, inputs), inputs, spec, "float32", "numpy") <= 2
    with pytest.raises(common.WrongResult, match="no timing is posted"):
        common.gate(numpy_bench(spec, inputs, scale_bug=True), inputs, spec, "float32", "numpy")
    other = {**inputs, "query": inputs["query"] * 0.5}
    assert not common.gate_reference(other, spec, "float32").stored
    assert common.store_gate_references([["torch-sdpa", "gpt-t128", "float32", True]] * 2) == (0, 1)
    common.gate_store().joinpath(next(common.gate_store().glob("*.json")).name).write_text("{damaged")
    assert common.store_gate_references([["x", "gpt-t128", "float32", True]]) in ((1, 0), (0, 1))


def test_slow_inputs_are_stored(tmp_path, monkeypatch):
    """Inputs over ``SLOW_INPUTS_SECONDS`` to build are kept (safetensors) and read back equal;
    quick ones are not written."""
    from mha_conformance.vectors.generate import build_inputs

    monkeypatch.setenv("MHA_CACHE_DIR", str(tmp_path))
    spec = common.config_spec("alibi-t128", True)
    monkeypatch.setattr(common, "SLOW_INPUTS_SECONDS", float("inf"))  # never slow, however busy
    common.inputs_of(spec)
    assert not (tmp_path / "inputs").exists()
    monkeypatch.setattr(common, "SLOW_INPUTS_SECONDS", -1.0)
    common.inputs_of(spec)
    (stored,) = (tmp_path / "inputs").glob("*.safetensors")
    read, built = common.inputs_of(spec), build_inputs(spec)
    assert sorted(read) == sorted(built)
    assert all(np.array_equal(read[k], built[k]) and read[k].dtype == built[k].dtype for k in built)
    stored.write_bytes(b"damaged")
    assert sorted(common.inputs_of(spec)) == sorted(built)  # rebuilt, and replaced


@needs_asv
def test_forkserver_runs_every_framework_here(tmp_path):
    """A quick real asv run under the forkserver, with this environment's frameworks preloaded as
    the runner does, of one configuration per framework installed here: each is built, gated and
    run in a forked process, with its threads fixed in that process (TensorFlow's and XLA's
    before their runtime starts: the parent's imports did not start it)."""
    plan = runner.plan("cpu", ["torch-sdpa", "jax-sdpa", "flax-mha", "keras-mha*", "onnx-attention"])
    chosen = {c[0]: c for c in plan["configurations"] if c[1] == "gpt-t128"}
    if not chosen:
        pytest.skip("no framework with a timed path is installed here")
    assert plan["launch_method"] == "forkserver" and plan["preload"]
    asv, env = asv_setup(tmp_path, ROOT, "fork")
    env.update({common.PRELOAD_ENV: ",".join(plan["preload"]), "MHA_BENCH_THREADS": "2"})
    selection = [a for c in chosen.values() for a in ("--bench", runner.param_regex(*c))]
    done = subprocess.run(
        [*asv, "run", "--python=same", "--quick", "--machine", "fork", "--launch-method", "forkserver"]
        + ["--show-stderr", *selection],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # a hang guard: 40-90 s here; 10x on a busy machine
    )
    assert done.returncode == 0 and "failed" not in done.stdout, done.stdout[-4000:]
    configs = json.loads((tmp_path / "run.json").read_text())["configs"]
    for name, c in chosen.items():
        entry = configs[common.config_key(*c, "cpu")]
        assert entry["status"] == "ok" and entry["gate_ratio"] <= 2, (name, entry)
        assert entry["forward_median"] > 0 and entry["meta"]["threads"] == "2", (name, entry)
        if "threads_how" in entry["meta"]:  # TensorFlow and XLA say how they were fixed
            assert "started" not in entry["meta"]["threads_how"] or "before" in entry["meta"]["threads_how"]


def test_measured_table_from_run_logs_and_results(tmp_path):
    """The docs' measured table: the newest full and quick run per label of the commit (other
    commits and older runs left out), totals, the spread of the recorded timings and the forward
    medians with the worst gate ratio; a commit that never ran is a clear error."""
    from benchmarks import measured

    runs, results = tmp_path / "runs", tmp_path / "results"
    runs.mkdir()
    key = "torch-sdpa|gpt-t128|float32|causal=True|cpu|threads=2"

    def log(name: str, commit: str, label: str, quick: bool, seconds: float, median: float) -> None:
        configs = {key: {"status": "ok", "gate_ratio": 0.5, "forward_median": median}}
        configs["torch-mha|gpt-t128|float32|causal=True|cpu|threads=2"] = {"status": "wrong", "reason": "x"}
        (runs / f"m-cpu-{name}.json").write_text(json.dumps({"configs": configs}))
        run = {"commit": commit, "label": label, "quick": quick, "seconds": seconds, "configurations": 2}
        measured.record_run(runs / f"m-cpu-{name}.json", run)

    log("20260101T000000Z", "a" * 40, "torch", False, 500.0, 0.030)  # older full run: replaced
    log("20260102T000000Z", "a" * 40, "torch", False, 200.0, 0.020)
    log("20260103T000000Z", "a" * 40, "torch", True, 60.0, 0.025)
    log("20260104T000000Z", "b" * 40, "torch", False, 999.0, 0.040)  # another commit
    log("20260105T000000Z", "a" * 40, "onnx", False, 50.0, 0.010)
    (results / "m-cpu").mkdir(parents=True)
    columns = ["result", "params", "version", "started_at", "duration", "stats_ci_99_a", "stats_ci_99_b"]
    columns += ["stats_q_25", "stats_q_75", "stats_number", "stats_repeat"]
    row = [[0.020], [["'torch-sdpa'"], ["'gpt-t128'"], ["'float32'"], ["True"]], "1", 0, 1.0, None, None]
    data = {
        "result_columns": columns,
        "results": {"bench_attention.Forward.time_forward": row + [[0.0195], [0.0205], [5], [6]]},
    }
    (results / "m-cpu" / f"{'a' * 8}-env.json").write_text(json.dumps(data))

    body = measured.render("m-cpu", "a" * 40, runs, results)
    rows = {line.split(" | ")[0]: line for line in body.splitlines() if line.startswith("| ")}
    assert rows["| torch"] == "| torch | 2 | 200 | 60 | 1 ok, 1 wrong |"
    assert rows["| onnx"].startswith("| onnx | 2 | 50 | - |")
    assert rows["| **all**"] == "| **all** | | **250** | **60** | |"
    assert "999" not in body and "500" not in body
    (forward,) = [line.split() for line in body.splitlines() if line.startswith("time_forward ")]
    assert forward[1:5] == ["1", "5.0%", "5.0%", "5.0%"]  # (0.0205 - 0.0195) / 0.020
    assert "| `torch-sdpa` | 20.0 | 0.50 |" in body  # the full run's median, not the quick one's
    with pytest.raises(LookupError, match="no benchmark run of commit cccccccccccc"):
        measured.render("m-cpu", "c" * 40, runs, results)


def test_quick_runs_go_side_by_side(tmp_path):
    """A ``--quick`` run deals its configurations out to asv runs side by side (each with its own
    run cache and forkserver) and merges what they found into one run log. A run that keeps its
    timings is never split."""
    pytest.importorskip("torch")
    with pytest.raises(SystemExit, match="--quick runs only"):
        runner.quick_jobs(2, quick=False, device="cpu", configurations=4)
    assert runner.quick_jobs(None, quick=False, device="cpu", configurations=4) == 1
    assert runner.quick_jobs(None, quick=True, device="cuda", configurations=4) == 1
    assert runner.quick_jobs(8, quick=True, device="cpu", configurations=3) == 3
    configurations = [
        ("torch-sdpa", "gpt-t128", "float32", True),
        ("torch-sdpa", "transformer-t128", "float32", False),
    ]
    configurations += [("torch-mha", "gpt-t128", "float32", True)]
    asv, env = asv_setup(tmp_path, ROOT, "sidebyside")
    env.update({common.PRELOAD_ENV: "torch", common.QUICK_ENV: "1"})
    cmd = [
        *asv,
        "run",
        "--python=same",
        "--quick",
        "--machine",
        "sidebyside",
        "--launch-method",
        "forkserver",
    ]
    log = tmp_path / "log.json"
    bench = [runner.param_regex(*c) for c in configurations]
    groups, _ = runner.deal(bench, [1.0, 1.0, 1.0], 2)
    cores = runner.share_cores(2)
    assert runner.run_asv([*cmd, "--show-stderr"], groups, env, log, cores) == 0
    assert sorted(p.name for p in tmp_path.glob("log*.json")) == ["log.json"]  # the parts are merged away
    configs = json.loads(log.read_text())["configs"]
    threads = len(cores[0]) or None  # pinned: one thread per CPU of the run's share
    for c in configurations:
        entry = configs[common.config_key(*c, "cpu", threads)]
        assert entry["status"] == "ok" and entry["gate_ratio"] <= 2, (c, entry)
        assert entry["seconds"] > 0, (c, entry)  # the configuration's cost, for the next dealing
        if threads:
            assert entry["meta"]["threads"] == str(threads), (c, entry)


def test_quick_runs_are_dealt_by_what_each_configuration_cost():
    """Side-by-side runs get configurations by expected seconds (costliest first, to the run
    with the fewest so far), each run keeping the plan's order; a never-measured configuration
    is guessed by its length."""
    bench = ["a", "b", "c", "d", "e", "f"]
    groups, loads = runner.deal(bench, [1.0, 5.0, 1.0, 1.0, 1.0, 1.0], 2)
    assert sorted(sum(groups, [])) == bench and loads == [5.0, 5.0]
    assert groups == [["b"], ["a", "c", "d", "e", "f"]]
    # Round robin would have put the costly one with two others: 7 s against 3 s.
    groups, loads = runner.deal(bench, [3.0, 3.0, 2.0, 2.0, 2.0, 2.0], 3)
    assert loads == [5.0, 5.0, 4.0] and all(g == sorted(g) for g in groups)
    assert (
        runner.guess_seconds("gpt-t2048")
        > runner.guess_seconds("gpt-t512")
        > runner.guess_seconds("gpt-t128")
    )


def test_side_by_side_runs_share_the_cores(monkeypatch):
    """Each run side by side gets an equal share of the CPUs this process may use (pinned with
    asv's --cpu-affinity, as many threads); with fewer CPUs than runs none is pinned."""
    monkeypatch.setattr(runner.os, "sched_getaffinity", lambda pid: {4, 5, 6, 7, 9}, raising=False)
    assert runner.share_cores(2) == [[4, 5], [6, 7]]
    assert runner.share_cores(5) == [[4], [5], [6], [7], [9]]
    assert runner.share_cores(6) == [[]] * 6


def test_quick_costs_come_from_the_newest_quick_run(tmp_path):
    """What a configuration cost is read from the newest ``--quick`` run log that ran it; full runs
    (their timing dominates) and damaged logs are passed over."""
    from benchmarks import measured

    def log(name: str, quick: bool, seconds: dict[str, float]) -> None:
        path = tmp_path / f"m-cpu-{name}.json"
        path.write_text(
            json.dumps({"configs": {k: {"status": "ok", "seconds": v} for k, v in seconds.items()}})
        )
        measured.record_run(path, {"quick": quick, "label": "torch"})

    log("20260101T000000Z", True, {"a": 1.0, "b": 2.0})
    log("20260102T000000Z", True, {"a": 3.0})
    log("20260103T000000Z", False, {"a": 30.0, "b": 40.0})
    (tmp_path / "m-cpu-20260104T000000Z.json").write_text("{damaged")
    log("20260105T000000Z", True, {"c": 0.0})  # no cost: not a measurement
    assert measured.quick_seconds("m-cpu", tmp_path) == {"a": 3.0, "b": 2.0}
    assert measured.quick_seconds("other-cpu", tmp_path) == {}
    assert measured.quick_seconds("m-cpu", tmp_path, wanted={"a"}) == {"a": 3.0}  # stops reading there


def test_quick_runs_each_timed_body_once(monkeypatch):
    """Under ``--quick`` (``MHA_BENCH_QUICK``) a sample is one call and nothing is spent on
    calibrating it; otherwise ``number`` comes from a timed call (``common.calls_per_sample``)."""
    pytest.importorskip("torch")
    from benchmarks.bench_attention import Forward, Gradients

    where = ("torch-sdpa", "gpt-t128", "float32", True, "cpu")
    forward, gradients = Forward(), Gradients()
    forward.config = common.configuration(*where)
    gradients.backward = common.backward_of(*where)
    monkeypatch.setenv(common.QUICK_ENV, "1")
    assert forward.number == 1 and gradients.number == 1
    assert forward.config.estimate is None and "call_seconds" not in gradients.__dict__  # no calibration
    monkeypatch.setenv(common.QUICK_ENV, "")
    assert forward.number == common.calls_per_sample(forward.config.estimate)
    assert gradients.number == common.calls_per_sample(gradients.call_seconds)
