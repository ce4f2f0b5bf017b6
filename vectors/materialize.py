"""Kernel-scale cases made where they run: their inputs from the fixed stream, their truth computed
on first use and cached.

``vectors/KERNELS.json`` holds what is small about each case of ``vectors/kernels.py``: the spec,
the digest of its inputs, a fingerprint of its float64 truth, and its per-dtype baselines and
error scales. :func:`load_kernel_case` builds the inputs (``vectors/stream.py``: the same bits on
every machine) and refuses them unless they hash to the manifest's digest; it then reads the
truth from ``$MHA_CACHE_DIR/kernel-truth/`` or computes it (:func:`truth`, head by head so that
memory stays within a few of one head's score matrices), writes it atomically and checks it
against the fingerprint by the float64 rule (``vectors/verify.py``). A cached file that is
truncated, damaged, for other inputs or from another version of the reference is recomputed,
never trusted. The case then is a :class:`golden.GoldenCase` like any stored one, judged as
strictly.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load

from mha_conformance.impls import cache, reference
from mha_conformance.vectors import golden
from mha_conformance.vectors.generate import build_inputs
from mha_conformance.vectors.stream import FixedStream, seed_of
from mha_conformance.vectors.verify import float64_bound

KERNEL_MANIFEST = golden.VECTORS_DIR / "KERNELS.json"
#: Values of each truth tensor the fingerprint keeps (at fixed, seeded positions, plus the first
#: and the last).
FINGERPRINT_VALUES = 64
#: What a truth file depends on besides its inputs: the code that computes it.
_TRUTH_SOURCES = (reference.__file__, __file__)


def truth_version() -> str:
    """A digest of the reference and of this module: a cached truth from other code is stale."""
    digest = hashlib.sha256()
    for path in _TRUTH_SOURCES:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def truth_dir() -> Path:
    return cache.root() / "kernel-truth"


def read_kernel_manifest(path: Path = KERNEL_MANIFEST) -> dict[str, Any]:
    """The kernel-scale manifest, or a VectorError saying what to do."""
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise golden.VectorError(
            f"{path}: the kernel-scale manifest is missing; restore it with `git checkout vectors/` or run "
            "`python -m mha_conformance.vectors generate --kernel`"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise golden.VectorError(
            f"{path}: not valid JSON ({exc}); restore it with `git checkout vectors/`"
        ) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("cases"), dict):
        raise golden.VectorError(f"{path}: no 'cases' object; restore it with `git checkout vectors/`")
    return manifest


# ------------------------------------------------------------------------------------ truth


def _head_case(tensors: Mapping[str, np.ndarray], spec: Mapping[str, Any], h: int) -> tuple[dict, dict]:
    """Head ``h`` alone, as a one-head case: its columns of the projections, its rows of the output
    projection (no output bias: it is added once), its slice of a per-head mask or bias."""
    hd, hdv = spec["head_dim"], spec["v_head_dim"]
    g = h // (spec["num_heads"] // spec["num_kv_heads"])
    cols = {
        "q": slice(h * hd, (h + 1) * hd),
        "k": slice(g * hd, (g + 1) * hd),
        "v": slice(g * hdv, (g + 1) * hdv),
    }
    t = {n: tensors[n] for n in ("query", "key", "value")}
    for short, part in cols.items():
        t[f"w_{short}"] = tensors[f"w_{short}"][:, part]
        if f"b_{short}" in tensors:
            t[f"b_{short}"] = tensors[f"b_{short}"][part]
    if spec["out_proj"]:
        t["w_o"] = tensors["w_o"][h * hdv : (h + 1) * hdv]
    for name in ("mask", "attn_bias"):
        if name in tensors:
            per_head = tensors[name].shape[1] > 1
            t[name] = tensors[name][:, h : h + 1] if per_head else tensors[name]
    one = {**spec, "num_heads": 1, "num_kv_heads": 1, "out_bias": False}
    if not spec["out_proj"]:
        one["d_out"] = hdv
    return t, one


def truth(
    tensors: Mapping[str, np.ndarray], spec: Mapping[str, Any], progress: Callable[[str], None] | None = None
) -> dict[str, np.ndarray]:
    """The float64 truth of a case (output, attention weights where the spec stores them, the
    gradients it lists), computed one head at a time with ``impls/reference.py``: the heads'
    contributions to the output projection and to the input gradients add up, the output bias is
    added once; without an output projection the heads' contexts are concatenated. The same
    attention as one pass over all heads, up to float64 summation order."""
    h, hdv = spec["num_heads"], spec["v_head_dim"]
    g = tensors["grad_output"]
    out: dict[str, np.ndarray] = {}
    contexts, weights = [], []
    grads: dict[str, np.ndarray] = {}
    for head in range(h):
        if progress:
            progress(f"head {head + 1}/{h}")
        t, one = _head_case(tensors, spec, head)
        g_head = g if spec["out_proj"] else g[..., head * hdv : (head + 1) * hdv]
        fw = reference.forward(t, one)
        contexts.append(fw.output)
        if spec.get("store_weights", True):
            weights.append(fw.attn_weights)
        back = reference.backward(t, one, g_head, fw=fw, only_inputs=True)
        for name in spec["gradients"]:
            if head == 0:
                grads[name] = back[name]
            elif name == "grad_attn_bias" and tensors["attn_bias"].shape[1] > 1:  # a bias per head
                grads[name] = np.concatenate([grads[name], back[name]], axis=1)
            else:  # summed over heads: the input gradients, a bias shared by every head
                grads[name] = grads[name] + back[name]
        del fw, back
    if spec["out_proj"]:
        output = contexts[0]
        for part in contexts[1:]:
            output = output + part
        out["output"] = output + (np.asarray(tensors["b_o"], np.float64) if "b_o" in tensors else 0.0)
    else:
        out["output"] = np.concatenate(contexts, axis=-1)
    if weights:
        out["attn_weights"] = np.concatenate(weights, axis=1)
    out.update(grads)
    return out


def fully_masked_rows(tensors: Mapping[str, np.ndarray], spec: Mapping[str, Any]) -> bool:
    """Whether some query row of the case has no allowed key (without building [B, H, Tq, Tk] at once)."""
    for head in range(spec["num_heads"]):
        t, one = _head_case(tensors, spec, head)
        if not reference.allowed_keys(one, t.get("mask"), t.get("attn_bias")).any(axis=-1).all():
            return True
    return False


# ------------------------------------------------------------------------------ fingerprint


def fingerprint_positions(case_id: str, name: str, size: int) -> np.ndarray:
    """The flat positions a fingerprint keeps of a tensor of ``size`` values: the first, the last
    and :data:`FINGERPRINT_VALUES` drawn from the fixed stream, the same everywhere."""
    drawn = FixedStream(seed_of(f"{case_id}/fingerprint/{name}")).integers(0, size, FINGERPRINT_VALUES)
    return np.unique(np.concatenate([[0, size - 1], drawn]))


def fingerprint(case_id: str, tensors: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Per truth tensor: its largest magnitude and its values at :func:`fingerprint_positions`."""
    found = {}
    for name, array in tensors.items():
        flat = np.asarray(array, np.float64).reshape(-1)
        where = fingerprint_positions(case_id, name, flat.size)
        found[name] = {
            "max_abs": float(np.max(np.abs(flat), initial=0.0)),
            "positions": where.tolist(),
            "values": flat[where].tolist(),
        }
    return found


def fingerprint_problems(
    case_id: str, fresh: Mapping[str, np.ndarray], entry: Mapping[str, Any]
) -> list[str]:
    """Where a truth disagrees with the manifest's fingerprint by more than the float64 rule."""
    problems = []
    scales = entry["baseline"]["error_scale"]
    for name, stored in entry["fingerprint"].items():
        if name not in fresh:
            problems.append(f"case {case_id}: the truth has no '{name}'")
            continue
        flat = np.asarray(fresh[name], np.float64).reshape(-1)
        bound = float64_bound(flat, scales[name])
        got = flat[np.asarray(stored["positions"], dtype=np.int64)]
        err = float(np.max(np.abs(got - np.asarray(stored["values"])), initial=0.0))
        if not err <= bound:
            problems.append(
                f"case {case_id}: '{name}' differs from the manifest's fingerprint by {err:.3e}, more than the "
                f"float64 rule allows ({bound:.3e})"
            )
    return problems


# ------------------------------------------------------------------------------------ store


def _cached_path(case_id: str, inputs_digest: str) -> Path:
    return truth_dir() / f"{case_id}-{truth_version()}-{inputs_digest[:12]}.safetensors"


def _read_cached(path: Path, spec: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The cached truth, or None when it is missing, unreadable, incomplete or not finite."""
    try:
        data = path.read_bytes()
        header = golden._parse_header(path, data)
        arrays = st_load(data)
    except Exception:  # missing, truncated or damaged (safetensors raises its own error types)
        return None
    if header.get("__metadata__", {}).get("version") != truth_version():
        return None
    layout = golden.expected_layout(spec)
    wanted = {
        n for n in layout if n in ("output", "attn_weights") or (n.startswith("grad_") and n != "grad_output")
    }
    if set(arrays) != wanted:
        return None
    for name, array in arrays.items():
        if array.shape != layout[name][0] or array.dtype != np.float64 or not np.isfinite(array).all():
            return None
    return arrays


def _write_cached(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically: a temporary file beside it, then one rename, so two processes (xdist
    workers) computing the same truth at once never leave half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(golden.serialize(arrays, {"version": truth_version()}))
    os.replace(tmp, path)


def kernel_spec(case_id: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
    entry = manifest["cases"].get(case_id)
    if entry is None:
        raise golden.VectorError(
            f"case {case_id}: not in {KERNEL_MANIFEST}; check the id (python -m mha_conformance --kernel-scale "
            "--collect-only -q lists them)"
        )
    return dict(entry["spec"])


def load_kernel_case(
    case_id: str, manifest: Mapping[str, Any] | None = None, progress: Callable[[str], None] | None = None
) -> golden.GoldenCase:
    """A kernel-scale case, ready to judge: inputs built and checked against the manifest's digest,
    the truth read from the cache or computed (``progress`` hears each head) and checked against
    the manifest's fingerprint."""
    manifest = manifest or read_kernel_manifest()
    entry = manifest["cases"].get(case_id)
    spec = kernel_spec(case_id, manifest)
    tensors = build_inputs(spec)
    digest = golden.inputs_digest(tensors)
    if digest != entry["inputs_sha256"]:
        raise golden.VectorError(
            f"case {case_id}: its inputs, generated here, hash to {digest[:12]}..., the manifest says "
            f"{entry['inputs_sha256'][:12]}...; the stream or the generator changed (vectors/stream.py, "
            "vectors/generate.py): regenerate the kernel manifest (python -m mha_conformance.vectors generate --kernel)"
        )
    path = _cached_path(case_id, digest)
    found = _read_cached(path, spec)
    if found is None or fingerprint_problems(case_id, found, entry):
        found = truth(tensors, spec, progress)
        problems = fingerprint_problems(case_id, found, entry)
        if problems:
            raise golden.VectorError(
                "; ".join(problems)
                + ": the reference on this machine disagrees with the kernel manifest; impls/reference.py "
                "changed (regenerate: python -m mha_conformance.vectors generate --kernel) or this is a bug to report"
            )
        _write_cached(path, found)
    tensors.update(found)
    return golden.GoldenCase(spec, tensors, entry["baseline"], path, synthetic=True, sha256=digest)
