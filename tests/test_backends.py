"""Framework adapters beyond torch: behaviour the golden verdicts alone do not show."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from mha_conformance.checks.golden import check_golden
from mha_conformance.checks.skeleton import CheckRecord
from mha_conformance.execution import harness
from mha_conformance.impls.registry import builtin


@pytest.mark.parametrize("name", ["jax-sdpa", "flax-mha", "flax-mha-weights"])
def test_jax_adapters_compile_once_per_prepared_case(name, caplog):
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    adapter = builtin(name)
    case = harness.load("gqa_h8_kv2_cross_keypad")
    inputs = harness.cast_inputs(case, "float32")
    run = adapter.prepare(inputs, case.spec, "float32", "cpu")
    jax.clear_caches()  # executables are shared per structure across the process: start from none

    def compiles_during(call):
        caplog.clear()
        jax.config.update("jax_log_compiles", True)
        try:
            with caplog.at_level(logging.DEBUG):
                out = call()
        finally:
            jax.config.update("jax_log_compiles", False)
        return out, [r.getMessage() for r in caplog.records if "ompil" in r.getMessage()]

    first, compiled = compiles_during(lambda: run(inputs)["output"])
    assert compiled, "the first call must compile (else this test could not see a recompile)"
    second, recompiled = compiles_during(lambda: run(inputs)["output"])
    assert not recompiled, recompiled
    np.testing.assert_array_equal(first, second)


def test_jax_float64_really_runs_in_float64_where_it_can():
    """flax-mha-weights computes its own softmax: float64 must meet the float64 rule there,
    which only holds if x64 mode is on (otherwise JAX silently computes in float32)."""
    pytest.importorskip("flax")
    record = check_golden(builtin("flax-mha-weights"), "self_basic_b2_t8_d16_h4", "float64", "cpu")
    assert all(v.passed for v in record.verdicts)
    assert {v.tensor for v in record.verdicts} == {"output", "attn_weights"}


def test_jax_sdpa_float64_divergence_reports_the_error_it_reaches():
    """The declared float32-softmax divergence is real and measured: ~1e-7 relative, not NaN."""
    pytest.importorskip("jax")
    adapter = builtin("jax-sdpa")
    assert adapter.divergence("golden", harness.load("self_basic_b2_t8_d16_h4").spec, "float64", "cpu")
    record = CheckRecord()
    with pytest.raises(AssertionError, match="max rel err"):
        check_golden(adapter, "self_basic_b2_t8_d16_h4", "float64", "cpu", record=record)
    (verdict,) = record.verdicts
    assert 1e-9 < verdict.max_rel_err < 1e-5


def test_flex_compiled_second_run_compiles_nothing(tmp_path):
    """``torch-flex-compiled`` keeps inductor's compiled kernels in ``MHA_CACHE_DIR``: a first run
    compiles (each result's meta says ``inductor: compiled``), a second process on the same cache
    compiles nothing (``cache hit``), with the same verdicts."""
    import json
    import os

    pytest.importorskip("torch")
    from tests.runs import run_suite

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["MHA_CACHE_DIR"] = str(tmp_path / "cache")
    cases = ["variant_gemma2_softcap50_window3_gqa_h4_kv2", "variant_bias_alibi_self_causal_h4"]
    runs = []
    for n in (1, 2):
        report = tmp_path / f"run{n}.json"
        args = ["--adapter", "torch-flex-compiled", "--dtype", "float32", "--report", str(report)]
        args += ["--case-timeout", "900"]  # a cold compile runs in the call: 5-20 s here, 45x to spare
        for case in cases:
            args += ["--case", case]
        done = run_suite(*args, env=env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        tests = json.loads(report.read_text())["tests"]
        runs.append({t["nodeid"]: (t["outcome"], (t.get("meta") or {}).get("inductor")) for t in tests})
    first, second = runs
    assert [o for o, _ in first.values()] == ["passed"] * len(cases)
    assert {how for _, how in first.values()} == {"compiled"}
    assert {how for _, how in second.values()} == {"cache hit"}  # nothing compiled the second time
    assert [o for o, _ in second.values()] == [o for o, _ in first.values()]
    assert (tmp_path / "cache" / "torchinductor").is_dir()


def test_the_cpu_compiler_probe_starts_no_thread(tmp_path):
    """``probe_cpu_compiler`` (run in asv's forkserver before it forks the benchmarks) leaves
    inductor's answer about the CPU's vector instructions in the process, in the suite's cache,
    and starts no thread: a fork of it stays safe."""
    import os
    import subprocess
    import sys

    pytest.importorskip("torch")
    code = (
        "import os, torch\n"
        "from torch._inductor.cpu_vec_isa import valid_vec_isa_list\n"
        "from mha_conformance.impls.torch.flex import probe_cpu_compiler\n"
        "before = len(os.listdir('/proc/self/task'))\n"
        "probe_cpu_compiler()\n"
        "print(valid_vec_isa_list.cache_info().currsize, before, len(os.listdir('/proc/self/task')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["MHA_CACHE_DIR"] = str(tmp_path / "cache")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    cached, before, after = map(int, done.stdout.split())
    assert cached == 1 and after == before
    assert any((tmp_path / "cache" / "torchinductor").iterdir())  # built in the suite's cache


def test_eager_flex_reuses_a_trace_for_new_sizes():
    """Eager FlexAttention traces its call with dynamo; ``torch-flex`` has it trace sizes
    symbolically, sizes of 1 included, so a case of the same structure with other lengths (here
    a single key) reuses the trace of an earlier case, and still passes the golden check."""
    pytest.importorskip("torch")
    from torch._dynamo.utils import counters

    graphs = []
    for case_id in ("cross_tq5_tk9", "cross_tk1_single_key"):
        record = check_golden(builtin("torch-flex"), case_id, "float32", "cpu")
        assert all(v.passed for v in record.verdicts)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0]
