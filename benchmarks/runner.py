"""One ``nox -s benchmarks`` run on one device: plan, machine, asv, summary (a CLI).

``python -m benchmarks.runner --device cpu --adapter 'torch-*' [--shape GLOB] [asv run arguments]``

* **Plan**: the ``--bench`` regexes that select exactly the configurations that can run
  here (asv starts a process per benchmark and configuration even to skip it, so selecting up
  front is what keeps the CPU matrix within minutes).
* **Machine**: ``<host>-<device>``, registered with ``asv machine`` with the CPU or GPU
  name and the thread count the run fixes: asv records no GPU, so the device is part of
  the machine name and results of different devices never mix.
* **Gate references**: the reference side of every configuration's correctness gate is
  computed and stored before asv starts (``common.store_gate_references``), so no benchmark
  process spends time or memory on it.
* **Run**: ``asv run --python=same`` in this environment, with the launch method of
  :func:`launch_method` (``forkserver`` on a CPU, the environment's frameworks imported once
  before the fork: ``MHA_BENCH_PRELOAD``); with a clean git tree it records history
  (``--set-commit-hash HEAD``), otherwise it runs without saving and says so. A ``--quick``
  run on a CPU goes as one asv run per core side by side, each pinned to its share of the cores
  (:func:`share_cores`) and given the configurations by what they cost in the last quick run
  (:func:`deal`). Table rows of unselected parameters (asv prints every combination) are left
  out.
* **Summary**: every configuration's status, median forward time and gate ratio, from the
  run cache (``.asv/runs/<machine>-<time>.json``, which stays as the run's log), and, when
  results were recorded, the spread of this run's timings (``benchmarks/spread.py``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from mha_conformance.impls.bench import THREADS_ENV

from . import common, measured, spread

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = r"bench_attention\.(Forward|Gradients|Roofline)\."
#: asv prints a table row per parameter combination; unselected ones end in n/a.
NOISE = re.compile(r"^\s*(\S+\s+){4}n/a\s*$")
#: Frameworks whose benchmarks may not run in a process forked from asv's forkserver (see
#: :func:`launch_method`); empty while every framework here tolerates it.
NO_FORK: dict[str, str] = {}


def param_regex(adapter: str, shape: str, dtype: str, causal: bool) -> str:
    """A regex matching asv's name of one parameter combination (``name('a', 's', 'd', True)``)."""
    return BENCHMARKS + r"\w+\(" + re.escape(f"'{adapter}', '{shape}', '{dtype}', {causal}") + r"\)"


def launch_method(adapters: list[Any], device: str) -> tuple[str, str]:
    """asv's launch method for a run of ``adapters`` on ``device``, and why.

    ``forkserver`` on a CPU: asv imports the suite once (with the frameworks,
    ``common.preload``) and forks a process per benchmark, instead of starting a Python and
    importing the framework for each (``spawn``). That is safe where the parent only imported
    modules: no framework has started a thread pool or a runtime before the fork, and each
    benchmark sets its threads and builds its module in its own process, as under ``spawn``.
    ``spawn`` on a GPU (a CUDA or MPS runtime must never be inherited through a fork, and the
    frameworks' import-time probing of devices is not proven fork-safe there) and for any
    framework listed in :data:`NO_FORK`.
    """
    if device != "cpu":
        return "spawn", f"{device}: a device runtime is never shared with a forked process"
    frameworks = sorted({a.framework or a.name for a in adapters} & set(NO_FORK))
    if frameworks:
        return "spawn", "; ".join(f"{f}: {NO_FORK[f]}" for f in frameworks)
    return "forkserver", "CPU frameworks imported once, before the fork; nothing runs before it"


def default_dtypes(device: str) -> list[str]:
    """Dtypes a run measures unless ``--dtype`` says otherwise: float32 on a CPU, where the
    whole default matrix must fit in 10 minutes on two cores (``--dtype bfloat16`` adds the
    bfloat16 half); every dtype elsewhere."""
    return ["float32"] if device == "cpu" else list(common.DTYPES)


def plan(
    device: str, patterns: list[str], dtypes: list[str] | None = None, shapes: list[str] | None = None
) -> dict[str, Any]:
    """The machine and the selection for ``device``, the built-in adapters matching
    ``patterns``, ``dtypes`` (default :func:`default_dtypes`) and the shapes matching ``shapes``
    (globs, default every shape)."""
    from mha_conformance.impls import registry
    from mha_conformance.impls.adapter import Adapter, cpu_name, refusal
    from mha_conformance.impls.bench import bench_threads

    adapters = [registry.builtin(n) for n in common.ADAPTERS if any(fnmatchcase(n, p) for p in patterns)]
    runnable = [a for a in adapters if not a.missing()]
    untimed = [a.name for a in runnable if type(a).bench is Adapter.bench]  # no timed path yet
    runnable = [a for a in runnable if a.name not in untimed]
    selected, skipped, selected_adapters, configurations = [], Counter(), set(), []
    dtypes = dtypes or default_dtypes(device)
    chosen = [s for s in common.SHAPES if any(fnmatchcase(s, g) for g in shapes or ["*"])]
    for a, shape, dtype, causal in itertools.product(runnable, chosen, dtypes, common.CAUSAL):
        spec = common.config_spec(shape, causal)
        reason = common.plan_skip(shape, dtype, causal, device) or refusal(a, spec, dtype, device)
        if reason:
            skipped[f"{a.name}: {reason}" if "on CPU" not in reason else reason] += 1
        else:
            selected.append(param_regex(a.name, shape, dtype, causal))
            selected_adapters.add(a.name)
            configurations.append([a.name, shape, dtype, causal])
    reachable = [a for a in runnable if not a.device_unavailable(device)]
    timed = [a for a in runnable if a.name in selected_adapters]
    method, why = launch_method(timed, device)
    # The preload is the environment's (every installed adapter with a timed path), not the
    # selection's: it is part of every benchmark process, so peakmem_forward must not move
    # with the --adapter patterns of a run.
    installed = [registry.builtin(n) for n in common.ADAPTERS]
    environment = [a.name for a in installed if not a.missing() and type(a).bench is not Adapter.bench]
    hardware = reachable[0].device_name(device) if reachable else cpu_name()
    threads = bench_threads()
    return {
        "machine": f"{platform.node() or 'host'}-{device}",
        "machine_info": {
            "os": f"{platform.system()} {platform.release()}",
            "arch": platform.machine(),
            "cpu": f"{hardware}; {threads} CPU threads",
            "num_cpu": str(threads),
            "ram": _memory(),
        },
        "threads": threads,
        "adapters": [a.name for a in runnable],
        "missing": {a.name: a.missing() for a in adapters if a.missing()},
        "untimed": untimed,
        "bench": selected,
        "configurations": configurations,
        "skipped": dict(skipped),
        "launch_method": method,
        "launch_method_why": why,
        "preload": common.preload_modules(environment) if method == "forkserver" else [],
    }


def devices(patterns: list[str]) -> list[str]:
    """Every device some selected, installed adapter reaches here (``--device all``)."""
    from mha_conformance.impls import registry

    found: list[str] = []
    for name in common.ADAPTERS:
        if any(fnmatchcase(name, p) for p in patterns):
            adapter = registry.builtin(name)
            if not adapter.missing():
                found += [d for d in adapter.devices() if d not in found]
    return found or ["cpu"]


def _memory() -> str:
    try:
        with open("/proc/meminfo") as info:
            return str(int(info.readline().split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        return "unknown"


def clean_head() -> str | None:
    """HEAD's full hash when the work tree is clean (results then belong to that commit), else None.
    Generated documentation does not count: a run's own ``--markdown`` table lands there, and the
    next backend's run of the same commit must still record."""
    try:
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", ".", ":!docs/generated"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return None if dirty else head


def summary(cache: dict[str, Any]) -> str:
    """The run's configurations as a table: status, median forward time, gate ratio."""
    rows = [("configuration", "status", "forward (median)", "gate ratio")]
    for key, entry in sorted(cache.get("configs", {}).items()):
        name = " ".join(key.split("|")[:4])
        median = entry.get("forward_median")
        ratio = entry.get("gate_ratio")
        status = entry.get("status", "?")
        if status != "ok":
            status += ": " + str(entry.get("reason", "")).split(": ", 1)[-1].splitlines()[0][:90]
        rows.append(
            (name, status, f"{median * 1e3:.2f} ms" if median else "-", f"{ratio:.3g}" if ratio else "-")
        )
    for key, entry in sorted(cache.get("peak", {}).items()):
        rows.append((f"peak {key}", "ok", f"{entry.get('gflops', 0):.1f} GFLOP/s", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def run(
    device: str,
    patterns: list[str],
    dtypes: list[str],
    asv_args: list[str],
    shapes: list[str] | None = None,
    label: str | None = None,
    markdown: Path | None = None,
    jobs: int | None = None,
) -> int:
    """Plan, register the machine, run asv with the output filtered, print the summary; keep
    the run's facts in its log and, with ``markdown``, render the commit's measured table."""
    p = plan(device, patterns, dtypes, shapes)
    print(
        f"benchmarks: machine {p['machine']} ({p['machine_info']['cpu']}), adapters {', '.join(p['adapters'])}"
    )
    for name, why in p["missing"].items():
        print(f"  not installed: {name}: {why}")
    if p["untimed"]:
        print(f"  no timed path (Adapter.bench) yet: {', '.join(p['untimed'])}")
    for why, count in p["skipped"].items():
        print(f"  left out: {count} x {why}")
    if not p["bench"]:
        print("benchmarks: nothing to run on this device")
        return 0
    info = [a for k, v in p["machine_info"].items() for a in (f"--{k}", v)]
    subprocess.run(
        ["asv", "machine", "--machine", p["machine"], *info, "--yes"],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    given = asv_args[asv_args.index("--set-commit-hash") + 1 :][:1] if "--set-commit-hash" in asv_args else []
    commit = given[0] if given else clean_head()
    quick = "--quick" in asv_args or "-q" in asv_args
    record = ["--set-commit-hash", commit] if commit and not quick and not given else []
    if quick:
        recording = "NOT recording history (--quick)"
    elif commit:
        recording = f"recording history for commit {commit[:12]} in .asv/results/{p['machine']}/"
    else:
        recording = (
            "NOT recording history (the work tree has uncommitted changes; "
            "commit them to record results for a commit)"
        )
    print(f"benchmarks: {len(p['bench'])} configurations; {recording}")
    t0 = time.time()
    computed, stored = common.store_gate_references(p["configurations"])
    print(
        f"benchmarks: gate references: {computed} computed, {stored} already stored "
        f"({time.time() - t0:.0f} s; {common.gate_store()})"
    )
    cache_file = (
        ROOT / ".asv" / "runs" / f"{p['machine']}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    )
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MHA_BENCH_DEVICE=device, MHA_BENCH_THREADS=str(p["threads"]))
    env[common.RUN_CACHE_ENV] = str(cache_file)
    env[common.PRELOAD_ENV] = ",".join(p["preload"])
    env[common.QUICK_ENV] = "1" if quick else ""
    launch = [] if "--launch-method" in asv_args else ["--launch-method", p["launch_method"]]
    if launch:
        print(f"benchmarks: launch method {p['launch_method']} ({p['launch_method_why']})")
    cmd = ["asv", "run", "--python=same", "--machine", p["machine"], *launch, *record, *asv_args]
    jobs = quick_jobs(jobs, quick, device, len(p["bench"]))
    groups, cores = [p["bench"]], [[]]
    if jobs > 1:
        # A user's own --cpu-affinity reaches every run unchanged: then none is pinned here.
        cores = share_cores(jobs) if "--cpu-affinity" not in asv_args else [[] for _ in range(jobs)]
        threads = len(cores[0]) or p["threads"]
        keys = [common.config_key(*c, device, threads) for c in p["configurations"]]
        known = measured.quick_seconds(p["machine"], wanted=set(keys))
        costs = [known.get(k) or guess_seconds(c[1]) for k, c in zip(keys, p["configurations"], strict=True)]
        groups, loads = deal(p["bench"], costs, jobs)
        where = " / ".join(f"CPU {','.join(map(str, c))}" for c in cores) if cores[0] else "unpinned"
        print(
            f"benchmarks: {jobs} asv runs side by side (--quick on a CPU: nothing is recorded), {where}, "
            f"{threads} thread(s) each; dealt by each configuration's seconds in the last quick run "
            f"({sum(k in known for k in keys)} of {len(keys)} known, the others guessed by length): "
            f"{' / '.join(f'{x:.0f}' for x in loads)} s expected"
        )
    started = time.time()
    returncode = run_asv(cmd, groups, env, cache_file, cores)
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    print(summary(cache))
    written = [
        f
        for f in spread.results_files([ROOT / ".asv" / "results" / p["machine"]])
        if f.stat().st_mtime >= started
    ]
    mine = {tuple(map(str, c)) for c in p["configurations"]}  # a results file keeps earlier runs too
    spreads = [s for f in written for s in spread.read_spreads(f) if s.values in mine]
    if spreads:
        print(
            f"benchmarks: spread (IQR / median) of this run's timings, {', '.join(f.name for f in written)}:"
        )
        print(spread.format_summary(spread.summarize(spreads)))
    seconds = time.time() - started
    info = {"commit": commit or "", "label": label or "+".join(patterns), "quick": quick, "seconds": seconds}
    info.update(
        machine=p["machine"],
        device=device,
        configurations=len(p["bench"]),
        launch=p["launch_method"],
        jobs=jobs,
    )
    measured.record_run(cache_file, info)
    print(
        f"benchmarks: asv exited {returncode} after {seconds:.0f} s; run log {cache_file.relative_to(ROOT)}"
    )
    if markdown is not None and commit:
        from mha_conformance.results.tables import write_markdown

        body = measured.render(p["machine"], commit)
        command = f"nox -s benchmarks -- --markdown {markdown}"
        write_markdown(markdown, command, body)
        print(f"benchmarks: measured table of commit {commit[:12]} written to {markdown}")
    elif markdown is not None:
        print(f"benchmarks: {markdown} not written: the work tree has uncommitted changes")
    return returncode


def quick_jobs(asked: int | None, quick: bool, device: str, configurations: int) -> int:
    """How many asv runs go side by side: ``--jobs``, by default every core for a ``--quick``
    run on a CPU and one otherwise. Timings taken side by side would measure each other, so more
    than one is refused for a run that keeps its timings (without ``--quick``)."""
    if asked is not None and asked > 1 and not quick:
        raise SystemExit(
            "benchmarks: --jobs above 1 is for --quick runs only: timings taken side by side measure "
            "each other (and a full run records them)"
        )
    wanted = asked if asked is not None else (os.cpu_count() or 1) if quick and device == "cpu" else 1
    return max(1, min(wanted, configurations))


def share_cores(jobs: int) -> list[list[int]]:
    """The CPUs this process may use, split into ``jobs`` sets (every job at least one CPU): one
    set per asv run side by side, each run's benchmarks pinned to its set (asv's
    ``--cpu-affinity``) with as many threads. Unpinned, every run's processes would each start a
    thread per core, twice as many threads as cores, and wait on each other's time slices."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < jobs:
        return [[] for _ in range(jobs)]  # not pinnable here: every run uses every core
    size = len(cpus) // jobs
    return [cpus[i * size : (i + 1) * size] for i in range(jobs)]


def guess_seconds(shape: str) -> float:
    """A configuration's cost before any quick run measured it: more for longer sequences (on two
    cores a quick run's configuration takes ~1 s at 128 tokens, 2-6 s at 2048)."""
    tokens = int(shape.rpartition("-t")[2])
    return 1.0 + 2.0 * (tokens / 2048) ** 2


def deal(bench: list[str], costs: list[float], jobs: int) -> tuple[list[list[str]], list[float]]:
    """The ``--bench`` regexes dealt out to ``jobs`` runs so that their expected seconds even out
    (the costliest first, each to the run with the fewest seconds so far: within 4/3 of the best
    split), in the plan's order within a run; returns the groups and their expected seconds."""
    loads, chosen = [0.0] * jobs, [[] for _ in range(jobs)]
    for i in sorted(range(len(bench)), key=lambda i: (-costs[i], i)):
        run = loads.index(min(loads))
        loads[run] += costs[i]
        chosen[run].append(i)
    return [[bench[i] for i in sorted(group)] for group in chosen], loads


def run_asv(
    cmd: list[str],
    groups: list[list[str]],
    env: dict[str, str],
    cache_file: Path,
    cores: list[list[int]] | None = None,
) -> int:
    """``cmd`` over the ``--bench`` regexes of each group: one asv run, or several side by side
    (:func:`deal`), each with its own run cache and forkserver, and pinned to its ``cores`` (as
    many threads; none: unpinned); their caches are merged into ``cache_file`` and the output
    lines prefixed by the run's number. Returns the worst exit status."""
    jobs = len(groups)
    cores = cores or [[] for _ in groups]
    parts = [cache_file] if jobs == 1 else [cache_file.with_suffix(f".{i + 1}.json") for i in range(jobs)]
    procs: list[subprocess.Popen] = []
    readers: list[threading.Thread] = []

    def relay(i: int, proc: subprocess.Popen, talking: threading.Event) -> None:
        assert proc.stdout is not None
        prefix = f"[{i + 1}/{jobs}] " if jobs > 1 else ""
        for line in proc.stdout:
            talking.set()
            if not NOISE.match(line) and "profiler_st" not in line:
                print(prefix + line, end="", flush=True)
        talking.set()

    for i, (group, part) in enumerate(zip(groups, parts, strict=True)):
        selection = [a for regex in group for a in ("--bench", regex)]
        own = {common.RUN_CACHE_ENV: str(part)}
        pin = []
        if cores[i]:
            pin = ["--cpu-affinity", ",".join(map(str, cores[i]))]
            own[THREADS_ENV] = str(len(cores[i]))
        proc = subprocess.Popen(
            [*cmd, *pin, *selection],
            cwd=ROOT,
            env={**env, **own},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        talking = threading.Event()
        readers.append(threading.Thread(target=relay, args=(i, proc, talking)))
        readers[-1].start()
        procs.append(proc)
        # asv rewrites ~/.asv-machine.json as it starts, before it prints anything: the next run
        # starts once this one has spoken, or two would read each other's half-written file.
        talking.wait(timeout=120)
    for reader in readers:
        reader.join()
    returncode = max(proc.wait() for proc in procs)
    if jobs > 1:
        merged: dict[str, Any] = {}
        for part in parts:
            data = json.loads(part.read_text()) if part.is_file() else {}
            for section, entries in data.items():
                merged.setdefault(section, {}).update(entries)
            part.unlink(missing_ok=True)
        cache_file.write_text(json.dumps(merged, indent=1, sort_keys=True))
    return returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.runner",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, mps, or all")
    parser.add_argument("--adapter", action="append", default=[], help="glob on built-in adapter names")
    parser.add_argument(
        "--dtype",
        action="append",
        default=[],
        choices=common.DTYPES,
        help="dtypes to measure (default float32 on cpu, all elsewhere)",
    )
    parser.add_argument(
        "--shape", action="append", default=[], help=f"glob on shape names ({', '.join(common.SHAPES)})"
    )
    parser.add_argument("--label", default=None, help="the run's name in its log (nox: the backend)")
    parser.add_argument(
        "--markdown", type=Path, default=None, help="after the run, write the commit's measured table here"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="asv runs side by side for --quick (default: every core on a CPU, else 1; full runs: 1)",
    )
    parser.add_argument("--plan", action="store_true", help="print the plan as JSON and stop")
    args, asv_args = parser.parse_known_args(argv)
    patterns = args.adapter or ["*"]
    targets = devices(patterns) if args.device == "all" else [args.device]
    if args.plan:
        print(json.dumps({d: plan(d, patterns, args.dtype, args.shape) for d in targets}, indent=1))
        return 0
    return max(
        run(d, patterns, args.dtype, asv_args, args.shape, args.label, args.markdown, args.jobs)
        for d in targets
    )


if __name__ == "__main__":
    sys.exit(main())
