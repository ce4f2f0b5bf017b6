"""Convention probes and the dropout statistics: each names the convention that was built in.

The mutants (``impls/variants/mutants.py``) are implementations whose conventions are known by
construction, so they test the probes: the twin must read as the reference everywhere, each
convention mutant as its own convention.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mha_conformance.impls.adapter import FunctionAdapter
from mha_conformance.impls.variants import mutants
from mha_conformance.impls.variants.conventions import Convention, attention
from mha_conformance.probes import conventions as probes
from mha_conformance.probes import dropout

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_ROW = {
    "mask_polarity": "True = attend",
    "empty_rows": "zeros",
    "causal_tq_lt_tk": "bottom-right",
    "gqa_head_order": "h // group",
    "default_scale": "1/sqrt(d)",
    "dropout_in_eval": "none",
    "nan_masked_keys": "contained",
    "dropout_training": "ok",
    "softcap_order": "cap, then bias",
    "window_alignment": "bottom-right",
    "zero_length": "zeros",
}


def verdicts(adapter) -> dict[str, str]:
    doc = probes.probe_all([adapter])
    return {k: v["verdict"] for k, v in doc["adapters"][adapter.name]["probes"].items()}


def convention_adapter(conv: Convention, name: str) -> FunctionAdapter:
    def fn(case, spec, dtype, device):
        return {"output": attention(case, spec, conv)["output"].astype(dtype)}

    fn.variants = ("attn_bias", "softcap", "window", "kv_lengths")
    return FunctionAdapter(fn, name)


def test_the_correct_twin_reads_as_the_reference_everywhere():
    assert verdicts(mutants.Correct()) == REFERENCE_ROW


@pytest.mark.parametrize(
    ("mutant", "probe", "verdict"),
    [
        (mutants.NoScale, "default_scale", "1"),
        (mutants.ScaleByD, "default_scale", "1/d"),
        (mutants.MaskInverted, "mask_polarity", "True = blocked"),
        (mutants.MaskInverted, "nan_masked_keys", "leaks via keys and values"),
        (mutants.NanEmptyRows, "empty_rows", "NaN"),
        (mutants.CausalIgnored, "causal_tq_lt_tk", "ignored"),
        (mutants.GqaTiled, "gqa_head_order", "h % kv_heads"),
        (mutants.DropoutInEval, "dropout_in_eval", "applied"),
        (mutants.DropoutInEval, "dropout_training", "wrong"),  # eval mode is not uniform
        (mutants.RelError1e3, "dropout_training", "wrong"),  # kept weights off by 1e-3
        (mutants.HeadsNotTransposed, "default_scale", "other"),  # no candidate explains it
    ],
)
def test_each_convention_mutant_reads_as_its_convention(mutant, probe, verdict):
    assert verdicts(mutant())[probe] == verdict


def test_other_conventions_are_named():
    got = verdicts(
        convention_adapter(Convention(empty_rows="uniform", causal="top_left"), "uniform-top-left")
    )
    assert got["empty_rows"] == "uniform" and got["causal_tq_lt_tk"] == "top-left"
    got = verdicts(convention_adapter(Convention(empty_rows="unmasked", mask="ignored"), "ignores-masks"))
    assert got["mask_polarity"] == "mask ignored"
    assert got["dropout_training"] == "n/a"  # a function adapter has no training mode


def test_the_variant_conventions_are_named():
    got = verdicts(
        convention_adapter(
            Convention(softcap="after_bias", window="top_left", empty_rows="uniform"), "variants-other-way"
        )
    )
    assert got["softcap_order"] == "bias, then cap" and got["window_alignment"] == "top-left"
    assert got["zero_length"] == "uniform"
    got = verdicts(convention_adapter(Convention(softcap="ignored", window="ignored"), "variants-ignored"))
    assert got["softcap_order"] == "cap ignored" and got["window_alignment"] == "ignored"


def test_binomial_bounds_and_the_dropout_verdict():
    low, high = dropout.binomial_bounds(0.2, 10_000)
    assert low == pytest.approx(0.18) and high == pytest.approx(0.22)
    tk, rng = 64, np.random.default_rng(1)
    keep = rng.random((4, 64, tk)) >= 0.2
    right = [np.where(keep, 1 / (tk * 0.8), 0.0)]
    assert dropout.judge_training(right, 0.2, tk)["fraction_ok"]
    assert dropout.judge_training(right, 0.2, tk)["rescale_ok"]
    unscaled = [np.where(keep, 1 / tk, 0.0)]  # dropped, not rescaled
    assert not dropout.judge_training(unscaled, 0.2, tk)["rescale_ok"]
    too_many = [np.where(rng.random((4, 64, tk)) >= 0.25, 1 / (tk * 0.8), 0.0)]  # p 0.25 claimed as 0.2
    assert not dropout.judge_training(too_many, 0.2, tk)["fraction_ok"]


def test_torch_adapters_probe_and_pass_the_dropout_statistics():
    pytest.importorskip("torch")
    from mha_conformance.impls import registry

    mha, sdpa = registry.resolve(["torch-mha", "torch-sdpa"])
    got = verdicts(mha)
    assert got["empty_rows"] == "NaN" and got["dropout_training"] == "ok" and got["dropout_in_eval"] == "none"
    assert verdicts(sdpa)["empty_rows"] == "zeros"


def test_cli_writes_json_and_merges_markdown(tmp_path):
    out = tmp_path / "mutants.json"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    cmd = [
        sys.executable,
        "-m",
        "mha_conformance.probes.conventions",
        "--adapter",
        "mha_conformance.impls.variants.mutants:GqaTiled",
        "--json",
        str(out),
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["format_version"] == probes.FORMAT_VERSION
    entry = doc["adapters"]["mutant-gqa-tiled"]["probes"]["gqa_head_order"]
    assert entry["verdict"] == "h % kv_heads" and set(entry["distance"]) == {"h // group", "h % kv_heads"}
    res = subprocess.run(
        [sys.executable, "-m", "mha_conformance.probes.conventions", "--markdown", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert "| `mutant-gqa-tiled` |" in res.stdout and "h % kv_heads" in res.stdout
