"""Running the real suite in a subprocess, as a user would (``python -m mha_conformance ...``)."""

from __future__ import annotations

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
