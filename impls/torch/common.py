"""What the PyTorch adapters share: devices, dtypes, conversions and the causal mask."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from mha_conformance.impls.adapter import Adapter, Arrays, Spec, rule_mask
from mha_conformance.impls.bench import Bench
from mha_conformance.impls.torch import timed
from mha_conformance.impls.torch.convert import import_torch, to_torch

TORCH_DTYPES = ("float64", "float32", "float16", "bfloat16")


class TorchAdapter(Adapter):
    """Base for adapters that run PyTorch: cpu always, cuda and mps when torch sees them."""

    framework = "torch"
    extra = "torch"
    device_kinds = ("cpu", "cuda", "mps")

    def devices(self) -> list[str]:
        t = import_torch()
        found = ["cpu"]
        if t.cuda.is_available():
            found.append("cuda")
        if getattr(t.backends, "mps", None) is not None and t.backends.mps.is_available():
            found.append("mps")
        return found

    def device_unavailable(self, device: str) -> str | None:
        if device == "cuda" and device not in self.devices():
            t = import_torch()
            build = f"CUDA {t.version.cuda}" if t.version.cuda else "a CPU-only build"
            return f"cuda requested but torch.cuda.is_available() is False (torch {t.__version__}, {build})"
        return super().device_unavailable(device)

    def device_name(self, device: str) -> str:
        t = import_torch()
        if device == "cuda":
            return t.cuda.get_device_name(t.cuda.current_device())
        return "Apple MPS" if device == "mps" else super().device_name(device)

    def supports(self, spec: Spec, dtype: str, device: str) -> str | None:
        if device == "mps" and dtype == "float64":
            return "MPS has no float64"
        return None

    def versions(self) -> dict[str, str]:
        t = import_torch()
        return {
            "torch": t.__version__,
            "threads": str(t.get_num_threads()),
            "cpu_capability": t.backends.cpu.get_cpu_capability(),
            "mkldnn": str(t.backends.mkldnn.enabled),
        }

    def bench(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Bench:
        """The timed path: :meth:`timed_body` under the common driver (``impls/torch/timed.py``)."""
        return timed.bench(self, case, spec, dtype, device)

    def timed_body(self, case: Arrays, spec: Spec, dtype: str, device: str) -> timed.Built:
        """(forward closure, graph builder) over device tensors prepared once (``impls/torch/timed.py``)."""
        raise NotImplementedError(f"{self.name} has no timed body (TorchAdapter.timed_body)")


def allowed_mask(spec: Mapping[str, Any], mask: np.ndarray | None, device: str):
    """Bool [B|1, H|1, Tq, Tk] on ``device``, True = may attend: the case mask AND the causal rule
    ``j <= i + (Tk - Tq)`` (bottom-right aligned), each row's ``kv_lengths`` and the ``window``
    (``impls.adapter.rule_mask``). None when nothing is masked."""
    allowed = rule_mask(spec, mask)
    return None if allowed is None else import_torch().from_numpy(np.ascontiguousarray(allowed)).to(device)


def project_heads(params: Mapping[str, Any], x, short: str, heads: int, width: int):
    """``x @ W (+ b)`` with the golden [in, out] weight, as [B, heads, T, width]."""
    y = x @ params[f"w_{short}"]
    if f"b_{short}" in params:
        y = y + params[f"b_{short}"]
    return y.view(x.shape[0], -1, heads, width).transpose(1, 2)


def merge_and_project(params: Mapping[str, Any], ctx, spec: Mapping[str, Any]):
    """Heads [B, H, Tq, hdv] back to [B, Tq, H*hdv], then the output projection the case has."""
    b, _, tq, _ = ctx.shape
    out = ctx.transpose(1, 2).reshape(b, tq, spec["num_heads"] * spec["v_head_dim"])
    if spec["out_proj"]:
        out = out @ params["w_o"]
        if "b_o" in params:
            out = out + params["b_o"]
    return out


def additive_mask(bias, allowed):
    """A float attention mask: the case's ``attn_bias`` (``-inf`` = masked) with ``-inf`` wherever
    ``allowed`` (bool, or None) forbids a key. Differentiable in ``bias``."""
    return bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))


def linear_weight(w: np.ndarray, dtype: str, device: str):
    """A [in, out] golden weight as the [out, in] tensor nn.Linear stores."""
    return to_torch(np.ascontiguousarray(w.T), dtype, device)


def input_leaves(inputs: Mapping[str, np.ndarray], dtype: str, device: str) -> dict[str, Any]:
    """``query``, ``key`` and ``value`` as three separate leaf tensors that require grad: the
    golden gradients treat them as separate arguments even where a self-attention case holds
    one array three times, so each gets its own ``.grad``."""
    return {n: to_torch(inputs[n], dtype, device, requires_grad=True) for n in ("query", "key", "value")}


@contextlib.contextmanager
def feed_projections(feeds: Mapping[Any, Any]) -> Iterator[None]:
    """While active, each projection module in ``feeds`` reads its given tensor instead of the
    one its caller passes (a forward pre-hook): a module that projects one sequence into
    queries, keys and values then gives each of them its own gradient."""
    handles = [layer.register_forward_pre_hook(lambda _m, _args, x=x: (x,)) for layer, x in feeds.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
