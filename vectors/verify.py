"""Check the committed golden files against the manifest, the schema and the reference."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from mha_conformance.impls import reference
from mha_conformance.vectors import golden
from mha_conformance.vectors.catalogue import CASES
from mha_conformance.vectors.generate import baselines

#: Recomputed float64 values may differ from the stored ones only by summation order.
RECOMPUTE_RTOL = 1e-9


def _close(stored: np.ndarray, fresh: np.ndarray) -> bool:
    scale = max(float(np.max(np.abs(fresh), initial=0.0)), 1e-300)
    return bool(np.all(np.abs(stored - fresh) <= RECOMPUTE_RTOL * scale))


def verify_case(case_id: str, root: Path, manifest: dict, catalogue: dict[str, dict]) -> list[str]:
    """Problems found in one case, each a sentence naming the case; empty when sound."""
    try:
        case = golden.load_case(case_id, root, manifest)
    except golden.VectorError as exc:
        return [str(exc)]
    problems = []
    spec = case.spec
    wanted = catalogue.get(case_id)
    if wanted is None:
        problems.append(
            f"case {case_id}: in the manifest but not in vectors/catalogue.py; {golden.REGENERATE}"
        )
    elif {k: v for k, v in spec.items() if k != "fully_masked_rows"} != wanted:
        problems.append(f"case {case_id}: stored spec differs from vectors/catalogue.py; {golden.REGENERATE}")
    truth = reference.forward(case.tensors, spec)
    grads = reference.backward(case.tensors, spec, case.tensors["grad_output"])
    fresh = {"output": truth.output, "attn_weights": truth.attn_weights, **grads}
    for name in ["output", "attn_weights", *spec["gradients"]]:
        if not _close(case.tensors[name], fresh[name]):
            problems.append(
                f"case {case_id}: stored '{name}' disagrees with the reference recomputed from the "
                f"stored inputs; the file or impls/reference.py changed; {golden.REGENERATE}"
            )
    stored_base = case.baseline
    fresh_base = baselines(spec, case.tensors, truth, grads)
    for name, scale in fresh_base["error_scale"].items():
        stored = stored_base.get("error_scale", {}).get(name)
        if (
            not isinstance(stored, dict)
            or stored.get("terms") != scale["terms"]
            or not np.isclose(stored.get("rms_magnitude", np.nan), scale["rms_magnitude"], rtol=1e-6)
        ):
            problems.append(
                f"case {case_id}: error_scale for '{name}' is {stored}, recomputed {scale}; {golden.REGENERATE}"
            )
    for dtype in spec["dtypes"]:
        for name in ("output", "attn_weights", *spec["gradients"]):
            a, b = stored_base.get(dtype, {}).get(name), fresh_base[dtype][name]
            if a is None or not np.isclose(a, b, rtol=1e-3, atol=1e-30):
                problems.append(
                    f"case {case_id}: {dtype} baseline for '{name}' is {a}, recomputed {b:.3e}; "
                    f"{golden.REGENERATE}"
                )
    if stored_base.get("set_by") != fresh_base["set_by"]:
        problems.append(
            f"case {case_id}: the algorithms that set the baselines ('set_by') differ from a fresh run of the "
            f"ensemble in impls/reference.py; {golden.REGENERATE}"
        )
    return problems


def verify(root: Path = golden.VECTORS_DIR, progress: Callable[[str], None] | None = None) -> list[str]:
    """Every problem in the vector store; an empty list means it is sound."""
    try:
        manifest = golden.read_manifest(root)
    except golden.VectorError as exc:
        return [str(exc)]
    catalogue = {c["id"]: c for c in CASES}
    problems = [
        f"case {cid}: in vectors/catalogue.py but not in the manifest; {golden.REGENERATE}"
        for cid in catalogue
        if cid not in manifest["cases"]
    ]
    on_disk = {p.stem for p in root.glob("*.safetensors")}
    problems += [
        f"{root / (cid + '.safetensors')}: not listed in the manifest; delete it or {golden.REGENERATE}"
        for cid in sorted(on_disk - set(manifest["cases"]))
    ]
    for n, cid in enumerate(manifest["cases"], 1):
        found = verify_case(cid, root, manifest, catalogue)
        problems += found
        if progress:
            progress(f"[{n}/{len(manifest['cases'])}] {cid}: {'FAIL' if found else 'ok'}")
    return problems
