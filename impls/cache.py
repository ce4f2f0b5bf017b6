"""The suite's persistent caches: one folder, ``$MHA_CACHE_DIR`` (default
``mha-conformance`` in the user's cache folder), safe to delete at any time.

What lives there is compiled code and exported models, keyed by the frameworks themselves, so a
warm run costs little more than the compute it does: ``jax/`` (XLA executables, for the JAX
and Keras-on-JAX adapters), ``torchinductor/`` (``torch-flex-compiled``'s kernels) and ``onnx/``
(exported models, ``$MHA_ONNX_CACHE`` overrides). TensorFlow has no persistent cache for traced
functions; the adapters reuse them within a process instead. Nothing in a cache changes a verdict:
``tests/test_speed.py`` checks that a warm run's verdicts are a cold run's.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "MHA_CACHE_DIR"


def root() -> Path:
    """``$MHA_CACHE_DIR``, else ``mha-conformance`` under ``$XDG_CACHE_HOME`` (else ``~/.cache``)."""
    raw = os.environ.get(ENV)
    if raw:
        return Path(raw)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mha-conformance"


def folder(name: str) -> Path:
    """``<root>/<name>``, created."""
    path = root() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def entries() -> int:
    """How many files the caches hold (a run that adds none found everything it needed)."""
    base = root()
    return sum(len(files) for _, _, files in os.walk(base)) if base.is_dir() else 0


def jax_persistent_cache(jax) -> Path | None:
    """Turn on JAX's persistent compilation cache in ``<root>/jax`` for every compile, however
    short (ours take 0.05-0.5 s each, under JAX's default 1 s minimum, and there are thousands),
    unless the user chose a cache folder of their own (``JAX_COMPILATION_CACHE_DIR``); return the
    folder in use. Call before the first compile."""
    chosen = jax.config.jax_compilation_cache_dir
    if not chosen:
        chosen = str(folder("jax"))
        jax.config.update("jax_compilation_cache_dir", chosen)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return Path(chosen)
