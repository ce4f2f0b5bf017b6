"""Convention probes: which attention conventions does an adapter follow?

The golden checks say pass or fail; these say *why* an implementation differs, along the axes
where frameworks disagree: mask polarity, rows with no allowed key, causal alignment when
Tq < Tk, grouped-query head order, the default scale, dropout in eval mode, whether NaN in
masked-out keys leaks into the output, and for the variants of contract v2 where the softcap
sits relative to the bias, how a window is aligned when Tq < Tk, and what a batch row of key
length 0 gives. Each probe runs the adapter through the adapter
contract on small crafted float32 inputs and names the candidate convention
(``mha_conformance.impls.variants.conventions``) its output matches. With a training mode
(``Adapter.prepare_training``), a statistical check of dropout follows (``conformance/probes/dropout.py``).

``python -m mha_conformance.probes [--adapter NAME ...] [--json PATH]`` probes adapters (default:
every built-in whose framework is installed); ``--markdown A.json B.json ...`` merges result
files (one per environment) into the README's matrix.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mha_conformance.checks.skeleton import output_problems
from mha_conformance.impls.adapter import Adapter, refusal
from mha_conformance.impls.variants.conventions import REFERENCE, Convention, attention
from mha_conformance.vectors.catalogue import spec as make_spec

DTYPE = "float32"
#: Max abs difference, relative to the candidate's largest value, for "matches": float32
#: attention is good to ~1e-6; the crafted candidates differ by 1e-1 or more.
MATCH_RTOL = 1e-3


@dataclass(frozen=True)
class Probe:
    """A crafted case and the candidate conventions an adapter's output may match."""

    name: str
    question: str
    spec: dict[str, Any]
    candidates: dict[str, Convention]
    #: Which query rows to compare (None: all); the empty-rows probe looks only at its empty rows.
    rows: tuple[int, ...] | None = None
    #: Turn the crafted inputs into what the adapter receives (the NaN probe poisons masked keys).
    poison: bool = False


def _probe_spec(case_id: str, **fields: Any) -> dict[str, Any]:
    base = {"batch": 2, "q_len": 6, "d_in": 16, "num_heads": 2, "head_dim": 8, "dtypes": [DTYPE]}
    return make_spec(f"probe_{case_id}", f"convention probe: {case_id}", **{**base, **fields})


def _mask(shape: tuple[int, ...], rng: np.random.Generator, empty_rows: tuple[int, ...] = ()) -> np.ndarray:
    """A random mask whose rows each allow and block at least one key, except ``empty_rows``
    (all blocked), so polarity and empty-row conventions give clearly different outputs."""
    mask = rng.random(shape) < 0.5
    tk = shape[-1]
    first, second = rng.integers(0, tk, shape[:-1]), rng.integers(0, tk - 1, shape[:-1])
    second = second + (second >= first)  # a different key
    np.put_along_axis(mask, first[..., None], True, axis=-1)
    np.put_along_axis(mask, second[..., None], False, axis=-1)
    for r in empty_rows:
        mask[..., r, :] = False
    return mask


PROBES: tuple[Probe, ...] = (
    Probe(
        "mask_polarity",
        "Does a bool mask's True mean 'may attend' (the contract)?",
        _probe_spec("mask_polarity", mask={"kind": "random", "shape": [2, 1, 6, 6]}),
        {
            "True = attend": REFERENCE,
            "True = blocked": Convention(mask="true_blocks"),
            "mask ignored": Convention(mask="ignored"),
        },
    ),
    Probe(
        "empty_rows",
        "What does a query row with no allowed key give?",
        _probe_spec("empty_rows", mask={"kind": "masked_rows", "shape": [2, 1, 6, 6], "rows": [1, 4]}),
        {
            "zeros": REFERENCE,
            "uniform": Convention(empty_rows="uniform"),
            "attends all keys": Convention(empty_rows="unmasked"),
        },
        rows=(1, 4),
    ),
    Probe(
        "causal_tq_lt_tk",
        "Where is the causal diagonal when Tq < Tk (3 queries, 7 keys)?",
        _probe_spec("causal_tq3_tk7", q_len=3, kv_len=7, causal=True, self_attention=False),
        {
            "bottom-right": REFERENCE,
            "top-left": Convention(causal="top_left"),
            "ignored": Convention(causal="ignored"),
        },
    ),
    Probe(
        "gqa_head_order",
        "Which kv head does query head h read (4 query heads, 2 kv heads)?",
        _probe_spec("gqa_h4_kv2", num_heads=4, num_kv_heads=2, head_dim=4),
        {"h // group": REFERENCE, "h % kv_heads": Convention(gqa="tile")},
    ),
    Probe(
        "default_scale",
        "What scale applies when none is given (head_dim 8)?",
        _probe_spec("default_scale_hd8"),
        {"1/sqrt(d)": REFERENCE, "1/d": Convention(scale="inv_d"), "1": Convention(scale="one")},
    ),
    Probe(
        "dropout_in_eval",
        "Is dropout (p = 0.5) applied in eval mode?",
        _probe_spec("dropout_p0p5_eval", dropout=0.5),
        {"none": REFERENCE},
    ),
    Probe(
        "nan_masked_keys",
        "Does NaN in masked-out keys/values reach the output?",
        _probe_spec(
            "nan_keypad",
            q_len=4,
            kv_len=7,
            self_attention=False,
            mask={"kind": "key_padding", "shape": [2, 1, 1, 7]},
        ),
        {"contained": REFERENCE},
        poison=True,
    ),
    Probe(
        "softcap_order",
        "Where does the softcap (2) sit relative to an additive bias?",
        _probe_spec("softcap2_bias", softcap=2.0, attn_bias={"kind": "random", "shape": [2, 2, 6, 6]}),
        {
            "cap, then bias": REFERENCE,
            "bias, then cap": Convention(softcap="after_bias"),
            "cap ignored": Convention(softcap="ignored"),
        },
    ),
    Probe(
        "window_alignment",
        "Where is a window [1, 1] centred when Tq < Tk (3 queries, 7 keys)?",
        _probe_spec("window_tq3_tk7", q_len=3, kv_len=7, window=[1, 1], self_attention=False),
        {
            "bottom-right": REFERENCE,
            "top-left": Convention(window="top_left"),
            "ignored": Convention(window="ignored"),
        },
    ),
    Probe(
        "zero_length",
        "What does a batch row of key length 0 give?",
        _probe_spec("kv_lengths_6_0", kv_lengths=[6, 0]),
        {
            "zeros": REFERENCE,
            "uniform": Convention(empty_rows="uniform"),
            "attends all keys": Convention(empty_rows="unmasked"),
        },
    ),
)


def crafted_case(probe: Probe) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(weights, runtime inputs) for a probe, float32, reproducible from its name."""
    s = probe.spec
    rng = np.random.default_rng(zlib.crc32(probe.name.encode()))
    b, tq, tk, h, hkv = s["batch"], s["q_len"], s["kv_len"], s["num_heads"], s["num_kv_heads"]
    hd, hdv, d = s["head_dim"], s["v_head_dim"], s["d_in"]

    def normal(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    weights = {
        "w_q": normal(d, h * hd, scale=d**-0.5 * 2),
        "w_k": normal(d, hkv * hd, scale=d**-0.5 * 2),
        "w_v": normal(d, hkv * hdv, scale=d**-0.5),
        "w_o": normal(h * hdv, s["d_out"], scale=0.3),
    }
    for short, width in (("q", h * hd), ("k", hkv * hd), ("v", hkv * hdv), ("o", s["d_out"])):
        weights[f"b_{short}"] = normal(width, scale=0.2)
    query = normal(b, tq, d)
    kv = query if s["self_attention"] else normal(b, tk, d)
    inputs = {"query": query, "key": kv, "value": kv}  # key is value: every adapter can take it
    if s.get("attn_bias") is not None:
        inputs["attn_bias"] = normal(*s["attn_bias"]["shape"], scale=3.0)
    mask = s["mask"]
    if mask is not None:
        shape = tuple(mask["shape"])
        if mask["kind"] == "key_padding":
            valid = np.array([tk - 2, tk - 3])[:b]
            inputs["mask"] = (np.arange(tk)[None, :] < valid[:, None]).reshape(shape)
        else:
            inputs["mask"] = _mask(shape, rng, tuple(mask.get("rows", ())))
    return weights, inputs


def _poisoned(inputs: Mapping[str, np.ndarray], parts: tuple[str, ...]) -> dict[str, np.ndarray]:
    """NaN in every position of ``parts`` (key, value) that the key padding mask blocks."""
    blocked = ~inputs["mask"][:, 0, 0, :, None]  # [B, Tk, 1]
    poisoned = np.where(blocked, np.float32(np.nan), inputs[parts[0]])
    return {**inputs, **dict.fromkeys(parts, poisoned)}  # key is value when both are poisoned


def run_adapter(adapter: Adapter, prepare: Callable, probe: Probe, inputs: Mapping[str, np.ndarray], weights):
    """The adapter's output for a probe, or a string saying why there is none."""
    reason = refusal(adapter, probe.spec, DTYPE, "cpu")
    if reason:
        return f"n/a: {reason}"
    if DTYPE not in adapter.dtypes:
        return f"n/a: {adapter.name} does not support {DTYPE}"
    try:
        result = prepare({**weights, **inputs}, probe.spec, DTYPE, "cpu")(dict(inputs))
    except NotImplementedError as exc:
        return f"n/a: {exc}"
    except Exception as exc:  # a probe reports what happened; it never stops the matrix
        return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    problems = output_problems(result, probe.spec, DTYPE)
    if problems:
        return f"error: {problems[0][:200]}"
    return result["output"].astype(np.float64)


def classify(probe: Probe, adapter: Adapter) -> dict[str, Any]:
    """The probe's verdict for one adapter: ``{"verdict", "detail", "distance"}``.

    verdict is the matching candidate's label, ``NaN`` when the compared rows hold NaN,
    ``other`` when no candidate matches, ``n/a`` or ``error`` when it cannot run."""
    weights, inputs = crafted_case(probe)
    got = run_adapter(adapter, adapter.prepare, probe, inputs, weights)
    if isinstance(got, str):
        return {"verdict": got.split(":")[0], "detail": got, "distance": {}}
    rows = slice(None) if probe.rows is None else list(probe.rows)
    distance = {}
    for label, conv in probe.candidates.items():
        want = attention({**weights, **inputs}, probe.spec, conv)["output"]
        diff = np.nan_to_num(np.abs(got[:, rows] - want[:, rows]), nan=np.inf)
        distance[label] = float(diff.max()) / max(1.0, float(np.abs(want[:, rows]).max()))
    if probe.poison:
        return _nan_verdict(probe, adapter, weights, inputs, distance)
    if probe.name == "dropout_in_eval":
        return _dropout_verdict(probe, adapter, weights, inputs, got, distance)
    if not np.isfinite(got[:, rows]).all():
        bad = int((~np.isfinite(got)).sum())
        return {"verdict": "NaN", "detail": f"{bad} of {got.size} outputs are NaN/Inf", "distance": distance}
    best = min(distance, key=distance.get)
    if distance[best] <= MATCH_RTOL:
        return {"verdict": best, "detail": f"matches within {distance[best]:.1e}", "distance": distance}
    return {"verdict": "other", "detail": f"nearest: {best} at {distance[best]:.2g}", "distance": distance}


def _dropout_verdict(probe, adapter, weights, inputs, got, distance) -> dict[str, Any]:
    """Eval mode with dropout 0.5 against the same module built with dropout 0, and against a
    second eval call: any difference means dropout ran."""
    plain = replace(probe, spec={**probe.spec, "dropout": 0.0})
    without = run_adapter(adapter, adapter.prepare, plain, inputs, weights)
    again = run_adapter(adapter, adapter.prepare, probe, inputs, weights)
    if isinstance(without, str) or isinstance(again, str):
        return {"verdict": "n/a", "detail": "cannot build the module without dropout", "distance": distance}
    scale = max(1.0, float(np.abs(without).max()))
    diff = max(float(np.max(np.abs(got - without))), float(np.max(np.abs(got - again)))) / scale
    same = diff <= MATCH_RTOL  # another code path may round differently; dropout p=0.5 changes O(1)
    detail = (
        f"within {diff:.1e} of the dropout-0 module and across calls"
        if same
        else (f"differs by {diff:.2g} from the dropout-0 module or across calls")
    )
    return {"verdict": "none" if same else "applied", "detail": detail, "distance": distance}


def _nan_verdict(probe, adapter, weights, inputs, distance) -> dict[str, Any]:
    """NaN at blocked positions of the keys only, of the values only (where the adapter takes
    key != value), else of both: which of them reaches the output."""
    leaked, ran = [], []
    for part in ("key", "value"):
        got = run_adapter(adapter, adapter.prepare, probe, _poisoned(inputs, (part,)), weights)
        if isinstance(got, np.ndarray):
            ran.append(part)
            if not np.isfinite(got).all():
                leaked.append(f"{part}s")
    if not ran:
        got = run_adapter(adapter, adapter.prepare, probe, _poisoned(inputs, ("key", "value")), weights)
        if isinstance(got, str):
            return {"verdict": got.split(":")[0], "detail": got, "distance": distance}
        bad = int((~np.isfinite(got)).sum())
        verdict = "leaks (key = value)" if bad else "contained"
        return {
            "verdict": verdict,
            "detail": f"key and value poisoned together: {bad} of {got.size} outputs NaN/Inf",
            "distance": distance,
        }
    verdict = "leaks via " + " and ".join(leaked) if leaked else "contained"
    return {"verdict": verdict, "detail": f"poisoned separately: {', '.join(ran)}", "distance": distance}


def probe_adapter(adapter: Adapter) -> dict[str, dict[str, Any]]:
    """Every probe's verdict for one adapter."""
    return {p.name: classify(p, adapter) for p in PROBES}


FORMAT_VERSION = "1"
COLUMNS = {
    "mask_polarity": "mask True =",
    "empty_rows": "fully masked row",
    "causal_tq_lt_tk": "causal, Tq < Tk",
    "gqa_head_order": "GQA: head h reads kv",
    "default_scale": "default scale",
    "dropout_in_eval": "dropout in eval",
    "nan_masked_keys": "NaN at masked keys",
    "dropout_training": "dropout in training (p 0.2)",
    "softcap_order": "softcap vs bias",
    "window_alignment": "window, Tq < Tk",
    "zero_length": "key length 0",
}


def probe_all(adapters: list[Adapter]) -> dict[str, Any]:
    """The probe results for ``adapters`` as the JSON document ``--json`` writes."""
    from datetime import datetime, timezone

    from mha_conformance.probes.dropout import check_dropout

    out: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(),
        "probes": {p.name: p.question for p in PROBES}
        | {"dropout_training": "conformance/probes/dropout.py"},
        "columns": COLUMNS,
        "adapters": {},
    }
    for adapter in adapters:
        results = probe_adapter(adapter)
        results["dropout_training"] = check_dropout(adapter)
        versions = {} if adapter.missing() else adapter.versions()
        out["adapters"][adapter.name] = {"path": adapter.path, "versions": versions, "probes": results}
    return out


def _cell(result: dict[str, Any]) -> str:
    verdict = result["verdict"]
    if verdict in ("n/a", "error"):
        return verdict
    return verdict if verdict != "NaN" else "**NaN**"


def markdown(documents: list[dict[str, Any]]) -> str:
    """One matrix (adapter x probe) from one or more probe documents; later ones win on a name."""
    rows: dict[str, dict[str, Any]] = {}
    for doc in documents:
        rows.update(doc["adapters"])
    head = "| adapter | " + " | ".join(COLUMNS.values()) + " |"
    lines = [head, "| --- " * (len(COLUMNS) + 1) + "|"]
    for name, entry in rows.items():
        cells = [_cell(entry["probes"][c]) if c in entry["probes"] else "-" for c in COLUMNS]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    from pathlib import Path

    from mha_conformance.impls import registry

    parser = argparse.ArgumentParser(
        prog="python -m mha_conformance.probes", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--adapter", action="append", default=[], help="adapter (as for the suite); repeatable"
    )
    parser.add_argument("--json", type=Path, help="write the results here (e.g. results/probes/torch.json)")
    parser.add_argument(
        "--markdown",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="print the matrix merged from these result files instead of probing",
    )
    parser.add_argument("--out", type=Path, help="with --markdown: write the matrix, stamped, here")
    args = parser.parse_args(argv)
    if args.markdown:
        from mha_conformance.results.tables import write_markdown

        documents = [json.loads(p.read_text()) for p in args.markdown]
        table = markdown(documents)
        if args.out:
            versions = {
                k: v for doc in documents for a in doc["adapters"].values() for k, v in a["versions"].items()
            }
            files = " ".join(str(p) for p in args.markdown)
            write_markdown(
                args.out,
                f"python -m mha_conformance.probes --markdown {files} --out {args.out}",
                table,
                versions,
            )
        print(table)
        return 0
    if args.adapter:
        adapters = registry.resolve(args.adapter)
    else:
        adapters = [a for a in (registry.builtin(n) for n in registry.BUILTINS) if not a.missing()]
    doc = probe_all(adapters)
    if args.json:
        from mha_conformance.results.report import write_json_atomic

        write_json_atomic(args.json, doc)
    print(markdown([doc]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
