"""The fuzzer finds a real bug, shrinks it, prints a line that reproduces it, and remembers it."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fuzz(adapter: str, db: Path, examples: int, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "mha_conformance.plugin",
        "--pyargs",
        "mha_conformance.fuzzing.fuzz_attention",
        "-p",
        "no:cacheprovider",
        "-q",
        "--adapter",
        adapter,
        "--fuzz-examples",
        str(examples),
    ]
    env = {**os.environ, "MHA_FUZZ_DB": str(db), **(env_extra or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def test_a_correct_implementation_survives_fuzzing(tmp_path):
    res = fuzz("mha_conformance.impls.variants.mutants:Correct", tmp_path / "db", 25)
    assert res.returncode == 0, res.stdout[-3000:]


def test_fuzzing_catches_shrinks_and_reproduces_a_bug(tmp_path):
    db = tmp_path / "db"
    res = fuzz("mha_conformance.impls.variants.mutants:CausalOffByOne", db, 60)
    assert res.returncode == 1, res.stdout[-3000:]
    match = re.search(r"Reproduce: MHA_FUZZ_SPEC=('.*?') python -m pytest", res.stdout)
    assert match, res.stdout[-3000:]
    spec = shlex.split(match.group(1))[0]
    assert '"causal": true' in spec  # shrunk to a spec that still shows the bug
    again = fuzz(
        "mha_conformance.impls.variants.mutants:CausalOffByOne",
        tmp_path / "other",
        1,
        {"MHA_FUZZ_SPEC": spec},
    )
    assert again.returncode == 1 and "mutant-causal-off-by-one on cpu in float32, case fuzz_" in again.stdout
    remembered = fuzz(
        "mha_conformance.impls.variants.mutants:CausalOffByOne", db, 1
    )  # one example: only the saved failure
    assert remembered.returncode == 1, remembered.stdout[-2000:]


def test_fuzzing_draws_the_variants_an_adapter_expresses(tmp_path):
    """The correct variant adapter survives specs with biases, softcaps, windows and lengths; one
    that ignores per-batch key lengths is caught and shrunk to a spec that uses them."""
    ok = fuzz("tests.variant_adapters:loops", tmp_path / "ok", 40)
    assert ok.returncode == 0, ok.stdout[-3000:]
    bad = fuzz("tests.variant_adapters:lengths_ignored", tmp_path / "bad", 60)
    assert bad.returncode == 1, bad.stdout[-3000:]
    match = re.search(r"Reproduce: MHA_FUZZ_SPEC=('.*?') python -m pytest", bad.stdout)
    assert match and '"kv_lengths": [' in shlex.split(match.group(1))[0], bad.stdout[-3000:]
