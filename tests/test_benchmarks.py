"""The benchmark suite: configurations, FLOP counts, the correctness gate, the torch timed
bodies, the run cache, the plan the nox session hands asv, and a tiny real asv run."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import bench_attention, common, runner
from benchmarks.regression import gate
from mha_conformance.impls import reference, registry
from mha_conformance.impls.bench import Bench
from mha_conformance.vectors.generate import build_inputs
from tests.runs import asv_setup

ROOT = Path(__file__).resolve().parents[1]


def test_suite_imports_and_parameters():
    assert bench_attention.PARAM_NAMES == ["adapter", "shape", "dtype", "causal"]
    adapters, shapes, dtypes, causal = bench_attention.PARAMS
    assert set(registry.BUILTINS) == set(adapters)
    assert {"gpt-t128", "gpt-t2048", "transformer-t512", "transformer-t2048"} <= set(shapes)
    assert dtypes == ["float32", "bfloat16", "float16"] and causal == [False, True]
    for cls in (bench_attention.Forward, bench_attention.Roofline, bench_attention.Gradients):
        assert cls.version and cls.rounds == 1


def test_config_spec_and_flops():
    spec = common.config_spec("gpt-t512", causal=True)
    assert (spec["batch"], spec["q_len"], spec["d_in"], spec["num_heads"], spec["head_dim"]) == (
        2,
        512,
        512,
        8,
        64,
    )
    assert spec["qkv_bias"] is False and spec["out_proj"] and spec["self_attention"]
    full = common.forward_flops(common.config_spec("gpt-t512", causal=False))
    proj = 2 * 2 * 512 * 4 * 512 * 512  # batch 2, 512 tokens, Q K V O
    assert full == proj + 2 * 2 * 8 * 512 * 512 * 128  # plus Q K^T and P V
    assert common.forward_flops(spec) == proj + 2 * 2 * 8 * (512 * 513 // 2) * 128  # allowed pairs only
    with pytest.raises(ValueError, match="<preset>-t<seq_len>"):
        common.config_spec("bert-512", causal=False)


def test_plan_skip_policy():
    assert "emulation" in common.plan_skip("gpt-t512", "float16", True, "cpu")
    assert common.plan_skip("gpt-t512", "float32", True, "cpu") is None
    assert "causal (a decoder) only" in common.plan_skip("gpt-t512", "float32", False, "cpu")
    assert "without a mask" in common.plan_skip("transformer-t512", "bfloat16", True, "cpu")
    assert common.plan_skip("gpt-t512", "float16", False, "cuda") is None


def numpy_bench(spec, inputs, *, scale_bug: bool = False) -> Bench:
    """A framework-free timed path computing attention with the reference in float32."""
    wrong = {**spec, "scale": 1.0} if scale_bug else spec
    out = reference.forward(inputs, wrong, reference.PRECISIONS["float32"]).output.astype(np.float32)
    return Bench(forward=lambda: out, sync=lambda: None, to_numpy=lambda o: o)


@pytest.mark.parametrize("shape,causal", [("gpt-t128", True), ("transformer-t128", False)])
def test_gate_passes_right_and_stops_wrong_kernels(shape, causal):
    spec = common.config_spec(shape, causal)
    inputs = build_inputs(spec)
    assert common.gate(numpy_bench(spec, inputs), inputs, spec, "float32", "numpy") <= 2
    with pytest.raises(common.WrongResult, match="no timing is posted"):
        common.gate(numpy_bench(spec, inputs, scale_bug=True), inputs, spec, "float32", "numpy")


@pytest.mark.parametrize(
    "shape,wrong",
    [
        ("gemma2-t128", {"softcap": None}),  # the softcap left out
        ("gemma2-t128", {"window": None}),  # the window left out
        ("gemma2-t128", {"window": [63, -1]}),  # the window one key short
        ("alibi-t128", {"attn_bias": None}),  # the bias left out
    ],
)
def test_gate_checks_the_variant_presets(shape, wrong):
    """The Gemma-2-like and ALiBi presets: the reference passes the gate, and each variant left
    out (or off by one key) is stopped before any timing."""
    spec = common.config_spec(shape, True)
    inputs = build_inputs(spec)
    assert spec["q_len"] == 128 and (spec.get("softcap"), spec.get("window")) in (
        (50.0, [64, -1]),
        (None, None),
    )
    assert common.gate(numpy_bench(spec, inputs), inputs, spec, "float32", "numpy") <= 2
    bad = {**spec, **wrong}
    given = {k: v for k, v in inputs.items() if not (k == "attn_bias" and bad.get("attn_bias") is None)}
    out = reference.forward(given, bad, reference.PRECISIONS["float32"]).output.astype(np.float32)
    bench = Bench(forward=lambda: out, sync=lambda: None, to_numpy=lambda o: o)
    with pytest.raises(common.WrongResult, match="no timing is posted"):
        common.gate(bench, inputs, spec, "float32", "wrong")


def test_gate_catches_a_causal_mask_off_by_one():
    spec = common.config_spec("gpt-t128", True)
    inputs = build_inputs(spec)
    leaky = {**spec, "causal": False, "mask": None}
    mask = np.tri(128, 128, k=1, dtype=bool)[None, None]  # each query also sees the next key
    out = reference.forward({**inputs, "mask": mask}, leaky, reference.PRECISIONS["float32"]).output
    bench = Bench(forward=lambda: out.astype(np.float32), sync=lambda: None, to_numpy=lambda o: o)
    with pytest.raises(common.WrongResult):
        common.gate(bench, inputs, spec, "float32", "leaky")


TORCH_ADAPTERS = [
    "torch-mha",
    "torch-mha-noweights",
    "torch-mha-fastpath",
    "torch-sdpa",
    "torch-scratch",
    "torch-flex",
]


@pytest.mark.parametrize("name", TORCH_ADAPTERS)
def test_torch_timed_bodies_match_the_conformance_path(name):
    """The timed body computes what the adapter's conformance path computes, and backprops."""
    pytest.importorskip("torch")
    from mha_conformance.vectors.catalogue import spec as make_spec

    spec = make_spec("bench_test", "small", batch=2, q_len=16, d_in=32, num_heads=4, head_dim=8, causal=True)
    inputs = {k: v for k, v in build_inputs(spec).items() if k != "grad_output"}
    adapter = registry.builtin(name)
    bench = adapter.bench(inputs, spec, "float32", "cpu")
    runtime = {k: inputs[k] for k in ("query", "key", "value") if k in inputs}
    expected = adapter.prepare(inputs, spec, "float32", "cpu")(runtime)["output"]
    np.testing.assert_array_equal(bench.to_numpy(bench.forward()), expected)
    assert bench.meta["threads"] == str(int(os.environ.get("MHA_BENCH_THREADS") or os.cpu_count()))
    if name in ("torch-mha-fastpath", "torch-flex"):  # inference mode; FlexAttention has no CPU backward
        assert bench.make_backward is None
    else:
        bench.make_backward()()  # one backward pass runs
    product = bench.matmul(8)()
    assert tuple(product.shape) == (8, 8)


@pytest.mark.parametrize("name", ["torch-mha", "torch-sdpa", "torch-flex"])
def test_torch_timed_bodies_run_the_variants(name):
    """With an ALiBi bias and a window (and a softcap where the adapter has one) the timed body
    computes what the conformance path computes, and passes the gate."""
    pytest.importorskip("torch")
    adapter = registry.builtin(name)
    spec = {**common.config_spec("alibi-t128", True), "window": [40, -1]}
    spec["softcap"] = 30.0 if "softcap" in adapter.variants else None
    inputs = {k: v for k, v in build_inputs(spec).items() if k != "grad_output"}
    bench = adapter.bench(inputs, spec, "float32", "cpu")
    runtime = {k: inputs[k] for k in ("query", "key", "value", "attn_bias")}
    expected = adapter.prepare(inputs, spec, "float32", "cpu")(runtime)["output"]
    np.testing.assert_array_equal(bench.to_numpy(bench.forward()), expected)
    assert common.gate(bench, inputs, spec, "float32", name) <= 2


def test_run_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(common.RUN_CACHE_ENV, str(tmp_path / "run.json"))
    key = common.config_key("torch-sdpa", "gpt-t128", "float32", True, "cpu")
    assert common.cached_config(key) is None
    common.update_run_cache("configs", key, {"status": "ok", "framework": "torch", "forward_median": 0.01})
    common.update_run_cache("configs", key, {"gate_ratio": 0.5})
    assert common.cached_config(key) == {
        "status": "ok",
        "framework": "torch",
        "forward_median": 0.01,
        "gate_ratio": 0.5,
    }

    def must_not_build(*args):
        raise AssertionError("the figures should come from the run cache")

    monkeypatch.setattr(common, "configuration", must_not_build)
    figures = common.forward_figures("torch-sdpa", "gpt-t128", "float32", True, "cpu")
    assert figures.gflops == pytest.approx(
        common.forward_flops(common.config_spec("gpt-t128", True)) / 0.01 / 1e9
    )
    common.update_run_cache("configs", "skip-me", {"status": "skip", "reason": "no GPU here"})
    with pytest.raises(NotImplementedError, match="no GPU here"):
        common.cached_config("skip-me")
    (tmp_path / "run.json").write_text("{damaged")
    assert common.read_run_cache() == {}  # a damaged cache is measured again, never trusted


def test_plan_selects_what_can_run():
    pytest.importorskip("torch")
    plan = runner.plan("cpu", ["torch-*"])
    assert plan["machine"].endswith("-cpu") and plan["threads"] >= 1
    # float32 on CPU, 3 lengths per preset: FlexAttention eager and compiled run all 4 presets; the
    # three nn.MultiheadAttention paths and SDPA run GPT, the Transformer and ALiBi (no softcap);
    # the seed's from-scratch module GPT and the Transformer (no bias, no window)
    assert len(plan["bench"]) == 3 * (2 * 4 + 4 * 3 + 2)
    assert not any("torch-wrapper" in r for r in plan["bench"])  # supports no preset: never spawned
    assert any("MultiHeadAttentionWrapper" in why for why in plan["skipped"])
    name = "bench_attention.Gradients.time_backward('torch-sdpa', 'gpt-t2048', 'float32', True)"
    assert any(__import__("re").search(r, name) for r in plan["bench"])
    sdpa = runner.plan("cpu", ["torch-sdpa"], ["float32", "bfloat16"])["bench"]
    assert len(sdpa) == 2 * 3 * 3  # 2 dtypes x 3 lengths x (gpt, transformer, alibi)


@pytest.mark.skipif(
    shutil.which("asv") is None and not (Path(sys.executable).parent / "asv").exists(),
    reason="asv is not installed: pip install '.[bench]'",
)
def test_asv_quick_smoke(tmp_path):
    """asv discovers the suite and runs one configuration end to end (``--quick``)."""
    pytest.importorskip("torch")
    asv, env = asv_setup(tmp_path, ROOT, "smoke")
    selection = runner.param_regex("torch-sdpa", "gpt-t128", "float32", True)
    done = subprocess.run(
        [
            *asv,
            "run",
            "--python=same",
            "--quick",
            "--machine",
            "smoke",
            "--bench",
            selection,
            "--show-stderr",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard: 20-40 s here
    )
    assert done.returncode == 0, done.stdout[-3000:]
    cache = json.loads((tmp_path / "run.json").read_text())
    entry = cache["configs"][common.config_key("torch-sdpa", "gpt-t128", "float32", True, "cpu")]
    assert entry["status"] == "ok" and entry["gate_ratio"] <= 2 and entry["forward_median"] > 0
    assert any(k.startswith("torch|cpu|float32") for k in cache["peak"])


def test_a_missing_device_is_a_skip_with_its_reason():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(NotImplementedError, match="cuda"):
        common.configuration("torch-sdpa", "gpt-t128", "float16", True, "cuda")
    plan = runner.plan("cuda", ["torch-sdpa"])
    assert plan["bench"] == [] and plan["machine"].endswith("-cuda")


def test_regression_gate_rule_needs_significance_and_effect():
    """The gate's rule on known samples: a 1.5x slowdown is flagged; a significant 1.15x is not
    (the effect rule), nor is a 1.5x ratio from three samples each (the significance rule)."""
    rng = np.random.default_rng(0)

    def samples(n: int, factor: float = 1.0) -> np.ndarray:
        return 0.02 * factor * np.exp(rng.normal(0, 0.02, n))

    base = samples(30)
    same = gate.judge("same", list(base), list(samples(30)))
    assert same.verdict == "same" and 0.97 < same.ratio < 1.03
    slower = gate.judge("slower", list(base), list(samples(30, 1.5)))
    assert slower.verdict == "SLOWER" and slower.p_slower < 1e-6 and 1.45 < slower.ratio < 1.55
    assert gate.judge("faster", list(base), list(samples(30, 0.6))).verdict == "faster"
    drift = gate.judge("drift", list(base), list(samples(30, 1.15)))
    assert drift.p_slower < gate.ALPHA and drift.ratio < gate.MIN_RATIO and drift.verdict == "same"
    few = gate.judge("few", list(base[:3]), list(samples(3, 1.5)))
    assert few.ratio >= gate.MIN_RATIO and few.p_slower >= gate.ALPHA and few.verdict == "same"
    assert gate.hodges_lehmann_ratio(base, 1.5 * base) == pytest.approx(1.5)
    # The normal approximation against the exact permutation p-value (ties included).
    x, y = np.array([1.0, 2, 2, 4, 5, 6]), np.array([3.0, 4, 6, 7, 8, 9])
    u = gate.ranks(np.concatenate([x, y]))
    observed = u[6:].sum()
    splits = [u[list(c)].sum() for c in itertools.combinations(range(12), 6)]
    exact = np.mean([s >= observed for s in splits])
    assert gate.mann_whitney_p(x, y) == pytest.approx(exact, abs=0.01)
    assert gate.mann_whitney_p(y, x) > 0.9 and gate.mann_whitney_p(x, x) > 0.4


def saved_run(storage, name: str, samples: dict, gate_verdicts=None, injected=(), threads="1"):
    """A saved run in pytest-benchmark's layout, with raw samples and the gate's verdicts."""
    benchmarks = [
        {
            "name": k,
            "options": {"timer": "process_time"},
            "extra_info": {"threads": threads, **({"injected": 1.5} if k in injected else {})},
            "stats": {"data": v},
        }
        for k, v in samples.items()
    ]
    data = {"datetime": f"2026-01-01T00:00:{name[:2]}", "benchmarks": benchmarks}
    if gate_verdicts:
        run, each = gate_verdicts
        data["mha_speed_gate"] = {"verdict": run, "benchmarks": {k: {"verdict": v} for k, v in each.items()}}
    path = storage / "Linux-CPython-3.11-64bit" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_regression_gate_baseline_is_the_newest_result_not_flagged(tmp_path):
    """A flagged or injected result is never a baseline (unless its run was accepted); another
    thread count is never compared; a partial run compares what it has."""
    fast, slow = [0.010 + 1e-5 * i for i in range(12)], [0.015 + 1e-5 * i for i in range(12)]
    saved_run(tmp_path, "01", {"a": fast, "b": fast})
    saved_run(tmp_path, "02", {"a": slow, "b": fast}, ("slower", {"a": "SLOWER", "b": "same"}))
    saved_run(tmp_path, "03", {"a": slow}, injected=["a"])
    saved_run(tmp_path, "04", {"a": slow}, threads="2")
    new = saved_run(tmp_path, "05", {"a": slow, "c": fast})
    rows = {r.name: r for r in gate.compare(tmp_path, new)}
    assert rows["a"].verdict == "SLOWER" and rows["a"].baseline_run == "01.json"
    assert rows["c"].verdict == "new" and "b" not in rows
    assert gate.record(new, list(rows.values()), accepted=True) == "accepted"
    newer = saved_run(tmp_path, "06", {"a": slow, "b": fast})
    rows = {r.name: r for r in gate.compare(tmp_path, newer)}
    assert rows["a"].verdict == "same" and rows["a"].baseline_run == "05.json"
    assert rows["b"].verdict == "same" and rows["b"].baseline_run == "02.json"


def run_gate(storage, inject: str = "") -> subprocess.CompletedProcess:
    """One run of the real gate on torch-sdpa's two configurations, timed by the counting clock
    (tests/fake_clock.py): what the gate decides then depends on its logic alone, not on the machine."""
    env = {k: v for k, v in os.environ.items() if k not in ("MHA_BENCH_THREADS", "MHA_SPEED_INJECT")}
    if inject:
        env["MHA_SPEED_INJECT"] = inject
    cmd = [
        sys.executable,
        "benchmarks/regression/run.py",
        "--storage",
        str(storage),
        "--adapter",
        "torch-sdpa",
        "--benchmark-max-time=0.02",  # 20 rounds (10 slowed) on the counting clock
        "--benchmark-timer=tests.fake_clock.ticks",
        "--benchmark-calibration-precision=1",  # a round of one call: one step, the clock's precision
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


GPT = "test_forward[torch-sdpa-gpt-t512-float32-causal]"
TRANSFORMER = "test_forward[torch-sdpa-transformer-t128-float32-full]"


def gate_verdicts(storage) -> dict[str, tuple[str, str | None]]:
    """The newest saved run's verdict and baseline per benchmark, as the gate recorded them."""
    newest = max(storage.rglob("*.json"), key=lambda p: p.name)
    data = json.loads(newest.read_text())["mha_speed_gate"]["benchmarks"]
    return {name: (row["verdict"], row["baseline_run"]) for name, row in data.items()}


def test_regression_gate_holds_still_and_flags_an_injected_slowdown(tmp_path):
    """The real gate (pytest-benchmark, torch) on the counting clock: three back-to-back runs of
    this commit raise no alarm; a slowdown injected into one benchmark (MHA_SPEED_INJECT: four
    steps a call instead of one) is flagged, only there, twice against the same baseline (a flagged
    run is never one). How well the gate separates real slowdowns from noise on a real clock is
    measured, not tested (docs/benchmarks.md, "detection power")."""
    pytest.importorskip("torch")
    pytest.importorskip("pytest_benchmark")
    storage = tmp_path / "speed"
    first = run_gate(storage)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    assert "saved as the baseline" in first.stdout
    for _ in range(2):
        again = run_gate(storage)
        assert again.returncode == 0, again.stdout[-3000:]
        assert {v for v, _ in gate_verdicts(storage).values()} <= {"same", "faster"}, again.stdout[-3000:]
    assert set(gate_verdicts(storage)) == {GPT, TRANSFORMER}
    baseline = max(storage.rglob("*.json"), key=lambda p: p.name).name  # the third run
    for _ in range(2):
        slow = run_gate(storage, inject="*transformer-t128*=1.5")
        assert slow.returncode == 1, slow.stdout[-3000:]
        verdicts = gate_verdicts(storage)
        assert verdicts[TRANSFORMER] == ("SLOWER", baseline), slow.stdout[-3000:]
        assert verdicts[GPT][0] in ("same", "faster"), slow.stdout[-3000:]
        assert "baseline median" in slow.stdout and "What to do" in slow.stdout
    assert len(list(storage.rglob("*.json"))) == 5  # the flagged runs are kept too
