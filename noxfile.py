"""Every task has a session here: ``nox -s conformance``, ``nox -s tests``, ``nox -s vectors``,
``nox -s lint``.

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


#: Built-in adapters by the environment (pip extra) they run in; each gets its own virtualenv
#: so conflicting packages (onnxruntime vs onnxruntime-gpu, framework pins) never meet.
BACKENDS = {"torch": ["torch-*"]}
HISTORY = "results/conformance"


def adapter_args(session: nox.Session, patterns: list[str]) -> list[str]:
    """The pytest arguments for one backend: its own built-in adapters, or those of the
    user's ``--adapter`` values that belong to it; skips the session when none do."""
    from fnmatch import fnmatchcase

    args = session.posargs
    chosen = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--adapter"]
    rest = [a for i, a in enumerate(args) if a != "--adapter" and (i == 0 or args[i - 1] != "--adapter")]
    every = [p for ps in BACKENDS.values() for p in ps]
    foreign = [c for c in chosen if not any(fnmatchcase(c, p) for p in every)]
    if foreign:
        session.error(
            f"{foreign} are not built-in adapters; run your own adapter in your own environment: "
            f"python -m pytest conformance --adapter {foreign[0]}"
        )
    mine = [c for c in chosen if any(fnmatchcase(c, p) for p in patterns)] if chosen else patterns
    if not mine:
        session.skip("no selected adapter runs in this environment")
    return [arg for name in mine for arg in ("--adapter", name)] + rest


@nox.session
@nox.parametrize("backend", list(BACKENDS))
def conformance(session: nox.Session, backend: str) -> None:
    """Validate the built-in adapters of one backend against the golden vectors.

    Arguments after ``--`` reach pytest: ``nox -s conformance -- --adapter torch-sdpa --device all``.
    Every run also writes its JSON report into results/conformance/ (the history).
    """
    args = adapter_args(session, BACKENDS[backend])
    install(session, "-e", f".[test,{backend}]")
    session.run("python", "-m", "pytest", "conformance", "-p", "no:cacheprovider", "-rfE",
                "--history", HISTORY, *args)  # fmt: skip


@nox.session
def tests(session: nox.Session) -> None:
    """The project's own tests, then the conformance suite on CPU with the torch adapters."""
    install(session, "-e", ".[test,torch]")
    session.run("python", "-m", "pytest", "tests", "-ra", *session.posargs)
    session.run("python", "-m", "pytest", "conformance", "-p", "no:cacheprovider", "-rfE",
                "--adapter", "torch-*", "--report", "results/ci-conformance.json")  # fmt: skip


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
