"""The tolerance rule's verdict power: the smallest relative error of a result that fails.

``python -m mha_conformance.audit.sensitivity [--vectors DIR] [--kernel-scale] [--before-rev REV] [--markdown PATH]``

For every ordinary case (inputs and weights at unit scale, no empty rows), every dtype and
every judged tensor, the float64 truth is scaled by ``1 + delta``, rounded to the dtype, and
judged; a bisection finds the smallest ``delta`` that fails at the default k. The table gives
its median and largest value per dtype and tensor kind, so a reader sees how large a mistake
each dtype can hide. With ``--before-rev``, the same figures for the vectors committed at
``REV`` under the rule of that time (the single straightforward baseline, no dtype floor), for
comparison. The README's figures come from this command. With ``--kernel-scale``, the same over
the kernel tier's cases (``vectors/kernels.py``; their truths computed on first use and cached),
and ``--valid-orders`` runs the orders kernels use at that scale (``KERNEL_VALID_ORDERS``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np

from mha_conformance.impls.error_model import EPS
from mha_conformance.results.report import source_root
from mha_conformance.results.tables import write_markdown
from mha_conformance.tolerance import DEFAULT_K, judge
from mha_conformance.vectors import golden, materialize

NUMPY = {"float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
KINDS = {
    "output": ("output",),
    "attn_weights": ("attn_weights",),
    "input gradients": ("grad_query", "grad_key", "grad_value"),
    "weight gradients": ("grad_w_q", "grad_w_k", "grad_w_v", "grad_w_o"),
    "bias gradients": ("grad_b_q", "grad_b_v", "grad_b_o"),  # grad_b_k is zero in exact arithmetic
    "attention-bias gradients": ("grad_attn_bias",),  # contract v2's additive bias
}


def ordinary(spec: dict) -> bool:
    """Cases at unit input and weight scale with no empty rows: what most users run."""
    return spec["input_scale"] == 1 and spec["weight_scale"] == 1 and not spec["fully_masked_rows"]


def smallest_failing(case: golden.GoldenCase, name: str, dtype: str, legacy: bool = False) -> float | None:
    """The smallest ``delta`` for which ``truth * (1 + delta)`` in ``dtype`` fails (None: never
    below 1). ``legacy`` applies the rule before the ensemble: the case's single baseline plus half
    an ulp and the float64 reference's uncertainty from the absolute-value replay, no dtype floor."""
    truth = case.tensors[name]
    scale = case.baseline["error_scale"][name]
    baseline = case.baseline[dtype][name]

    def fails(delta: float) -> bool:
        got = (truth * (1.0 + delta)).astype(NUMPY[dtype])
        if not legacy:
            verdict = judge(
                got, truth, tensor=name, dtype=dtype, baseline=baseline, error_scale=scale, k=DEFAULT_K
            )
            return not verdict.passed
        emax = float(np.max(np.abs(truth), initial=0.0))
        reference = EPS["float64"] * np.sqrt(scale["terms"]) * scale["magnitude"]
        tolerance = DEFAULT_K * (baseline + EPS[dtype] / 2 * emax + reference)
        return float(np.max(np.abs(got.astype(np.float64) - truth), initial=0.0)) > tolerance

    lo, hi = 1e-18, 1.0
    if not fails(hi):
        return None
    for _ in range(60):  # bisect in log space: about 1% resolution
        mid = float(np.sqrt(lo * hi))
        if fails(mid):
            hi = mid
        else:
            lo = mid
        if hi / lo < 1.01:
            break
    return hi


def each_case(root: Path, kernel: bool = False) -> Iterator[tuple[str, golden.GoldenCase]]:
    """Every case of the committed store at ``root``, or (``kernel``) of its kernel manifest, loaded
    one at a time (a kernel-scale truth is computed on first use, with a progress line)."""
    if not kernel:
        for case_id in golden.case_ids(root):
            yield case_id, golden.load_case(case_id, root)
        return
    manifest = materialize.read_kernel_manifest(root / materialize.KERNEL_MANIFEST.name)
    for n, case_id in enumerate(manifest["cases"], 1):
        print(f"[{n}/{len(manifest['cases'])}] {case_id}", file=sys.stderr, flush=True)
        yield case_id, materialize.load_kernel_case(case_id, manifest, lambda line: None)


def measure(root: Path, legacy: bool = False, kernel: bool = False) -> dict[tuple[str, str], list[float]]:
    """``{(dtype, kind): [smallest failing delta per ordinary case and tensor]}``."""
    found: dict[tuple[str, str], list[float]] = {}
    for _, case in each_case(root, kernel):
        if not ordinary(case.spec):
            continue
        for dtype in case.spec["dtypes"]:
            for kind, names in KINDS.items():
                for name in names:
                    if name in case.baseline[dtype] and name in case.tensors:
                        delta = smallest_failing(case, name, dtype, legacy)
                        if delta is not None:
                            found.setdefault((dtype, kind), []).append(delta)
    return found


def elementwise_study(
    root: Path, names: Sequence[str] = ("output", "grad_query", "grad_w_q", "grad_b_v")
) -> str:
    """Would judging element by element (each value against its own bound) see more, without false
    failures? Per element: the ensemble's worst error there, plus half an ulp of the value and the
    dtype floor with that element's own magnitude. Measured on the ordinary cases up to d_in 96
    (the emulation is recomputed): the per-tensor and per-element sensitivity (median smallest
    failing uniform ``delta``), and the worst per-element ratio the valid orders of
    ``impls/variants/valid_orders.py`` reach (above 1: fails at k = 1; above 2: a false failure at the default)."""
    from mha_conformance.execution.harness import cast_inputs, runtime_inputs
    from mha_conformance.impls import error_model, reference
    from mha_conformance.impls.error_model import FLOOR_C, floor
    from mha_conformance.impls.variants import valid_orders

    found: dict[tuple[str, str], dict[str, list[float]]] = {}
    for case_id in golden.case_ids(root):
        case = golden.load_case(case_id, root)
        spec = case.spec
        if not ordinary(spec) or spec["d_in"] > 96:
            continue
        inputs, g = case.inputs(), case.tensors["grad_output"]
        rms = error_model.rms_arrays(inputs, spec, g)
        for dtype in (d for d in spec["dtypes"] if d != "float64"):
            per_element: dict[str, np.ndarray] = {}
            for algorithm in (a for a in reference.ENSEMBLE if a.used_in(dtype)):
                emulated = reference.forward(inputs, spec, reference.PRECISIONS[dtype], algorithm)
                grads = reference.backward(inputs, spec, g, reference.PRECISIONS[dtype], algorithm=algorithm)
                for name, got in {"output": emulated.output, **grads}.items():
                    err = np.abs(got - case.tensors.get(name, got))
                    per_element[name] = np.maximum(per_element.get(name, 0.0), err)
            valid = []
            for cls in valid_orders.VALID_ORDERS:
                adapter = cls()
                out = adapter.prepare(cast_inputs(case, dtype), spec, dtype, "cpu")(
                    runtime_inputs(case, dtype)
                )
                back = adapter.prepare_backward(cast_inputs(case, dtype), spec, dtype, "cpu")
                valid.append({**out, **back(runtime_inputs(case, dtype, "backward"))})
            for name in names:
                truth = case.tensors.get(name)
                if truth is None or np.abs(truth).max() < 1e-9:
                    continue
                scale = case.baseline["error_scale"][name]
                unit = np.sqrt(scale["terms"]) * rms[name]
                bound = (
                    per_element[name]
                    + EPS[dtype] / 2 * np.abs(truth)
                    + (EPS["float64"] + FLOOR_C * EPS[dtype] / 2) * unit
                )
                tensor_bound = case.baseline[dtype][name] + floor(dtype, float(np.abs(truth).max()), scale)
                big = np.abs(truth) > 1e-3 * np.abs(truth).max()
                row = found.setdefault((dtype, name), {"tensor": [], "element": [], "valid": []})
                row["tensor"].append(DEFAULT_K * tensor_bound / float(np.abs(truth).max()))
                row["element"].append(float(np.min(DEFAULT_K * bound[big] / np.abs(truth[big]))))
                row["valid"].append(
                    max(float(np.max(np.abs(v[name].astype(np.float64) - truth) / bound)) for v in valid)
                )
    lines = [
        "| dtype | tensor | sensitivity per tensor (median) | per element (median) | valid orders' worst per-element ratio | cases above 1 / above 2 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (dtype, name), row in sorted(found.items()):
        over1 = sum(r > 1 for r in row["valid"])
        over2 = sum(r > 2 for r in row["valid"])
        lines.append(
            f"| {dtype} | {name} | {np.median(row['tensor']):.2g} | {np.median(row['element']):.2g} | "
            f"{max(row['valid']):.2f} | {over1} / {over2} of {len(row['valid'])} |"
        )
    return "\n".join(lines) + "\n"


def valid_order_margins(root: Path, kernel: bool = False) -> str:
    """The evidence for the floor's constant: each valid order of ``impls/variants/valid_orders.py`` (none of
    them an ensemble member) on every case, the worst ratio it reaches per dtype and tensor kind,
    and the smallest ``c`` that would keep it within baseline plus floor (ratio <= 1). ``kernel``:
    the kernel tier's cases and the orders kernels use at scale."""
    from mha_conformance.execution.harness import cast_inputs, runtime_inputs
    from mha_conformance.impls.error_model import FLOOR_C, floor
    from mha_conformance.impls.variants import valid_orders

    kind_of = {name: kind for kind, names in KINDS.items() for name in names} | {"grad_b_k": "bias gradients"}
    found: dict[tuple[str, str], list[tuple[float, float, str]]] = {}
    orders = valid_orders.KERNEL_VALID_ORDERS if kernel else valid_orders.VALID_ORDERS
    for case_id, case in each_case(root, kernel):
        for dtype in case.spec["dtypes"]:
            for cls in orders:
                adapter = cls()
                result = adapter.prepare(cast_inputs(case, dtype), case.spec, dtype, "cpu")(
                    runtime_inputs(case, dtype)
                )
                back = adapter.prepare_backward(cast_inputs(case, dtype), case.spec, dtype, "cpu")
                result.update(back(runtime_inputs(case, dtype, "backward")))
                for name in ("output", *case.spec["gradients"]):
                    truth, scale = case.tensors[name], case.baseline["error_scale"][name]
                    err = float(np.max(np.abs(result[name].astype(np.float64) - truth), initial=0.0))
                    base = case.baseline[dtype][name]
                    full = floor(dtype, float(np.max(np.abs(truth), initial=0.0)), scale)
                    unit = EPS[dtype] / 2 * np.sqrt(scale["terms"]) * scale["rms_magnitude"]
                    needed = (err - base - (full - FLOOR_C * unit)) / unit if unit > 0 else 0.0
                    ratio = err / (base + full) if base + full > 0 else 0.0
                    found.setdefault((dtype, kind_of[name]), []).append(
                        (ratio, needed, f"{cls.name} {case_id}")
                    )
    lines = [
        f"| dtype | tensor | worst ratio at c = {FLOOR_C:g} | c it needs for ratio <= 1 | where |",
        "| --- | --- | --- | --- | --- |",
    ]
    for dtype in NUMPY:
        for kind in KINDS:
            rows = found.get((dtype, kind))
            if rows:
                ratio, needed, where = max(rows, key=lambda r: r[1])
                lines.append(
                    f"| {dtype} | {kind} | {max(r[0] for r in rows):.2f} | {max(needed, 0.0):.3f} | {where} |"
                )
    return "\n".join(lines) + "\n"


def checkout_vectors(rev: str, into: Path) -> Path:
    """The vector store as committed at ``rev``, written under ``into``."""
    root = source_root()
    if root is None:
        raise SystemExit("--before-rev needs a git checkout of mha-conformance")
    names = subprocess.run(
        ["git", "ls-tree", "--name-only", rev, "vectors/"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for name in names:
        if name.endswith((".safetensors", ".json")):
            data = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=root, check=True, capture_output=True)
            (into / Path(name).name).write_bytes(data.stdout)
    return into


def table(after: dict, before: dict | None) -> str:
    head = "| dtype | tensor | median (after) | largest (after) |"
    rule = "| --- | --- | --- | --- |"
    if before is not None:
        head += " median (before) | largest (before) |"
        rule += " --- | --- |"
    caption = (
        "Smallest relative error `delta` (result = truth x (1 + delta), rounded to the dtype) that fails at "
        f"k = {DEFAULT_K:g}, over the ordinary cases (unit-scale inputs and weights, no empty rows)."
    )
    lines = [caption, "", head, rule]
    for dtype in NUMPY:
        for kind in KINDS:
            values = after.get((dtype, kind))
            if not values:
                continue
            row = f"| {dtype} | {kind} | {np.median(values):.2g} | {max(values):.2g} |"
            if before is not None:
                old = before.get((dtype, kind)) or [np.nan]
                row += f" {np.median(old):.2g} | {max(old):.2g} |"
            lines.append(row)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mha_conformance.audit.sensitivity", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--vectors", type=Path, default=golden.VECTORS_DIR, help="vector folder (default: committed)"
    )
    parser.add_argument(
        "--before-rev", help="also measure the vectors and rule committed at this git revision"
    )
    parser.add_argument("--markdown", type=Path, help="write the table here, stamped (else print it)")
    parser.add_argument(
        "--elementwise", action="store_true", help="instead: compare per-element with per-tensor judging"
    )
    parser.add_argument(
        "--valid-orders", action="store_true", help="instead: the valid orders' margins, and the c they need"
    )
    parser.add_argument(
        "--kernel-scale",
        action="store_true",
        help="the kernel tier's cases (vectors/KERNELS.json) instead of the committed ones",
    )
    args = parser.parse_args(argv)
    flags = (("--elementwise", args.elementwise), ("--valid-orders", args.valid_orders))
    flags += (("--kernel-scale", args.kernel_scale),)
    command = "python -m mha_conformance.audit.sensitivity" + "".join(f" {flag}" for flag, on in flags if on)
    if args.elementwise:
        if args.kernel_scale:
            parser.error("--elementwise studies the committed cases only")
        body = elementwise_study(args.vectors)
    elif args.valid_orders:
        body = valid_order_margins(args.vectors, args.kernel_scale)
    elif args.kernel_scale:
        if args.before_rev:
            parser.error("--before-rev compares committed vectors; the kernel tier has no earlier rule")
        body = table(measure(args.vectors, kernel=True), None)
    else:
        before = None
        if args.before_rev:
            command += f" --before-rev {args.before_rev}"
            with tempfile.TemporaryDirectory() as tmp:
                before = measure(checkout_vectors(args.before_rev, Path(tmp)), legacy=True)
        body = table(measure(args.vectors), before)
    if args.markdown:
        command += f" --markdown {args.markdown}"
    print(write_markdown(args.markdown, command, body, {"ml_dtypes": ml_dtypes.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
