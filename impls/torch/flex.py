"""``torch-flex`` and ``torch-flex-compiled``: explicit projections plus
``torch.nn.attention.flex_attention``, eager and under ``torch.compile``.

FlexAttention states attention as two functions: a ``score_mod(score, b, h, q_idx, kv_idx)``
applied to each scaled score, and a ``mask_mod(b, h, q_idx, kv_idx)`` compiled into a
``BlockMask``. Every variant of contract v2 is one of them:

* ``score_mod``: the softcap ``c * tanh(score / c)``, then the additive ``attn_bias`` (ALiBi and
  T5 biases are such tensors), indexed by the batch and head it broadcasts along;
* ``mask_mod``: the case's bool mask, the causal rule, the window and the per-batch key lengths,
  each row bottom-right aligned to its own length, and the bias's ``-inf`` entries.

Grouped-query attention is ``enable_gqa``. Eager FlexAttention runs on the CPU unfused (about
2 s for a first call); its backward is not implemented on the CPU (torch 2.13 raises
"FlexAttention does not support backward on CPU"), so gradients are a skip there with that
reason, and run on cuda. Decoding goes through a block mask over a cache of the case's full
length: each step's lone query attends the keys fed so far (a ``mask_mod`` term), at its
position, so every step has the same shapes.

``torch-flex-compiled`` runs ``torch.compile(flex_attention, fullgraph=True, dynamic=False)``:
inductor's fused FlexAttention kernel (a C++ template on the CPU, Triton on cuda), a different
implementation from the eager one. One compiled function serves the process; dynamo keeps one
graph per structure (shapes, dtype, which mods) and the mods read every per-call value (the
decoding step, key lengths, mask, bias) and the case's integers (query length, window, causal)
from tensors, so a new step, input or window never recompiles (eager FlexAttention traces its
call with dynamo too: 108 traces for the golden forwards instead of 160, outputs bit for bit
the same; 84 with its sizes traced symbolically, :meth:`TorchFlex.tracing`). Compiled code goes
to the inductor cache (``MHA_CACHE_DIR``, :func:`inductor_cache`), so a second run compiles nothing; each result's meta says whether
its call compiled, hit the cache or reused the process's graph. Shapes are static: torch 2.13's
dynamic-shape CPU template fails to build for head widths of 16 and more (a C++ compile error,
``cur_qSplitSize4`` undeclared; docs/findings.md), and the inductor CPU template takes float32,
float16 and bfloat16 only, so float64 is a skip on the CPU with that reason.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mha_conformance.impls import cache
from mha_conformance.impls.adapter import Arrays, Divergence, Prepared, Spec
from mha_conformance.impls.torch.common import TorchAdapter, input_leaves, merge_and_project, project_heads
from mha_conformance.impls.torch.convert import import_torch, to_numpy, to_torch
from mha_conformance.impls.torch.timed import Built, bench_inputs


def inductor_cache() -> Path:
    """Point inductor's caches at ``<cache root>/torchinductor`` (``impls/cache.py``; before the
    first compile) and return it. The suite's ``MHA_CACHE_DIR`` decides: torch writes its own
    default (``/tmp/torchinductor_<user>``) into ``TORCHINDUCTOR_CACHE_DIR`` the first time
    anything asks, so that variable cannot tell a user's choice from torch's."""
    path = cache.folder("torchinductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def probe_cpu_compiler() -> None:
    """Point inductor at the suite's cache (:func:`inductor_cache`) and let it probe the CPU's
    vector instructions now. The first CPU kernel a process compiles or loads first builds and
    loads a test library per instruction set (``valid_vec_isa_list``: ~1.2 s of compiler and
    child processes here, kept in the process). Run before asv forks a benchmark process
    (``benchmarks/common.py``, ``PRELOADS``), it is paid once per run, not per process. It starts
    no thread and runs no torch operation: only child processes, which have ended."""
    inductor_cache()
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    valid_vec_isa_list()


def _index(tensor, b, h, q_idx, kv_idx):
    """``tensor[b, h, q, kv]`` for a tensor broadcast along its size-1 batch and head axes."""
    zero = b * 0
    return tensor[b if tensor.shape[0] > 1 else zero, h if tensor.shape[1] > 1 else zero, q_idx, kv_idx]


class Mods:
    """The ``score_mod`` and ``BlockMask`` of a case, for calls starting at query row ``row``
    (a tensor: a decoding step's index, 0 for a whole call) with ``q_len`` queries; a
    decoding call also hides the cache beyond its own row. Block masks are kept per mask
    content, bias ``-inf`` pattern and call, so repeated calls build each once."""

    def __init__(self, spec: Mapping[str, Any], device: str):
        t = import_torch()
        self.spec, self.device = spec, device
        lengths = spec.get("kv_lengths")
        self.ends = t.tensor(
            lengths if lengths is not None else [spec["kv_len"]] * spec["batch"], device=device
        )
        # The case's integers as tensors, so that the mods' code is the same for every case of a
        # structure: dynamo guards on the Python values a traced function reads, so each query
        # length, window or causal flag as a constant would be a trace of its own (eager
        # FlexAttention traces on every new one: ~0.25 s each).
        left, right = spec.get("window") or (-1, -1)
        self.scalars = {
            name: t.tensor(value, dtype=t.int64, device=device)
            for name, value in {"q_len": spec["q_len"], "left": left, "right": right}.items()
        }
        self.causal = t.tensor(bool(spec["causal"]), device=device)
        self.block_masks: dict[tuple, Any] = {}

    def __call__(self, mask, bias, row=None, q_len: int | None = None):
        """``(score_mod or None, block_mask)``; ``row`` None for a whole call."""
        t = import_torch()
        from torch.nn.attention.flex_attention import create_block_mask

        spec, ends, causal = self.spec, self.ends, self.causal
        tq, left, right = self.scalars["q_len"], self.scalars["left"], self.scalars["right"]
        tk, cap = spec["kv_len"], spec.get("softcap")
        decoding = row is not None
        first = row if decoding else t.zeros((), dtype=t.int64, device=self.device)

        def score_mod(score, bb, hh, q_idx, kv_idx):
            if cap is not None:
                score = cap * t.tanh(score / cap)
            if bias is not None:
                score = score + _index(bias, bb, hh, q_idx + first, kv_idx)
            return score

        def mask_mod(bb, hh, q_idx, kv_idx):
            at = q_idx + first  # the query's row in the case
            position = at + ends[bb] - tq  # its position among its row's keys
            ok = kv_idx < ends[bb]
            if decoding:
                ok = ok & (kv_idx <= at)  # the cache holds tokens 0..row (a prefill: each query its own)
            ok = ok & (~causal | (kv_idx <= position))
            ok = ok & ((left < 0) | (kv_idx >= position - left))
            ok = ok & ((right < 0) | (kv_idx <= position + right))
            if mask is not None:
                ok = ok & _index(mask, bb, hh, at if mask.shape[2] > 1 else at * 0, kv_idx)
            if bias is not None:
                ok = ok & (_index(bias, bb, hh, at, kv_idx) != float("-inf"))
            return ok

        q_len = spec["q_len"] if q_len is None else q_len
        key = (  # what the block mask depends on: the mask, the bias's -inf entries, the call
            None if mask is None else mask.cpu().numpy().tobytes(),
            None if bias is None else t.isneginf(bias.detach()).cpu().numpy().tobytes(),
            None if row is None else int(row),
            q_len,
        )
        if key not in self.block_masks:
            self.block_masks[key] = create_block_mask(
                mask_mod, spec["batch"], spec["num_heads"], q_len, tk, device=self.device
            )
        return (score_mod if cap is not None or bias is not None else None), self.block_masks[key]


class TorchFlex(TorchAdapter):
    name = "torch-flex"
    path = (
        "x @ W + b projections, torch.nn.attention.flex_attention eager: score_mod (softcap, bias), "
        "BlockMask from mask_mod (causal, window, lengths, mask), enable_gqa"
    )
    variants = frozenset({"attn_bias", "softcap", "window", "kv_lengths"})
    mode = "eager"

    def flex(self):
        """The FlexAttention callable this adapter runs."""
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention

    def call_meta(self, before: Any) -> dict[str, str]:
        """What a call ran, for the result's meta (``before``: :meth:`state` before the call)."""
        return {"flex_attention": self.mode}

    def state(self) -> Any:
        return None

    def attend(self, params, query, key, value, spec: Mapping[str, Any], mods, mask, bias, row=None):
        """Projections, FlexAttention over ``key``/``value`` and the output projection, on tensors."""
        h, hkv = spec["num_heads"], spec["num_kv_heads"]
        q = project_heads(params, query, "q", h, spec["head_dim"])
        score_mod, block_mask = mods(mask, bias, row, q.shape[2])
        with self.tracing():
            ctx = self.flex()(
                q,
                key,
                value,
                score_mod=score_mod,
                block_mask=block_mask,
                scale=spec["scale"],
                enable_gqa=hkv != h,
            )
        return merge_and_project(params, ctx, spec)

    def tracing(self) -> contextlib.AbstractContextManager:
        """How dynamo traces the eager call (eager FlexAttention wraps its operation in
        ``torch.compile``): every size symbolic from the first call, sizes of 1 included
        (dynamo's ``assume_static_by_default`` off, ``backed_size_oblivious`` on), so that a new
        batch, length or broadcast size reuses a trace. The golden forwards trace 84 times
        instead of 108 (25 s of calls instead of 28 s); every verdict figure of the adapter's full
        run is the same. What still traces anew is a new dtype, head count or head width
        (FlexAttention marks those static) or a new set of mods."""
        t = import_torch()
        from torch.fx.experimental import _config as fx_config

        stack = contextlib.ExitStack()
        stack.enter_context(t._dynamo.config.patch(assume_static_by_default=False))
        stack.enter_context(fx_config.patch(backed_size_oblivious=True))
        return stack

    def forward(self, params, query, key, value, spec: Mapping[str, Any], mods, mask, bias):
        """The whole call: key and value projections, then :meth:`attend`."""
        hkv, hd, hdv = spec["num_kv_heads"], spec["head_dim"], spec["v_head_dim"]
        k, v = project_heads(params, key, "k", hkv, hd), project_heads(params, value, "v", hkv, hdv)
        return self.attend(params, query, k, v, spec, mods, mask, bias)

    @staticmethod
    def extras(inputs: Mapping[str, np.ndarray], dtype: str, device: str, grad: bool = False):
        """The case's bool mask and additive bias as tensors (None where absent)."""
        t = import_torch()
        mask = inputs.get("mask")
        mask = None if mask is None else t.from_numpy(np.ascontiguousarray(mask)).to(device)
        bias = inputs.get("attn_bias")
        bias = None if bias is None else to_torch(bias, dtype, device, requires_grad=grad)
        return mask, bias

    def prepare(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        t = import_torch()
        params = {n: to_torch(a, dtype, device) for n, a in case.items() if n[:2] in ("w_", "b_")}
        mods = Mods(spec, device)

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            q, k, v = (to_torch(inputs[n], dtype, device) for n in ("query", "key", "value"))
            before = self.state()
            with t.no_grad():
                out = self.forward(params, q, k, v, spec, mods, *self.extras(inputs, dtype, device))
            return {"output": to_numpy(out, dtype, device), "meta": self.call_meta(before)}

        return run

    def prepare_backward(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        """Autograd through the same computation; the bias is a leaf, for ``grad_attn_bias``."""
        if device == "cpu":
            raise NotImplementedError(
                f"FlexAttention has no backward on the CPU (torch {import_torch().__version__}: 'FlexAttention "
                "does not support backward on CPU'); gradients run on cuda"
            )
        names = [n for n in case if n[:2] in ("w_", "b_")]
        mods = Mods(spec, device)

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            leaves = {n: to_torch(case[n], dtype, device, requires_grad=True) for n in names}
            leaves.update(input_leaves(inputs, dtype, device))
            mask, bias = self.extras(inputs, dtype, device, grad=True)
            if bias is not None:
                leaves["attn_bias"] = bias
            out = self.forward(
                leaves, leaves["query"], leaves["key"], leaves["value"], spec, mods, mask, bias
            )
            out.backward(to_torch(inputs["grad_output"], dtype, device))
            return {f"grad_{n}": to_numpy(leaf.grad, dtype, device) for n, leaf in leaves.items()}

        return run

    def prepare_decoder(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Callable[[], Prepared]:
        """A cache of projected keys and values of the case's full length; each call writes its
        rows (one token's, or a prefill's) and each of its queries attends rows 0 to its own
        through the block mask, with the case's score_mod."""
        t = import_torch()
        params = {n: to_torch(a, dtype, device) for n, a in case.items() if n[:2] in ("w_", "b_")}
        mask, bias = self.extras(case, dtype, device)
        mods = Mods(spec, device)
        b, tk = spec["batch"], spec["kv_len"]
        hkv, hd, hdv = spec["num_kv_heads"], spec["head_dim"], spec["v_head_dim"]

        def new_stream() -> Prepared:
            keys = t.zeros(b, hkv, tk, hd, dtype=params["w_k"].dtype, device=device)
            values = t.zeros(b, hkv, tk, hdv, dtype=params["w_v"].dtype, device=device)
            fed = [0]

            def step(token: Mapping[str, np.ndarray]) -> dict[str, Any]:
                row, n = fed[0], token["query"].shape[1]  # n > 1: a prefill
                before = self.state()
                with t.no_grad():
                    x = {name: to_torch(token[name], dtype, device) for name in ("query", "key", "value")}
                    keys[:, :, row : row + n] = project_heads(params, x["key"], "k", hkv, hd)
                    values[:, :, row : row + n] = project_heads(params, x["value"], "v", hkv, hdv)
                    at = t.tensor(row, device=device)
                    out = self.attend(params, x["query"], keys, values, spec, mods, mask, bias, row=at)
                fed[0] = row + n
                meta = {"cache_length": str(row + n), **self.call_meta(before)}
                return {"output": to_numpy(out, dtype, device), "meta": meta}

            return step

        return new_stream

    def timed_body(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Built:
        """The projections and FlexAttention on tensors put on the device once (block mask built
        in setup), under ``no_grad``; gradients on devices with a FlexAttention backward."""
        t = import_torch()
        mods = Mods(spec, device)

        def weights(grad: bool) -> dict[str, Any]:
            return {
                n: to_torch(a, dtype, device, requires_grad=grad)
                for n, a in case.items()
                if n[:2] in ("w_", "b_")
            }

        params, (q, k, v) = weights(False), bench_inputs(spec, case, dtype, device, grad=False)
        mask, bias = self.extras(case, dtype, device)

        def forward():
            with t.no_grad():
                return self.forward(params, q, k, v, spec, mods, mask, bias)

        def graph():
            leaves = bench_inputs(spec, case, dtype, device, grad=True)
            return self.forward(weights(True), *leaves, spec, mods, mask, bias)

        return forward, None if device == "cpu" else graph


_COMPILED: list[Any] = []


def reads_past_the_keys(spec: Spec) -> bool:
    """Key length 8 mod 16 and head width 8 or 16 (inductor's CPU template reads keys past the key tensor)."""
    return spec["kv_len"] % 16 == 8 and spec["head_dim"] in (8, 16)


class TorchFlexCompiled(TorchFlex):
    name = "torch-flex-compiled"
    path = (
        "x @ W + b projections, torch.compile(flex_attention, dynamic=False): inductor's fused kernel with the "
        "same score_mod and BlockMask, inductor cache in MHA_CACHE_DIR"
    )
    mode = "compiled"
    divergences = (
        Divergence(
            "inductor's vectorised CPU FlexAttention template (torch 2.13.0+cpu, AVX2) reads keys past the end "
            "of the key tensor at key lengths 8 mod 16 with head widths 8 and 16: the last (batch, head) "
            "slice then depends on whatever memory follows the keys (NaN after a NaN tail, right after "
            "zeros; measured over key lengths 1-64 and head widths 4-128). Not a semantic choice: the "
            "verdict would change with the allocator",
            check="golden",
            device="cpu",
            when=reads_past_the_keys,
            upstream="docs/repro/torch_flex_compiled_cpu_kv8.py",
        ),
    )

    def supports(self, spec: Spec, dtype: str, device: str) -> str | None:
        if device == "cpu" and dtype == "float64":
            return (
                f"inductor's CPU FlexAttention kernel takes float32, float16 and bfloat16 only (torch "
                f"{import_torch().__version__}: '`torch.float` , `torch.float16` and `torch.bfloat16` are "
                "supported in FlexAttention for CPU device'); float64 runs eager in torch-flex"
            )
        return super().supports(spec, dtype, device)

    def flex(self):
        """One ``torch.compile(flex_attention)`` per process, whole-graph (a graph break would
        fall back to eager silently) and never past the recompile limit silently."""
        if not _COMPILED:
            t = import_torch()
            from torch.nn.attention.flex_attention import flex_attention

            inductor_cache()
            config = t._dynamo.config
            config.recompile_limit = config.accumulated_recompile_limit = 100_000
            config.fail_on_recompile_limit_hit = True
            _COMPILED.append(t.compile(flex_attention, fullgraph=True, dynamic=False))
        return _COMPILED[0]

    def tracing(self) -> contextlib.AbstractContextManager:
        """Static shapes, as compiled (``dynamic=False``)."""
        return contextlib.nullcontext()

    def state(self) -> Any:
        from torch._dynamo.utils import counters

        return dict(counters["inductor"])

    def call_meta(self, before: Any) -> dict[str, str]:
        """``inductor``: ``compiled`` (a cache miss), ``cache hit`` (a graph another run
        compiled) or ``reused`` (this process's graph), from inductor's counters."""
        after = self.state()

        def grew(name: str) -> bool:
            return after.get(name, 0) > before.get(name, 0)

        how = (
            "compiled"
            if grew("fxgraph_cache_miss")
            else "cache hit"
            if grew("fxgraph_cache_hit")
            else "reused"
        )
        return {"flex_attention": self.mode, "inductor": how}
