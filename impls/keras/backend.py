"""Which Keras backend runs, and importing Keras under it: a leaf module the adapters and their
timed bodies both read."""

from __future__ import annotations

import os

from mha_conformance.impls import cache

#: The pip extra and the module each Keras backend needs.
KERAS_BACKENDS = {
    "tensorflow": ("tensorflow", "tensorflow"),
    "jax": ("jax", "jax"),
    "torch": ("torch", "torch"),
}


def import_keras():
    # Keras reads KERAS_BACKEND at import; without it Keras runs TensorFlow, as missing() assumes.
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if os.environ["KERAS_BACKEND"] == "jax":
        import jax

        # Without x64, JAX silently makes every float64 array float32, and with it a float64 layer.
        jax.config.update("jax_enable_x64", True)
        cache.jax_persistent_cache(jax)
    import keras

    return keras
