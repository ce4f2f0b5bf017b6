"""The kernel-scale cases: a stream whose bits are fixed, inputs that hash to the manifest's digests,
a truth computed head by head and cached, recomputed whenever the cache cannot be trusted."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mha_conformance.impls import reference
from mha_conformance.vectors import golden, kernel_manifest, kernels, materialize
from mha_conformance.vectors.catalogue import bias_entry, mask_entry, spec
from mha_conformance.vectors.generate import build_inputs
from mha_conformance.vectors.stream import FixedStream, seed_of, splitmix64
from mha_conformance.vectors.verify import float64_bound

ROOT = Path(__file__).resolve().parents[1]
MASK64 = (1 << 64) - 1


def splitmix64_python(seed: int, count: int) -> list[int]:
    """SplitMix64 as Steele, Lea and Flood give it, in Python integers: the independent reference."""
    out, state = [], seed
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        out.append(z ^ (z >> 31))
    return out


def test_the_stream_is_splitmix64_bit_for_bit():
    assert int(splitmix64(0, 0, 1)[0]) == 0xE220A8397B1DCDAF  # the published first output for seed 0
    for seed in (0, 1, 2**63 + 12345, seed_of("k_self_t63_hd32")):
        assert [int(v) for v in splitmix64(seed, 0, 50)] == splitmix64_python(seed, 50)
        assert [int(v) for v in splitmix64(seed, 20, 5)] == splitmix64_python(seed, 25)[20:]  # counter-based


def test_the_streams_floats_have_stored_digests():
    """The floats are exact functions of the bits: these digests hold on every machine and NumPy."""
    s = FixedStream(seed_of("stream-digest"))
    digests = [
        hashlib.sha256(s.random(1000).tobytes()).hexdigest(),
        hashlib.sha256(s.standard_normal((10, 100)).tobytes()).hexdigest(),
        hashlib.sha256(s.integers(0, 1000, 100).astype("<i8").tobytes()).hexdigest(),
    ]
    assert digests == [
        "9815ecd3158c5bed0b41a23918cf7f6d61377bd0901e87df65293e3cfb33f560",
        "068972914e4f2c10f3dc265e450bd4d0de6782e18ea77f7a737802f3c1ff7a08",
        "d0282ef9fd21e4c090211ea20fb02d978f835cd0921ad28aa06a990450c606ff",
    ]
    x = FixedStream(1).standard_normal(100_000)
    assert abs(x.mean()) < 0.02 and abs(x.var() - 1) < 0.02 and np.abs(x).max() <= 2 * np.sqrt(3)


def test_every_kernel_case_builds_the_inputs_its_manifest_names():
    """Generated here, each case's inputs hash to the digest committed in vectors/KERNELS.json, and
    the manifest holds exactly the catalogue (vectors/kernels.py)."""
    manifest = materialize.read_kernel_manifest()
    assert sorted(manifest["cases"]) == sorted(c["id"] for c in kernels.KERNEL_CASES)
    for case_spec in kernels.KERNEL_CASES:
        entry = manifest["cases"][case_spec["id"]]
        assert {k: v for k, v in entry["spec"].items() if k != "fully_masked_rows"} == case_spec
        assert golden.inputs_digest(build_inputs(case_spec)) == entry["inputs_sha256"], case_spec["id"]


SMALL = [
    spec(
        "small_gqa_mask_per_head",
        "",
        batch=2,
        q_len=7,
        kv_len=11,
        num_heads=4,
        num_kv_heads=2,
        self_attention=False,
        mask=mask_entry("random", (2, 4, 7, 11), keep=0.7, keep_diagonal=True),
    ),
    spec("small_bias_shared_causal", "", q_len=6, causal=True, attn_bias=bias_entry("random", (1, 1, 6, 6))),
    spec(
        "small_bias_per_head_softcap",
        "",
        q_len=5,
        softcap=5.0,
        input_scale=3.0,
        attn_bias=bias_entry("random", (2, 4, 5, 5)),
    ),
    spec(
        "small_noproj_lengths",
        "",
        q_len=4,
        kv_len=9,
        self_attention=False,
        out_proj=False,
        kv_lengths=[9, 3],
        causal=True,
    ),
    spec("small_mqa_band", "", q_len=9, num_kv_heads=1, attn_bias=bias_entry("band", (1, 1, 9, 9), width=2)),
]


@pytest.mark.parametrize("case_spec", SMALL, ids=lambda s: s["id"])
def test_the_truth_head_by_head_is_the_reference(case_spec):
    """One head at a time and added up is the reference in one pass, up to the float64 rule."""
    case_spec = {
        **case_spec,
        "gradients": [g for g in case_spec["gradients"] if not g.startswith(("grad_w", "grad_b"))],
    }
    t = build_inputs(case_spec)
    by_head = materialize.truth(t, case_spec)
    fw = reference.forward(t, case_spec)
    whole = {
        "output": fw.output,
        "attn_weights": fw.attn_weights,
        **reference.backward(t, case_spec, t["grad_output"]),
    }
    from mha_conformance.impls import error_model

    scales = error_model.case_error_scales(t, case_spec, t["grad_output"], case_spec["gradients"])
    assert set(by_head) == {"output", "attn_weights", *case_spec["gradients"]}
    for name, value in by_head.items():
        err = float(np.max(np.abs(value - whole[name])))
        assert err <= float64_bound(whole[name], scales[name]), (name, err)
    assert materialize.fully_masked_rows(t, case_spec) == bool((~fw.allowed.any(-1)).any())


@pytest.fixture
def tiny_manifest(tmp_path, monkeypatch):
    """A kernel-scale manifest of one small case (the real pipeline: inputs, truth, fingerprint,
    ensemble baselines), with the cache in a temporary folder."""
    monkeypatch.setenv("MHA_CACHE_DIR", str(tmp_path / "cache"))
    case_spec = kernels.kernel(
        "k_tiny_t70_hd12_causal", "A tiny case for the store's tests.", q_len=70, head_dim=12, causal=True
    )
    return {
        "format_version": golden.FORMAT_VERSION,
        "cases": {case_spec["id"]: kernel_manifest.kernel_entry(case_spec)},
    }


def test_the_truth_is_computed_once_then_read(tiny_manifest, monkeypatch):
    cid = next(iter(tiny_manifest["cases"]))
    heard = []
    first = materialize.load_kernel_case(cid, tiny_manifest, heard.append)
    assert heard == ["head 1/2", "head 2/2"] and first.synthetic and first.path.is_file()
    monkeypatch.setattr(materialize, "truth", lambda *a, **k: pytest.fail("computed again"))
    again = materialize.load_kernel_case(cid, tiny_manifest)
    for name in ("output", "attn_weights", "grad_query"):
        assert np.array_equal(first.tensors[name], again.tensors[name])
    assert again.baseline == tiny_manifest["cases"][cid]["baseline"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "nan", "wrong values", "other version"])
def test_an_untrustworthy_cache_is_recomputed(tiny_manifest, monkeypatch, damage):
    cid = next(iter(tiny_manifest["cases"]))
    good = materialize.load_kernel_case(cid, tiny_manifest)
    path = good.path
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\0" * len(data))
    else:
        arrays = {
            n: good.tensors[n].copy()
            for n in ("output", "attn_weights", "grad_query", "grad_key", "grad_value")
        }
        if damage == "nan":
            arrays["output"][0, 0, 0] = np.nan
        elif damage == "wrong values":
            arrays["grad_key"] *= 1.01  # well-formed, finite, and wrong: the fingerprint sees it
        version = "someotherversion" if damage == "other version" else materialize.truth_version()
        path.write_bytes(golden.serialize(arrays, {"version": version}))
    computed = []
    real = materialize.truth
    monkeypatch.setattr(materialize, "truth", lambda *a, **k: computed.append(1) or real(*a, **k))
    again = materialize.load_kernel_case(cid, tiny_manifest)
    assert computed == [1], damage
    assert np.array_equal(again.tensors["grad_key"], good.tensors["grad_key"])
    assert materialize._read_cached(path, again.spec) is not None  # rewritten whole


def test_inputs_that_miss_their_digest_are_refused(tiny_manifest):
    cid = next(iter(tiny_manifest["cases"]))
    tiny_manifest["cases"][cid]["inputs_sha256"] = "0" * 64
    with pytest.raises(golden.VectorError, match=f"case {cid}: its inputs, generated here, hash to"):
        materialize.load_kernel_case(cid, tiny_manifest)


def test_a_truth_that_misses_its_fingerprint_is_refused(tiny_manifest):
    """The fingerprint is the float64 rule at fixed positions: a truth off by far more fails, and
    says what to do."""
    cid = next(iter(tiny_manifest["cases"]))
    tiny_manifest["cases"][cid]["fingerprint"]["output"]["values"][3] += 1e-6
    with pytest.raises(golden.VectorError, match="differs from the manifest's fingerprint"):
        materialize.load_kernel_case(cid, tiny_manifest)


def test_two_processes_computing_one_truth_at_once_leave_one_whole_file(tiny_manifest, tmp_path):
    """As xdist workers would: both compute, both write atomically, the file is whole."""
    manifest_path = tmp_path / "KERNELS.json"
    manifest_path.write_text(json.dumps(tiny_manifest))
    cid = next(iter(tiny_manifest["cases"]))
    code = (
        "import json, sys; from mha_conformance.vectors import materialize; "
        f"m = json.load(open({str(manifest_path)!r})); c = materialize.load_kernel_case({cid!r}, m); "
        "print(c.path)"
    )
    env = {**__import__("os").environ}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]  # a hang guard: seconds here
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1]
    path = Path(outs[0])
    assert materialize._read_cached(path, tiny_manifest["cases"][cid]["spec"]) is not None
    assert not list(path.parent.glob("*.tmp"))


def run_tier(tmp_path: Path, *args: str) -> tuple[dict, str]:
    """The kernel tier through the suite, as a user runs it; its JSON report and output."""
    from mha_conformance import __main__ as suite

    report = tmp_path / "report.json"
    done = suite.run(
        ["-q", "--no-header", "-o", "addopts=", "--kernel-scale", "--report", str(report), *args]
    )
    assert report.exists(), done.stdout[-3000:] + done.stderr[-2000:]
    return json.loads(report.read_text()), done.stdout


#: The CI slice of the kernel tier: a 64-key tile tail, a causal partial query tile, an odd head dim
#: padded to 64, a head dim above the 128 template.
SLICE = ["k_self_t65_hd40_causal", "k_cross_tq113_tk203_hd59", "k_cross_tq511_tk513_hd256"]


def test_a_slice_of_the_kernel_tier_passes_torch_sdpa(tmp_path):
    """torch's fused kernels over the slice, every dtype, golden and gradients: no failure."""
    report, out = run_tier(tmp_path, "--adapter", "torch-sdpa", *(a for c in SLICE for a in ("--case", c)))
    outcomes = [t["outcome"] for t in report["tests"]]
    assert report["run"]["kernel_scale"] is True
    assert outcomes.count("passed") >= 2 * len(SLICE) * 3 and set(outcomes) <= {"passed", "skipped"}, out


def test_a_case_over_the_memory_budget_is_a_skip_that_names_the_option(tmp_path):
    report, _ = run_tier(tmp_path, "--adapter", "torch-sdpa", "--case", SLICE[0], "--memory-budget", "1e-6")
    assert report["tests"] and {t["outcome"] for t in report["tests"]} == {"skipped"}
    assert all("--memory-budget" in t["reason"] for t in report["tests"])


def test_the_kernel_valid_orders_pass_at_half_the_limit(tmp_path):
    """The orders kernels use at scale (flash tiles of 64 and 128, split-K, tensor-core GEMMs) pass
    the slice at --k-factor 1; the whole tier: docs/generated/valid_orders-kernel.md."""
    from mha_conformance.impls.variants import valid_orders

    orders = [
        a
        for cls in valid_orders.KERNEL_VALID_ORDERS
        for a in ("--adapter", f"{cls.__module__}:{cls.__name__}")
    ]
    report, out = run_tier(
        tmp_path, "--k-factor", "1", *orders, *(a for c in SLICE[:2] for a in ("--case", c))
    )
    outcomes = [t["outcome"] for t in report["tests"]]
    assert outcomes and set(outcomes) == {"passed"}, out


def test_the_kernel_mutants_need_the_kernel_tier():
    """Each shape-dependent mutant survives the committed catalogue and dies on the kernel cases of
    its shape; the correct twin passes both (the whole tier: docs/generated/mutation-kernel.md)."""
    from mha_conformance.audit import mutation
    from mha_conformance.impls.variants import mutants

    small = mutation.run(["--dtype", "float32"], mutants.KERNEL_MUTANTS)
    cases = [
        "k_self_t65_hd40_causal",
        "k_cross_tq113_tk203_hd59",
        "k_cross_tq511_tk513_hd256",
        "k_decode_tq1_tk4096_gqa_h16_kv8_hd128",
        "k_variant_window_left300_t1025_causal",
        "k_variant_kv_lengths_b2_1025_700_causal",
    ]
    kernel = mutation.run(
        ["--kernel-scale", "--dtype", "float32", *(a for c in cases for a in ("--case", c))],
        mutants.KERNEL_MUTANTS,
    )
    assert small.twin_passes and kernel.twin_passes
    assert [m.name for m in small.mutants if m.killed] == []
    assert [m.name for m in kernel.mutants if not m.killed] == []


def test_verify_kernel_builds_a_case_and_checks_it():
    """`python -m mha_conformance.vectors verify --kernel --case ID`: inputs against their digest,
    the truth (computed or cached) against its fingerprint, the spec against the catalogue."""
    done = subprocess.run(
        [sys.executable, "-m", "mha_conformance.vectors", "verify", "--kernel", "--case", "k_self_t63_hd32"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verify: 0 problem(s)" in done.stdout
