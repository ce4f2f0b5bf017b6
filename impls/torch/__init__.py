"""The PyTorch adapters: each module one adapter, with its conversions in ``common`` and its timed
bodies in ``timed``."""
