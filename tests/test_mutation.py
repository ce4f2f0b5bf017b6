"""The suite kills every deliberately wrong implementation and passes their correct twin.

The full score (docs/generated/mutation.md) comes from ``python -m mha_conformance.audit.mutation`` over the
whole catalogue; here the suite runs once, in a subprocess as a user would, on five cases in
float64: enough that each mutant dies on the case made for its bug, in seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mha_conformance.audit import mutation
from mha_conformance.impls.variants import mutants

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore")

#: The case that must kill each mutant: the catalogue case written for that kind of bug.
KILLED_BY = {
    "mutant-no-scale": "self_causal_b2_t8_d16_h4",
    "mutant-scale-by-d": "self_causal_b2_t8_d16_h4",
    "mutant-causal-off-by-one": "self_causal_b2_t8_d16_h4",
    "mutant-causal-ignored": "self_causal_b2_t8_d16_h4",
    "mutant-mask-inverted": "mask_random_broadcast_1_1",
    "mutant-softmax-wrong-axis": "self_causal_b2_t8_d16_h4",
    "mutant-heads-not-transposed": "self_causal_b2_t8_d16_h4",
    "mutant-gqa-tiled": "gqa_h8_kv2",
    "mutant-keys-value-weights": "self_causal_b2_t8_d16_h4",
    "mutant-float32-softmax": "self_causal_b2_t8_d16_h4",
    "mutant-nan-empty-rows": "mask_fully_masked_query_rows",
    "mutant-dropout-in-eval": "dropout_p0p1_eval_mode",
    "mutant-rel-error-1e-3": "self_causal_b2_t8_d16_h4",
    "mutant-no-biases": "self_causal_b2_t8_d16_h4",
}
#: Storage-precision mutants: killed by the precision-exposing case for their dtype, by no other.
STORAGE_KILLED_BY = {
    "mutant-weights-bf16-in-float32": "precision_f32_inputs_self_causal_b2_t8_d16_h4",
    "mutant-inputs-f32-in-float64": "precision_f64_inputs_self_b2_t8_d16_h4",
    "mutant-f16-from-bf16-inputs": "precision_f16_inputs_far_from_bf16_self_b1_t4_d8_h2",
}
STORAGE = [m for m in mutants.MUTANTS if m.narrowed is not None]


@pytest.fixture(scope="module")
def reduced_run() -> mutation.MutationRun:
    cases = sorted(set(KILLED_BY.values()))
    semantic = [m for m in mutants.MUTANTS if m.narrowed is None]
    return mutation.run([a for c in cases for a in ("--case", c)] + ["--dtype", "float64"], semantic)


def test_every_mutant_of_the_issue_exists():
    assert {m.name for m in mutants.MUTANTS} == set(KILLED_BY) | set(STORAGE_KILLED_BY)
    assert len(mutants.MUTANTS) == 17


def test_storage_mutants_die_on_precision_cases_and_on_no_other():
    """A tensor kept in a narrower dtype than the call is invisible on inputs exact in bfloat16
    (every shared case), and fails on the full-precision inputs of the call's dtype."""
    result = mutation.run(["-k", "test_golden"], STORAGE)
    assert result.twin_passes, result.twin.failed
    for m in result.mutants:
        killers = {case for check, case, _ in m.failed if check == "golden"}
        assert STORAGE_KILLED_BY[m.name] in killers, (m.name, sorted(killers))
        assert all(case.startswith("precision_") for case in killers), (m.name, sorted(killers))


def test_the_correct_twin_passes(reduced_run):
    twin = reduced_run.twin
    assert reduced_run.twin_passes, (twin.counts, twin.failed)
    assert twin.counts.get("passed", 0) >= len(set(KILLED_BY.values()))


def test_every_mutant_is_killed_by_the_case_for_its_bug(reduced_run):
    assert reduced_run.score == (14, 14), mutation.format_table(reduced_run)
    for m in reduced_run.mutants:
        golden_kills = {case for check, case, _ in m.failed if check == "golden"}
        assert KILLED_BY[m.name] in golden_kills, (m.name, sorted(golden_kills))
    assert reduced_run.ok


def test_a_survivor_is_reported_and_fails_the_command(reduced_run):
    """A mutant no selected case can see (GQA order, with no GQA case) survives, and says so."""
    result = mutation.run(["--case", "self_basic_b2_t8_d16_h4", "--dtype", "float64"], [mutants.GqaTiled])
    assert result.score == (0, 1) and result.twin_passes and not result.ok
    assert "**SURVIVED**" in mutation.format_table(result)
    assert "Mutation score: 0/1" in mutation.format_table(result)


def test_generated_score_covers_every_mutant():
    """docs/generated/mutation.md is current: it names every shipped mutant, each killed."""
    text = (ROOT / "docs" / "generated" / "mutation.md").read_text()
    regenerate = "run: python -m mha_conformance.audit.mutation --markdown docs/generated/mutation.md"
    for cls in mutants.MUTANTS:
        assert f"| `{cls.name}` |" in text, f"{cls.name} missing; {regenerate}"
    total = len(mutants.MUTANTS)
    assert f"Mutation score: {total}/{total} killed; correct twin passes." in text, regenerate
