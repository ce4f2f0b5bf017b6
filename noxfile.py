"""Every task has a session here: ``nox -s tests``, ``nox -s vectors``, ``nox -s lint``.

Sessions use stdlib venv + pip: this machine's pip finds the local CPU build of torch, which
uv does not. ``constraints.txt`` pins torch to that build; point ``MHA_CONSTRAINTS`` at
another file (or set it empty) to choose a different torch, e.g. a CUDA build.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["tests"]


def install(session: nox.Session, *args: str) -> None:
    """pip install with the project's constraints (torch pinned to a CPU build by default)."""
    constraints = os.environ.get("MHA_CONSTRAINTS", str(ROOT / "constraints.txt"))
    extra = ["-c", constraints] if constraints else []
    session.install("--quiet", *extra, *args)


@nox.session
def tests(session: nox.Session) -> None:
    """The project's own tests (reference, vectors, tolerance)."""
    install(session, "-e", ".[test]")
    session.run("python", "-m", "pytest", "tests", *session.posargs)


@nox.session
def vectors(session: nox.Session) -> None:
    """Check the golden vectors (``-- generate`` rewrites them first)."""
    install(session, "-e", ".")
    if "generate" in session.posargs:
        session.run("python", "-m", "vectors", "generate")
    session.run("python", "-m", "vectors", "verify")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    install(session, "ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
