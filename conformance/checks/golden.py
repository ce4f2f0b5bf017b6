"""The golden check: an adapter's output (and attention weights, if it returns them) against the
golden expectations, tensor by tensor, with the tolerance rule."""

from __future__ import annotations

from mha_conformance.checks.skeleton import Check, Expected, Run, forward_shapes
from mha_conformance.tolerance import Verdict, judge_tensor


class Golden(Check):
    name = "golden"
    selector = "test_golden"

    def runs(self, case, dtype):
        return [Run("forward", case)]

    def expected(self, case, run):
        shapes = forward_shapes(case.spec)
        return {"output": Expected(shapes["output"]), "attn_weights": Expected(shapes["attn_weights"], False)}

    def judge(self, case, runs, results, dtype, k) -> tuple[list[Verdict], str]:
        (result,) = results
        verdicts = [  # a kernel-scale case too large to store its attention weights judges the output alone
            judge_tensor(result[n], case, n, dtype, k)
            for n in ("output", "attn_weights")
            if n in result and n in case.tensors
        ]
        return verdicts, "differs from the golden expectations"


GOLDEN = Golden()


#: ``check_golden(adapter, case_id, dtype, device, k=..., record=..., runner=..., root=...)``
check_golden = GOLDEN.on
