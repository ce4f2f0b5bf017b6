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
across heads ([B, Tq, Tk]). Half precision comes from Keras dtype policies.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from impls.adapter import POISON_LEAKS, Adapter, catalogue_ids

#: The pip extra and the module each Keras backend needs.
KERAS_BACKENDS = {
    "tensorflow": ("tensorflow", "tensorflow"),
    "jax": ("jax", "jax"),
    "torch": ("torch", "torch"),
}

#: Cases whose 1/sqrt(head_dim) is not exact in float32 (head_dim 2, 5, 8, 128).
INEXACT_SCALE_CASES = (
    "causal_long_t512_h2_hd8", "decode_tq1_tk1024_long_cache", "head_dim128_h2",
    "odd_sizes_t7_din13_h3_hd5_dout11", "seed_gpt3_96_heads_hd2",
)  # fmt: skip
TF_SCALE_ROUNDING = (
    "on TensorFlow, Keras turns the Python-float scale 1/sqrt(key_dim) into a float32 tensor before casting "
    "it to the compute dtype (tf.cast of a Python float), so under a float64 policy every logit carries the "
    "scale's float32 rounding: ~3e-8 relative error whenever 1/sqrt(head_dim) is not exact in float32"
)
FLOAT64_TO_FLOAT32 = (
    "Keras's fused ops.dot_product_attention casts q, k and v to backend.result_type('float64', 'float64'), "
    "which is 'float32' under the default floatx, so attention in a float64 layer runs in float32: ~1e-7 "
    "relative error"
)
HALF_SCALE = (
    "Keras casts the scale 1/sqrt(key_dim) to the half dtype (float16 keeps 11 bits: up to 2.4e-4 relative "
    "error in every logit) and multiplies by it in the half dtype; with long rows, wide heads or logits "
    "near 7e3 that reaches 2-6x the straightforward float16/bfloat16 error"
)
UNIFORM_ROWS = (
    "a query row with no allowed key gets uniform weights 1/Tk (masked scores are set to a large negative "
    "number, not excluded), so its context is the mean of all values, where the reference gives zeros"
)
JAX_VALUE_WIDTH = (
    "the JAX backend's dot_product_attention cannot take values wider than keys (TypeError: cannot reshape), "
    "although MultiHeadAttention(value_dim != key_dim) accepts the configuration"
)
TORCH_FLASH = (
    "the torch backend runs torch's CPU flash kernel, whose online softmax over 1024 keys in float32 reaches "
    "5.5x the straightforward float32 error (as torch-sdpa does)"
)


#: With dropout declared (even in eval mode) Keras takes its explicit path, never the fused one.
FUSED_CASES = catalogue_ids(lambda c: c["dropout"] == 0)


def declared(path: str, entries: list[tuple[str, str, str]]) -> dict[str, str]:
    """``{check:case:dtype: "<path>: <reason>"}`` from (case pattern, dtype pattern, reason); first match wins."""
    found = {f"golden:{case}:{dtype}": f"{path}: {reason}" for case, dtype, reason in entries}
    return {**found, **{p: f"{path}: {r}" for p, r in POISON_LEAKS.items()}}


HALF_BIAS_SUM = (
    "TensorFlow sums bias gradients over batch and tokens in the half dtype (grad_b_o of large_values_v1e2 "
    "is a plain sum of grad_output: 2.4x; over 512 tokens 4.7x), where the baseline accumulates in float32; "
    "with the half-dtype scale the other gradients reach 2-2.7x"
)
TF_FLOAT32_BACKWARD = (
    "with 128-wide heads the float32 backward (einsum gradients in TensorFlow's own order) reaches 2.1-2.7x "
    "the straightforward float32 gradient error"
)
#: Gradient divergences measured on CPU (TensorFlow 2.21, Keras 3.15), per path (case, dtype, reason).
TF_GRADIENTS = {
    "fused": [("*fully_masked*", "*", UNIFORM_ROWS + "; the gradients flow into every value")]
    + [(case, "float64", TF_SCALE_ROUNDING) for case in INEXACT_SCALE_CASES]
    + [(c, "bfloat16", HALF_BIAS_SUM) for c in ("batch1_self_t8", "causal_long_t512_h2_hd8", "large_values_v1e2")]
    + [(c, "float16", HALF_BIAS_SUM) for c in (
        "decode_tq1_tk1024_long_cache", "head_dim128_h2", "mqa_h4_kv1", "seed_reduced_projection_din16_h2_hd4_dout16")]
    + [("huge_logits_1e4", "float16", HALF_SCALE), ("huge_logits_1e4", "bfloat16", HALF_SCALE),
       ("head_dim128_h2", "float32", TF_FLOAT32_BACKWARD)],
    "explicit": [(case, "float64", TF_SCALE_ROUNDING) for case in INEXACT_SCALE_CASES]
    + [(c, "bfloat16", HALF_BIAS_SUM) for c in (
        "batch1_self_t8", "causal_long_t512_h2_hd8", "gqa_h6_kv3_causal", "large_values_v1e2")]
    + [(c, "float16", HALF_BIAS_SUM) for c in (
        "causal_long_t512_h2_hd8", "decode_tq1_tk1024_long_cache", "odd_sizes_t7_din13_h3_hd5_dout11")]
    + [("huge_logits_1e4", "float16", HALF_SCALE), ("huge_logits_1e4", "bfloat16", HALF_SCALE),
       ("head_dim128_h2", "float32", TF_FLOAT32_BACKWARD)],
}  # fmt: skip


def declared_gradients(path: str, entries: list[tuple[str, str, str]]) -> dict[str, str]:
    """Like :func:`declared`, for the gradients check."""
    return {f"gradients:{case}:{dtype}": f"{path}: {reason}" for case, dtype, reason in entries}


def keras():
    # Keras reads KERAS_BACKEND at import; without it Keras runs TensorFlow, as missing() assumes.
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if os.environ["KERAS_BACKEND"] == "jax":
        import jax

        # Without x64, JAX silently makes every float64 array float32, and with it a float64 layer.
        jax.config.update("jax_enable_x64", True)
    import keras

    return keras


class KerasMHA(Adapter):
    name = "keras-mha"
    keras_backend = "tensorflow"
    return_scores = False
    framework = "keras"
    extra = "tensorflow"
    device_kinds = ("cpu", "cuda")
    path = (
        "keras.layers.MultiHeadAttention / GroupQueryAttention, fused ops.dot_product_attention (no scores)"
    )
    divergences = declared(
        "Keras MultiHeadAttention, fused path on TensorFlow",
        [("*fully_masked*", "*", UNIFORM_ROWS)]
        + [(case, "float64", TF_SCALE_ROUNDING) for case in INEXACT_SCALE_CASES]
        + [("huge_logits_1e4", "float16", HALF_SCALE), ("huge_logits_1e4", "bfloat16", HALF_SCALE),
           ("causal_long_t512_h2_hd8", "float16", HALF_SCALE), ("head_dim128_h2", "float16", HALF_SCALE)],
    ) | declared_gradients("Keras MultiHeadAttention backward, fused path on TensorFlow", TF_GRADIENTS["fused"])  # fmt: skip

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
        k = keras()
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

    def supports(self, spec: Mapping[str, Any], dtype: str, device: str) -> str | None:
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

    def _layer(self, spec: Mapping[str, Any], dtype: str, use_bias: bool):
        k = keras()
        if spec["num_kv_heads"] != spec["num_heads"]:
            if not hasattr(k.layers, "GroupQueryAttention"):
                raise NotImplementedError(
                    f"Keras {k.__version__} has no layers.GroupQueryAttention (added in 3.4)"
                )
            return k.layers.GroupQueryAttention(
                head_dim=spec["head_dim"], num_query_heads=spec["num_heads"],
                num_key_value_heads=spec["num_kv_heads"], dropout=spec["dropout"], use_bias=use_bias, dtype=dtype,
            )  # fmt: skip
        return k.layers.MultiHeadAttention(
            num_heads=spec["num_heads"], key_dim=spec["head_dim"], value_dim=spec["v_head_dim"],
            output_shape=spec["d_out"], dropout=spec["dropout"], use_bias=use_bias, dtype=dtype,
        )  # fmt: skip

    def _tensor(self, array: np.ndarray, dtype: str):
        k = keras()
        if array.dtype == np.bool_:
            return k.ops.convert_to_tensor(array)
        # Every backend reads float32; it holds the bfloat16/float16 values exactly.
        return k.ops.cast(k.ops.convert_to_tensor(array.astype(np.float32)), dtype)

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
            w = case[f"w_{short}"].astype(np.float32)
            kernel = w.reshape(h, hdv, spec["d_out"]) if short == "o" else w.reshape(w.shape[0], *heads)
            sub.kernel.assign(kernel)  # float32 holds every listed dtype's values exactly; Keras casts
            if sub.bias is not None:
                shape = (spec["d_out"],) if short == "o" else heads
                bias = case.get(f"b_{short}")
                # A missing bias is exactly a zero bias: x + 0 == x in every dtype.
                values = (
                    np.zeros(shape, np.float32) if bias is None else bias.astype(np.float32).reshape(shape)
                )
                sub.bias.assign(values)

    def _attention_mask(self, spec: Mapping[str, Any], mask: np.ndarray | None):
        """(attention_mask [B, Tq, Tk] or None, use_causal_mask) with the bottom-right causal rule."""
        b, tq, tk = spec["batch"], spec["q_len"], spec["kv_len"]
        if spec["causal"] and mask is None and tq == tk:
            return None, True  # Keras's own causal mask is top-left, right when Tq == Tk
        allowed = np.ones((b, tq, tk), dtype=bool)
        if mask is not None:
            allowed &= np.broadcast_to(mask[:, 0], (b, tq, tk))
        if spec["causal"]:
            allowed &= np.tri(tq, tk, k=tk - tq, dtype=bool)
        return (allowed if mask is not None or spec["causal"] else None), False

    def _device_scope(self, device: str):
        import contextlib

        if device == "cpu" or self.keras_backend == "torch":
            return contextlib.nullcontext()
        gpu = self._gpu()
        if self.keras_backend == "tensorflow":
            import tensorflow as tf

            return tf.device(gpu)
        import jax

        return jax.default_device(gpu)

    def _check_device(self, out, device: str) -> None:
        """A result labelled cuda must have been computed on a GPU."""
        where = str(getattr(out, "device", "") or "")
        if self.keras_backend == "jax":
            where = ",".join(str(d) for d in out.devices())
        on_gpu = any(s in where.lower() for s in ("gpu", "cuda"))
        if (device == "cuda") != on_gpu:
            raise RuntimeError(f"{self.name}: result computed on {where!r}, but the test asked for {device}")

    def prepare(self, case, spec, dtype, device):
        k = keras()
        if device == "cuda" and self.keras_backend == "torch":
            raise NotImplementedError("Keras on torch places tensors itself; cuda runs are not wired up yet")
        use_bias = spec["qkv_bias"] or spec["out_bias"]
        with self._device_scope(device):
            layer = self._layer(spec, dtype, use_bias)
            shapes = [
                (spec["batch"], spec["q_len"], spec["d_in"]),
                (spec["batch"], spec["kv_len"], spec["vdim"]),
            ]
            key_shape = (spec["batch"], spec["kv_len"], spec["kdim"])
            layer.build(*shapes, key_shape)
            self._load_weights(layer, case, spec, dtype)

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            attention_mask, use_causal = self._attention_mask(spec, inputs.get("mask"))
            with self._device_scope(device):
                q = self._tensor(inputs["query"], dtype)
                kk = q if spec["self_attention"] else self._tensor(inputs["key"], dtype)
                v = q if spec["self_attention"] else self._tensor(inputs["value"], dtype)
                am = None if attention_mask is None else k.ops.convert_to_tensor(attention_mask)
                result = layer(
                    q, v, key=kk, attention_mask=am, use_causal_mask=use_causal,
                    return_attention_scores=self.return_scores, training=False,
                )  # fmt: skip
            out, scores = result if self.return_scores else (result, None)
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

    def prepare_backward(self, case, spec, dtype, device):
        """``tf.GradientTape`` over the layer on TensorFlow (the other Keras backends differentiate
        differently and are not wired up): query, key and value are three watched tensors, the
        kernels are the layer's own trainable variables. EinsumDense kernels [in, H, hd] (output
        [H, hdv, d_out]) are reshaped to the golden [in, out]; zero biases the layer holds
        because the case has none are not returned."""
        if self.keras_backend != "tensorflow":
            raise NotImplementedError(f"{self.name}: gradients are wired up for Keras on TensorFlow only")
        import tensorflow as tf

        k = keras()
        use_bias = spec["qkv_bias"] or spec["out_bias"]
        gqa = spec["num_kv_heads"] != spec["num_heads"]
        with self._device_scope(device):
            layer = self._layer(spec, dtype, use_bias)
            shapes = [
                (spec["batch"], spec["q_len"], spec["d_in"]),
                (spec["batch"], spec["kv_len"], spec["vdim"]),
            ]
            layer.build(*shapes, (spec["batch"], spec["kv_len"], spec["kdim"]))
            self._load_weights(layer, case, spec, dtype)
        dense = {
            short: getattr(layer, f"_{name}_dense" if gqa else f"{name}_dense")
            for short, name in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "output"))
        }

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
            attention_mask, use_causal = self._attention_mask(spec, inputs.get("mask"))
            with self._device_scope(device):
                q, kk, v = (self._tensor(inputs[n], dtype) for n in ("query", "key", "value"))
                am = None if attention_mask is None else k.ops.convert_to_tensor(attention_mask)
                variables = {}
                for short, sub in dense.items():
                    variables[f"w_{short}"] = sub.kernel
                    if f"b_{short}" in case:
                        variables[f"b_{short}"] = sub.bias
                with tf.GradientTape() as tape:
                    tape.watch([q, kk, v])
                    result = layer(
                        q, v, key=kk, attention_mask=am, use_causal_mask=use_causal,
                        return_attention_scores=self.return_scores, training=False,
                    )  # fmt: skip
                    out = result[0] if self.return_scores else result
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
            found["meta"] = {"keras_backend": k.backend.backend()}
            return found

        return run

    def _numpy(self, tensor, dtype: str) -> np.ndarray:
        k = keras()
        host = k.ops.convert_to_numpy(k.ops.cast(tensor, "float32") if dtype == "bfloat16" else tensor)
        if dtype == "bfloat16":
            import ml_dtypes

            return host.astype(ml_dtypes.bfloat16)  # exact: the values were bfloat16
        return host


class KerasMHAScores(KerasMHA):
    name = "keras-mha-scores"
    return_scores = True
    path = "keras.layers.MultiHeadAttention / GroupQueryAttention, return_attention_scores=True: einsum + masked Softmax"
    divergences = declared(
        "Keras MultiHeadAttention, explicit path on TensorFlow",
        [(case, "float64", TF_SCALE_ROUNDING) for case in INEXACT_SCALE_CASES]
        + [("huge_logits_1e4", "float16", HALF_SCALE), ("huge_logits_1e4", "bfloat16", HALF_SCALE)],
    ) | declared_gradients(
        "Keras MultiHeadAttention backward, explicit path on TensorFlow", TF_GRADIENTS["explicit"]
    )


class KerasMHAJax(KerasMHA):
    name = "keras-mha-jax"
    keras_backend = "jax"
    extra = "jax"
    # The layer cannot run at all on v_head_dim cases, so every check on them meets that first.
    divergences = {
        "*:v_head_dim*": f"Keras MultiHeadAttention, fused path on JAX: {JAX_VALUE_WIDTH}",
        **declared(
            "Keras MultiHeadAttention, fused path on JAX",
            [("*fully_masked*", "*", UNIFORM_ROWS)]
            + [(case, "float64", FLOAT64_TO_FLOAT32) for case in FUSED_CASES]
            + [("huge_logits_1e4", "float16", HALF_SCALE)],
        ),
    }


class KerasMHAScoresJax(KerasMHAScores):
    name = "keras-mha-scores-jax"
    keras_backend = "jax"
    extra = "jax"
    divergences = declared(
        "Keras MultiHeadAttention, explicit path on JAX",
        [("huge_logits_1e4", "float16", HALF_SCALE), ("huge_logits_1e4", "bfloat16", HALF_SCALE)],
    )


class KerasMHATorch(KerasMHA):
    name = "keras-mha-torch"
    keras_backend = "torch"
    extra = "torch"
    divergences = declared(
        "Keras MultiHeadAttention, fused path on torch",
        [("*fully_masked*", "*", UNIFORM_ROWS)]
        + [(case, "float64", FLOAT64_TO_FLOAT32) for case in FUSED_CASES]
        + [("decode_tq1_tk1024_long_cache", "float32", TORCH_FLASH), ("huge_logits_1e4", "float16", HALF_SCALE)],
    )  # fmt: skip


class KerasMHAScoresTorch(KerasMHAScores):
    name = "keras-mha-scores-torch"
    keras_backend = "torch"
    extra = "torch"
    divergences = declared(
        "Keras MultiHeadAttention, explicit path on torch",
        [("huge_logits_1e4", "float16", HALF_SCALE), ("huge_logits_1e4", "bfloat16", HALF_SCALE)],
    )
