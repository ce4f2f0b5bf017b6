"""torch.compile(flex_attention) on the CPU reads keys past the end of the key tensor.

Specification: softmax(Q K^T / sqrt(d)) V per (batch, head), no mask (docs/semantics.md, "The
contract"); eager ``flex_attention`` and this script's float64 NumPy reference agree. The output
must not depend on memory outside the inputs.

Found by mha-conformance (case ``single_head_h1_hd16``: batch 2, one head, 8 queries and keys,
head width 16; its verdict changed with what the allocator left after the key tensor), measured
with torch 2.13.0+cpu on an AVX2 CPU. Here the key tensor is a view of a larger buffer whose
tail is NaN: the compiled kernel's last (batch, head) slice comes out NaN. With zeros there it
is right; with ``TORCHINDUCTOR_CPP_SIMDLEN=0`` (no vectorisation) it is right. Key lengths 8,
24 and 40 (8 mod 16) with head widths 8 and 16 read past the end; the other shapes measured do
not (mha-conformance: impls/torch/flex.py, ``reads_past_the_keys``).
Prints REPRODUCED or NOT REPRODUCED and exits 1 or 0 to match.
"""

import sys

import numpy as np
import torch
from torch.nn.attention.flex_attention import flex_attention


def reference(q, k, v):
    """float64 softmax(q k^T / sqrt(d)) v over the last two axes."""
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


shape = (2, 1, 8, 16)  # batch, heads, tokens, head width
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
buffer = np.full(2 * k.size, np.nan, np.float32)  # the key tensor, then NaN that no one passed
buffer[: k.size] = k.ravel()
keys = torch.from_numpy(buffer)[: k.size].view(shape)
expected = reference(*(x.astype(np.float64) for x in (q, k, v)))
compiled = torch.compile(flex_attention, fullgraph=True, dynamic=False)
got = compiled(torch.from_numpy(q), keys, torch.from_numpy(v)).double().numpy()
err = np.abs(np.nan_to_num(got - expected, nan=np.inf))
at = tuple(int(i) for i in np.unravel_index(int(err.argmax()), err.shape))
print(f"torch {torch.__version__}; q, k, v {shape} float32; largest |difference| {err.max():.3g} at {at}")
print(f"  got {got[at]:.6g}, expected {expected[at]:.6g}; per batch row: {err.max(axis=(1, 2, 3))}")
if err.max() > 1e-4:  # float32 attention over 8 keys is good to ~1e-6
    print("REPRODUCED: compiled FlexAttention's output depends on memory past the key tensor")
    sys.exit(1)
print("NOT REPRODUCED: compiled FlexAttention matches the reference")
