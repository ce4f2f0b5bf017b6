"""The onnxruntime adapters: honest providers, kernel checks, the graphs, and the export cache.

Everything runs for real (onnxruntime sessions, torch.onnx.export), on small cases.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from mha_conformance.checks.golden import check_golden  # noqa: E402
from mha_conformance.checks.skeleton import CheckRecord  # noqa: E402
from mha_conformance.execution.harness import cast_inputs, load  # noqa: E402
from mha_conformance.impls.onnx import common as onnx_common  # noqa: E402
from mha_conformance.impls.onnx import runtime as onnx_runtime  # noqa: E402
from mha_conformance.impls.onnx.attention import OnnxAttention, attention_model  # noqa: E402
from mha_conformance.impls.onnx.contrib import OnnxContribMHA  # noqa: E402
from tests import runs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore")


def run_suite(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return runs.run_suite(*args, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **env})


@pytest.mark.parametrize("adapter", [OnnxAttention(), OnnxContribMHA()])
@pytest.mark.parametrize(
    "case_id", ["gqa_h6_kv3_causal", "causal_tq4_tk7_bottom_right", "mask_random_per_head"]
)
def test_hand_built_graphs_pass_golden_cases_on_the_cpu_provider(adapter, case_id):
    spec = load(case_id).spec
    if adapter.supports(spec, "float32", "cpu"):
        pytest.skip(adapter.supports(spec, "float32", "cpu"))
    record = check_golden(adapter, case_id, "float32", "cpu", record=CheckRecord())
    assert record.meta["provider"] == "CPUExecutionProvider"
    assert record.meta["session_providers"] == "CPUExecutionProvider"
    assert adapter.kernel[0] in record.meta["kernel"]


def test_attention_graph_uses_the_ops_inputs_for_each_causal_alignment():
    """Tq < Tk goes through past_key/past_value, Tq > Tk through nonpad_kv_seqlen, with
    q_num_heads/kv_num_heads for GQA, and the weights come out of qk_matmul_output_mode 3."""

    def attention_node(case_id: str):
        c = load(case_id)
        model, _ = attention_model(cast_inputs(c, "float32"), c.spec, "float32")
        (node,) = [n for n in model.graph.node if n.op_type == "Attention"]
        return node, {a.name: a for a in node.attribute}

    node, attrs = attention_node("causal_tq4_tk7_bottom_right")
    assert len(node.input) == 6 and node.input[4] and node.input[5]  # past_key, past_value
    node, attrs = attention_node("causal_tq7_tk4_fully_masked_rows")
    assert len(node.input) == 7 and not node.input[4] and node.input[6]  # nonpad_kv_seqlen
    node, attrs = attention_node("gqa_h6_kv3_causal")
    assert (attrs["q_num_heads"].i, attrs["kv_num_heads"].i, attrs["is_causal"].i) == (6, 3, 1)
    assert attrs["qk_matmul_output_mode"].i == 3


def test_missing_kernels_are_reasons_not_results():
    """float64 Attention on the CPU provider is inlined into its function body: not the kernel."""
    reason = onnx_common.kernel_probe(("Attention", ""), "float64", "cpu")
    assert reason and "no Attention kernel ran" in reason and "function body" in reason
    reason = onnx_common.kernel_probe(("MultiHeadAttention", "com.microsoft"), "float64", "cpu")
    assert reason and "tensor(double)" in reason
    assert onnx_common.kernel_probe(("Attention", ""), "float32", "cpu") is None


def test_a_result_is_never_labelled_cuda_when_cpu_ran_it():
    """The node-placement check that guards a cuda session (onnxruntime-gpu places nodes it
    cannot run on CUDA on the CPU provider without a word)."""
    session = object.__new__(onnx_runtime.Session)
    session.device, session.kernel, session.what, session.meta = "cuda", ("Attention", ""), "t", {}
    with pytest.raises(NotImplementedError, match="never reported as cuda"):
        session._check([("MatMul", "CUDAExecutionProvider"), ("Attention", "CPUExecutionProvider")])
    session._check([("Attention", "CUDAExecutionProvider")])
    assert session.meta["provider"] == "CUDAExecutionProvider"


def test_cuda_without_onnxruntime_gpu_is_a_skip_naming_the_extra():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this environment has onnxruntime-gpu")
    res = run_suite("--adapter", "onnx-attention", "--device", "cuda", "--case", "bias_none", "-rs", env={})
    assert res.returncode == 0, res.stdout[-3000:]
    assert "has no CUDAExecutionProvider" in res.stdout and "pip install '.[onnx-gpu]'" in res.stdout


def test_cache_key_follows_what_the_model_depends_on():
    pytest.importorskip("torch")
    from mha_conformance.impls.onnx.export import cache_key

    c = load("bias_none")
    case = cast_inputs(c, "float32")
    key = cache_key(case, c.spec, "float32", 23)
    assert key.startswith("bias_none.float32.opset23.torch") and key.endswith(".onnx")
    assert cache_key(case, c.spec, "float16", 23) != key
    assert cache_key(case, c.spec, "float32", None) != key
    changed = {**case, "w_q": case["w_q"] + np.float32(1)}
    assert cache_key(changed, c.spec, "float32", 23) != key


def test_second_run_exports_nothing(tmp_path):
    """Two runs of the suite on one case: the first exports (and reports the provider), the
    second finds the model in the cache and leaves the file untouched."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    cache = tmp_path / "cache"
    args = ["--adapter", "onnx-export-attention", "--case", "self_causal_b2_t8_d16_h4", "--dtype", "float32"]
    env = {"MHA_ONNX_CACHE": str(cache)}
    metas = []
    for run in ("first", "second"):
        report = tmp_path / f"{run}.json"
        res = run_suite(*args, "--report", str(report), env=env)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        (test,) = json.loads(report.read_text())["tests"]
        assert test["outcome"] == "passed", test["reason"]
        metas.append(test["meta"])
        if run == "first":
            (model,) = cache.iterdir()
            written = model.stat().st_mtime_ns
    assert re.fullmatch(r"exported in [\d.]+ s", metas[0]["export"]), metas[0]
    assert metas[1]["export"] == "cached"
    assert metas[0]["model"] == metas[1]["model"] == model.name
    assert [p.name for p in cache.iterdir()] == [model.name] and model.stat().st_mtime_ns == written
    assert all(m["provider"] == "CPUExecutionProvider" for m in metas)
    assert metas[1]["kernel"] == "Attention on CPUExecutionProvider" and metas[1]["opset"] == "23"
    assert not any(p.name.endswith(".tmp") for p in cache.iterdir())


# --- the timed path (Adapter.bench, impls/onnx/timed.py) ---------------------------------

ONNX_ADAPTERS = [
    "onnx-export",
    "onnx-export-attention",
    "onnx-attention",
    "onnx-contrib-mha",
    "onnx-contrib-gqa",
]


@pytest.mark.parametrize("name", ONNX_ADAPTERS)
def test_onnx_timed_bodies_match_the_conformance_path(name, tmp_path, monkeypatch):
    """The timed body computes exactly what the adapter's conformance path computes (the same
    graph without the weights output), records threads and the provider that ran the kernel,
    has no backward, and offers a MatMul in the same dtype for the peak."""
    if name.startswith("onnx-export"):
        pytest.importorskip("torch")
        pytest.importorskip("onnxscript")
        monkeypatch.setenv("MHA_ONNX_CACHE", str(tmp_path))
    from mha_conformance.impls import registry
    from mha_conformance.impls.bench import bench_threads
    from mha_conformance.vectors.catalogue import spec as make_spec
    from mha_conformance.vectors.generate import build_inputs

    spec = make_spec("bench_test", "small", batch=2, q_len=16, d_in=32, num_heads=4, head_dim=8, causal=True)
    inputs = {k: v for k, v in build_inputs(spec).items() if k != "grad_output"}
    adapter = registry.builtin(name)
    bench = adapter.bench(inputs, spec, "float32", "cpu")
    runtime = {k: inputs[k] for k in ("query", "key", "value")}
    expected = adapter.prepare(inputs, spec, "float32", "cpu")(runtime)["output"]
    got = bench.to_numpy(bench.forward())
    bench.sync()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    assert bench.meta["threads"] == str(bench_threads()) and bench.meta["inter_op_threads"] == "1"
    assert bench.meta["provider"] == "CPUExecutionProvider" and bench.meta["onnxruntime"]
    assert bench.make_backward is None
    product = bench.matmul(8)()
    assert product.shape == (8, 8) and product.dtype == np.float32
    if name.startswith("onnx-export"):  # the export cache serves the timed path too
        assert re.fullmatch(r"exported in [\d.]+ s", bench.meta["export"])
        assert adapter.bench(inputs, spec, "float32", "cpu").meta["export"] == "cached"
        assert len(list(tmp_path.iterdir())) == 1


def test_timed_path_refuses_what_the_kernel_cannot_run():
    """bfloat16 on the CPU provider has no Attention kernel: a reason, not a timing."""
    from mha_conformance.vectors.catalogue import spec as make_spec
    from mha_conformance.vectors.generate import build_inputs

    spec = make_spec("bench_test", "small", batch=1, q_len=8, d_in=16, num_heads=2, head_dim=8, causal=True)
    inputs = build_inputs(spec)
    with pytest.raises(NotImplementedError, match="bfloat16"):
        OnnxAttention().bench(inputs, spec, "bfloat16", "cpu")


# --- incremental decoding (prepare_decoder) -----------------------------------------------


@pytest.mark.parametrize("adapter", [OnnxAttention(), OnnxContribMHA()])
def test_decoder_streams_grow_their_cache_from_empty(adapter):
    """Each stream starts with a zero-length past and the presents come back as the next past;
    a stream whose cache is dropped after every step (each token then attends only itself)
    is caught by the same comparison, so the check can fail."""
    from mha_conformance.execution.harness import decode_tokens, runtime_inputs
    from mha_conformance.tolerance import judge

    case = load("self_causal_b2_t8_d16_h4")
    new_stream = adapter.prepare_decoder(cast_inputs(case, "float32"), case.spec, "float32", "cpu")
    runtime = runtime_inputs(case, "float32")
    step = new_stream()
    lengths, metas = [], []
    for t in range(case.spec["q_len"]):
        result = step({n: runtime[n][:, t : t + 1] for n in ("query", "key", "value")})
        lengths.append(int(result["meta"]["cache_length"]))
        metas.append(result["meta"])
    assert lengths == list(range(1, case.spec["q_len"] + 1))
    assert metas[0]["provider"] == "CPUExecutionProvider" and adapter.kernel[0] in metas[0]["kernel"]

    def verdict(outputs):
        return judge(
            outputs,
            case.tensors["output"],
            tensor="output",
            dtype="float32",
            baseline=case.baseline["float32"]["output"],
            error_scale=case.baseline["error_scale"]["output"],
        )

    assert verdict(decode_tokens(new_stream, runtime)["output"]).passed

    def forgetful():  # a fresh stream for every token: the cache never survives a step
        return lambda inputs: new_stream()(inputs)

    assert not verdict(decode_tokens(forgetful, runtime)["output"]).passed


@pytest.mark.parametrize("name", ["onnx-attention", "onnx-contrib-mha", "onnx-contrib-gqa"])
def test_onnx_timed_bodies_run_the_variants(name):
    """With a bias and a window (and a softcap where the op has one) the timed body still feeds
    what the conformance path feeds (the folded mask included), and both pass the gate."""
    from benchmarks import common
    from mha_conformance.impls import registry

    spec = common.config_spec("alibi-t128", causal=True)
    adapter = registry.builtin(name)
    spec = {**spec, "window": [40, -1], "softcap": 30.0 if "softcap" in adapter.variants else None}
    inputs = {k: v for k, v in common.build_inputs(spec).items() if k != "grad_output"}
    bench = adapter.bench(inputs, spec, "float32", "cpu")
    runtime = {k: inputs[k] for k in ("query", "key", "value", "attn_bias")}
    expected = adapter.prepare(inputs, spec, "float32", "cpu")(runtime)["output"]
    np.testing.assert_array_equal(bench.to_numpy(bench.forward()), expected)
    assert common.gate(bench, inputs, spec, "float32", name) <= 2


def test_benchmark_plan_times_every_onnx_adapter():
    """The runner plans every onnxruntime adapter's CPU configurations; onnx.reference, a NumPy
    reference implementation, is the one left untimed; the variant presets go to the adapters that
    express them."""
    from benchmarks import runner

    plan = runner.plan("cpu", ["onnx-*"])
    assert plan["untimed"] == ["onnx-reference"] and set(plan["adapters"]) == set(ONNX_ADAPTERS)
    # float32 on CPU, 3 lengths per preset: the GPT decoder by all 5; the Transformer encoder by all
    # but GroupQueryAttention (causal only); ALiBi by the 3 taking a bias; Gemma 2's softcap by the
    # 2 taking one (onnx-attention, onnx-contrib-gqa)
    assert len(plan["bench"]) == 3 * (5 + 4 + 3 + 2)
