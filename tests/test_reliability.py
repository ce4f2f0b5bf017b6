"""The harness survives what it is used for: broken vectors, broken adapters, crashes, races."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
import shutil
import struct
import time
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

#: A case every check kind applies to: golden, gradients, decoding (causal self-attention) and
#: the properties future-tokens, batch-independence and head-permutation.
EVERY_CHECK_CASE = "self_causal_b2_t8_d16_h4"
CHECK_KINDS = {"golden", "gradients", "decoding", "future-tokens", "batch-independence", "head-permutation"}


@pytest.mark.parametrize("isolation", ["process", "none"])
def test_every_check_fails_every_faulty_adapter_cleanly(isolation, tmp_path):
    """Each fault, in every check kind: a failure naming it (never a harness error), exit 1, the
    report written, and the correct adapter that runs after them all untouched."""
    from tests.faulty_adapters import FAULTY, Correct

    faulty = [f for f in FAULTY if isolation == "process" or not f.kills]
    refs = [f"tests.faulty_adapters:{f.__name__}" for f in [*faulty, Correct]]
    report_path = tmp_path / "r.json"
    res = run_suite(
        *(arg for ref in refs for arg in ("--adapter", ref)),
        *("--case", EVERY_CHECK_CASE, "--dtype", "float32", "--isolation", isolation),
        # 2 s bounds the hanging adapters; every other call takes 5-50 ms here (40x to spare)
        *("--case-timeout", "2", "--report", str(report_path)),
        test="conformance",
        timeout=600,
    )
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    tests = json.loads(report_path.read_text())["tests"]
    by_adapter: dict[str, dict[str, dict]] = {}
    for t in tests:
        by_adapter.setdefault(t["adapter"], {})[t["check"]] = t
    assert set(by_adapter["correct"]) == CHECK_KINDS
    assert {c: t["outcome"] for c, t in by_adapter["correct"].items()} == dict.fromkeys(CHECK_KINDS, "passed")
    for fault in faulty:
        seen = by_adapter[fault.name]
        assert set(seen) == CHECK_KINDS, (fault.name, sorted(seen))
        for check, t in seen.items():
            if not fault.shows:  # harmless (garbage on stdout and stderr): its results are right
                assert t["outcome"] == "passed", (fault.name, check, t["reason"][:500])
                continue
            assert t["outcome"] == "failed", (fault.name, check, t["outcome"], t["reason"][:500])
            assert fault.shows in t["reason"], (fault.name, check, t["reason"][:500])
            assert "Reproduce: python -m mha_conformance -k " in t["reason"], (fault.name, check)


def test_the_case_timeout_bounds_the_call(tmp_path):
    """--case-timeout 5 over 3 cases of a hanging adapter (each call sleeps an hour): three
    failures naming the call and the limit, each after at least the 5 s it was given. Without the
    limit the run would hang; run_suite's 600 s guard (35x the 17 s it takes) would end it."""
    report_path = tmp_path / "r.json"
    res = run_suite(
        *("--adapter", "tests.faulty_adapters:Hangs", "--dtype", "float32", "--case-timeout", "5"),
        *("--case", "bias_none", "--case", "bias_out_only", "--case", "bias_qkv_only"),
        *("--report", str(report_path)),
    )
    assert res.returncode == 1, res.stdout[-2000:]
    tests = json.loads(report_path.read_text())["tests"]
    assert [t["outcome"] for t in tests] == ["failed"] * 3
    for t in tests:
        assert (
            "the adapter call did not finish within 5 s (--case-timeout); its worker was killed"
            in t["reason"]
        )
        assert t["duration"] >= 5, t["duration"]  # the call had its 5 s: a busy machine only adds


def test_a_hanging_startup_has_its_own_limit_and_message(tmp_path):
    """A prepare that hangs is ended by --startup-timeout (3 s), not by the 60 s case limit: the
    message names the startup. run_suite's 600 s guard ends the run if neither limit works."""
    res = run_suite(
        *("--adapter", "tests.faulty_adapters:HangsInPrepare", "--case", "bias_none", "--dtype", "float32"),
        *("--startup-timeout", "3", "--case-timeout", "60"),
    )
    assert res.returncode == 1, res.stdout[-2000:]
    assert (
        "the adapter's startup (worker start, imports and prepare) did not finish within 3 s "
        "(--startup-timeout); its worker was killed" in res.stdout
    )


def test_a_huge_exception_message_is_cut_in_the_report_and_the_terminal(tmp_path):
    report_path = tmp_path / "r.json"
    res = run_suite(
        *("--adapter", "tests.faulty_adapters:HugeMessage", "--case", "bias_none", "--dtype", "float32"),
        *("-k", "golden", "--report", str(report_path)),
    )
    assert res.returncode == 1, res.stdout[-2000:]
    (test,) = json.loads(report_path.read_text())["tests"]
    assert test["outcome"] == "failed" and "the adapter raised RuntimeError: xxx" in test["reason"]
    assert "characters cut]" in test["reason"] and len(test["reason"]) < 30_000
    assert test["reason"].rstrip().endswith("--case bias_none")  # the reproduce line survives
    assert len(res.stdout) < 100_000, len(res.stdout)
    assert report_path.stat().st_size < 200_000


def _other_format(tmp_path: Path) -> str:
    store = tmp_path / "v99"
    shutil.copytree(ROOT / "vectors", store, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    manifest = json.loads((store / golden.MANIFEST).read_text())
    manifest["format_version"] = "99"
    (store / golden.MANIFEST).write_text(json.dumps(manifest))
    return str(store)


USAGE_ERRORS = {
    "k-negative": (lambda tmp: ["--k-factor", "-1"], "--k-factor must be a positive number (got -1)"),
    "k-zero": (lambda tmp: ["--k-factor", "0"], "--k-factor must be a positive number"),
    "k-nan": (lambda tmp: ["--k-factor", "nan"], "--k-factor must be a positive number (got nan)"),
    "timeout-negative": (lambda tmp: ["--case-timeout", "-5"], "--case-timeout must be a number of seconds"),
    "report-unwritable": (
        lambda tmp: ["--report", str(_blocker(tmp) / "r.json")],
        "--report",
    ),
    "report-is-a-folder": (lambda tmp: ["--report", str(tmp)], "is a directory"),
    "history-unwritable": (lambda tmp: ["--history", str(_blocker(tmp) / "h")], "--history"),
    "case-matches-nothing": (
        lambda tmp: ["--case", "bias_*", "--case", "no_such_case*"],
        "--case 'no_such_case*' matches no case id",
    ),
    "vectors-other-format": (
        lambda tmp: ["--vectors", _other_format(tmp)],
        "vector format version '99', but this suite reads 1, 2",
    ),
}


def _blocker(tmp: Path) -> Path:
    """A path under a regular file: not writable even for root."""
    blocker = tmp / "a-file"
    blocker.write_text("")
    return blocker


@pytest.mark.parametrize("kind", USAGE_ERRORS)
def test_a_bad_option_is_a_usage_error_before_any_test_runs(kind, tmp_path):
    make_args, message = USAGE_ERRORS[kind]
    res = run_suite("--adapter", "tests.faulty_adapters:good", *make_args(tmp_path))
    assert res.returncode == 4, (res.returncode, res.stdout[-1500:], res.stderr[-1500:])
    assert message in res.stderr, res.stderr[-1500:]
    assert "passed" not in res.stdout and "failed" not in res.stdout


def test_faults_that_kill_are_out_of_scope_in_process():
    """With --isolation none a hang or a process death would take the run with it: those
    faults are for the worker; the library says which."""
    from tests.faulty_adapters import FAULTY

    assert {f.name for f in FAULTY if f.kills} == {"hangs", "exits", "segfaults"}


def test_a_framework_tensor_is_refused_by_name():
    pytest.importorskip("torch")
    res = run_suite(
        "--adapter", "tests.faulty_adapters:returns_tensor", "--case", "bias_none", "--dtype", "float32"
    )
    assert res.returncode == 1, res.stdout[-2000:]
    assert "'output' is a torch.Tensor, not a numpy.ndarray; convert it" in res.stdout


def test_a_fault_in_process_still_fails_only_its_test():
    res = run_suite(
        "--isolation",
        "none",
        "--adapter",
        "tests.faulty_adapters:Raises",
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


def test_exit_code_is_zero_only_for_passes_skips_and_declared_divergences(tmp_path):
    res = run_suite("--adapter", "tests.faulty_adapters:good", "--case", "bias_*", "--case", "gqa_h8_kv2")
    assert res.returncode == 0, res.stdout[-2000:]


# ------------------------------------------------------------------ resources and interrupts


def _peak_rss(tmp_path: Path, *cases: str) -> float:
    report_path = tmp_path / "rss.json"
    args = [a for c in cases for a in ("--case", c)]
    res = run_suite(
        *("--adapter", "tests.faulty_adapters:good", "--dtype", "float32", "-k", "golden"),
        *args,
        *("--report", str(report_path)),
    )
    assert res.returncode == 0, res.stdout[-2000:]
    return json.loads(report_path.read_text())["run"]["peak_rss_mb"]


def test_the_suite_memory_does_not_grow_with_the_number_of_cases(tmp_path):
    """The suite holds a case's tensors only while its tests run: the 53 cases outside the seed
    cases (which hold the largest files) add next to nothing to the peak (measured 1.2 MB;
    keeping every case loaded added 9 MB)."""
    seeds = _peak_rss(tmp_path, "seed_*")
    every = _peak_rss(tmp_path, "*")
    assert every - seeds < 5, f"peak RSS {seeds:.1f} MB for the seed cases, {every:.1f} MB for all"


def _processes_with(marker: str) -> list[int]:
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def test_ctrl_c_writes_what_finished_and_leaves_no_worker(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import uuid

    marker = f"MHA_INTERRUPT_TEST={uuid.uuid4().hex}"
    report_path = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "pytest", "conformance/test_golden.py", "-p", "no:cacheprovider", "-q"]
    cmd += ["--adapter", "tests.faulty_adapters:Slow", "--dtype", "float32", "--report", str(report_path)]
    calls = tmp_path / "calls"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1], "MHA_SLOW_CALLS": str(calls)}
    # SIGINT ignored by whatever started these tests (a background job of a non-interactive shell)
    # would be inherited, and Ctrl-C would then do nothing: the suite gets Ctrl-C's default.
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )

    def finished_calls() -> int:
        return len(calls.read_text().splitlines()) if calls.exists() else 0

    try:
        # Wait for the fourth call to finish (so three tests are done), however long the start takes;
        # 300 s is a hang guard (the start takes 1-2 s here).
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and finished_calls() < 4 and proc.poll() is None:
            time.sleep(0.1)
        assert finished_calls() >= 4, "the suite made no progress"
        assert len(_processes_with(marker)) == 2, "the suite and its worker are not both running"
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends the foreground process
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 2, out[-2000:]  # pytest's "interrupted"
    assert "KeyboardInterrupt" in out
    data = json.loads(report_path.read_text())
    assert data["run"]["exit_status"] == 2
    finished = [t for t in data["tests"] if t["outcome"] == "passed"]
    assert 3 <= len(finished) < 61, len(finished)
    deadline = time.monotonic() + 30  # the worker is killed before the suite exits; this only waits for /proc
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with(marker) == [], "a worker process outlived the interrupted run"
