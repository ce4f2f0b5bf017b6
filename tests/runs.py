"""Running the real suite in a subprocess, as a user would (``python -m mha_conformance ...``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_suite(
    *args: str,
    test: str = "conformance/test_golden.py",
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """``python -m pytest <test> -q -rfE <args>`` in ``cwd``; ``env`` replaces the environment
    (None inherits this one), so a test can show what a user's bare shell would see."""
    cmd = [sys.executable, "-m", "pytest", test, "-p", "no:cacheprovider", "-q", "-rfE", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


def asv_setup(tmp_path: Path, repo: Path, machine: str) -> tuple[list[str], dict[str, str]]:
    """The project's asv.conf.json pointed at ``repo`` with env, results and html under
    ``tmp_path``, and machine ``machine`` registered in a throwaway home: returns the asv command
    (``asv --config ...``) and the environment to run it in."""
    from benchmarks import common

    conf = json.loads((ROOT / "asv.conf.json").read_text())
    conf.update(
        repo=str(repo),
        benchmark_dir=str(ROOT / "benchmarks"),
        env_dir=str(tmp_path / "env"),
        results_dir=str(tmp_path / "results"),
        html_dir=str(tmp_path / "html"),
    )
    (tmp_path / "asv.conf.json").write_text(json.dumps(conf))
    asv = [
        shutil.which("asv") or str(Path(sys.executable).parent / "asv"),
        "--config",
        str(tmp_path / "asv.conf.json"),
    ]
    env = dict(os.environ, HOME=str(tmp_path), ASV_PYTHONPATH=str(ROOT))  # machine file in a throwaway home
    env[common.RUN_CACHE_ENV] = str(tmp_path / "run.json")
    described = ["--os", "x", "--arch", "x", "--cpu", "x", "--num_cpu", "1", "--ram", "1"]
    subprocess.run(
        [*asv, "machine", "--machine", machine, *described, "--yes"], env=env, check=True, timeout=60
    )
    return asv, env
