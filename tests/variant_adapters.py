"""Adapters for the contract-v2 variants: a correct one written as loops (``tests.loop_impls``), and
one per way of getting a variant wrong, so ``tests/test_variants.py`` can show each verdict fails."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from mha_conformance.impls import reference
from tests.faulty_adapters import Faulty, _f64
from tests.loop_impls import _may_attend, per_head


def _loops(may_attend=_may_attend, softcap_last: bool = False, drop_bias: bool = False):
    def adapter(case, spec, dtype, device):
        f64 = {k: v if v.dtype == np.bool_ else v.astype(np.float64) for k, v in case.items()}
        if drop_bias:
            f64.pop("attn_bias", None)
        out, _ = per_head(spec, f64, may_attend, softcap_last)
        return {"output": out.astype(case["query"].dtype)}

    adapter.variants = reference.VARIANTS
    return adapter


def _top_left(spec, t, b, h, i, j):
    """Causal and window aligned to the first key (query i at position i), as ONNX without a cache."""
    length = spec["kv_len"] if spec.get("kv_lengths") is None else spec["kv_lengths"][b]
    return _may_attend({**spec, "q_len": length}, t, b, h, i, j)


#: The correct loops, every variant.
loops = _loops()
#: The softcap applied after the bias (the bias capped too).
softcap_after_bias = _loops(softcap_last=True)
#: Causal and the window aligned top-left instead of bottom-right.
top_left = _loops(_top_left)
#: Per-batch key lengths ignored.
lengths_ignored = _loops(lambda spec, t, b, h, i, j: _may_attend({**spec, "kv_lengths": None}, t, b, h, i, j))
#: The additive bias ignored (its -inf entries too).
bias_ignored = _loops(drop_bias=True)


class WrongGradient(Faulty):
    """The reference backward with one step of it done wrong (:meth:`wrong`)."""

    def wrong(self, given: dict, spec) -> reference.Forward | None:
        """Change ``given`` in place, or return the (altered) forward the backward should reuse."""
        return None

    def prepare_backward(self, case, spec, dtype, device):
        weights = _f64({n: a for n, a in case.items() if n[:2] in ("w_", "b_")})

        def run(inputs):
            given = {**weights, **_f64({n: a for n, a in inputs.items() if n != "grad_output"})}
            fw = self.wrong(given, spec)
            grads = reference.backward(given, spec, inputs["grad_output"].astype(np.float64), fw=fw)
            return {n: g.astype(inputs["query"].dtype) for n, g in grads.items()}

        return run


class SoftcapGradientIgnored(WrongGradient):
    """Gradients through the softcap as if it were the identity (1 - tanh^2 left out)."""

    name = "softcap-gradient-ignored"

    def wrong(self, given, spec):
        fw = reference.forward(given, spec)
        return fw if fw.capped is None else replace(fw, capped=np.zeros_like(fw.capped))


class BiasGradientNotSummed(WrongGradient):
    """The bias gradient of the bias broadcast to [B, H, Tq, Tk], not summed back to the bias's shape."""

    name = "bias-gradient-not-summed"

    def wrong(self, given, spec):
        if "attn_bias" in given:
            full = (spec["batch"], spec["num_heads"], spec["q_len"], spec["kv_len"])
            given["attn_bias"] = np.broadcast_to(given["attn_bias"], full).copy()
        return None
