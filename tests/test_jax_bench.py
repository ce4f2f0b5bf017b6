"""The JAX adapters' timed bodies (``impls/jax/timed.py``), their thread pinning, training mode
and the process-wide jit cache they share with the conformance path."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mha_conformance.checks.properties import head_permutation
from mha_conformance.execution import harness
from mha_conformance.impls.registry import builtin
from mha_conformance.vectors.generate import build_inputs

ROOT = Path(__file__).resolve().parents[1]
JAX_ADAPTERS = ["jax-sdpa", "flax-mha", "flax-mha-weights"]


def small_spec():
    from mha_conformance.vectors.catalogue import spec as make_spec

    return make_spec("bench_test", "small", batch=2, q_len=16, d_in=32, num_heads=4, head_dim=8, causal=True)


@pytest.fixture
def unpinned(monkeypatch):
    """As many bench threads as the test process may use: bench() must not pin this process."""
    monkeypatch.setenv(
        "MHA_BENCH_THREADS", str(len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else ""
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", JAX_ADAPTERS)
def test_jax_timed_bodies_match_the_conformance_path(name, dtype, unpinned):
    """Bitwise: the timed forward and the conformance path trace the same function with the same
    static arguments, so XLA compiles the same executable; the backward (a jitted pullback on
    residuals from setup) gives bitwise the conformance path's input gradients too."""
    pytest.importorskip("jax")
    pytest.importorskip("flax")
    spec = small_spec()
    inputs = {
        k: v.astype(harness.NUMPY_DTYPES[dtype]) for k, v in build_inputs(spec).items() if k != "grad_output"
    }
    adapter = builtin(name)
    bench = adapter.bench(inputs, spec, dtype, "cpu")
    runtime = {k: inputs[k] for k in ("query", "key", "value")}
    expected = adapter.prepare(inputs, spec, dtype, "cpu")(runtime)["output"]
    got = bench.to_numpy(bench.forward())
    bench.sync()
    assert got.dtype == expected.dtype and str(got.dtype) == dtype
    np.testing.assert_array_equal(got, expected)
    assert bench.meta["device"] == "cpu" and bench.meta["jax"] and "jax.jit" in bench.meta["jitted"]

    import jax

    backward = bench.make_backward()
    grads = backward()
    bench.sync()
    d_params, d_query, d_key, d_value = grads
    leaves = jax.tree_util.tree_leaves(d_params)
    assert len(leaves) == 8  # four kernels and four biases (Flax holds b_o; the spec has them all)
    assert all(np.isfinite(np.asarray(g, np.float64)).all() for g in [*leaves, d_query, d_key, d_value])
    grad_output = np.random.default_rng(0).standard_normal(got.shape).astype(harness.NUMPY_DTYPES[dtype])
    conformance = adapter.prepare_backward(inputs, spec, dtype, "cpu")(
        {**runtime, "grad_output": grad_output}
    )
    for label, g in (("query", d_query), ("key", d_key), ("value", d_value)):
        np.testing.assert_array_equal(np.asarray(g), conformance[f"grad_{label}"], err_msg=label)
    product = bench.matmul(8)()
    assert product.shape == (8, 8) and str(product.dtype) == dtype


@pytest.mark.parametrize("name", ["jax-sdpa", "flax-mha"])
def test_jax_bench_refuses_what_the_adapter_refuses(name, unpinned):
    pytest.importorskip("flax")
    spec = small_spec()
    inputs = {k: v.astype(np.float16) for k, v in build_inputs(spec).items() if k != "grad_output"}
    with pytest.raises(NotImplementedError, match="F16_F16_F32"):
        builtin(name).bench(inputs, spec, "float16", "cpu")
    with pytest.raises(NotImplementedError, match="not available"):
        builtin(name).bench(inputs, spec, "float32", "mps")


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity")
    or len(os.sched_getaffinity(0)) < 2
    or not Path("/proc/self/task").is_dir(),
    reason="needs Linux with at least 2 usable CPUs to see XLA:CPU's pool shrink",
)
def test_jax_bench_fixes_xla_cpu_threads_in_a_fresh_process():
    """asv's situation: a fresh process, JAX's CPU client already started by devices(); with
    MHA_BENCH_THREADS=1 the intra-op pool XLA really runs (threads named *XLAEigen*) is one."""
    pytest.importorskip("jax")
    script = (
        "import json, os\n"
        "from mha_conformance.impls.registry import builtin\n"
        "from tests.test_jax_bench import small_spec\n"
        "from mha_conformance.vectors.generate import build_inputs\n"
        "spec = small_spec()\n"
        "inputs = {k: v for k, v in build_inputs(spec).items() if k != 'grad_output'}\n"
        "adapter = builtin('jax-sdpa')\n"
        "assert adapter.devices() == ['cpu']\n"
        "bench = adapter.bench(inputs, spec, 'float32', 'cpu')\n"
        "bench.matmul(256)()\n"
        "bench.sync()\n"
        "names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]\n"
        "print(json.dumps({'meta': bench.meta, 'pool': sum('XLAEigen' in n for n in names)}))\n"
    )
    env = dict(os.environ, MHA_BENCH_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["meta"]["threads"] == "1", found
    assert found["pool"] == 1, found


def test_flax_training_mode_drops_and_rescales():
    """The dropout statistics (conformance/probes/dropout.py) on flax-mha: a fraction near p, kept
    weights rescaled by 1/(1-p), a new draw per call, and eval mode untouched."""
    pytest.importorskip("flax")
    from mha_conformance.probes.dropout import check_dropout, dropout_case, dropout_spec

    result = check_dropout(builtin("flax-mha"))
    assert result["verdict"] == "ok", result["detail"]
    spec, case = dropout_spec(), dropout_case()
    train = builtin("flax-mha").prepare_training(case, spec, "float32", "cpu")
    inputs = {n: case[n] for n in ("query", "key", "value")}
    first, second = (train(dict(inputs))["output"] for _ in range(2))
    assert not np.array_equal(first, second), "every call must draw a new dropout mask"


def test_jax_adapters_compile_once_per_structure(caplog):
    """A second prepared case of the same structure (here the head-permutation property's
    renumbered copy, new weights, new case id) reuses the executable: weights are arguments."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    case = harness.load("gqa_h8_kv2_cross_keypad")
    inputs = {
        n: a
        for n, a in harness.cast_inputs(case, "float32").items()
        if n in ("query", "key", "value", "mask")
    }
    renumbered = head_permutation(case, inputs)
    for name in JAX_ADAPTERS:
        adapter = builtin(name)
        jax.clear_caches()
        messages = []
        for run_case, run_inputs in ((case, inputs), (renumbered.case, renumbered.inputs)):
            run = adapter.prepare(harness.cast_inputs(run_case, "float32"), run_case.spec, "float32", "cpu")
            caplog.clear()
            jax.config.update("jax_log_compiles", True)
            try:
                with caplog.at_level(logging.DEBUG):
                    run(run_inputs)
            finally:
                jax.config.update("jax_log_compiles", False)
            messages.append(
                [r.getMessage() for r in caplog.records if "Finished XLA compilation" in r.getMessage()]
            )
        assert messages[0], f"{name}: the first case must compile (else this test could not see a recompile)"
        assert not messages[1], f"{name}: {messages[1]}"
