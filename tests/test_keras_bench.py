"""The Keras adapters' timed bodies (``impls/keras/timed.py``) and training mode, per backend.

Keras picks its backend once per process, from ``KERAS_BACKEND`` at import. The checks below
run for the adapters of the backend this process runs; ``test_each_keras_backend`` runs them
for every other installed backend in a child pytest with ``KERAS_BACKEND`` set, and fails
with the child's report. A backend that is not installed is a skip naming it: the nox
``tests`` session has torch and jax (Keras on torch and on JAX), not TensorFlow.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mha_conformance.impls import reference, registry
from mha_conformance.impls.bench import bench_threads
from mha_conformance.impls.error_model import case_error_scales
from mha_conformance.probes.dropout import check_dropout
from mha_conformance.tolerance import judge
from mha_conformance.vectors.catalogue import spec as make_spec
from mha_conformance.vectors.generate import build_inputs, ensemble_errors

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = {
    "tensorflow": ["keras-mha", "keras-mha-scores"],
    "jax": ["keras-mha-jax", "keras-mha-scores-jax"],
    "torch": ["keras-mha-torch", "keras-mha-scores-torch"],
}
#: ``keras.ops.dot_product_attention`` per backend: forward only, checked by the ops tests below.
OPS_ADAPTERS = {"tensorflow": "keras-ops-sdpa", "jax": "keras-ops-sdpa-jax", "torch": "keras-ops-sdpa-torch"}
BACKEND_OF = {name: backend for backend, names in ADAPTERS.items() for name in names}
BACKEND_OF.update({name: backend for backend, name in OPS_ADAPTERS.items()})
EVERY_ADAPTER = [name for names in ADAPTERS.values() for name in names]
#: The timed body runs what the conformance path runs, so it gives the same bits; except on
#: JAX, where the timed body is jitted (XLA fuses the layer) and the conformance path runs op
#: by op: there it is held to the suite's float32 rule (and a gap of at most that tolerance
#: to the conformance path's output). Measured: 1.2e-7 at most on the spec below.
BITWISE = {"tensorflow", "torch"}
#: The per-adapter checks below (tests parametrized by adapter name), and per ops adapter.
CHECKS = 4
OPS_CHECKS = 2


def running_backend() -> str:
    return os.environ.get("KERAS_BACKEND", "tensorflow")  # as impls/keras/backend.import_keras() decides


def missing(backend: str) -> str | None:
    for module in ("keras", backend):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed here: pip install '.[{backend},keras]'"
    return None


def here(name: str):
    """The adapter when this process runs its Keras backend, else a skip saying where it runs."""
    backend = BACKEND_OF[name]
    if missing(backend):
        pytest.skip(missing(backend))
    if running_backend() != backend:
        pytest.skip(f"runs under KERAS_BACKEND={backend}: test_each_keras_backend[{backend}]")
    return registry.builtin(name)


@pytest.mark.parametrize("backend", list(ADAPTERS))
def test_each_keras_backend(backend):
    """The checks below, in a process whose Keras runs ``backend``."""
    if missing(backend):
        pytest.skip(missing(backend))
    if running_backend() == backend:
        pytest.skip(f"this process runs Keras on {backend}: the checks below ran here")
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    child = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            __file__,
            "-k",
            "not test_each_keras_backend",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = child.stdout[-6000:] + child.stderr[-2000:]
    assert child.returncode == 0, f"KERAS_BACKEND={backend}: the checks failed:\n{report}"
    passed = re.search(r"(\d+) passed", report)
    want = CHECKS * len(ADAPTERS[backend]) + OPS_CHECKS  # every check below for the backend's adapters
    assert passed and int(passed.group(1)) == want, f"expected {want} passed under {backend}:\n{report}"


def small_case():
    spec = make_spec("bench_test", "small", batch=2, q_len=16, d_in=32, num_heads=4, head_dim=8, causal=True)
    inputs = {k: v for k, v in build_inputs(spec).items() if k != "grad_output"}
    return spec, inputs


def leaves(tree) -> list:
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in leaves(item)]
    return [tree]


@pytest.mark.parametrize("name", EVERY_ADAPTER)
def test_timed_body_matches_the_conformance_path(name):
    """The timed forward computes what the conformance path computes; the backward runs and
    its input gradient meets the suite's rule; matmul multiplies; threads are recorded."""
    adapter = here(name)
    from mha_conformance.impls.keras.timed import upstream_gradient

    spec, inputs = small_case()
    bench = adapter.bench(inputs, spec, "float32", "cpu")
    runtime = {k: inputs[k] for k in ("query", "key", "value")}
    expected = adapter.prepare(inputs, spec, "float32", "cpu")(runtime)["output"]
    got = bench.to_numpy(bench.forward())
    bench.sync()
    truth = reference.forward(inputs, spec)
    g = upstream_gradient(spec).astype(np.float64)
    exact = reference.backward(inputs, spec, g)
    total = sum(exact[f"grad_{n}"] for n in ("query", "key", "value"))
    want = {"output": truth.output, **{f"grad_{n}": exact[f"grad_{n}"] for n in ("query", "key", "value")}}
    baselines = ensemble_errors(inputs, spec, "float32", want, g)[0]
    scales = case_error_scales(inputs, spec, g, [f"grad_{n}" for n in ("query", "key", "value")])
    verdict = judge(
        got,
        truth.output,
        tensor="output",
        dtype="float32",
        baseline=baselines["output"],
        error_scale=scales["output"],
    )
    assert verdict.passed, verdict.describe()
    if BACKEND_OF[name] in BITWISE:
        np.testing.assert_array_equal(got, expected)
    else:
        assert np.max(np.abs(got - expected)) <= verdict.tolerance

    grads = bench.make_backward()()
    bench.sync()
    arrays = [np.asarray(bench.to_numpy(g), np.float64) for g in leaves(grads)]
    assert len(arrays) == 1 + 8  # the one self-attention input, then 4 kernels and 4 biases
    assert all(np.isfinite(a).all() for a in arrays)
    # Self-attention passes one tensor as query, key and value: its gradient is the sum of the three,
    # whose error is at most the sum of theirs.
    names = [f"grad_{n}" for n in ("query", "key", "value")]
    worst = {
        "terms": max(scales[n]["terms"] for n in names),
        "rms_magnitude": sum(scales[n]["rms_magnitude"] for n in names),
    }
    gap = sum(baselines[n] for n in names)
    grad_verdict = judge(
        bench.to_numpy(leaves(grads)[0]),
        total,
        tensor="grad_query+key+value",
        dtype="float32",
        baseline=gap,
        error_scale=worst,
    )
    assert grad_verdict.passed, grad_verdict.describe()

    product = bench.matmul(8)()
    bench.sync()
    assert tuple(product.shape) == (8, 8)
    assert bench.meta["keras_backend"] == BACKEND_OF[name]
    if BACKEND_OF[name] != "jax":  # XLA's thread pool is fixed at backend start (meta says so)
        assert bench.meta["threads"] == str(bench_threads())


@pytest.mark.parametrize("name", EVERY_ADAPTER)
def test_a_reused_layer_computes_what_a_new_one_does(name):
    """The conformance path builds a layer once per structure and then only loads each case's
    weights (``KerasMHA.build``): after another case of the same structure (other weights, batch
    and length), a case's output and attention weights are bit for bit those of a layer built
    for it alone; a seeded (dropout) layer is never reused."""
    adapter = here(name)
    from mha_conformance.impls.keras import mha

    def case(case_id: str, **shape):
        spec = make_spec(case_id, "reuse", d_in=32, num_heads=4, head_dim=8, causal=True, **shape)
        inputs = {k: v for k, v in build_inputs(spec).items() if k != "grad_output"}
        return spec, inputs, {k: inputs[k] for k in ("query", "key", "value")}

    first, second = case("reuse_a", batch=3, q_len=5), case("reuse_b", batch=2, q_len=16)
    mha._LAYERS.clear()
    alone = adapter.prepare(second[1], second[0], "float32", "cpu")(second[2])
    mha._LAYERS.clear()
    adapter.prepare(first[1], first[0], "float32", "cpu")(first[2])
    layer = next(iter(mha._LAYERS.values()))
    reused = adapter.prepare(second[1], second[0], "float32", "cpu")(second[2])
    assert list(mha._LAYERS.values()) == [layer], "the second case of the structure built a new layer"
    for key in ("output", "attn_weights"):
        if key in alone:
            assert np.array_equal(reused[key], alone[key]), key
    assert adapter.build(first[1], first[0], "float32", "cpu", seed=0) is not layer


@pytest.mark.parametrize("name", EVERY_ADAPTER)
def test_training_mode_passes_the_dropout_statistics(name):
    """``prepare_training`` drops about p of the weights and rescales the rest by 1/(1-p);
    eval mode drops nothing (``conformance/probes/dropout.py``)."""
    result = check_dropout(here(name))
    assert result["verdict"] == "ok", result["detail"]


@pytest.mark.parametrize("name", EVERY_ADAPTER)
def test_the_benchmark_plan_times_the_adapter(name):
    """With a timed path the runner plans the adapter's CPU configurations (none untimed)."""
    here(name)
    from benchmarks import runner

    plan = runner.plan("cpu", [name])
    assert plan["untimed"] == [] and plan["adapters"] == [name]
    assert len(plan["bench"]) == 3 * 2, plan["skipped"]  # 3 lengths x 2 presets, float32 on CPU


@pytest.mark.parametrize("name", list(OPS_ADAPTERS.values()))
def test_ops_timed_body_runs_the_variants(name):
    """``keras-ops-sdpa*``'s timed forward (traced where the backend traces) computes what its
    conformance path computes, with an ALiBi bias and a window, and passes the benchmarks' gate."""
    adapter = here(name)
    from benchmarks import common

    spec = {**common.config_spec("alibi-t128", True), "window": [40, -1]}
    inputs = {k: v for k, v in build_inputs(spec).items() if k != "grad_output"}
    bench = adapter.bench(inputs, spec, "float32", "cpu")
    runtime = {k: inputs[k] for k in ("query", "key", "value", "attn_bias")}
    expected = adapter.prepare(inputs, spec, "float32", "cpu")(runtime)["output"]
    got = bench.to_numpy(bench.forward())
    bench.sync()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)  # a traced graph may fuse differently
    assert common.gate(bench, inputs, spec, "float32", name) <= 2
    assert bench.make_backward is None and bench.meta["threads"] == str(bench_threads())
    assert tuple(bench.matmul(8)().shape) == (8, 8)


@pytest.mark.parametrize("name", list(OPS_ADAPTERS.values()))
def test_the_benchmark_plan_times_the_ops_adapter(name):
    """GPT, the Transformer and ALiBi (a bias), not Gemma 2 (a softcap Keras runs on TPUs only)."""
    here(name)
    from benchmarks import runner

    plan = runner.plan("cpu", [name])
    assert plan["untimed"] == [] and plan["adapters"] == [name]
    assert len(plan["bench"]) == 3 * 3, plan["skipped"]
