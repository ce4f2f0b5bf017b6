"""The decoding check: feeding one token at a time through an adapter's KV cache gives the full
causal pass's golden output (``Adapter.prepare_decoder``). A kernel-scale case with
``decode_prefill`` fills the cache with one call of that many tokens first, as serving does."""

from __future__ import annotations

from mha_conformance.checks.skeleton import Check, Expected, Run, forward_shapes
from mha_conformance.tolerance import Verdict, judge_tensor


class Decoding(Check):
    name = "decoding"
    selector = "test_decoding"

    def applies(self, spec) -> bool:
        """Causal self-attention without an extra mask or per-batch lengths, short enough to step
        through token by token or filled by one prefill call (a softcap, a window and a bias apply
        in every step)."""
        return (
            spec["causal"]
            and spec["self_attention"]
            and spec["mask"] is None
            and spec.get("kv_lengths") is None
            and (2 <= spec["q_len"] <= 64 or bool(spec.get("decode_prefill")))
            and not spec["fully_masked_rows"]
        )

    def runs(self, case, dtype):
        return [Run("decode", case)]

    def expected(self, case, run):
        return {"output": Expected(forward_shapes(case.spec)["output"])}

    def judge(self, case, runs, results, dtype, k) -> tuple[list[Verdict], str]:
        (result,) = results
        return [judge_tensor(result["output"], case, "output", dtype, k)], "differs from the full causal pass"

    def what(self) -> str:
        return ", decoding token by token (after one prefill call, where the case has one)"


DECODING = Decoding()
