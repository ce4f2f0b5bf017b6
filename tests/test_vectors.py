"""The golden-vector store: catalogue coverage, determinism, and verify catching damage."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mha_conformance.vectors import golden, verify
from mha_conformance.vectors.catalogue import CASES
from mha_conformance.vectors.generate import case_tensors, generate

ROOT = Path(__file__).resolve().parents[1]
IDS = [c["id"] for c in CASES]


def run_vectors(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mha_conformance.vectors", *args], cwd=ROOT, capture_output=True, text=True
    )


def test_catalogue_is_broad_and_named():
    assert len(IDS) >= 40 and len(set(IDS)) == len(IDS)
    by_id = {c["id"]: c for c in CASES}
    wrapper = by_id["seed_wrapper_stacked_causal_heads_noproj_b2_t6_din3_h2_hd2"]
    assert (wrapper["batch"], wrapper["q_len"], wrapper["d_out"], wrapper["out_proj"]) == (2, 6, 4, False)
    gpt = by_id["seed_gpt_causal_d512_h8_hd64_noqkvbias"]
    assert (gpt["d_out"], gpt["num_heads"], gpt["qkv_bias"], gpt["causal"]) == (512, 8, False, True)
    assert any(c["num_heads"] == 96 for c in CASES)
    assert any(c["q_len"] >= 512 for c in CASES)
    assert any(c["num_kv_heads"] == 1 for c in CASES) and any(
        1 < c["num_kv_heads"] < c["num_heads"] for c in CASES
    )
    assert any(c["causal"] and c["q_len"] < c["kv_len"] for c in CASES)
    assert any(c["head_dim"] == 1 for c in CASES) and any(c["scale"] is not None for c in CASES)
    assert any(c["kdim"] != c["d_in"] for c in CASES)


def test_committed_vectors_verify():
    result = run_vectors("verify", "-q")
    assert result.returncode == 0, result.stderr
    sizes = sum(p.stat().st_size for p in (ROOT / "vectors").glob("*.safetensors"))
    assert sizes < 50e6


def test_every_case_loads_with_its_flags():
    for cid in golden.case_ids():
        case = golden.load_case(cid)
        has_empty_row = not case.tensors["attn_weights"].sum(axis=-1).all()
        assert case.spec["fully_masked_rows"] == has_empty_row, cid
        # adapters declare NaN-row divergences by this name pattern, so it must be exact
        assert case.spec["fully_masked_rows"] == ("fully_masked" in cid), cid
        assert all(
            np.isfinite(case.tensors[n]).all() for n in ["output", "attn_weights", *case.spec["gradients"]]
        )


def test_generation_is_bit_identical_here_and_its_inputs_everywhere(tmp_path):
    """Generating again on one machine gives the same bytes. Against the committed files (made on
    another machine): the inputs are bit-identical (they never touch BLAS), the truths and
    baselines agree by the float64 rule (vectors/verify.py), not bit for bit."""
    (tmp_path / "first").mkdir()
    (tmp_path / "again").mkdir()
    fresh = generate(tmp_path / "first")
    for case_spec in CASES[::6]:  # a second generation of every sixth case
        spec = dict(case_spec)
        again = golden.write_case(tmp_path / "again", spec, *case_tensors(spec))
        assert again.read_bytes() == (tmp_path / "first" / again.name).read_bytes(), spec["id"]
    committed = golden.read_manifest()
    assert sorted(fresh["cases"]) == sorted(committed["cases"])
    for cid, entry in committed["cases"].items():
        assert fresh["cases"][cid]["inputs_sha256"] == entry["inputs_sha256"], cid
        stored, made = golden.load_case(cid), golden.load_case(cid, tmp_path / "first")
        assert stored.spec == made.spec, cid
        for name in stored.inputs():
            assert stored.tensors[name].tobytes() == made.tensors[name].tobytes(), (cid, name)
        problems = verify.compare(stored, verify.Recomputed(made.tensors, made.baseline, members={}))
        if any("set_by" in p or "set by" in p for p in problems):  # a near tie needs every member's error
            problems = verify.compare(stored, verify.recompute(made))
        assert problems == [], cid


def flip(array: np.ndarray, index: tuple[int, ...], bit: int) -> np.ndarray:
    """A copy of a float64 array with one mantissa bit (0 = the lowest of 52) of one value flipped."""
    out = array.copy()
    out.view(np.uint64)[index] ^= np.uint64(1 << bit)
    return out


#: A low mantissa bit: flipped, it moves a value by 2**-40 of itself (about 1e-12).
LOW_BIT = 12


def test_a_flipped_low_bit_in_any_ordinary_tensor_is_caught():
    """The float64 rule is loose enough for another CPU's BLAS and tight enough for damage: in every
    stored tensor whose largest value is of ordinary size (at least a tenth of the magnitudes it is
    formed from: not rounding noise such as grad_b_k), flipping mantissa bit 12 of that value exceeds
    the bound, while the stored tensor itself is within it."""
    checked = 0
    for cid in golden.case_ids():
        case = golden.load_case(cid)
        fresh = verify.recompute(case)
        for name in ["output", "attn_weights", *case.spec["gradients"]]:
            stored, scale = case.tensors[name], fresh.baseline["error_scale"][name]
            bound = verify.float64_bound(fresh.tensors[name], scale)
            assert np.max(np.abs(stored - fresh.tensors[name]), initial=0.0) <= bound, (cid, name)
            if np.abs(stored).max() < 0.1 * scale["rms_magnitude"]:
                continue
            worst = np.unravel_index(int(np.argmax(np.abs(stored))), stored.shape)
            damaged = flip(stored, worst, LOW_BIT)
            assert np.max(np.abs(damaged - fresh.tensors[name])) > bound, (cid, name)
            checked += 1
    assert checked > 900  # of about 1,170 stored tensors; the rest are noise or exact zeros


def rewrite(root: Path, cid: str, **tensors: np.ndarray) -> None:
    """Write a case with some tensors replaced, and its manifest entry with the new file's sha256:
    damage that only the recomputation can see."""
    case = golden.load_case(cid, root)
    path = golden.write_case(root, case.spec, {**case.tensors, **tensors}, case.baseline)
    manifest = golden.read_manifest(root)
    manifest["cases"][cid] = golden.manifest_entry(path)
    (root / golden.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


@pytest.fixture
def vector_copy(tmp_path):
    dest = tmp_path / "vectors"
    shutil.copytree(ROOT / "vectors", dest, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return dest


def test_verify_catches_a_flipped_byte(vector_copy):
    victim = vector_copy / "mask_random_per_head.safetensors"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    result = run_vectors("verify", "-q", "--root", str(vector_copy), "--case", "mask_random_per_head")
    assert result.returncode == 1
    assert "case mask_random_per_head" in result.stderr and "sha256" in result.stderr


def test_verify_catches_a_missing_file(vector_copy):
    (vector_copy / "gqa_h8_kv2.safetensors").unlink()
    result = run_vectors("verify", "-q", "--root", str(vector_copy), "--case", "gqa_h8_kv2")
    assert result.returncode == 1
    assert "case gqa_h8_kv2" in result.stderr and "missing" in result.stderr


def test_load_rejects_a_truncated_file_before_parsing(vector_copy):
    victim = vector_copy / "bias_none.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(golden.VectorError, match="case bias_none"):
        golden.load_case("bias_none", vector_copy)


def test_precision_cases_use_every_bit_of_their_one_dtype():
    """Shared cases hold values exact in bfloat16; each precision-exposing case holds values only
    its own dtype represents (docs/vectors.md)."""
    import ml_dtypes

    def exact_in(x: np.ndarray, dtype) -> bool:
        return bool(np.array_equal(x.astype(dtype).astype(np.float64), x.astype(np.float64)))

    names = ("query", "w_q", "w_o")
    for cid in golden.case_ids():
        case = golden.load_case(cid)
        spec, values = case.spec, [case.tensors[n] for n in names if n in case.tensors]
        if not cid.startswith("precision_"):
            assert "input_dtype" not in spec and all(exact_in(v, ml_dtypes.bfloat16) for v in values), cid
            continue
        (dtype,) = spec["dtypes"]
        if dtype == "float64":
            assert all(v.dtype == np.float64 and not exact_in(v, np.float32) for v in values), cid
        elif dtype == "float32":
            assert all(not exact_in(v, ml_dtypes.bfloat16) and not exact_in(v, np.float16) for v in values), (
                cid
            )
        elif dtype == "float16":
            for v in values:
                assert exact_in(v, np.float16) and not exact_in(v, ml_dtypes.bfloat16), cid
                bits = v.astype(np.float16).view(np.uint16)
                assert np.all((bits[bits & 0x7C00 != 0] & 7) == 3), cid  # 3/8 of a bfloat16 ulp off its grid
        else:
            x = case.tensors["query"]
            assert exact_in(x, ml_dtypes.bfloat16) and np.abs(x).max() > np.finfo(np.float16).max, cid


def test_format_1_and_2_files_load_and_others_are_refused(tmp_path):
    """A case with float32 inputs is written in format 1 (what a format-1 reader reads); only the
    float64-input cases need format 2; a newer format is refused with what to do."""
    v1, v2 = (
        golden.load_case("self_basic_b2_t8_d16_h4"),
        golden.load_case("precision_f64_inputs_self_b2_t8_d16_h4"),
    )
    for case, fmt in ((v1, "1"), (v2, "2")):
        header = golden._parse_header(case.path, case.path.read_bytes())
        assert header["__metadata__"]["format_version"] == fmt
        assert header["query"]["dtype"] == ("F32" if fmt == "1" else "F64")
    path = golden.write_case(tmp_path, v1.spec, v1.tensors, v1.baseline)
    data = path.read_bytes().replace(b'"format_version":"1"', b'"format_version":"9"')
    path.write_bytes(data)
    manifest = {"format_version": golden.FORMAT_VERSION, "cases": {v1.id: golden.manifest_entry(path)}}
    (tmp_path / golden.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(golden.VectorError, match="format_version '9', this code reads 1, 2"):
        golden.load_case(v1.id, tmp_path)


def test_verify_catches_a_rehashed_flipped_bit(vector_copy):
    """A stored gradient with mantissa bit 12 of one value flipped, the file and the manifest
    rehashed: verify names the case and the tensor and says by how much it is off."""
    cid = "gqa_h8_kv2"
    grad = golden.load_case(cid, vector_copy).tensors["grad_w_q"]
    rewrite(
        vector_copy,
        cid,
        grad_w_q=flip(grad, np.unravel_index(int(np.argmax(np.abs(grad))), grad.shape), LOW_BIT),
    )
    result = run_vectors("verify", "-q", "--root", str(vector_copy), "--case", cid)
    assert result.returncode == 1
    assert f"case {cid}: stored 'grad_w_q' differs" in result.stderr and "float64 rule" in result.stderr
    assert result.stderr.count("ERROR:") == 1, result.stderr


def test_verify_catches_changed_inputs_by_their_digest(vector_copy):
    """Inputs changed and the file rehashed, but the manifest's inputs_sha256 kept: named as such."""
    cid = "bias_none"
    case = golden.load_case(cid, vector_copy)
    path = golden.write_case(
        vector_copy, case.spec, {**case.tensors, "query": case.tensors["query"] * 2}, case.baseline
    )
    manifest = golden.read_manifest(vector_copy)
    manifest["cases"][cid]["sha256"] = golden.manifest_entry(path)["sha256"]
    (vector_copy / golden.MANIFEST).write_text(json.dumps(manifest))
    result = run_vectors("verify", "-q", "--root", str(vector_copy), "--case", cid)
    assert result.returncode == 1 and f"case {cid}: the manifest's inputs_sha256" in result.stderr


def test_a_baseline_a_millionth_off_is_caught(vector_copy):
    """The emulation is the same bits on every machine, so a baseline is held to the truth's own
    float64 bound: one a millionth off (a changed ensemble member, a changed emulation) is caught,
    in every dtype, tensor and the set_by it names, while the stored ones pass."""
    cid = "gqa_h8_kv2"
    case = golden.load_case(cid, vector_copy)
    fresh = verify.recompute(case)
    assert verify.compare(case, fresh) == []
    for dtype in ("float32", "float16", "bfloat16"):
        for name in ("output", "grad_w_q", "grad_b_k"):
            stored = case.baseline[dtype][name]
            case.baseline[dtype][name] = stored * (1 + 1e-6)
            problems = verify.compare(case, fresh)
            assert len(problems) == 1 and f"{dtype} baseline for '{name}'" in problems[0], problems
            case.baseline[dtype][name] = stored
    case.baseline["set_by"]["float32"]["output"] = "no-such-member"
    (problem,) = verify.compare(case, fresh)
    assert "was set by 'no-such-member'" in problem
