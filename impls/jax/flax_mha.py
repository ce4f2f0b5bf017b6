"""``flax.nnx.MultiHeadAttention`` through its two code paths.

* ``flax-mha``: the default ``attention_fn``, which hands attention to
  ``jax.nn.dot_product_attention`` when dropout is 0 and no weights are sown.
* ``flax-mha-weights``: ``sow_weights=True``, Flax's own einsum + masked softmax
  (``dot_product_attention_weights``), whose per-head weights are read back from the
  module's ``Intermediate`` state.

Kernels go in as Flax stores them: query/key/value [in, heads, head_dim] with biases
[heads, head_dim], output [H, head_dim, out]. The mask is [B, H|1, Tq, Tk], True = attend,
with the causal rule added bottom-right aligned; ``deterministic=True`` except in training
mode (``prepare_training``: ``deterministic=False`` and a fresh dropout key per call).

The module functions below are what runs, each ``jax.jit``-compiled once per process for each
distinct static part (the Flax graph, which Flax compares by structure, and ``sow``), shapes
and dtypes (``impls/jax/common.jitted``), with the module state as an argument: cases of
equal structure share one executable. ``impls/jax/timed.py`` times the same functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cache, partial
from typing import Any

import numpy as np

from mha_conformance.impls.adapter import Arrays, Divergence, Prepared, Spec
from mha_conformance.impls.bench import Bench
from mha_conformance.impls.jax import timed
from mha_conformance.impls.jax.common import (
    UNIFORM_ROWS,
    JaxAdapter,
    allowed,
    has_empty_rows,
    import_jax,
    jitted,
    several_keys_per_row,
)
from mha_conformance.impls.jax.sdpa import FLOAT32_SOFTMAX


def softmax_shows_without_dropout(spec: Mapping[str, Any]) -> bool:
    """Some query attends more than one key, and no dropout is declared (with dropout, even in eval
    mode, Flax takes its own softmax, not ``jax.nn.dot_product_attention``)."""
    return several_keys_per_row(spec) and spec["dropout"] == 0


def flax_divergences(explicit: bool) -> tuple[Divergence, ...]:
    """What Flax does differently from the reference (Flax 0.12.8, JAX 0.10.2): semantic only."""
    path = "flax.nnx dot_product_attention_weights" if explicit else "flax.nnx.MultiHeadAttention"
    found = [
        Divergence(f"{path}: {UNIFORM_ROWS}", check="golden", when=has_empty_rows),
        Divergence(
            f"{path}: {UNIFORM_ROWS}; the gradients flow into every value",
            check="gradients",
            when=has_empty_rows,
        ),
    ]
    if not explicit:  # with dropout declared (even in eval) Flax takes its own, float64-clean softmax
        float32_softmax = f"{path} -> {FLOAT32_SOFTMAX}"
        found += [
            Divergence(float32_softmax, check="golden", dtype="float64", when=softmax_shows_without_dropout),
            Divergence(
                float32_softmax, check="gradients", dtype="float64", when=softmax_shows_without_dropout
            ),
            Divergence(f"{path}(decode=True) -> {FLOAT32_SOFTMAX}", check="decoding", dtype="float64"),
        ]
    return tuple(found)


def nnx():
    from flax import nnx

    return nnx


@cache
def skeleton(h: int, hkv: int, hd: int, widths: tuple[int, int, int], dtype: str, dropout: float, bias: bool):
    """The abstract module of one structure (``nnx.eval_shape``: no random initialisation to
    compile and run for weights that are replaced anyway), made once per process: a clone costs
    0.3 ms where a construction costs 9. ``keep_rngs=False``: training mode passes its dropout
    key with each call."""
    nnx_, jnp = nnx(), import_jax().numpy
    d_in, d_out, kdim = widths
    return nnx_.eval_shape(
        lambda: nnx_.MultiHeadAttention(
            num_heads=h,
            in_features=d_in,
            qkv_features=h * hd,
            out_features=d_out,
            num_kv_heads=hkv,
            in_kv_features=kdim,
            dtype=getattr(jnp, dtype),
            param_dtype=getattr(jnp, dtype),
            dropout_rate=dropout,
            deterministic=True,
            use_bias=bias,
            decode=False,
            rngs=nnx_.Rngs(0),
            keep_rngs=False,
        )
    )


def call(module, sow: bool, *args, **kwargs):
    """``module(*args, sow_weights=sow, **kwargs)`` as ``(output, sown weights or None)``: with
    ``sow`` the call runs under ``nnx.capture``, which collects what ``Module.sow`` stores."""
    if not sow:
        return module(*args, sow_weights=False, **kwargs), None
    return nnx().capture(module, nnx().Intermediate)(*args, sow_weights=True, **kwargs)


def flax_forward(state, query, key, value, mask, graphdef, sow: bool):
    """The module's eval-mode forward: ``(output, sown weights or None)``."""
    return call(nnx().merge(graphdef, state), sow, query, key, value, mask=mask, deterministic=True)


def flax_vjp(params, rest, query, key, value, mask, graphdef, sow: bool):
    """``(output, pullback)`` with respect to the module's ``nnx.Param`` state and the three
    inputs; ``sow`` as the forward has it (it is what picks Flax's explicit softmax path)."""

    def forward(params, query, key, value):
        module = nnx().merge(graphdef, params, rest)
        return call(module, sow, query, key, value, mask=mask, deterministic=True)[0]

    return import_jax().vjp(forward, params, query, key, value)


def flax_gradients(params, rest, query, key, value, mask, grad_output, graphdef, sow: bool):
    """The gradients of ``sum(output * grad_output)``: (d_params, d_query, d_key, d_value)."""
    _, pullback = flax_vjp(params, rest, query, key, value, mask, graphdef, sow)
    return pullback(grad_output)


def flax_training(state, query, key, value, mask, seed, count, graphdef, sow: bool):
    """The forward in training mode: ``deterministic=False``, dropout drawn from the key
    ``fold_in(key(seed), count)`` (traced arguments: every call draws anew, no recompile)."""
    j = import_jax()
    rngs = nnx().Rngs(dropout=j.random.fold_in(j.random.key(seed), count))
    module = nnx().merge(graphdef, state)
    return call(module, sow, query, key, value, mask=mask, deterministic=False, rngs=rngs)[0]


def flax_decode_step(state, token, graphdef):
    """One ``decode=True`` step: the token's output and the module state with the cache advanced."""
    module = nnx().merge(graphdef, state)
    out = module(token, decode=True, deterministic=True)
    return out, nnx().state(module)


class FlaxMHA(JaxAdapter):
    name = "flax-mha"
    framework = "flax"
    sow_weights = False
    path = "flax.nnx.MultiHeadAttention, default attention_fn (jax.nn.dot_product_attention when dropout is 0), jit"
    divergences = flax_divergences(explicit=False)
    # Lengths and windows go into the boolean mask (impls.jax.common.allowed).
    variants = frozenset({"window", "kv_lengths"})
    cannot_express = {
        "attn_bias": "flax.nnx.MultiHeadAttention's call takes a boolean mask only (no additive bias)",
        "softcap": "flax.nnx.MultiHeadAttention has no logit softcap",
    }

    def versions(self) -> dict[str, str]:
        import flax

        return {**super().versions(), "flax": flax.__version__}

    def supports(self, spec: Spec, dtype: str, device: str) -> str | None:
        if not spec["out_proj"]:
            return "flax.nnx.MultiHeadAttention always applies its output projection"
        if spec["v_head_dim"] != spec["head_dim"]:
            return "flax.nnx.MultiHeadAttention uses one head_dim (qkv_features / num_heads) for Q, K and V"
        if spec["kdim"] != spec["vdim"]:
            return "flax.nnx.MultiHeadAttention has one in_kv_features for both keys and values"
        if spec["scale"] is not None:
            return "flax.nnx.MultiHeadAttention always scales by 1/sqrt(head_dim)"
        if device == "cpu" and dtype == "float16" and not self.sow_weights:
            return (
                "XLA:CPU has no float16 x float16 -> float32 dot_general, which jax.nn.dot_product_attention's "
                "xla implementation requests ('F16_F16_F32' is not supported by dot_general on CPU)"
            )
        return None

    def build(self, case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str):
        """The module with the case's weights: a copy of the structure's :func:`skeleton`, every
        kernel and bias set from the case (a bias the case lacks is exactly zero: x + 0 == x in
        every dtype)."""
        nnx_ = nnx()
        jnp = import_jax().numpy
        h, hkv, hd = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"]
        use_bias = spec["qkv_bias"] or spec["out_bias"]
        widths = (spec["d_in"], spec["d_out"], spec["kdim"])
        module = nnx_.clone(skeleton(h, hkv, hd, widths, dtype, spec["dropout"], use_bias))
        host = np.dtype(getattr(jnp, dtype))  # converted on the host: no XLA convert to compile

        def set_to(variable, values: np.ndarray) -> None:
            variable.set_value(jnp.asarray(np.asarray(values, dtype=host).reshape(variable.shape)))

        layers = {"q": (module.query, (h, hd)), "k": (module.key, (hkv, hd)), "v": (module.value, (hkv, hd))}
        for short, (layer, heads) in layers.items():
            set_to(layer.kernel, case[f"w_{short}"])
            if use_bias:
                set_to(layer.bias, case.get(f"b_{short}", np.zeros(heads, np.float32)))
        set_to(module.out.kernel, case["w_o"])
        if use_bias:
            set_to(module.out.bias, case.get("b_o", np.zeros(spec["d_out"], np.float32)))
        return module

    def split(self, case, spec, dtype, device):
        """``(graphdef, state)`` of the built module, the state on ``device``."""
        j = import_jax()
        with j.default_device(self.device(device)):
            graphdef, state = nnx().split(self.build(case, spec, dtype))
        return graphdef, j.device_put(state, self.device(device))

    def prepare(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        j = import_jax()
        graphdef, state = self.split(case, spec, dtype, device)
        forward = jitted(flax_forward, "graphdef", "sow")

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            mask = allowed(spec, inputs.get("mask"))
            args = [self.put(inputs[n], dtype, device) for n in ("query", "key", "value")]
            mask = None if mask is None else self.put(mask, "bool", device)
            out, weights = forward(state, *args, mask, graphdef=graphdef, sow=self.sow_weights)
            result = {"output": self.fetch(out, dtype, device)}
            if weights is not None:
                (sown,) = j.tree_util.tree_leaves(weights)
                result["attn_weights"] = self.fetch(sown, dtype, device)
            return result

        return run

    def prepare_training(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        """The same module in training mode: ``deterministic=False`` with dropout
        ``spec["dropout"]``, a new dropout key for every call (``fold_in`` of a fixed seed and
        the call count, so a run is reproducible). Only the output is returned: the weights
        Flax sows are taken before dropout, so they would not show what was dropped."""
        graphdef, state = self.split(case, spec, dtype, device)
        training = jitted(flax_training, "graphdef", "sow")
        calls = [0]

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            mask = allowed(spec, inputs.get("mask"))
            args = [self.put(inputs[n], dtype, device) for n in ("query", "key", "value")]
            mask = None if mask is None else self.put(mask, "bool", device)
            out = training(state, *args, mask, 0, calls[0], graphdef=graphdef, sow=self.sow_weights)
            calls[0] += 1
            return {"output": self.fetch(out, dtype, device)}

        return run

    def prepare_decoder(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Callable[[], Prepared]:
        """Flax's own autoregressive cache: ``init_cache`` for the case's length, then
        ``decode=True`` with one token per call; the jitted step threads the cache state. Flax's
        cache takes one token a call (it raises on more), so a prefill call is fed to it token
        by token, as a Flax user has to."""
        if spec.get("window") is not None:
            raise NotImplementedError(
                "flax.nnx.MultiHeadAttention's decode cache attends every cached key: it has no window"
            )
        j = import_jax()
        with j.default_device(self.device(device)):
            module = self.build(case, spec, dtype)
            module.init_cache((spec["batch"], spec["q_len"], spec["d_in"]), dtype=getattr(j.numpy, dtype))
            graphdef, initial = nnx().split(module)
        initial = j.device_put(initial, self.device(device))
        step = jitted(flax_decode_step, "graphdef")

        def new_stream():
            state = [initial]

            def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
                outs = []
                for t in range(inputs["query"].shape[1]):  # a prefill: its tokens one by one
                    token = self.put(inputs["query"][:, t : t + 1], dtype, device)
                    out, state[0] = step(state[0], token, graphdef=graphdef)
                    outs.append(self.fetch(out, dtype, device))
                return {"output": np.concatenate(outs, axis=1)}

            return run

        return new_stream

    def prepare_backward(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        """``jax.vjp`` of the module over its ``nnx.Param`` state (the kernels Flax trains) and
        the three inputs at ``grad_output``. Kernel gradients come back in Flax's [in, H, hd]
        (output [H, hd, out]) layout and are reshaped to the golden [in, out] on the host; a
        bias Flax holds as zeros because the case has none is not returned."""
        graphdef, state = self.split(case, spec, dtype, device)
        params, rest = nnx().split_state(state, nnx().Param, ...)
        gradients = jitted(flax_gradients, "graphdef", "sow")

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            mask = allowed(spec, inputs.get("mask"))
            args = [self.put(inputs[n], dtype, device) for n in ("query", "key", "value", "grad_output")]
            mask = None if mask is None else self.put(mask, "bool", device)
            d_params, d_query, d_key, d_value = gradients(
                params, rest, *args[:3], mask, args[3], graphdef=graphdef, sow=self.sow_weights
            )
            grads = {"grad_query": d_query, "grad_key": d_key, "grad_value": d_value}
            result = {n: self.fetch(g, dtype, device) for n, g in grads.items()}
            for short, layer in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
                kernel = self.fetch(d_params[layer]["kernel"][...], dtype, device)
                golden = (-1, kernel.shape[-1]) if short == "o" else (kernel.shape[0], -1)
                result[f"grad_w_{short}"] = kernel.reshape(golden)
                if f"b_{short}" in case:
                    result[f"grad_b_{short}"] = self.fetch(
                        d_params[layer]["bias"][...], dtype, device
                    ).reshape(-1)
            return result

        return run

    def bench(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Bench:
        """``flax-mha`` / ``flax-mha-weights``: ``flax_mha.flax_forward`` (``nnx.merge`` and the
        module's call) jitted over the split module state, the graph bound statically."""
        from flax import nnx

        meta = timed.setup(self, spec, dtype, device)
        j = import_jax()
        graphdef, state = self.split(case, spec, dtype, device)
        params, rest = nnx.split_state(state, nnx.Param, ...)
        q, k, v = timed.device_inputs(self, case, spec, dtype, device)
        allowed_keys = allowed(spec, case.get("mask"))
        mask = None if allowed_keys is None else self.put(allowed_keys, "bool", device)
        sow = self.sow_weights
        forward = j.jit(partial(flax_forward, graphdef=graphdef, sow=sow))
        pullback = j.jit(partial(flax_vjp, graphdef=graphdef, sow=sow))
        meta.update(
            jitted="forward: jax.jit(nnx.merge + MultiHeadAttention.__call__) over the split state"
            + (", sown weights returned" if sow else "")
            + ", compiled in setup; backward: jax.jit of jax.vjp's pullback (nnx.Param state and inputs) "
            "on forward residuals computed in setup",
        )
        return timed.timed(
            self,
            dtype,
            device,
            forward=lambda: forward(state, q, k, v, mask),
            pullback=lambda: pullback(params, rest, q, k, v, mask),
            meta=meta,
        )


class FlaxMHAWeights(FlaxMHA):
    name = "flax-mha-weights"
    sow_weights = True
    path = "flax.nnx.MultiHeadAttention(sow_weights=True): Flax's einsum + masked softmax, weights read back, jit"
    divergences = flax_divergences(explicit=True)

    def prepare_decoder(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Callable[[], Prepared]:
        raise NotImplementedError("decoding runs no sow_weights path; it is checked once, on flax-mha")
