"""The suite kills every deliberately wrong implementation and passes their correct twin.

The full score (README, "Mutation score") comes from ``python -m conformance.mutation`` over the
whole catalogue; here the suite runs once, in a subprocess as a user would, on five cases in
float64: enough that each mutant dies on the case made for its bug, in seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conformance import mutation
from impls import mutants

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


@pytest.fixture(scope="module")
def reduced_run() -> mutation.MutationRun:
    cases = sorted(set(KILLED_BY.values()))
    return mutation.run([a for c in cases for a in ("--case", c)] + ["--dtype", "float64"])


def test_every_mutant_of_the_issue_exists():
    assert {m.name for m in mutants.MUTANTS} == set(KILLED_BY)
    assert len(mutants.MUTANTS) == 14


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


def test_readme_reports_every_mutant():
    text = (ROOT / "README.md").read_text()
    assert "## Mutation score" in text
    for name in KILLED_BY:
        assert f"`{name}`" in text, name
