"""What every benchmark shares: the configurations, the correctness gate, FLOP counts and the
measured peak (in the spirit of numpy's ``benchmarks/benchmarks/common.py``).

Nothing here imports a framework: adapters do, inside ``setup``, so the suite imports on any
machine and a missing framework or device is a ``NotImplementedError`` (asv's skip).

A configuration is adapter x shape x dtype x causal on the device named by
``MHA_BENCH_DEVICE`` (default ``cpu``; the nox session sets it and names the asv machine
``<host>-<device>``). Shapes are the seed documents' systems at several sequence lengths,
``<preset>-t<seq_len>``, with ``batch = max(1, TOKENS // seq_len)``: short sequences still
make calls long enough to time, and the attention part grows with the sequence.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import cache
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from mha_conformance.checks.skeleton import output_problems
from mha_conformance.impls import cache as caches
from mha_conformance.impls import error_model, reference, registry
from mha_conformance.impls.adapter import refusal, rule_mask
from mha_conformance.impls.bench import Bench, bench_threads
from mha_conformance.tolerance import DEFAULT_K, judge
from mha_conformance.vectors.catalogue import spec as catalogue_spec
from mha_conformance.vectors.generate import build_inputs, ensemble_errors

DEVICE_ENV = "MHA_BENCH_DEVICE"
#: JSON file shared by the processes of one run (the nox session gives each run a fresh one).
RUN_CACHE_ENV = "MHA_BENCH_RUN_CACHE"

#: The seed documents' systems: the from-scratch GPT-style module (d 512, 8 heads of 64,
#: Linear(bias=False) for Q/K/V) and the original Transformer's attention (d_model 512,
#: 8 heads, d_k = d_v = 64, biased projections).
PRESETS: dict[str, dict[str, Any]] = {
    "gpt": {"d_in": 512, "num_heads": 8, "head_dim": 64, "qkv_bias": False},
    "transformer": {"d_in": 512, "num_heads": 8, "head_dim": 64, "qkv_bias": True},
    # The variants (contract v2), scaled to the same width: Gemma 2's attention (logit softcap 50,
    # a sliding window of half its context, grouped-query heads: 8 query heads over 4 key/value
    # heads) and ALiBi's linear distance bias (BLOOM, MPT), both decoders.
    "gemma2": {
        "d_in": 512,
        "num_heads": 8,
        "num_kv_heads": 4,
        "head_dim": 64,
        "qkv_bias": False,
        "softcap": 50.0,
    },
    "alibi": {"d_in": 512, "num_heads": 8, "head_dim": 64, "qkv_bias": False},
}


def preset_variants(preset: str, n: int, heads: int) -> dict[str, Any]:
    """The variant fields of a preset at sequence length ``n``: Gemma 2's window of 4096 keys in
    an 8192 context becomes ``n // 2`` keys to the left; ALiBi's bias is [1, H, n, n]."""
    if preset == "gemma2":
        return {"window": [n // 2, -1]}
    if preset == "alibi":
        return {"attn_bias": {"kind": "alibi", "shape": [1, heads, n, n], "grad": False}}
    return {}


SEQ_LENS = (128, 512, 2048)
#: Tokens per call: batch = max(1, TOKENS // seq_len) (8 x 128, 2 x 512, 1 x 2048).
TOKENS = 1024
SHAPES = tuple(f"{preset}-t{n}" for preset in PRESETS for n in SEQ_LENS)
DTYPES = ("float32", "bfloat16", "float16")
CAUSAL = (False, True)
#: Every built-in adapter; one whose framework is not installed skips.
ADAPTERS = tuple(registry.BUILTINS)
NUMPY_DTYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
}
#: The gate compares this many query rows (the first and last halves) against the reference.
GATE_ROWS = 32
#: On CPU, the causality each preset runs with (``plan_skip``).
CPU_CAUSALITY = {"gpt": True, "transformer": False, "gemma2": True, "alibi": True}
#: Matrix size for the measured peak: large enough to reach the device's steady GEMM rate.
PEAK_N = {"cpu": 2048, "cuda": 8192, "mps": 4096}


#: Modules the forkserver imports before it forks, comma-separated (the runner sets it from the
#: plan with :func:`preload_modules`); empty: nothing, each benchmark imports what it needs.
PRELOAD_ENV = "MHA_BENCH_PRELOAD"
#: Set by the runner for ``asv run --quick`` (:func:`quick`).
QUICK_ENV = "MHA_BENCH_QUICK"
#: What each adapter's timed path imports, by adapter-name glob (every matching glob counts);
#: ``module:function`` also calls ``function()``: a probe of the machine that every process
#: would repeat and that keeps its answer in the process (it must start no thread).
PRELOADS: dict[str, tuple[str, ...]] = {
    "torch-*": ("torch",),
    "torch-flex*": ("torch.nn.attention.flex_attention",),
    "torch-flex-compiled": (
        "torch._dynamo",
        "torch._inductor.compile_fx",
        "mha_conformance.impls.torch.flex:probe_cpu_compiler",
    ),
    "jax-*": ("jax",),
    "flax-*": ("jax", "flax.nnx"),
    "keras-*": ("keras",),
    "onnx-*": ("onnx", "onnxruntime"),
    "onnx-export*": ("torch", "torch.onnx", "onnxscript"),
}


class WrongResult(AssertionError):
    """The benchmarked configuration computes the wrong attention: no timing is posted."""


def device() -> str:
    """The device the benchmarks run on, from ``MHA_BENCH_DEVICE`` (default cpu)."""
    return os.environ.get(DEVICE_ENV, "") or "cpu"


def preload_modules(adapter_names: list[str]) -> list[str]:
    """The modules to import once before forking for these adapters (:data:`PRELOADS`)."""
    found: list[str] = []
    for name in adapter_names:
        for pattern, modules in PRELOADS.items():
            if fnmatchcase(name, pattern):
                found += [m for m in modules if m not in found]
    return found


def preload() -> list[str]:
    """In asv's forkserver, import the modules named in ``MHA_BENCH_PRELOAD``; return them.

    The forkserver imports the suite once and forks a process per benchmark: what is imported
    here is loaded in every benchmark for free (torch costs 1-2 s per process, and a
    configuration takes five processes). Importing runs no operation, so no framework has
    started a thread pool or a device runtime that a fork would break; a probe
    (``module:function``, :data:`PRELOADS`) only runs child processes that have ended. The runner sets the
    variable only for devices and frameworks that run under the forkserver (``runner.py``).
    Keras and JAX go through the suite's own importers, which configure them (the Keras backend,
    float64, the compilation cache) before anything runs. asv's discovery process, and a
    benchmark started by ``spawn``, import nothing here: they would pay for it and gain nothing.
    """
    if sys.argv[1:2] != ["run_server"]:  # asv's benchmark.py run_server DIR SOCKET
        return []
    names = [n.strip() for n in os.environ.get(PRELOAD_ENV, "").split(",") if n.strip()]
    for name in names:
        if name == "keras":
            from mha_conformance.impls.keras.backend import import_keras

            import_keras()
        elif name == "jax":
            from mha_conformance.impls.jax.common import import_jax

            import_jax()
        else:
            module, _, probe = name.partition(":")
            imported = importlib.import_module(module)
            if probe:
                getattr(imported, probe)()
    return names


def config_spec(shape: str, causal: bool) -> dict[str, Any]:
    """A full spec (catalogue keys) for a benchmark shape such as ``gpt-t2048``."""
    preset, _, seq = shape.rpartition("-t")
    if preset not in PRESETS or not seq.isdigit():
        raise ValueError(
            f"benchmark shape {shape!r}: expected <preset>-t<seq_len> with preset in {list(PRESETS)}"
        )
    n = int(seq)
    return catalogue_spec(
        f"bench_{shape}_{'causal' if causal else 'full'}",
        f"benchmark configuration {shape}, {'causal' if causal else 'no mask'}",
        batch=max(1, TOKENS // n),
        q_len=n,
        causal=causal,
        dtypes=("float32", "bfloat16"),  # inputs exact in both (float16's range is wider)
        **PRESETS[preset],
        **preset_variants(preset, n, PRESETS[preset]["num_heads"]),
    )


def forward_flops(spec: dict[str, Any]) -> float:
    """Useful floating-point operations of one forward pass (a multiply-add counts 2).

    Projections, Q K^T and P V, and the output projection. Causal attention counts only the
    allowed (query, key) pairs, as FlashAttention's benchmarks do: a kernel that computes
    the masked half and throws it away does no useful work there. Softmax is left out.
    """
    b, tq, tk = spec["batch"], spec["q_len"], spec["kv_len"]
    h, hkv, hd, hdv = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"], spec["v_head_dim"]
    proj = tq * spec["d_in"] * h * hd + tk * (spec["kdim"] * hkv * hd + spec["vdim"] * hkv * hdv)
    if spec["out_proj"]:
        proj += tq * h * hdv * spec["d_out"]
    pairs = tq * tk
    if spec["causal"]:
        i = np.arange(tq)[:, None]
        pairs = int((np.arange(tk)[None, :] <= i + (tk - tq)).sum())
    return 2.0 * b * (proj + h * pairs * (hd + hdv))


def plan_skip(shape: str, dtype: str, causal: bool, dev: str) -> str | None:
    """Why a configuration is left out of the plan on ``dev`` whatever the adapter, else None.

    On a CPU (two cores on this project's machines, the whole matrix within 10 minutes):

    * float16 is left out: CPU frameworks emulate its matmuls (torch 2.13 here: ~20x slower
      than float32), so a timing would measure the emulation, not attention.
    * each preset runs with the causality of the seed system it stands for: GPT is a
      decoder (causal), the Transformer preset its encoder (no mask). The crossed pairs
      repeat the same GEMM shapes with or without a Q/K/V bias add: duplicates on a device
      where every configuration costs seconds. GPUs run every pairing.
    """
    if dev != "cpu":
        return None
    if dtype == "float16":
        return "float16 on CPU measures an emulation (no native float16 GEMM); benchmarked on GPUs only"
    preset = shape.rpartition("-t")[0]
    if preset in CPU_CAUSALITY and CPU_CAUSALITY[preset] != causal:
        kind = "causal (a decoder)" if CPU_CAUSALITY[preset] else "without a mask (the encoder)"
        return f"on CPU the {preset} preset runs {kind} only; the crossed pairing duplicates the other preset"
    return None


#: Inputs that take longer than this to build are kept on disk (:func:`inputs_of`).
SLOW_INPUTS_SECONDS = 0.5


def inputs_of(spec: dict[str, Any]) -> dict[str, np.ndarray]:
    """``build_inputs(spec)``: the configuration's seeded inputs, the same on every machine.

    Every benchmark process needs them, and a few take seconds to build (ALiBi's bias at 2048
    tokens, 8 x 2048 x 2048 values rounded to bfloat16: 2 s on two cores, in each of a
    configuration's processes). Those (over ``SLOW_INPUTS_SECONDS``) are kept in the suite's cache
    (``inputs/``, safetensors) under a digest of the spec and of the source of the modules that
    build them, so a changed generator is a new file, never a stale input.
    """
    path = _inputs_path(spec)
    if path.is_file():
        try:
            return dict(safetensors.numpy.load_file(path))
        except (OSError, ValueError, safetensors.SafetensorError):
            pass  # unreadable: built again (and replaced) below
    t0 = time.perf_counter()
    built = build_inputs(spec)
    if time.perf_counter() - t0 > SLOW_INPUTS_SECONDS:
        arrays = {k: np.ascontiguousarray(v) for k, v in built.items()}
        _write_atomically(path, lambda tmp: safetensors.numpy.save_file(arrays, tmp))
    return built


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file beside ``path``, then move it there in one step: a reader (another
    benchmark process) sees the old file or the whole new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


@cache
def _source_digest(*modules: Any) -> str:
    """A digest of the modules' source with NumPy's version: what a stored result was computed by."""
    digest = hashlib.sha256(np.__version__.encode())
    for module in modules:
        digest.update(Path(inspect.getsourcefile(module) or "").read_bytes())
    return digest.hexdigest()


def _inputs_path(spec: dict[str, Any]) -> Path:
    digest = hashlib.sha256(_source_digest(reference, sys.modules[build_inputs.__module__]).encode())
    digest.update(json.dumps(spec, sort_keys=True, default=str).encode())
    return caches.root() / "inputs" / f"{spec['id']}-{digest.hexdigest()[:32]}.safetensors"


@dataclass
class GateReference:
    """What the gate compares a configuration's output with: the float64 truth of the checked
    rows, the ensemble's baseline in the dtype and the error scale (the tolerance's floor)."""

    rows: np.ndarray  # the checked query rows of batch row 0
    truth: np.ndarray  # [1, len(rows), d_out], float64
    baseline: float
    error_scale: dict[str, float]
    stored: bool = False  # read from the store rather than computed


def gate_reference(inputs: dict[str, np.ndarray], spec: dict[str, Any], dtype: str) -> GateReference:
    """The reference side of the gate for the first and last ``GATE_ROWS // 2`` queries of batch
    row 0: the causal rule, the window and the key lengths become an explicit mask for those rows
    and the bias keeps their rows, so every key they may see is still checked.

    Computing it is most of a gate's cost (the ensemble's emulations project every key: 9 s at
    2048 tokens on two cores) and it depends on nothing an adapter does, so it is kept on disk
    (``gate/`` in the suite's cache, ``impls/cache.py``) under a digest of exactly what it is
    computed from: the sliced inputs, the sub-spec, the dtype, and the source of the modules that
    compute it with the NumPy version. Every adapter, run and backend then shares one
    computation, and a changed input or reference is a new key, never a stale answer.
    """
    tq = spec["q_len"]
    rows = np.unique(np.r_[np.arange(min(GATE_ROWS // 2, tq)), np.arange(max(tq - GATE_ROWS // 2, 0), tq)])
    sub = {
        **spec,
        **{"batch": 1, "q_len": len(rows), "causal": False, "self_attention": False},
        **{"window": None, "kv_lengths": None},
    }
    allowed = rule_mask(spec, inputs.get("mask"))
    picked = {k: v for k, v in inputs.items() if k not in ("grad_output", "mask")}
    picked["query"] = picked["query"][:1, rows]
    picked["key"], picked["value"] = picked["key"][:1], picked["value"][:1]
    if "attn_bias" in picked:  # sliced before the float64 copy: [1, H, 2048, 2048] is 0.35 s of it
        picked["attn_bias"] = picked["attn_bias"][:1, :, rows]
        sub["attn_bias"] = {**spec["attn_bias"], "shape": list(picked["attn_bias"].shape)}
    tensors = {k: np.asarray(v, np.float64) for k, v in picked.items()}
    if allowed is not None:
        tensors["mask"] = allowed[:1, :, rows] if allowed.shape[2] > 1 else allowed[:1]
    path = _gate_cache_path(tensors, sub, dtype)
    stored = _read_gate_reference(path)
    if stored is not None:
        return GateReference(rows, *stored, stored=True)
    truth = reference.forward(tensors, sub)
    baseline = ensemble_errors(tensors, sub, dtype, {"output": truth.output})[0]["output"]
    error_scale = error_model.case_error_scales(tensors, sub, None, [])["output"]
    found = GateReference(rows, np.asarray(truth.output, np.float64), float(baseline), error_scale)
    _write_gate_reference(path, found)
    return found


def _gate_cache_path(tensors: dict[str, np.ndarray], sub: dict[str, Any], dtype: str) -> Path:
    # The modules that compute the gate's reference side.
    code = _source_digest(reference, error_model, sys.modules[ensemble_errors.__module__])
    digest = hashlib.sha256(code.encode())
    digest.update(json.dumps([GATE_ROWS, dtype, sub], sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}".encode())
        digest.update(array.tobytes())
    return gate_store() / f"{sub['id']}-{dtype}-{digest.hexdigest()[:32]}.json"


def gate_store() -> Path:
    """Where the gate's reference sides are kept: ``gate/`` in the suite's cache (safe to delete)."""
    return caches.root() / "gate"


def _read_gate_reference(path: Path) -> tuple[np.ndarray, float, dict[str, float]] | None:
    """A stored reference side (JSON), or None when absent or unreadable (then recomputed)."""
    try:
        data = json.loads(path.read_text())
        truth = np.asarray(data["truth"], np.float64).reshape(data["shape"])
        scale = {str(k): float(v) for k, v in data["error_scale"].items()}
        return truth, float(data["baseline"]), scale
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_gate_reference(path: Path, ref: GateReference) -> None:
    data = {
        "shape": list(ref.truth.shape),
        "truth": ref.truth.ravel().tolist(),  # repr floats: read back bit for bit
        "baseline": ref.baseline,
        "error_scale": ref.error_scale,
    }
    _write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data)))


def store_gate_references(configurations: list[list[Any]]) -> tuple[int, int]:
    """Compute and store the gate's reference side of each distinct shape, causality and dtype
    among ``configurations`` (``[adapter, shape, dtype, causal]``) that is not stored yet:
    ``(computed, already stored)``. The runner calls it before asv starts, so no benchmark
    process computes a reference: its time and memory would otherwise land in the first
    process of each configuration (``peakmem_forward``'s)."""
    computed = stored = 0
    for shape, dtype, causal in sorted({(s, d, bool(c)) for _, s, d, c in configurations}):
        spec = config_spec(shape, causal)
        found = gate_reference(inputs_of(spec), spec, dtype)
        stored += found.stored
        computed += not found.stored
    return computed, stored


def gate(bench: Bench, inputs: dict[str, np.ndarray], spec: dict[str, Any], dtype: str, label: str) -> float:
    """Check the configuration against the float64 reference before anything is timed.

    The tolerance is the suite's rule (``conformance/tolerance.py``) with the baseline of
    the ensemble of valid algorithms emulated in the benchmark's dtype, on the rows of
    :func:`gate_reference`; the whole output is checked for its shape, dtype and finite values.
    Returns the error ratio; raises :class:`WrongResult`.
    """
    ref = gate_reference(inputs, spec, dtype)
    actual = bench.to_numpy(bench.forward())
    bench.sync()
    problems = output_problems({"output": actual}, spec, dtype)
    if problems:
        raise WrongResult(f"{label}: {'; '.join(problems)}; no timing is posted")
    verdict = judge(
        actual[:1, ref.rows],
        ref.truth,
        tensor="output",
        dtype=dtype,
        baseline=ref.baseline,
        error_scale=ref.error_scale,
        k=DEFAULT_K,
    )
    if not verdict.passed:
        raise WrongResult(
            f"{label}: wrong result, no timing is posted: {verdict.describe()}\n"
            f"Check it with the conformance suite: python -m mha_conformance --adapter {label.split()[0]}"
        )
    return verdict.ratio


def config_key(
    adapter_name: str, shape: str, dtype: str, causal: bool, dev: str, threads: int | None = None
) -> str:
    """A configuration's key in the run cache: its parameters, device and thread count (this
    process's ``bench_threads()`` unless given)."""
    threads = bench_threads() if threads is None else threads
    return f"{adapter_name}|{shape}|{dtype}|causal={causal}|{dev}|threads={threads}"


def read_run_cache() -> dict[str, Any]:
    """What earlier processes of this run found (``MHA_BENCH_RUN_CACHE``), else {}.

    asv runs every benchmark in a fresh process; the cache carries, within one run, what is
    measured once: the device's peak, each configuration's gate verdict (later processes do
    not recompute the reference) and ``time_forward``'s median (the ``track_`` figures
    derive from it instead of importing the framework again). A damaged cache is ignored.
    """
    path = os.environ.get(RUN_CACHE_ENV)
    if not path or not Path(path).is_file():
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_run_cache(section: str, key: str, value: dict[str, Any]) -> None:
    """Merge one entry into the run cache (written atomically; asv runs one process at a time)."""
    path = os.environ.get(RUN_CACHE_ENV)
    if not path:
        return
    data = read_run_cache()
    entries = data.get(section) if isinstance(data.get(section), dict) else {}
    entries[key] = {**entries.get(key, {}), **value}
    data[section] = entries
    _write_atomically(Path(path), lambda tmp: tmp.write_text(json.dumps(data, indent=1, sort_keys=True)))


def record_seconds(key: str, seconds: float) -> None:
    """Add one benchmark process's seconds (its setup to its teardown) to the configuration's
    entry in the run cache: what the configuration costs, by which the runner deals the next
    ``--quick`` run's configurations out evenly (``runner.deal``)."""
    entry = read_run_cache().get("configs", {}).get(key)
    spent = entry.get("seconds") if isinstance(entry, dict) else None
    update_run_cache("configs", key, {"seconds": (spent if isinstance(spent, float) else 0.0) + seconds})


def cached_config(key: str) -> dict[str, Any] | None:
    """This run's record of a configuration (status ok/skip/wrong), raising what it recorded."""
    entry = read_run_cache().get("configs", {}).get(key)
    if not isinstance(entry, dict):
        return None
    if entry.get("status") == "skip":
        raise NotImplementedError(str(entry.get("reason")))
    if entry.get("status") == "wrong":
        raise WrongResult(str(entry.get("reason")))
    return entry if entry.get("status") == "ok" else None


#: How the ``time_`` benchmarks sample: each sample times as many calls as add up to about
#: SAMPLE_SECONDS (at most MAX_NUMBER; :func:`calls_per_sample`), and asv takes REPEAT = (at least,
#: at most, stop after seconds) samples.
SAMPLE_SECONDS = 0.1
MAX_NUMBER = 16
REPEAT = (5, 12, 0.5)


def quick() -> bool:
    """An ``asv run --quick``: each timed body runs once, as asv means by it ("each benchmark
    function is run only once", results not saved), so no calibrating call and one call per
    sample. asv does not tell a benchmark; the runner sets ``MHA_BENCH_QUICK``."""
    return os.environ.get(QUICK_ENV, "") == "1"


def calls_per_sample(call_seconds: float) -> int:
    """asv's ``number`` for a timed body whose one call took ``call_seconds``.

    On a shared two-core machine a single 15 ms call is easily stretched by another process's
    time slice; a sample of several calls (asv times each and adds them up) averages that out,
    which is what keeps IQR / median within a few percent (docs/benchmarks.md). A call of
    SAMPLE_SECONDS or more is its own sample. What is measured does not change: asv reports the
    time of one call, and every sample is still the timed body alone.
    """
    if not call_seconds > 0:
        return 1
    return max(1, min(MAX_NUMBER, round(SAMPLE_SECONDS / call_seconds)))


@dataclass
class Configuration:
    """One benchmarked configuration, built once per process (and gated once per run)."""

    key: str
    label: str
    spec: dict[str, Any]
    dtype: str
    device: str
    framework: str
    bench: Bench
    durations: list[float] = field(default_factory=list)
    estimate: float | None = None  # seconds of one warm forward call (:meth:`call_seconds`)
    warm: bool = False  # the forward has run in this process

    @property
    def flops(self) -> float:
        return forward_flops(self.spec)

    def forward(self) -> None:
        """The timed body: one forward pass, then wait for the device."""
        self.bench.forward()
        self.bench.sync()

    def call_seconds(self) -> float:
        """Seconds of one warm forward call (:func:`calibrate`, once per process)."""
        if self.estimate is None:
            self.estimate = calibrate(self.forward, self.warm)
            self.warm = True
            update_run_cache(
                "configs", self.key, {"forward_call_seconds": self.estimate}
            )  # how number was set
        return self.estimate

    def forward_recorded(self) -> None:
        """``forward`` that also keeps its own duration (two clock reads, ~0.1 us), so the
        run's median reaches the ``track_`` benchmarks through the run cache."""
        t0 = time.perf_counter()
        self.bench.forward()
        self.bench.sync()
        self.durations.append(time.perf_counter() - t0)

    def record_median(self) -> None:
        if self.durations:
            median = statistics.median(self.durations)
            update_run_cache("configs", self.key, {"forward_median": median, "samples": len(self.durations)})


@cache
def configuration(adapter_name: str, shape: str, dtype: str, causal: bool, dev: str) -> Configuration:
    """Build (once per process: asv re-runs ``setup`` between samples) and gate a configuration.

    The first process of a configuration in a run gates it before anything is timed (the
    reference side comes from :func:`gate_reference`'s store, so a gate costs one forward pass)
    and records the verdict in the run cache; the later ones build the same module from the same
    inputs and find the verdict there.

    Raises NotImplementedError (asv's skip) for what cannot run here, WrongResult for a
    kernel that computes the wrong thing; both are recorded in the run cache, so later
    processes of the run skip or fail without building.
    """
    key = config_key(adapter_name, shape, dtype, causal, dev)
    label = f"{adapter_name} {shape} {dtype} causal={causal} on {dev}"
    known = cached_config(key)
    spec = config_spec(shape, causal)
    adapter = registry.builtin(adapter_name)
    reason = plan_skip(shape, dtype, causal, dev) or refusal(adapter, spec, dtype, dev)
    if reason:
        update_run_cache("configs", key, {"status": "skip", "reason": f"{label}: {reason}"})
        raise NotImplementedError(f"{label}: {reason}")
    inputs = inputs_of(spec)  # seeded by the spec id: the same inputs on every machine
    cast = {k: v if v.dtype == np.bool_ else v.astype(NUMPY_DTYPES[dtype]) for k, v in inputs.items()}
    try:
        bench = adapter.bench(cast, spec, dtype, dev)
    except NotImplementedError as exc:  # found only when built (torch's fast path not taken)
        update_run_cache("configs", key, {"status": "skip", "reason": f"{label}: {exc}"})
        raise NotImplementedError(f"{label}: {exc}") from exc
    framework = adapter.framework or adapter_name
    config = Configuration(key, label, spec, dtype, dev, framework, bench)
    if known is None:  # not yet gated in this run
        try:
            ratio = gate(bench, inputs, spec, dtype, label)
        except WrongResult as exc:
            update_run_cache("configs", key, {"status": "wrong", "reason": str(exc)})
            raise
        config.warm = True  # the gate ran the forward
        record = {"status": "ok", "gate_ratio": ratio, "framework": framework, "meta": bench.meta}
        update_run_cache("configs", key, {**record, "backward": bench.make_backward is not None})
    return config


@cache
def backward_of(adapter_name: str, shape: str, dtype: str, causal: bool, dev: str) -> Callable[[], None]:
    """The timed backward body of a configuration (graph recorded once per process)."""
    entry = cached_config(config_key(adapter_name, shape, dtype, causal, dev))
    if entry and entry.get("backward") is False:
        raise NotImplementedError(
            f"{adapter_name} {shape} {dtype}: this path cannot backprop (inference only)"
        )
    config = configuration(adapter_name, shape, dtype, causal, dev)
    if config.bench.make_backward is None:
        raise NotImplementedError(f"{config.label}: this path cannot backprop (inference only)")
    backward, sync = config.bench.make_backward(), config.bench.sync

    def timed() -> None:
        backward()
        sync()

    return timed


def median_seconds(fn: Callable[[], None], min_time: float = 0.3, min_runs: int = 5) -> float:
    """Median wall time of ``fn`` (which synchronises itself) after one warm-up call."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_time and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class Figures:
    """What the ``track_`` benchmarks report for one configuration."""

    flops: float
    seconds: float
    framework: str
    config: Configuration | None  # built only when this run had no figures yet

    @property
    def gflops(self) -> float:
        return self.flops / self.seconds / 1e9


def forward_figures(adapter_name: str, shape: str, dtype: str, causal: bool, dev: str) -> Figures:
    """FLOPs and median forward time: from this run's ``time_forward`` when it ran (no
    framework import), else built, gated and measured here."""
    key = config_key(adapter_name, shape, dtype, causal, dev)
    entry = cached_config(key)
    flops = forward_flops(config_spec(shape, causal))
    if entry and isinstance(entry.get("forward_median"), float) and entry.get("framework"):
        return Figures(flops, entry["forward_median"], entry["framework"], None)
    config = configuration(adapter_name, shape, dtype, causal, dev)
    return Figures(flops, median_seconds(config.forward), config.framework, config)


def measure_peak(config: Configuration) -> float:
    """The device's GEMM rate in GFLOP/s: the best of five n x n products in the same
    framework, dtype and device (n from ``PEAK_N``), after a warm-up; one under ``--quick``
    (:func:`quick`: its figures are not kept)."""
    if config.bench.matmul is None:
        raise NotImplementedError(f"{config.label}: the adapter offers no matmul for the peak")
    n = PEAK_N.get(config.device, 4096)
    product, sync = config.bench.matmul(n), config.bench.sync

    def once() -> None:
        product()
        sync()

    once()
    best = min(timed(once) for _ in range(1 if quick() else 5))
    return 2.0 * n**3 / best / 1e9


def calibrate(fn: Callable[[], None], warm: bool) -> float:
    """Seconds of one warm call of ``fn``, the calls spent on it also warming the process up.

    Call ``fn`` once, timed. That is the answer if ``fn`` had already run in this process
    (``warm``), or if the call took between SAMPLE_SECONDS and 1 s (such a call is its own sample
    either way). A shorter first call, or a longer one (a compile or a trace on first use), is
    followed by a second timed call, the answer: a short call costs little, and a compile must not
    set the sampling.
    """
    first = timed(fn)
    if warm or SAMPLE_SECONDS <= first <= 1.0:
        return first
    return timed(fn)


def timed(fn: Callable[[], None]) -> float:
    """Seconds one call of ``fn`` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peak_key(framework: str, dev: str, dtype: str) -> str:
    """Peaks are per framework, device, dtype and thread count: each has its own GEMM."""
    return f"{framework}|{dev}|{dtype}|threads={bench_threads()}"


def peak_gflops(adapter_name: str, shape: str, dtype: str, causal: bool, dev: str, framework: str) -> float:
    """The device's measured peak, once per run (run cache), else measured in this process."""
    key = peak_key(framework, dev, dtype)
    entry = read_run_cache().get("peak", {}).get(key)
    if isinstance(entry, dict) and isinstance(entry.get("gflops"), float):
        return entry["gflops"]
    gflops = measure_peak(configuration(adapter_name, shape, dtype, causal, dev))
    update_run_cache("peak", key, {"gflops": gflops, "n": PEAK_N.get(dev, 4096), "measured": time.time()})
    return gflops
