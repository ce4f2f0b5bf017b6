"""Writing and checking ``vectors/KERNELS.json``, the manifest of the kernel-scale cases.

``generate_kernel_manifest`` is run by whoever changes ``vectors/kernels.py`` (``python -m
mha_conformance.vectors generate --kernel``): for each case it builds the inputs, computes the
truth, and stores the spec, the inputs' digest, the truth's fingerprint, the error scales and the
per-dtype baselines (the ensemble of valid orders emulated in each dtype, as for the committed
cases; ``vectors/generate.py``). ``verify_kernel_cases`` is what a user's machine can afford:
every case built where it runs, its inputs against the digest, its truth against the fingerprint
by the float64 rule (``materialize.load_kernel_case`` does both).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mha_conformance.impls import error_model, reference
from mha_conformance.vectors import golden, materialize
from mha_conformance.vectors.generate import EMULATION, build_inputs, ensemble_errors
from mha_conformance.vectors.kernels import KERNEL_CASES


def kernel_entry(spec: dict[str, Any], progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One case's manifest entry: spec, inputs' digest, truth fingerprint, error scales, baselines."""
    tensors = build_inputs(spec)
    spec = {**spec, "fully_masked_rows": materialize.fully_masked_rows(tensors, spec)}
    truth = materialize.truth(tensors, spec, progress)
    inputs = {k: v for k, v in tensors.items() if k in golden.INPUT_NAMES}
    g = tensors["grad_output"]
    names = ["output", *(["attn_weights"] if "attn_weights" in truth else []), *spec["gradients"]]
    scales = error_model.case_error_scales(inputs, spec, g, spec["gradients"])
    baseline: dict[str, Any] = {
        "emulation": EMULATION,
        "algorithms": reference.ENSEMBLE_DESCRIPTION,
        "error_scale": {n: scales[n] for n in names},
        "set_by": {},
    }
    want = {n: truth[n] for n in names}  # input gradients only: no grad_b_k, so no key-bias bound
    for dtype in spec["dtypes"]:
        if progress:
            progress(f"baselines in {dtype}")
        if dtype == "float64":
            baseline[dtype] = dict.fromkeys(names, 0.0)
            continue
        baseline[dtype], baseline["set_by"][dtype] = ensemble_errors(inputs, spec, dtype, want, g)
    return {
        "spec": spec,
        "inputs_sha256": golden.inputs_digest(tensors),
        "fingerprint": materialize.fingerprint(spec["id"], truth),
        "baseline": baseline,
    }


def generate_kernel_manifest(
    path: Path = materialize.KERNEL_MANIFEST,
    only: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write the kernel manifest (``only``: recompute those cases, keep the others' entries)."""
    old = materialize.read_kernel_manifest(path)["cases"] if only and path.exists() else {}
    cases: dict[str, Any] = {}
    for n, spec in enumerate(KERNEL_CASES, 1):
        cid = spec["id"]
        if only and cid not in only:  # kept as it was, if it was there
            if cid in old:
                cases[cid] = old[cid]
            continue
        say = (
            (lambda line, n=n, cid=cid: progress(f"[{n}/{len(KERNEL_CASES)}] {cid}: {line}"))
            if progress
            else None
        )
        cases[cid] = kernel_entry(dict(spec), say)
        manifest = {"format_version": golden.FORMAT_VERSION, "cases": cases}
        path.write_text(
            json.dumps(manifest, indent=1, sort_keys=True) + "\n"
        )  # after each case: hours of work kept
    manifest = {"format_version": golden.FORMAT_VERSION, "cases": cases}
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def verify_kernel_cases(
    path: Path = materialize.KERNEL_MANIFEST,
    only: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[str]:
    """Every problem in the kernel manifest as this machine sees it: each case's inputs built here
    against its digest, its truth (cached or computed) against its fingerprint, and the manifest
    against the catalogue."""
    try:
        manifest = materialize.read_kernel_manifest(path)
    except golden.VectorError as exc:
        return [str(exc)]
    problems = []
    catalogue = {c["id"]: c for c in KERNEL_CASES}
    for cid in sorted(set(catalogue) - set(manifest["cases"])):
        problems.append(f"case {cid}: in vectors/kernels.py but not in {path.name}; regenerate it")
    wanted = [c for c in manifest["cases"] if only is None or c in only]
    for n, cid in enumerate(wanted, 1):
        stored = {k: v for k, v in manifest["cases"][cid]["spec"].items() if k != "fully_masked_rows"}
        if catalogue.get(cid) != stored:
            problems.append(
                f"case {cid}: its spec in {path.name} differs from vectors/kernels.py; regenerate it"
            )
            continue
        try:
            materialize.load_kernel_case(cid, manifest)
            found = []
        except golden.VectorError as exc:
            found = [str(exc)]
        problems += found
        if progress:
            progress(f"[{n}/{len(wanted)}] {cid}: {'FAIL' if found else 'ok'}")
    return problems
