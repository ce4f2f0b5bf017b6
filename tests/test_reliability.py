"""The harness survives what it is used for: broken vectors, broken adapters, crashes, races."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from mha_conformance.results import report
from mha_conformance.vectors import golden
from tests.runs import run_suite

ROOT = Path(__file__).resolve().parents[1]
CASE = "mask_random_per_head"


# ------------------------------------------------------------------------- bad vectors


@pytest.fixture
def store(tmp_path: Path) -> Path:
    dest = tmp_path / "vectors"
    shutil.copytree(ROOT / "vectors", dest, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return dest


def rewrite(store: Path, case_id: str, *, tensors=None, metadata=None, raw: bytes | None = None) -> None:
    """Replace a case file (tensors and metadata edited, or raw bytes) and re-hash it in the
    manifest, as a broken generator would: only the deeper checks can then catch it."""
    path = store / f"{case_id}.safetensors"
    if raw is None:
        data = path.read_bytes()
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + size])
        case = golden.load_case(case_id, store)
        arrays = dict(case.tensors)
        meta = dict(header["__metadata__"])
        if tensors:
            tensors(arrays)
        if metadata:
            metadata(meta)
        raw = golden.serialize(arrays, meta)
    path.write_bytes(raw)
    manifest = json.loads((store / golden.MANIFEST).read_text())
    manifest["cases"][case_id]["sha256"] = hashlib.sha256(raw).hexdigest()
    (store / golden.MANIFEST).write_text(json.dumps(manifest))


def _spec_edit(field, value):
    def edit(meta):
        spec = json.loads(meta["spec"])
        spec[field] = value
        meta["spec"] = json.dumps(spec)

    return edit


CORRUPTIONS = {
    "truncated": (
        lambda s: (s / f"{CASE}.safetensors").write_bytes((s / f"{CASE}.safetensors").read_bytes()[:-500]),
        "sha256",
    ),
    "flipped byte": (lambda s: _flip(s / f"{CASE}.safetensors"), "sha256"),
    "truncated and re-hashed": (
        lambda s: rewrite(s, CASE, raw=(s / f"{CASE}.safetensors").read_bytes()[:-500]),
        "cannot be read",
    ),
    "missing tensor": (lambda s: rewrite(s, CASE, tensors=lambda t: t.pop("w_k")), "missing tensors ['w_k']"),
    "wrong dtype": (
        lambda s: rewrite(s, CASE, tensors=lambda t: t.update(output=t["output"].astype(np.float32))),
        "tensor 'output'",
    ),
    "wrong shape": (
        lambda s: rewrite(s, CASE, tensors=lambda t: t.update(query=t["query"][:, :-1])),
        "tensor 'query'",
    ),
    "malformed spec JSON": (
        lambda s: rewrite(s, CASE, metadata=lambda m: m.update(spec="{not json")),
        "'spec' is not valid JSON",
    ),
    "missing baseline": (
        lambda s: rewrite(s, CASE, metadata=lambda m: m.pop("baseline")),
        "has no 'baseline'",
    ),
    "spec lacks a key": (
        lambda s: rewrite(s, CASE, metadata=lambda m: m.update(spec=json.dumps({"id": CASE}))),
        "spec lacks",
    ),
    "spec of another case": (
        lambda s: rewrite(s, CASE, metadata=_spec_edit("id", "bias_none")),
        "holds case 'bias_none'",
    ),
    "format version": (
        lambda s: rewrite(s, CASE, metadata=lambda m: m.update(format_version="99")),
        "format_version '99'",
    ),
    "oversized header": (lambda s: rewrite(s, CASE, raw=struct.pack("<Q", 1 << 40) + b"{}"), "header claims"),
    "header not JSON": (
        lambda s: rewrite(s, CASE, raw=struct.pack("<Q", 4) + b"nope"),
        "header is not valid JSON",
    ),
    "manifest hash differs": (
        lambda s: _edit_manifest(s, lambda m: m["cases"][CASE].update(sha256="0" * 64)),
        "the manifest says",
    ),
    "file missing": (lambda s: (s / f"{CASE}.safetensors").unlink(), "is missing"),
}


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x40
    path.write_bytes(bytes(data))


def _edit_manifest(store: Path, edit) -> None:
    manifest = json.loads((store / golden.MANIFEST).read_text())
    edit(manifest)
    (store / golden.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_every_corruption_is_named_before_anything_runs(kind, store):
    corrupt, expected = CORRUPTIONS[kind]
    corrupt(store)
    with pytest.raises(golden.VectorError) as err:
        golden.load_case(CASE, store)
    message = str(err.value)
    assert CASE in message and expected in message, message
    assert "python -m mha_conformance.vectors generate" in message  # says what to do


@pytest.mark.parametrize("problem", ["manifest not JSON", "manifest without cases", "manifest missing"])
def test_a_broken_manifest_is_named(problem, store):
    manifest = store / golden.MANIFEST
    {
        "manifest not JSON": lambda: manifest.write_text("{"),
        "manifest without cases": lambda: manifest.write_text("{}"),
        "manifest missing": manifest.unlink,
    }[problem]()
    with pytest.raises(golden.VectorError, match="manifest"):
        golden.case_ids(store)


def test_the_suite_stops_on_bad_vectors_before_any_adapter_runs(store, tmp_path):
    CORRUPTIONS["missing tensor"][0](store)
    report_path = tmp_path / "r.json"
    res = run_suite(
        "--vectors", str(store), "--adapter", "tests.faulty_adapters:good", "--report", str(report_path)
    )
    assert res.returncode == 4, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"case {CASE}" in res.stderr and "missing tensors ['w_k']" in res.stderr
    assert not report_path.exists()  # nothing ran, so nothing to report


def test_nothing_unpickles():
    """No pickle in the code: golden data and reports are safetensors and JSON only."""
    banned = [
        re.compile(r"\bpickle\.loads?\("),
        re.compile(r"allow_pickle\s*=\s*True"),
        re.compile(r"\btorch\.load\((?![^)]*weights_only\s*=\s*True)"),
        re.compile(r"\bimport\s+(c?pickle|dill|joblib)\b"),
    ]
    hits = []
    for path in ROOT.rglob("*.py"):
        if (
            any(part in (".nox", ".asv", ".ci-venv", ".cache") for part in path.parts)
            or path.name == "test_reliability.py"
        ):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if any(p.search(line) for p in banned):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, hits


# --------------------------------------------------------------------- faulty adapters

FAULTS = {
    "raises": "the adapter raised RuntimeError: kernel launch failed",
    "returns_nan": "non-finite value(s)",
    "wrong_shape": "output: shape [16, 8, 2], expected [2, 8, 16]",
    "wrong_dtype": "output: dtype float16, expected float32",
    "returns_list": "the adapter returned a list",
    "returns_tensor": "'output' is a torch.Tensor, not a numpy.ndarray",
    "returns_nothing": "the adapter returned None",
    "hangs": "did not finish within 3 s (--case-timeout); its worker was killed",
    "segfaults": "worker process died with signal SIGSEGV",
    "exits": "worker process died with exit code 3",
    "killed_like_oom": "died with signal SIGKILL (SIGKILL: often the kernel's out-of-memory killer)",
    "out_of_memory": "the adapter raised MemoryError",
}


def test_faulty_adapters_fail_their_tests_and_the_run_goes_on(tmp_path):
    pytest.importorskip("torch")  # returns_tensor returns a real framework tensor
    report_path = tmp_path / "r.json"
    adapters = [arg for name in [*FAULTS, "good"] for arg in ("--adapter", f"tests.faulty_adapters:{name}")]
    res = run_suite(
        *adapters,
        "--case",
        "self_basic_b2_t8_d16_h4",
        "--dtype",
        "float32",
        "--case-timeout",
        "3",
        "--report",
        str(report_path),
        timeout=900,
    )
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(report_path.read_text())
    outcomes = {t["adapter"].split(":")[1]: t for t in data["tests"]}
    assert outcomes["good"]["outcome"] == "passed"  # the run went on after every fault
    for name, message in FAULTS.items():
        assert outcomes[name]["outcome"] == "failed", (
            name,
            outcomes[name]["outcome"],
            outcomes[name]["reason"],
        )
        assert message in outcomes[name]["reason"], (name, outcomes[name]["reason"])
        assert "Reproduce: python -m mha_conformance -k 'test_golden'" in outcomes[name]["reason"]


def test_a_fault_in_process_still_fails_only_its_test():
    res = run_suite(
        "--isolation",
        "none",
        "--adapter",
        "tests.faulty_adapters:raises",
        "--adapter",
        "tests.faulty_adapters:good",
        "--case",
        "bias_none",
        "--dtype",
        "float64",
    )
    assert res.returncode == 1
    assert "1 failed, 1 passed" in res.stdout


def test_torch_results_on_the_wrong_device_are_refused():
    torch = pytest.importorskip("torch")
    from mha_conformance.impls.torch.convert import to_numpy

    with pytest.raises(RuntimeError, match="result is on cpu, but the test asked for cuda"):
        to_numpy(torch.zeros(2), "float32", "cuda")


# ------------------------------------------------------------------ history and exits


def _write_many(args: tuple[str, int]) -> int:
    folder, writer = args
    from datetime import datetime, timezone

    for n in range(50):
        data = {
            "writer": writer,
            "n": n,
            "tests": [{"case": f"c{i}", "outcome": "passed"} for i in range(20)],
        }
        report.write_json_atomic(
            Path(folder) / report.history_name(datetime.now(timezone.utc), "abc123"), data
        )
    return writer


def test_eight_concurrent_writers_lose_and_corrupt_nothing(tmp_path):
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        assert sorted(pool.map(_write_many, [(str(tmp_path), w) for w in range(8)])) == list(range(8))
    files = list(tmp_path.iterdir())
    assert len(files) == 400 and all(f.suffix == ".json" and not f.name.startswith(".") for f in files)
    seen = {(d["writer"], d["n"]) for d in (json.loads(f.read_text()) for f in files)}
    assert seen == {(w, n) for w in range(8) for n in range(50)}


def test_a_report_that_cannot_be_written_is_a_harness_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    res = run_suite(
        "--adapter",
        "tests.faulty_adapters:good",
        "--case",
        "bias_none",
        "--dtype",
        "float64",
        "--report",
        str(blocker / "r.json"),
    )
    assert res.returncode == 3, res.stdout[-2000:]
    assert "HARNESS ERROR: could not write the report" in res.stdout


def test_exit_code_is_zero_only_for_passes_skips_and_declared_divergences(tmp_path):
    res = run_suite("--adapter", "tests.faulty_adapters:good", "--case", "bias_*", "--case", "gqa_h8_kv2")
    assert res.returncode == 0, res.stdout[-2000:]
