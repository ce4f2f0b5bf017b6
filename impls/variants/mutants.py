"""Deliberately wrong multi-head attention: the suite's mutation score (docs/checks.md, "Mutation score").

Each mutant is a real adapter: :class:`Correct` (float64 NumPy, ``impls.conventions.attention``
under the reference conventions) with exactly one bug, the way people actually get attention
wrong. ``python -m mha_conformance.audit.mutation`` runs the suite against all of them and the correct
twin; every mutant must be killed (fail at least one test) and the twin must pass. A mutant
that survives is a gap in the catalogue or the tolerance, to be fixed there.

Use one alone as ``--adapter impls.mutants:NoScale``. They are not built-ins: nothing here is
an implementation anyone should ship. Every computation is in float64 and rounded once to the
requested dtype, so the only error a mutant carries is its bug (the float32-softmax mutant's
bug is precisely a lower-precision step).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np

from mha_conformance.impls.adapter import ALL_DTYPES, Adapter, Prepared
from mha_conformance.impls.variants.conventions import KERNEL_BUGS, REFERENCE, Convention, attention


def _numpy_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


class Correct(Adapter):
    """The correct twin: what every mutant is, minus its bug. It must pass every test."""

    name = "mutant-correct-twin"
    path = "float64 NumPy MHA (impls.conventions) under the reference conventions, rounded once to the dtype"
    dtypes = ALL_DTYPES
    variants = frozenset({"attn_bias", "softcap", "window", "kv_lengths"})
    convention: ClassVar[Convention] = REFERENCE
    #: The bug in one line, for the mutation table.
    bug: ClassVar[str] = "none (the correct twin)"
    #: A storage bug: (the call dtype it strikes, the tensors it narrows, the dtype they are kept in).
    narrowed: ClassVar[tuple[str, tuple[str, ...], str] | None] = None

    def keep(self, tensors: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
        """The tensors as the implementation holds them: the twin holds them as given."""
        if self.narrowed is None or self.narrowed[0] != dtype:
            return dict(tensors)
        _, names, narrow = self.narrowed
        return {
            n: a.astype(_numpy_dtype(narrow)).astype(a.dtype) if n in names or n[:2] in names else a
            for n, a in tensors.items()
        }

    def prepare(
        self, case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str, device: str
    ) -> Prepared:
        weights = self.keep({n: a for n, a in case.items() if n[:2] in ("w_", "b_")}, dtype)
        rng = np.random.default_rng(0)

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            held = self.keep({n: a for n, a in inputs.items() if n != "mask"}, dtype)
            out = attention({**weights, **inputs, **held}, spec, self.convention, rng)["output"]
            return {"output": out.astype(_numpy_dtype(dtype))}

        return run

    def prepare_training(
        self, case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str, device: str
    ) -> Prepared:
        """Training mode: dropout(spec["dropout"]) on the attention weights with 1/(1-p) rescaling."""
        twin = type(self)()
        twin.convention = replace(self.convention, dropout=True)  # type: ignore[misc]
        return twin.prepare(case, spec, dtype, device)


def _mutant(cls_name: str, name: str, bug: str, **knobs: Any) -> type[Correct]:
    return type(
        cls_name,
        (Correct,),
        {
            "name": name,
            "bug": bug,
            "convention": replace(REFERENCE, **knobs),
            "path": f"the correct twin with one bug: {bug}",
            "__doc__": f"Mutant: {bug}.",
        },
    )


NoScale = _mutant("NoScale", "mutant-no-scale", "scores not scaled (scale 1)", scale="one")
ScaleByD = _mutant(
    "ScaleByD", "mutant-scale-by-d", "scores scaled by 1/d instead of 1/sqrt(d)", scale="inv_d"
)
CausalOffByOne = _mutant(
    "CausalOffByOne",
    "mutant-causal-off-by-one",
    "causal mask lets each query see one future key",
    causal="off_by_one",
)
CausalIgnored = _mutant("CausalIgnored", "mutant-causal-ignored", "causal flag ignored", causal="ignored")
MaskInverted = _mutant(
    "MaskInverted", "mutant-mask-inverted", "bool mask read as True = blocked", mask="true_blocks"
)
SoftmaxWrongAxis = _mutant(
    "SoftmaxWrongAxis", "mutant-softmax-wrong-axis", "softmax over queries instead of keys", softmax_axis=-2
)
HeadsNotTransposed = _mutant(
    "HeadsNotTransposed",
    "mutant-heads-not-transposed",
    "heads merged by reshape [B,H,T,d] -> [B,T,H*d] without transposing back",
    merge="reshape",
)
GqaTiled = _mutant(
    "GqaTiled",
    "mutant-gqa-tiled",
    "GQA kv heads tiled (h % Hkv) instead of repeated (h // group)",
    gqa="tile",
)
KeysWithValueWeights = _mutant(
    "KeysWithValueWeights",
    "mutant-keys-value-weights",
    "keys projected with the value weights",
    key_weights="v",
)
Float32Softmax = _mutant(
    "Float32Softmax",
    "mutant-float32-softmax",
    "softmax in float32 (inside a float64 run)",
    softmax_float32=True,
)
NanEmptyRows = _mutant(
    "NanEmptyRows", "mutant-nan-empty-rows", "NaN for a query row with no allowed key", empty_rows="nan"
)
DropoutInEval = _mutant(
    "DropoutInEval", "mutant-dropout-in-eval", "dropout applied in eval mode", dropout=True
)
RelError1e3 = _mutant("RelError1e3", "mutant-rel-error-1e-3", "output off by 1e-3 relative", rel_error=1e-3)
NoBiases = _mutant("NoBiases", "mutant-no-biases", "biases ignored", biases=False)


def _narrowing(
    cls_name: str, name: str, bug: str, narrowed: tuple[str, tuple[str, ...], str]
) -> type[Correct]:
    return type(
        cls_name,
        (Correct,),
        {
            "name": name,
            "bug": bug,
            "narrowed": narrowed,
            "path": f"the correct twin with one bug: {bug}",
            "__doc__": f"Mutant: {bug}.",
        },
    )


#: Storage precision: a tensor kept in a narrower dtype than the call asks for (the golden cases
#: whose inputs are exact in bfloat16 cannot see these; the precision-exposing cases can).
WeightsBfloat16InFloat32 = _narrowing(
    "WeightsBfloat16InFloat32",
    "mutant-weights-bf16-in-float32",
    "weights and biases kept in bfloat16 inside a float32 call",
    ("float32", ("w_", "b_"), "bfloat16"),
)
InputsFloat32InFloat64 = _narrowing(
    "InputsFloat32InFloat64",
    "mutant-inputs-f32-in-float64",
    "inputs and weights kept in float32 inside a float64 call (only the arithmetic is float64)",
    ("float64", ("query", "key", "value", "w_", "b_"), "float32"),
)
Float16FromBfloat16 = _narrowing(
    "Float16FromBfloat16",
    "mutant-f16-from-bf16-inputs",
    "a float16 call computed from bfloat16-rounded inputs and weights",
    ("float16", ("query", "key", "value", "w_", "b_"), "bfloat16"),
)

#: Kernels' shape-dependent bugs (``conventions.KERNEL_BUGS``): exact on every shape but their own,
#: so the committed catalogue cannot see them and the kernel tier must (``--kernel-scale``).
TailTileDropped = _mutant(
    "TailTileDropped",
    "mutant-tail-tile-dropped",
    KERNEL_BUGS["tail_tile_dropped"],
    kernel="tail_tile_dropped",
)
TailTileUnmasked = _mutant(
    "TailTileUnmasked",
    "mutant-tail-tile-unmasked",
    KERNEL_BUGS["tail_tile_unmasked"],
    kernel="tail_tile_unmasked",
)
PartialQueryTileOffset = _mutant(
    "PartialQueryTileOffset",
    "mutant-partial-query-tile-offset",
    KERNEL_BUGS["partial_query_tile_offset"],
    kernel="partial_query_tile_offset",
)
HeadDimPaddingGarbage = _mutant(
    "HeadDimPaddingGarbage",
    "mutant-head-dim-padding-garbage",
    KERNEL_BUGS["head_dim_padding_garbage"],
    kernel="head_dim_padding_garbage",
)
HeadDimTruncated = _mutant(
    "HeadDimTruncated",
    "mutant-head-dim-truncated",
    KERNEL_BUGS["head_dim_truncated"],
    kernel="head_dim_truncated",
)
SplitKNoRescale = _mutant(
    "SplitKNoRescale",
    "mutant-split-k-no-rescale",
    KERNEL_BUGS["split_k_no_rescale"],
    kernel="split_k_no_rescale",
)
WindowEdgeOffByOne = _mutant(
    "WindowEdgeOffByOne",
    "mutant-window-edge-off-by-one",
    KERNEL_BUGS["window_edge_off_by_one"],
    kernel="window_edge_off_by_one",
)
LengthEdgeOffByOne = _mutant(
    "LengthEdgeOffByOne",
    "mutant-length-edge-off-by-one",
    KERNEL_BUGS["length_edge_off_by_one"],
    kernel="length_edge_off_by_one",
)
KERNEL_MUTANTS: tuple[type[Correct], ...] = (
    TailTileDropped,
    TailTileUnmasked,
    PartialQueryTileOffset,
    HeadDimPaddingGarbage,
    HeadDimTruncated,
    SplitKNoRescale,
    WindowEdgeOffByOne,
    LengthEdgeOffByOne,
)

#: Every mutant, in the issue's order; ``Correct`` is the twin that must pass.
MUTANTS: tuple[type[Correct], ...] = (
    NoScale,
    ScaleByD,
    CausalOffByOne,
    CausalIgnored,
    MaskInverted,
    SoftmaxWrongAxis,
    HeadsNotTransposed,
    GqaTiled,
    KeysWithValueWeights,
    Float32Softmax,
    NanEmptyRows,
    DropoutInEval,
    RelError1e3,
    NoBiases,
    WeightsBfloat16InFloat32,
    InputsFloat32InFloat64,
    Float16FromBfloat16,
)


def ref(cls: type[Adapter]) -> str:
    """The ``--adapter`` value that loads ``cls``."""
    return f"{__name__}:{cls.__name__}"
