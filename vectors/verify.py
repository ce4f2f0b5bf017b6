"""Check the committed golden files against the manifest, the schema and the reference.

Two kinds of content, checked for what each is (docs/vectors.md#what-is-the-same-on-every-machine):

* **Bit-identical on every machine**: the spec, the inputs, weights, mask, bias and
  ``grad_output``. They never touch BLAS or a vectorised libm (a seeded stream, IEEE products
  and square roots, one rounding to a dtype, ALiBi's slopes from ``portable_exp``), so their bytes
  and the manifest's ``inputs_sha256`` are the same everywhere; any difference is damage.
* **The same up to the float64 rule**: the truth (output, weights, gradients) and the baselines.
  The truth is formed through BLAS dot products and NumPy's exp, whose kernels are chosen by the CPU
  (OpenBLAS's core type, NumPy's SIMD dispatch): another machine sums in another order and gets
  other last bits. The recomputed truth is held to :func:`float64_bound`. The emulation that
  measures the baselines is the same bits on every machine, so the baselines move only with the
  truth (:func:`baseline_bound`), and ``set_by`` may name another member only where two members
  tie that closely. Each bound's reason is in its docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mha_conformance.impls import error_model, reference
from mha_conformance.vectors import golden
from mha_conformance.vectors.catalogue import CASES
from mha_conformance.vectors.generate import baselines

#: How many times the float64 floor a recomputed truth may differ from the stored one.
RECOMPUTE_K = 2.0
#: The relative agreement of a recomputed ``rms_magnitude``: a sum of squares, which cannot cancel.
RMS_RTOL = 1e-9


def float64_bound(fresh: np.ndarray, scale: Mapping[str, float]) -> float:
    """How far a stored float64 tensor may be from its recomputation: ``RECOMPUTE_K`` times the
    float64 floor of the tolerance rule, ``eps64 / 2 * max|fresh| + (eps64 + FLOOR_C * u64) *
    sqrt(terms) * rms_magnitude`` (:func:`mha_conformance.impls.error_model.floor`).

    Both tensors are float64 computations of the same exact value in orders that differ (another
    BLAS kernel, another exp); each is within the floor of the exact value, the bound every float64
    implementation is held to, so the two are within twice it. The bound scales with the
    magnitudes the value is formed from, not with the value: ``grad_b_k`` is zero in exact
    arithmetic, and what is stored and recomputed is rounding noise of that size. Measured over
    every committed case and the OpenBLAS kernels Prescott, Nehalem, Sandybridge and Haswell with
    another machine's NumPy exp: at most 0.16 of the bound. A flipped mantissa bit from about the
    tenth of 52 up in the largest value of a tensor exceeds it (tests/test_vectors.py)."""
    emax = float(np.max(np.abs(fresh), initial=0.0))
    return RECOMPUTE_K * error_model.floor("float64", emax, scale)


def baseline_bound(name: str, truth_bound: float, spec: Mapping) -> float:
    """How far a stored baseline (the ensemble's worst error in a dtype) may be from its
    recomputation: ``truth_bound``, the float64 rule of the tensor's truth; for ``grad_b_k``
    ``B * Tk`` times it.

    The emulation gives the same bits on every machine (IEEE arithmetic, dot products correctly
    rounded, exp, log and tanh from IEEE operations alone: impls/reference.py), so a baseline,
    its largest error against the float64 truth, moves only as far as the truth does. ``grad_b_k``'s
    baseline also sums, over the ``B * Tk`` tokens, errors against the truth's key-projection
    gradient (vectors/generate.py's ``key_bias_bound``), each of which moves with the truth."""
    return truth_bound * (spec["batch"] * spec["kv_len"] if name == "grad_b_k" else 1)


@dataclass
class Recomputed:
    """The reference run again from a case's stored inputs: what its file would hold on this machine."""

    tensors: dict[str, np.ndarray]
    baseline: dict
    #: Every ensemble member's error, ``{dtype: {tensor: {algorithm: error}}}``, to tell a near tie.
    members: dict[str, dict[str, dict[str, float]]]


def recompute(case: golden.GoldenCase) -> Recomputed:
    """The truth, gradients and baselines of ``case`` recomputed from its stored inputs."""
    spec = case.spec
    truth = reference.forward(case.tensors, spec)
    grads = reference.backward(case.tensors, spec, case.tensors["grad_output"])
    members: dict[str, dict[str, dict[str, float]]] = {}
    base = baselines(spec, case.tensors, truth, grads, every=members)
    fresh = {"output": truth.output, "attn_weights": truth.attn_weights, **grads}
    return Recomputed(fresh, base, members)


#: The largest error over its bound seen, per kind ("truth", "baseline"): (ratio, "case/tensor").
Margins = dict[str, tuple[float, str]]


def _note(margins: Margins | None, kind: str, err: float, bound: float, where: str) -> None:
    if margins is not None:
        ratio = err / bound if bound > 0 else (0.0 if err == 0 else float("inf"))
        margins[kind] = max(margins.get(kind, (0.0, "")), (ratio, where))


def compare(case: golden.GoldenCase, fresh: Recomputed, margins: Margins | None = None) -> list[str]:
    """Problems between a stored case and its recomputation, each a sentence naming the case and the
    tensor; empty when every stored figure is within its bound. ``margins``, when given, keeps the
    largest error-over-bound ratio of the truths and of the baselines."""
    cid, spec, stored = case.id, case.spec, case.baseline
    problems = []
    scales = fresh.baseline["error_scale"]
    bounds: dict[str, float] = {}
    for name in ["output", "attn_weights", *spec["gradients"]]:
        bounds[name] = float64_bound(fresh.tensors[name], scales[name])
        err = float(np.max(np.abs(case.tensors[name] - fresh.tensors[name]), initial=0.0))
        _note(margins, "truth", err, bounds[name], f"{cid}/{name}")
        if not err <= bounds[name]:
            problems.append(
                f"case {cid}: stored '{name}' differs from the reference recomputed from the stored inputs "
                f"by {err:.3e}, more than the float64 rule allows ({bounds[name]:.3e}, vectors/verify.py); "
                f"the file or impls/reference.py changed; {golden.REGENERATE}"
            )
    for name, scale in scales.items():
        old = stored.get("error_scale", {}).get(name)
        if (
            not isinstance(old, dict)
            or old.get("terms") != scale["terms"]
            or not np.isclose(old.get("rms_magnitude", np.nan), scale["rms_magnitude"], rtol=RMS_RTOL, atol=0)
        ):
            problems.append(
                f"case {cid}: error_scale for '{name}' is {old}, recomputed {scale}; {golden.REGENERATE}"
            )
    if stored.get("algorithms") != fresh.baseline["algorithms"]:
        problems.append(
            f"case {cid}: its baselines were measured with another ensemble than impls/reference.py's "
            f"ENSEMBLE; {golden.REGENERATE}"
        )
    for dtype in spec["dtypes"]:
        for name in ("output", "attn_weights", *spec["gradients"]):
            a, b = stored.get(dtype, {}).get(name), fresh.baseline[dtype][name]
            allowed = baseline_bound(name, bounds[name], spec) if dtype != "float64" else 0.0
            if isinstance(a, float | int) and dtype != "float64":
                _note(margins, "baseline", abs(a - b), allowed, f"{cid}/{dtype}/{name}")
            if not isinstance(a, float | int) or not abs(a - b) <= allowed:
                problems.append(
                    f"case {cid}: {dtype} baseline for '{name}' is {a}, recomputed {b:.6e}, more than "
                    f"{allowed:.3e} apart (vectors/verify.py); {golden.REGENERATE}"
                )
                continue
            was, now = (
                stored.get("set_by", {}).get(dtype, {}).get(name),
                fresh.baseline["set_by"].get(dtype, {}),
            )
            members = fresh.members.get(dtype, {}).get(name, {})
            if (
                dtype != "float64"
                and was != now.get(name)
                and not (was in members and members[now[name]] - members[was] <= 2 * allowed)
            ):
                problems.append(
                    f"case {cid}: the {dtype} baseline for '{name}' was set by {was!r}, a fresh run of the "
                    f"ensemble says {now.get(name)!r}, and the two are no near tie; {golden.REGENERATE}"
                )
    return problems


def verify_case(
    case_id: str, root: Path, manifest: dict, catalogue: dict[str, dict], margins: Margins | None = None
) -> list[str]:
    """Problems found in one case, each a sentence naming the case; empty when sound."""
    try:
        case = golden.load_case(case_id, root, manifest)
    except golden.VectorError as exc:
        return [str(exc)]
    problems = []
    wanted = catalogue.get(case_id)
    if wanted is None:
        problems.append(
            f"case {case_id}: in the manifest but not in vectors/catalogue.py; {golden.REGENERATE}"
        )
    elif {k: v for k, v in case.spec.items() if k != "fully_masked_rows"} != wanted:
        problems.append(f"case {case_id}: stored spec differs from vectors/catalogue.py; {golden.REGENERATE}")
    digest = golden.inputs_digest(case.tensors)
    if manifest["cases"][case_id].get("inputs_sha256") != digest:
        problems.append(
            f"case {case_id}: the manifest's inputs_sha256 is "
            f"{str(manifest['cases'][case_id].get('inputs_sha256'))[:12]}..., the stored inputs hash to "
            f"{digest[:12]}...; {golden.REGENERATE}"
        )
    return problems + compare(case, recompute(case), margins)


def verify(
    root: Path = golden.VECTORS_DIR,
    progress: Callable[[str], None] | None = None,
    only: list[str] | None = None,
    margins: Margins | None = None,
) -> list[str]:
    """Every problem in the vector store (``only``: in those cases); an empty list means it is sound.
    ``margins``, when given, keeps the largest error-over-bound ratios (:func:`compare`)."""
    try:
        manifest = golden.read_manifest(root)
    except golden.VectorError as exc:
        return [str(exc)]
    catalogue = {c["id"]: c for c in CASES}
    wanted = list(manifest["cases"]) if only is None else only
    problems = [
        f"case {cid}: in vectors/catalogue.py but not in the manifest; {golden.REGENERATE}"
        for cid in catalogue
        if cid not in manifest["cases"] and (only is None or cid in only)
    ]
    on_disk = {p.stem for p in root.glob("*.safetensors")}
    problems += [
        f"{root / (cid + '.safetensors')}: not listed in the manifest; delete it or {golden.REGENERATE}"
        for cid in sorted(on_disk - set(manifest["cases"]))
        if only is None or cid in only
    ]
    for n, cid in enumerate(wanted, 1):
        found = verify_case(cid, root, manifest, catalogue, margins)
        problems += found
        if progress:
            progress(f"[{n}/{len(wanted)}] {cid}: {'FAIL' if found else 'ok'}")
    return problems
