"""The gradients check: an adapter's backward against the golden gradients.

The adapter returns the gradients of ``sum(output * grad_output)`` (``grad_output`` from the
case) with respect to query, key, value, weights and biases; each one the case holds
(``spec["gradients"]``) is judged with the same rule as the forward, against the per-dtype
gradient baselines the generator stores. A gradient the case holds but the adapter does not
return fails; one for a tensor the case does not have (a zero bias the module needed) fails
too, since no caller could map it to anything; one the case has but does not store (the wide
cases keep only input gradients) is not judged.
"""

from __future__ import annotations

from mha_conformance.checks.skeleton import Check, Expected, Run
from mha_conformance.tolerance import Verdict, judge_tensor


class Gradients(Check):
    name = "gradients"
    selector = "test_gradients"

    def applies(self, spec) -> bool:
        """Every case that holds a gradient (a kernel-scale case for the forward alone holds none)."""
        return bool(spec["gradients"])

    def runs(self, case, dtype):
        return [Run("backward", case)]

    def expected(self, case, run):
        held = set(case.spec["gradients"])
        return {
            f"grad_{n}": Expected(a.shape, f"grad_{n}" in held)
            for n, a in case.inputs().items()
            if n != "mask"
        }

    def extra(self, case, run, names):
        unknown = sorted(names)
        if not unknown:
            return []
        return [
            f"unexpected {n!r} in the result: the case has no such tensor (a gradient for a bias "
            "filled with zeros because the case has none must not be returned)"
            for n in unknown
        ]

    def judge(self, case, runs, results, dtype, k) -> tuple[list[Verdict], str]:
        (result,) = results
        return [
            judge_tensor(result[n], case, n, dtype, k) for n in case.spec["gradients"]
        ], "gradients differ"

    def what(self) -> str:
        return ", gradients"


GRADIENTS = Gradients()


#: ``check_gradients(adapter, case_id, dtype, device, k=..., record=..., runner=..., root=...)``
check_gradients = GRADIENTS.on
