"""Every task has a session here. The two a newcomer needs: ``nox -s conformance`` (every built-in
adapter on CPU, one virtualenv per backend) and ``nox -s tests`` (the project's own tests). The
others: ``portability``, ``fuzz``, ``probes``, ``mutation`` and ``vectors`` (how good the verdicts
are), ``benchmarks``, ``speed`` and ``dashboard`` (how fast), ``docs`` and ``lint``. ``nox -l``
lists them with their backends.

Sessions use stdlib venv + pip: this machine's pip finds the local CPU build of torch, which
uv does not. ``constraints.txt`` pins torch to that build; point ``MHA_CONSTRAINTS`` at
another file (or set it empty) to choose a different torch, e.g. a CUDA build.
"""

from __future__ import annotations

import os
import shutil
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


#: One virtualenv per backend, so conflicting packages (onnxruntime vs onnxruntime-gpu, framework
#: pins) never meet: the pip extras it installs, the built-in adapters (globs) it runs, and its
#: environment variables. Keras picks its backend once per process from KERAS_BACKEND, so the same
#: Keras layer runs in three environments.
BACKENDS: dict[str, dict] = {
    "torch": {"extras": "torch", "adapters": ["torch-*"]},
    "tensorflow": {
        "extras": "tensorflow",
        "adapters": ["keras-mha", "keras-mha-scores", "keras-ops-sdpa"],
        "env": {"KERAS_BACKEND": "tensorflow"},
    },
    "jax": {"extras": "jax", "adapters": ["jax-*", "flax-*"]},
    "keras-jax": {"extras": "jax,keras", "adapters": ["keras-*-jax"], "env": {"KERAS_BACKEND": "jax"}},
    "keras-torch": {
        "extras": "torch,keras",
        "adapters": ["keras-*-torch"],
        "env": {"KERAS_BACKEND": "torch"},
    },
    "onnx": {"extras": "onnx", "adapters": ["onnx-*"]},
    "onnx-gpu": {"extras": "onnx-gpu", "adapters": ["onnx-*"], "gpu": True},  # onnxruntime-gpu, --device cuda
}
HISTORY = "results/conformance"


def adapter_args(session: nox.Session, patterns: list[str]) -> list[str]:
    """The pytest arguments for one backend: its own built-in adapters, or those of the
    user's ``--adapter`` values that belong to it; skips the session when none do."""
    from fnmatch import fnmatchcase

    args = session.posargs
    chosen = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--adapter"]
    rest = [a for i, a in enumerate(args) if a != "--adapter" and (i == 0 or args[i - 1] != "--adapter")]
    every = [p for b in BACKENDS.values() for p in b["adapters"]]
    foreign = [c for c in chosen if not any(fnmatchcase(c, p) for p in every)]
    if foreign:
        session.error(
            f"{foreign} are not built-in adapters; run your own adapter in your own environment: "
            f"python -m mha_conformance --adapter {foreign[0]}"
        )
    mine = [c for c in chosen if any(fnmatchcase(c, p) for p in patterns)] if chosen else patterns
    if not mine:
        session.skip("no selected adapter runs in this environment")
    return [arg for name in mine for arg in ("--adapter", name)] + rest


#: The most pytest-xdist workers the main job starts by itself: each is a process with its
#: framework imported, plus its adapter worker (about 1 GB each with TensorFlow).
MAX_WORKERS = 8


def default_workers(args: list[str]) -> list[str]:
    """``-n N`` for a CPU run that names no worker count, dispatch or debugger: one worker per
    core, at most :data:`MAX_WORKERS` (none on one core). The same verdicts as a serial run
    (tests/test_speed.py); each worker takes an adapter's dtype whole (docs/speed.md). A GPU run
    stays serial: the workers would share one device, not cores. ``-n 0`` runs serially."""
    chosen = any(
        a in ("-n", "--numprocesses", "--dist", "-d", "--pdb", "--trace", "no:xdist")
        or a.startswith(("--numprocesses=", "--dist="))
        or (a.startswith("-n") and not a.startswith("--"))
        for a in args
    )
    devices = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--device"]
    cores = min(os.cpu_count() or 1, MAX_WORKERS)
    return [] if chosen or devices not in ([], ["cpu"]) or cores < 2 else ["-n", str(cores)]


def backend_env(session: nox.Session, backend: str, extras: str) -> list[str]:
    """Prepare a per-backend session: skip a GPU backend without a GPU, install the project with
    ``extras`` plus the backend's own, set its environment; return the backend's adapter
    arguments (GPU backends default to ``--device cuda``)."""
    config = BACKENDS[backend]
    if config.get("gpu") and not shutil.which("nvidia-smi"):
        session.skip(f"{backend} needs an NVIDIA GPU (no nvidia-smi here); its adapters run on CPU elsewhere")
    args = adapter_args(session, config["adapters"])
    if config.get("gpu") and "--device" not in args:
        args += ["--device", "cuda"]
    install(session, "-e", f".[{extras},{config['extras']}]")
    session.env.update(config.get("env", {}))
    return args


@nox.session
@nox.parametrize("backend", list(BACKENDS))
def conformance(session: nox.Session, backend: str) -> None:
    """Validate the built-in adapters of one backend against the golden vectors.

    Arguments after ``--`` reach pytest: ``nox -s conformance -- --adapter torch-sdpa --device all``
    (``-- --quick``: the quick tier). On the CPU the tests are spread over one pytest-xdist worker
    per core, at most eight (``-- -n 0``: serially; :func:`default_workers`). Every run also writes its JSON
    report into results/conformance/ (the history). ``-- --timing`` measures the job instead, in
    the same environment and caches: cold, warm and quick runs, checked to give the same
    verdicts, into docs/generated/main-job-time.md (``mha_conformance.audit.timing``; with
    ``--kind serial --kind n1 --kind n2``, other worker counts on the warm caches).
    """
    args = backend_env(session, backend, "test")
    args = default_workers(args) + args
    if "--timing" in args:
        args.remove("--timing")
        table = ["--out", "results/timing", "--markdown", "docs/generated/main-job-time.md"]
        session.run("python", "-m", "mha_conformance.audit.timing", "--label", backend, *table, *args)
        return
    session.run("python", "-m", "mha_conformance", "-rfE", "--history", HISTORY, "--label", backend, *args)


@nox.session
@nox.parametrize("backend", ["torch", "tensorflow"])
def portability(session: nox.Session, backend: str) -> None:
    """Identical verdicts for one backend under other thread counts, kernel libraries and
    instruction sets (``conformance/audit/portability.py``; docs/tolerance.md), each setting the CPU
    cannot run skipped with its reason. The NumPy side (``--backend numpy``: the reference, verify,
    the NumPy adapters) runs in ``nox -s tests``. Arguments after ``--`` reach pytest."""
    backend_env(session, backend, "test")
    session.run("python", "-m", "mha_conformance.audit.portability", "--backend", backend, *session.posargs)


@nox.session
@nox.parametrize("backend", list(BACKENDS))
def fuzz(session: nox.Session, backend: str) -> None:
    """Random specs (hypothesis) for one backend's adapters against the reference, bounded by
    ``-- --fuzz-examples N`` (default 60 per adapter and dtype); failures shrink to the smallest
    spec and print a line that reproduces them; .hypothesis/fuzz remembers them for the next run."""
    args = backend_env(session, backend, "test")
    fuzzing = ["-p", "mha_conformance.plugin", "--pyargs", "mha_conformance.fuzzing.fuzz_attention"]
    session.run("python", "-m", "pytest", *fuzzing, "-p", "no:cacheprovider", "-rfEs", *args)


@nox.session
def tests(session: nox.Session) -> None:
    """The project's own tests, then the suite's golden checks on CPU with the torch adapters
    (``nox -s conformance`` runs every check for every backend)."""
    install(session, "-e", ".[test,torch,onnx,jax,bench,keras,docs]")
    session.run("python", "-m", "pytest", "tests", "-ra", *session.posargs)
    # The torch adapters but the compiled FlexAttention: its kernels compile per venv path (about 15
    # minutes cold here) and nox -s conformance runs it.
    torch = ["torch-mha*", "torch-sdpa", "torch-scratch", "torch-wrapper", "torch-flex"]
    golden = ["-k", "test_golden", *(a for name in torch for a in ("--adapter", name))]
    golden += ["--report", "results/ci-conformance.json"]
    session.run("python", "-m", "mha_conformance", "-rfE", *golden)


@nox.session
@nox.parametrize("backend", list(BACKENDS))
def benchmarks(session: nox.Session, backend: str) -> None:
    """Time one backend's adapters with asv (``asv run --python=same``; docs/benchmarks.md). ``-- --device cuda|mps|all`` (default cpu), ``-- --adapter GLOB``, ``-- --quick``
    for a smoke run, ``-- --markdown PATH`` to render the commit's measured table after the run; other
    arguments reach asv. Only a clean tree records history in .asv/results/."""
    args = backend_env(session, backend, "bench")
    session.run("python", "-m", "benchmarks.runner", "--label", backend, *args)


@nox.session
def dashboard(session: nox.Session) -> None:
    """``asv publish`` plus the conformance page, into .asv/html/ (``-- --serve`` serves both;
    ``-- --merge DIR`` first merges another machine's results and history; docs/benchmarks.md)."""
    install(session, "-e", ".[bench]")
    session.run("python", "-m", "mha_conformance.dashboard", "--history", HISTORY, *session.posargs)


@nox.session
@nox.parametrize("backend", list(BACKENDS))
def speed(session: nox.Session, backend: str) -> None:
    """The quick regression gate: a few forward benchmarks of one backend's adapters with
    pytest-benchmark (on CPU: CPU time, one framework thread), failing when a benchmark is slower
    than its baseline, its newest earlier unflagged result on the same machine and device: a
    one-sided Mann-Whitney U test on the raw samples at p < 0.01 and a Hodges-Lehmann ratio of at
    least 1.25 (docs/benchmarks.md). ``-- --device cuda``, ``-- --adapter GLOB`` as for the
    benchmarks; ``-- --accept`` makes an intentionally slower run the baseline."""
    args = backend_env(session, backend, "test,bench")
    session.run("python", "benchmarks/regression/run.py", "--backend", backend, *args)


@nox.session
def mutation(session: nox.Session) -> None:
    """The mutation score: the whole suite against every deliberately wrong implementation in
    impls/variants/mutants.py (NumPy) and their correct twin; fails unless every mutant is killed and the
    twin passes. ``-- --case GLOB --dtype D`` narrows it; ``-- --json PATH`` keeps the result."""
    install(session, "-e", ".[test]")
    session.run("python", "-m", "mha_conformance.audit.mutation", *session.posargs)


@nox.session
@nox.parametrize("backend", [b for b, c in BACKENDS.items() if not c.get("gpu")])
def probes(session: nox.Session, backend: str) -> None:
    """Convention probes and dropout statistics for one backend's adapters, written to
    results/probes/<backend>.json (the dashboard's data; docs/checks.md, "Conventions")."""
    config = BACKENDS[backend]
    install(session, "-e", f".[test,{config['extras']}]")
    session.env.update(config.get("env", {}))
    adapters = [a for pattern in config["adapters"] for a in ("--adapter", pattern)]
    session.run(
        "python", "-m", "mha_conformance.probes", *adapters, "--json", f"results/probes/{backend}.json"
    )


@nox.session
def vectors(session: nox.Session) -> None:
    """Check the golden vectors (``-- generate`` rewrites them first)."""
    install(session, "-e", ".")
    if "generate" in session.posargs:
        session.run("python", "-m", "mha_conformance.vectors", "generate")
    session.run("python", "-m", "mha_conformance.vectors", "verify")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site (mkdocs, strict: a broken link fails) into site/;
    ``-- serve`` serves it with live reload instead."""
    install(session, "-e", ".[docs]")
    if "serve" in session.posargs:
        session.run("mkdocs", "serve")
    else:
        session.run("mkdocs", "build", "--strict")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check (CI runs it; `ruff format .` fixes the formatting)."""
    install(session, "ruff==0.17.6")  # pinned: a new ruff may format differently
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
