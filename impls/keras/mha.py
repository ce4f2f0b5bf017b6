"""Keras 3 ``MultiHeadAttention`` (and ``GroupQueryAttention`` for grouped-query cases).

Two code paths, each on three Keras backends:

* ``keras-mha``: ``return_attention_scores=False``, where Keras calls the backend's fused
  ``ops.dot_product_attention`` (when dropout is 0).
* ``keras-mha-scores``: ``return_attention_scores=True``, the explicit einsum + masked
  ``Softmax`` path, which also returns per-head weights.

Keras reads ``KERAS_BACKEND`` once per process, so each backend is its own adapter
(``keras-mha`` on TensorFlow, ``keras-mha-jax``, ``keras-mha-torch``) run in its own nox
environment: the report then shows whether the same layer agrees with itself across
backends. Weights go in through the EinsumDense sublayers (query/key kernels [in, H, hd],
biases [H, hd], value kernel [vdim, H, hdv], output kernel [H, hdv, d_out]). The causal rule
goes in as Keras's own ``use_causal_mask`` where its top-left alignment is right (Tq == Tk,
no other mask), else as an explicit ``attention_mask`` (True = attend), which Keras shares
across heads ([B, Tq, Tk]), with per-batch key lengths and windows folded in (contract v2).
The layer has no additive bias and no softcap argument. Half precision comes from Keras dtype
policies.
"""

from __future__ import annotations

import importlib.util
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from mha_conformance.impls.adapter import Adapter, Arrays, Divergence, Prepared, Spec, rule_mask
from mha_conformance.impls.bench import Bench
from mha_conformance.impls.keras.backend import KERAS_BACKENDS, import_keras
from mha_conformance.impls.keras.divergences import JAX_VALUE_WIDTH, keras_divergences, values_wider_than_keys

#: Built layers kept for reuse, by adapter class and everything a layer's variables depend on.
_LAYERS: OrderedDict[tuple, Any] = OrderedDict()
LAYERS_KEPT = 32


class KerasMHA(Adapter):
    name = "keras-mha"
    keras_backend = "tensorflow"
    return_scores = False
    framework = "keras"
    extra = "tensorflow"
    device_kinds = ("cpu", "cuda")
    variants = frozenset({"window", "kv_lengths"})
    cannot_express = {
        "attn_bias": "keras.layers.MultiHeadAttention takes a boolean attention_mask only (no additive bias)",
        "softcap": "keras.layers.MultiHeadAttention has no logit softcap",
    }
    path = (
        "keras.layers.MultiHeadAttention / GroupQueryAttention, fused ops.dot_product_attention (no scores)"
    )
    divergences = keras_divergences(
        "Keras MultiHeadAttention, fused path on TensorFlow", fused_path=True, tensorflow=True
    )

    def missing(self) -> str | None:
        for module in ("keras", KERAS_BACKENDS[self.keras_backend][1]):
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed: pip install '.[{KERAS_BACKENDS[self.keras_backend][0]},keras]'"
        running = os.environ.get("KERAS_BACKEND", "tensorflow")
        if running != self.keras_backend:
            return (
                f"Keras picks its backend once per process and this one runs {running!r}; "
                f"run with KERAS_BACKEND={self.keras_backend} (nox -s conformance does)"
            )
        return None

    def versions(self) -> dict[str, str]:
        k = import_keras()
        backend_module = __import__(KERAS_BACKENDS[self.keras_backend][1])
        return {
            "keras": k.__version__,
            "keras_backend": k.backend.backend(),
            self.keras_backend: backend_module.__version__,
        }

    def devices(self) -> list[str]:
        return ["cpu", "cuda"] if self._gpu() is not None else ["cpu"]

    def _gpu(self):
        """The backend's first GPU, or None."""
        backend = self.keras_backend
        if backend == "tensorflow":
            import tensorflow as tf

            return "/GPU:0" if tf.config.list_physical_devices("GPU") else None
        if backend == "jax":
            import jax

            gpus = [d for d in jax.devices() if d.platform == "gpu"]
            return gpus[0] if gpus else None
        import torch

        return "cuda" if torch.cuda.is_available() else None

    def supports(self, spec: Spec, dtype: str, device: str) -> str | None:
        h, hkv = spec["num_heads"], spec["num_kv_heads"]
        if not spec["out_proj"]:
            return "Keras MultiHeadAttention always applies its output projection"
        if spec["scale"] is not None:
            return "Keras MultiHeadAttention has no scale argument (always 1/sqrt(key_dim))"
        mask = spec.get("mask")
        if mask is not None and mask["shape"][1] != 1:
            return (
                "Keras attention_mask is [B, Tq, Tk], shared by every head; the case masks heads differently"
            )
        if hkv != h:
            if spec["v_head_dim"] != spec["head_dim"] or spec["d_out"] != spec["d_in"]:
                return (
                    "keras.layers.GroupQueryAttention has one head_dim for K and V and outputs d_in features"
                )
        return None

    def _layer(self, spec: Mapping[str, Any], dtype: str, use_bias: bool, seed: int | None = None):
        k = import_keras()
        if spec["num_kv_heads"] != spec["num_heads"]:
            if not hasattr(k.layers, "GroupQueryAttention"):
                raise NotImplementedError(
                    f"Keras {k.__version__} has no layers.GroupQueryAttention (added in 3.4)"
                )
            return k.layers.GroupQueryAttention(
                head_dim=spec["head_dim"],
                num_query_heads=spec["num_heads"],
                num_key_value_heads=spec["num_kv_heads"],
                dropout=spec["dropout"],
                use_bias=use_bias,
                dtype=dtype,
                seed=seed,
            )
        return k.layers.MultiHeadAttention(
            num_heads=spec["num_heads"],
            key_dim=spec["head_dim"],
            value_dim=spec["v_head_dim"],
            output_shape=spec["d_out"],
            dropout=spec["dropout"],
            use_bias=use_bias,
            dtype=dtype,
            seed=seed,
        )

    @staticmethod
    def _plain(array: np.ndarray) -> np.ndarray:
        """The array in a dtype every backend reads: bfloat16 (an ml_dtypes type) as float32, which
        holds it exactly; every other dtype as it is, so a float64 value keeps its 53 bits."""
        return array.astype(np.float32) if array.dtype.name == "bfloat16" else array

    def _tensor(self, array: np.ndarray, dtype: str):
        k = import_keras()
        if array.dtype == np.bool_:
            return k.ops.convert_to_tensor(array)
        return k.ops.cast(k.ops.convert_to_tensor(self._plain(array)), dtype)

    def _load_weights(
        self, layer, case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str
    ) -> None:
        h, hkv, hd, hdv = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"], spec["v_head_dim"]
        gqa = hkv != h
        dense = {
            "q": (layer._query_dense if gqa else layer.query_dense, (h, hd)),
            "k": (layer._key_dense if gqa else layer.key_dense, (hkv, hd)),
            "v": (layer._value_dense if gqa else layer.value_dense, (hkv, hdv)),
            "o": (layer._output_dense if gqa else layer.output_dense, None),
        }
        for short, (sub, heads) in dense.items():
            w = self._plain(case[f"w_{short}"])
            kernel = w.reshape(h, hdv, spec["d_out"]) if short == "o" else w.reshape(w.shape[0], *heads)
            sub.kernel.assign(kernel)  # cast to the variable's dtype: exact, the values are that dtype's
            if sub.bias is not None:
                shape = (spec["d_out"],) if short == "o" else heads
                bias = case.get(f"b_{short}")
                # A missing bias is exactly a zero bias: x + 0 == x in every dtype.
                values = np.zeros(shape, w.dtype) if bias is None else self._plain(bias).reshape(shape)
                sub.bias.assign(values)

    def _attention_mask(self, spec: Mapping[str, Any], mask: np.ndarray | None):
        """(attention_mask [B, Tq, Tk] or None, use_causal_mask) with the bottom-right causal rule."""
        b, tq, tk = spec["batch"], spec["q_len"], spec["kv_len"]
        rules = spec.get("kv_lengths") is not None or spec.get("window") is not None
        if spec["causal"] and mask is None and tq == tk and not rules:
            return None, True  # Keras's own causal mask is top-left, right when Tq == Tk
        allowed = rule_mask(spec, mask)
        if allowed is None:
            return None, False
        return np.broadcast_to(allowed[:, 0], (b, tq, tk)).copy(), False

    def _device_scope(self, device: str):
        """Place what is built and computed inside on ``device``, explicitly: every backend would
        otherwise pick a GPU where there is one, even for a run labelled cpu."""
        if self.keras_backend == "tensorflow":
            import tensorflow as tf

            return tf.device("/CPU:0" if device == "cpu" else self._gpu())
        if self.keras_backend == "jax":
            import jax

            return jax.default_device(jax.devices("cpu")[0] if device == "cpu" else self._gpu())
        return import_keras().device(device)

    def _check_device(self, out, device: str) -> None:
        """A result labelled cuda must have been computed on a GPU."""
        where = str(getattr(out, "device", "") or "")
        if self.keras_backend == "jax":
            where = ",".join(str(d) for d in out.devices())
        on_gpu = any(s in where.lower() for s in ("gpu", "cuda"))
        if (device == "cuda") != on_gpu:
            raise RuntimeError(f"{self.name}: result computed on {where!r}, but the test asked for {device}")

    def build(self, case, spec: Mapping[str, Any], dtype: str, device: str, seed: int | None = None):
        """The layer with the case's weights on ``device`` (``seed`` seeds its dropout), as
        every path runs it: the conformance, gradient, training and timed ones.

        A layer without a seed is built once per structure (the adapter, dtype, device, head
        counts and widths, biases) and then only given each case's weights, as a model is built
        once and loaded many times: building is most of a small case's time (variables and
        their initialisers; on JAX each initialiser is lowered per shape). Every variable is
        assigned again, and the sublayers' einsum equations depend on ranks and widths only, so
        a reused layer computes what a new one would. A seeded layer (dropout) is always new: its
        generator's state is part of what the case checks."""
        if device == "cuda" and self.keras_backend == "torch":
            raise NotImplementedError("Keras on torch places tensors itself; cuda runs are not wired up yet")
        use_bias = spec["qkv_bias"] or spec["out_bias"]
        widths = (
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "v_head_dim",
            "d_in",
            "kdim",
            "vdim",
            "d_out",
            "dropout",
        )
        key = (type(self), dtype, device, use_bias, *(spec[w] for w in widths))
        layer = _LAYERS.get(key) if seed is None else None
        with self._device_scope(device):
            if layer is None:
                layer = self._layer(spec, dtype, use_bias, seed)
                shapes = [
                    (spec["batch"], spec["q_len"], spec["d_in"]),
                    (spec["batch"], spec["kv_len"], spec["vdim"]),
                ]
                layer.build(*shapes, (spec["batch"], spec["kv_len"], spec["kdim"]))
            if seed is None:
                _LAYERS[key] = layer
                _LAYERS.move_to_end(key)
                while len(_LAYERS) > LAYERS_KEPT:
                    _LAYERS.popitem(last=False)
            self._load_weights(layer, case, spec, dtype)
        return layer

    def tensors(self, spec: Mapping[str, Any], inputs: Mapping[str, np.ndarray], dtype: str, device: str):
        """(query, key, value, attention_mask, use_causal_mask) as backend tensors on ``device``;
        self-attention passes one tensor three times, as its callers do."""
        attention_mask, use_causal = self._attention_mask(spec, inputs.get("mask"))
        with self._device_scope(device):
            q = self._tensor(inputs["query"], dtype)
            kk = q if spec["self_attention"] else self._tensor(inputs["key"], dtype)
            v = q if spec["self_attention"] else self._tensor(inputs["value"], dtype)
            am = None if attention_mask is None else import_keras().ops.convert_to_tensor(attention_mask)
        return q, kk, v, am, use_causal

    def call(self, layer, q, kk, v, am, use_causal: bool, training: bool):
        """One call of the layer: (output, per-head weights or None)."""
        result = layer(
            q,
            v,
            key=kk,
            attention_mask=am,
            use_causal_mask=use_causal,
            return_attention_scores=self.return_scores,
            training=training,
        )
        return result if self.return_scores else (result, None)

    def prepare(self, case: Arrays, spec: Spec, dtype: str, device: str, training: bool = False) -> Prepared:
        k = import_keras()
        # Training draws fresh dropout masks on every call from the layer's own seeded generator.
        layer = self.build(case, spec, dtype, device, seed=0 if training else None)

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            q, kk, v, am, use_causal = self.tensors(spec, inputs, dtype, device)
            with self._device_scope(device):
                out, scores = self.call(layer, q, kk, v, am, use_causal, training)
            self._check_device(out, device)
            got = k.backend.standardize_dtype(out.dtype)
            if got != dtype:
                raise RuntimeError(f"{self.name}: layer computed in {got}, not the requested {dtype}")
            found = {"output": self._numpy(out, dtype)}
            if scores is not None:
                found["attn_weights"] = self._numpy(scores, dtype)
            found["meta"] = {"keras_backend": k.backend.backend()}
            return found

        return run

    def prepare_training(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        """The layer built with ``dropout=spec["dropout"]`` and ``seed=0`` (its own
        SeedGenerator: reproducible, and each call draws a new mask) and called with
        ``training=True``. With dropout Keras always takes its explicit path, so both
        adapters drop through the same ``Dropout`` layer on the softmax weights."""
        return self.prepare(case, spec, dtype, device, training=True)

    def bench(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Bench:
        from mha_conformance.impls.keras.timed import (
            bench,  # timed bodies live apart from the conformance path
        )

        return bench(self, case, spec, dtype, device)

    def prepare_backward(self, case: Arrays, spec: Spec, dtype: str, device: str) -> Prepared:
        """``tf.GradientTape`` over the layer on TensorFlow (the other Keras backends differentiate
        differently and are not wired up): query, key and value are three watched tensors, the
        kernels are the layer's own trainable variables. EinsumDense kernels [in, H, hd] (output
        [H, hdv, d_out]) are reshaped to the golden [in, out]; zero biases the layer holds
        because the case has none are not returned."""
        if self.keras_backend != "tensorflow":
            raise NotImplementedError(f"{self.name}: gradients are wired up for Keras on TensorFlow only")
        import tensorflow as tf

        gqa = spec["num_kv_heads"] != spec["num_heads"]
        layer = self.build(case, spec, dtype, device)
        dense = {
            short: getattr(layer, f"_{name}_dense" if gqa else f"{name}_dense")
            for short, name in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "output"))
        }

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            # Three separate tensors even for self-attention: the contract wants each one's gradient.
            q, kk, v, am, use_causal = self.tensors({**spec, "self_attention": False}, inputs, dtype, device)
            with self._device_scope(device):
                variables = {}
                for short, sub in dense.items():
                    variables[f"w_{short}"] = sub.kernel
                    if f"b_{short}" in case:
                        variables[f"b_{short}"] = sub.bias
                with tf.GradientTape() as tape:
                    tape.watch([q, kk, v])
                    out, _ = self.call(layer, q, kk, v, am, use_causal, training=False)
                sources = [q, kk, v, *variables.values()]
                grads = tape.gradient(
                    out, sources, output_gradients=self._tensor(inputs["grad_output"], dtype)
                )
            self._check_device(out, device)
            names = ["grad_query", "grad_key", "grad_value", *(f"grad_{n}" for n in variables)]
            found = {}
            for name, grad in zip(names, grads, strict=True):
                short = name.removeprefix("grad_w_")
                if name.startswith("grad_w_"):
                    rows = case[f"w_{short}"].shape[0]
                    grad = tf.reshape(grad, (rows, -1))
                elif name.startswith("grad_b_"):
                    grad = tf.reshape(grad, (-1,))
                found[name] = self._numpy(grad, dtype)
            found["meta"] = {"keras_backend": import_keras().backend.backend()}
            return found

        return run

    def _numpy(self, tensor, dtype: str) -> np.ndarray:
        k = import_keras()
        host = k.ops.convert_to_numpy(k.ops.cast(tensor, "float32") if dtype == "bfloat16" else tensor)
        if dtype == "bfloat16":
            import ml_dtypes

            return host.astype(ml_dtypes.bfloat16)  # exact: the values were bfloat16
        return host


class KerasMHAScores(KerasMHA):
    name = "keras-mha-scores"
    return_scores = True
    path = "keras.layers.MultiHeadAttention / GroupQueryAttention, return_attention_scores=True: einsum + masked Softmax"
    divergences = keras_divergences(
        "Keras MultiHeadAttention, explicit path on TensorFlow", fused_path=False, tensorflow=True
    )


class KerasMHAJax(KerasMHA):
    name = "keras-mha-jax"
    keras_backend = "jax"
    extra = "jax"
    # The layer cannot run at all when values are wider than keys: every check meets that first.
    divergences = (
        Divergence(
            f"Keras MultiHeadAttention, fused path on JAX: {JAX_VALUE_WIDTH}",
            when=values_wider_than_keys,
        ),
        *keras_divergences("Keras MultiHeadAttention, fused path on JAX", fused_path=True, tensorflow=False),
    )


class KerasMHAScoresJax(KerasMHAScores):
    name = "keras-mha-scores-jax"
    keras_backend = "jax"
    extra = "jax"
    divergences = ()  # the explicit path differs from the reference in nothing semantic


class KerasMHATorch(KerasMHA):
    name = "keras-mha-torch"
    keras_backend = "torch"
    extra = "torch"
    divergences = keras_divergences(
        "Keras MultiHeadAttention, fused path on torch", fused_path=True, tensorflow=False
    )


class KerasMHAScoresTorch(KerasMHAScores):
    name = "keras-mha-scores-torch"
    keras_backend = "torch"
    extra = "torch"
    divergences = ()  # the explicit path differs from the reference in nothing semantic
