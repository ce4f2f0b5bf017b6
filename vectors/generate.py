"""Build each catalogue case's inputs, run the reference, measure the precision baselines.

Generation is deterministic: a case's random numbers come from ``np.random.default_rng``
seeded by the sha256 of its id, so the same catalogue always gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mha_conformance.impls import error_model, reference
from mha_conformance.vectors import golden
from mha_conformance.vectors.catalogue import CASES
from mha_conformance.vectors.stream import FixedStream, seed_of

#: What the baselines emulate, stored with each case so a reader knows what was measured.
EMULATION = (
    "Inputs and weights are exactly representable in every listed dtype (no rounding on "
    "cast). Each step (Q/K/V projections with bias, scaled scores, softmax weights, "
    "context, output projection with bias) is computed in the accumulation dtype "
    "(float32 for float16/bfloat16, else the dtype itself) and its result rounded to the "
    "dtype, in each of the valid orders of operations listed under 'algorithms'; the backward "
    "runs on each emulated forward's rounded intermediates in the same way. Baseline = the "
    "largest max |emulated - float64| over those algorithms, per dtype and tensor ('set_by' "
    "names the algorithm); float64 has none (it is the truth's own precision: the analytic "
    "floor carries it). For grad_b_k, which is zero in exact arithmetic (the softmax ignores a "
    "per-row shift), at least the sum over tokens of the emulated key-projection gradient's "
    "errors, which bounds its noise in any summation order."
)


#: What a case's random numbers are drawn from.
Stream = np.random.Generator | FixedStream


def case_seed(case_id: str) -> int:
    """A stable 64-bit seed from the case id (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:8], "little")


def representable(x: np.ndarray, dtypes: list[str], grid: str | None = None) -> np.ndarray:
    """Round ``x`` to values every listed dtype holds exactly: float64 alone keeps full float64
    precision; otherwise float32, rounded further to bfloat16 and float16 when those are listed.

    bfloat16 keeps 8 significant bits and float16 11, so a bfloat16 value inside float16's
    normal range is a float16 value too. Below that range (|x| < 2**-14) float16 has
    coarser subnormals, so such values are flushed to zero when float16 is listed.
    ``grid="far_from_bfloat16"`` sets the three float16 fraction bits bfloat16 drops to 011 in
    every normal float16 value: each is then 3/8 of a bfloat16 ulp above the bfloat16 value below
    it, so rounding it to bfloat16 shrinks every magnitude by the same relative amount.
    """
    if dtypes == ["float64"]:
        return np.asarray(x, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64).astype(np.float32)
    if "bfloat16" in dtypes:
        x = reference.round_to_bfloat16(x)
    if "float16" in dtypes:
        x = np.where(np.abs(x) < 2.0**-14, np.float32(0), x).astype(np.float16).astype(np.float32)
    if grid == "far_from_bfloat16":
        bits = x.astype(np.float16).view(np.uint16)
        normal = (bits & 0x7C00) != 0
        moved = np.where(normal, (bits & ~np.uint16(7)) | np.uint16(3), bits).astype(np.uint16)
        x = moved.view(np.float16).astype(np.float32)
    return x


def build_mask(spec: dict[str, Any], rng: Stream) -> np.ndarray | None:
    """The boolean mask (True = may attend) that the spec's ``mask`` entry describes.

    Kinds: ``key_padding`` (per batch row a valid key length, at least 1, the first row
    full length), ``random`` (each entry kept with probability ``keep``; with
    ``keep_diagonal`` query i always keeps key i + Tk - Tq, the causal diagonal), ``diagonal``
    (query i sees key i), ``masked_rows`` (the listed query rows see nothing), and
    ``masked_batch`` (one batch row sees nothing).
    """
    m = spec["mask"]
    if m is None:
        return None
    shape = tuple(m["shape"])
    tq, tk = spec["q_len"], spec["kv_len"]
    kind = m["kind"]
    if kind == "key_padding":
        lengths = rng.integers(1, tk + 1, size=shape[0])
        lengths[0] = tk
        mask = np.arange(tk)[None, :] < lengths[:, None]
        return mask.reshape(shape)
    if kind == "random":
        mask = rng.random(shape) < m["keep"]
        if m.get("keep_diagonal"):
            mask |= np.eye(tq, tk, k=tk - tq, dtype=bool)
        return mask
    if kind == "diagonal":
        return np.broadcast_to(np.eye(tq, tk, dtype=bool), shape).copy()
    if kind == "masked_rows":
        mask = np.ones(shape, dtype=bool)
        mask[..., m["rows"], :] = False
        return mask
    if kind == "masked_batch":
        mask = np.ones(shape, dtype=bool)
        mask[m["batch_row"]] = False
        return mask
    raise ValueError(f"case {spec['id']}: unknown mask kind {kind!r} in vectors/catalogue.py")


def t5_bucket(distance: np.ndarray, buckets: int = 8, max_distance: int = 16) -> np.ndarray:
    """T5's bidirectional relative-position bucket of ``distance = key - query position``: half the
    buckets per sign, exact below ``buckets // 4``, logarithmic up to ``max_distance``."""
    half = buckets // 2
    bucket = np.where(distance > 0, half, 0)
    n = np.abs(distance)
    exact = half // 2
    large = exact + (np.log(np.maximum(n, 1) / exact) / np.log(max_distance / exact) * (half - exact)).astype(
        int
    )
    return bucket + np.where(n < exact, n, np.minimum(large, half - 1))


def build_bias(spec: dict[str, Any], rng: Stream) -> np.ndarray | None:
    """The additive bias [B|1, H|1, Tq, Tk] the spec's ``attn_bias`` entry describes (``-inf`` = masked).

    Kinds: ``alibi`` (head h's slope ``2^(-8(h+1)/H)`` times ``-|p - j|``, p the query's
    bottom-right position), ``t5`` (a learned value per head and :func:`t5_bucket` of ``j - p``),
    ``band`` (normal values where ``|j - p| <= width``, ``-inf`` elsewhere: a banded float mask),
    and ``random`` (normal values; ``neginf`` sets that fraction of entries to ``-inf``, except the
    causal diagonal with ``keep_diagonal``; ``rows`` sets whole query rows to ``-inf``).
    """
    entry = spec.get("attn_bias")
    if entry is None:
        return None
    shape = tuple(entry["shape"])
    tq, tk, heads = spec["q_len"], spec["kv_len"], shape[1]
    distance = np.arange(tk)[None, :] - (np.arange(tq)[:, None] + tk - tq)  # j - p, [Tq, Tk]
    kind = entry["kind"]
    if kind == "alibi":
        # 2**e as an exact power of two times portable_exp of the rest: no platform pow.
        exponent = -8.0 * np.arange(1, heads + 1) / heads
        whole = np.floor(exponent)
        slopes = np.ldexp(
            reference.portable_exp((exponent - whole) * 0.6931471805599453), whole.astype(np.int64)
        )
        bias = -slopes[:, None, None] * np.abs(distance)[None]
    elif kind == "t5":
        table = rng.standard_normal((heads, 8))
        bias = table[:, t5_bucket(distance)]
    elif kind == "band":
        bias = np.where(np.abs(distance) <= entry["width"], rng.standard_normal(shape), -np.inf)
    elif kind == "random":
        bias = rng.standard_normal(shape)
        off = rng.random(shape) < entry.get("neginf", 0.0)
        if entry.get("keep_diagonal"):
            off &= ~np.eye(tq, tk, k=tk - tq, dtype=bool)
        bias = np.where(off, -np.inf, bias)
        bias[..., entry.get("rows", []), :] = -np.inf
    else:
        raise ValueError(f"case {spec['id']}: unknown attn_bias kind {kind!r} in vectors/catalogue.py")
    bias = np.broadcast_to(bias, shape)
    return np.where(np.isinf(bias), bias, representable(bias, spec["dtypes"])).astype(bias.dtype)


def case_stream(spec: dict[str, Any]) -> Stream:
    """Where a case's random numbers come from: the fixed-bit stream for a spec that names it
    (``stream: splitmix64``, the kernel-scale cases, generated on the user's machine), else
    ``np.random.default_rng`` (the committed cases, generated once)."""
    if spec.get("stream") == "splitmix64":
        return FixedStream(seed_of(spec["id"]))
    return np.random.default_rng(case_seed(spec["id"]))


def build_inputs(spec: dict[str, Any]) -> dict[str, np.ndarray]:
    """Inputs, weights, biases, mask and ``grad_output`` for one case."""
    rng = case_stream(spec)
    dt = spec["dtypes"]
    b, tq, tk = spec["batch"], spec["q_len"], spec["kv_len"]
    h, hkv, hd, hdv = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"], spec["v_head_dim"]
    xs, ws = spec["input_scale"], spec["weight_scale"]

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return representable(rng.standard_normal(shape) * std, dt, spec.get("input_grid"))

    t: dict[str, np.ndarray] = {}
    t["query"] = normal((b, tq, spec["d_in"]), xs)
    if spec["self_attention"]:
        t["key"] = t["value"] = t["query"]
    else:
        t["key"] = normal((b, tk, spec["kdim"]), xs)
        t["value"] = normal((b, tk, spec["vdim"]), xs)
    # Weights scaled by 1/sqrt(fan_in) keep activations O(input_scale), as in trained models.
    widths = {"q": (spec["d_in"], h * hd), "k": (spec["kdim"], hkv * hd), "v": (spec["vdim"], hkv * hdv)}
    if spec["out_proj"]:
        widths["o"] = (h * hdv, spec["d_out"])
    for short, (fan_in, fan_out) in widths.items():
        t[f"w_{short}"] = normal((fan_in, fan_out), ws / np.sqrt(fan_in))
        if spec["out_bias"] if short == "o" else spec["qkv_bias"]:
            t[f"b_{short}"] = normal((fan_out,), 0.1 * xs * ws)
    mask = build_mask(spec, rng)
    if mask is not None:
        t["mask"] = mask
    bias = build_bias(spec, rng)
    if bias is not None:
        t["attn_bias"] = bias.astype(t["query"].dtype)
    t["grad_output"] = normal((b, tq, spec["d_out"]), 1.0)
    return t


def key_bias_bound(emulated: np.ndarray, truth: np.ndarray) -> float:
    """The baseline of ``grad_b_k``: the sum over batch and tokens of the per-token errors of
    the key projection's gradient, the largest column.

    A key bias shifts every score of a query row by the same ``q . b_k``, which the softmax
    ignores, so ``grad_b_k`` is zero in exact arithmetic and what any implementation returns
    is the rounding noise of its own summation order: one order's noise (the emulation's)
    does not bound another's. Summing the per-token errors' magnitudes does, for any order.
    """
    return float(np.max(np.abs(emulated - truth).sum(axis=(0, 1)), initial=0.0))


def ensemble_errors(
    inputs: dict[str, np.ndarray],
    spec: dict[str, Any],
    dtype: str,
    want: dict[str, np.ndarray],
    grad_output: np.ndarray | None = None,
    truth_d_y: dict[str, np.ndarray] | None = None,
    every: dict[str, dict[str, float]] | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """The worst error over the ensemble of valid algorithms emulated in ``dtype``, for every
    tensor in ``want`` (the float64 truth: ``output``, ``attn_weights`` and, with ``grad_output``,
    gradients), and the algorithm that set each. ``truth_d_y`` (the truth's projection
    gradients) bounds ``grad_b_k``'s noise (:func:`key_bias_bound`). ``every``, when given,
    receives each member's error per tensor (``{tensor: {algorithm: error}}``)."""
    precision = reference.PRECISIONS[dtype]
    worst: dict[str, float] = {}
    by: dict[str, str] = {}
    for algorithm in reference.ENSEMBLE:
        if not algorithm.used_in(dtype):
            continue
        emulated = reference.forward(inputs, spec, precision, algorithm)
        got = {"output": emulated.output, "attn_weights": emulated.attn_weights}
        d_y: dict[str, np.ndarray] = {}
        if grad_output is not None:
            inputs_only = not any(name.startswith(("grad_w_", "grad_b_")) for name in want)
            got.update(
                reference.backward(
                    inputs, spec, grad_output, precision, d_y, algorithm, emulated, inputs_only
                )
            )
        for name, truth in want.items():
            err = float(np.max(np.abs(got[name] - truth), initial=0.0))
            if name == "grad_b_k" and truth_d_y is not None:
                err = max(err, key_bias_bound(d_y["k"], truth_d_y["k"]))
            if not np.isfinite(err):
                raise ValueError(
                    f"case {spec['id']}: the {dtype} emulation ({algorithm.name}) of {name} is not "
                    f"finite; drop {dtype} from the case's dtypes in vectors/catalogue.py"
                )
            if every is not None:
                every.setdefault(name, {})[algorithm.name] = err
            if err > worst.get(name, -1.0):
                worst[name], by[name] = err, algorithm.name
    return worst, by


def baselines(
    spec: dict[str, Any],
    tensors: dict[str, np.ndarray],
    truth: reference.Forward,
    grads: dict[str, np.ndarray] | None = None,
    every: dict[str, dict[str, dict[str, float]]] | None = None,
) -> dict:
    """Per dtype, the worst error over the ensemble of valid algorithms emulated in that dtype
    for ``output``, ``attn_weights`` and each gradient the case holds (``spec["gradients"]``),
    which algorithm set each, and the error magnitudes. ``every``, when given, receives every
    member's error (``{dtype: {tensor: {algorithm: error}}}``)."""
    inputs = {k: v for k, v in tensors.items() if k in golden.INPUT_NAMES}
    truth_d_y: dict[str, np.ndarray] = {}
    fresh = reference.backward(inputs, spec, tensors["grad_output"], projection_grads=truth_d_y)
    grads = fresh if grads is None else grads
    want = {
        "output": truth.output,
        "attn_weights": truth.attn_weights,
        **{n: grads[n] for n in spec["gradients"]},
    }
    out: dict[str, Any] = {
        "emulation": EMULATION,
        "algorithms": reference.ENSEMBLE_DESCRIPTION,
        "error_scale": error_model.case_error_scales(inputs, spec, tensors["grad_output"], spec["gradients"]),
        "set_by": {},
    }
    for dtype in spec["dtypes"]:
        if dtype == "float64":
            out[dtype] = dict.fromkeys(want, 0.0)
            continue
        members = every.setdefault(dtype, {}) if every is not None else None
        out[dtype], out["set_by"][dtype] = ensemble_errors(
            inputs, spec, dtype, want, tensors["grad_output"], truth_d_y, members
        )
    return out


def case_tensors(spec: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
    """Everything a case file holds: tensors, and the baseline record."""
    tensors = build_inputs(spec)
    truth = reference.forward(tensors, spec)
    grads = reference.backward(tensors, spec, tensors["grad_output"])
    spec["fully_masked_rows"] = bool((~truth.allowed.any(axis=-1)).any())
    tensors["output"] = truth.output
    tensors["attn_weights"] = truth.attn_weights
    tensors.update({name: grads[name] for name in spec["gradients"]})
    return tensors, baselines(spec, tensors, truth, grads)


def generate(
    root: Path = golden.VECTORS_DIR,
    only: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Write every case file and ``MANIFEST.json``; return the manifest."""
    manifest = {"format_version": golden.FORMAT_VERSION, "cases": {}}
    old = golden.read_manifest(root) if only else None
    for n, case_spec in enumerate(CASES, 1):
        spec = dict(case_spec)
        cid = spec["id"]
        if only and cid not in only:
            manifest["cases"][cid] = old["cases"][cid]
            continue
        tensors, baseline = case_tensors(spec)
        path = golden.write_case(root, spec, tensors, baseline)
        manifest["cases"][cid] = golden.manifest_entry(path)
        if progress:
            progress(f"[{n}/{len(CASES)}] {cid} ({path.stat().st_size / 1e6:.2f} MB)")
    (root / golden.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest
