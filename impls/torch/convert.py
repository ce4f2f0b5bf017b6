"""Between NumPy and PyTorch: the lazily imported module, dtypes, and tensor conversions.

A leaf module: the adapters, their common base and their timed bodies all read it, and it reads
none of them.
"""

from __future__ import annotations

import functools
import os

import numpy as np


@functools.cache
def import_torch():  # imported lazily so the suite collects without torch installed
    import torch

    if os.environ.get("MHA_TORCH_MKLDNN") == "0":  # oneDNN kernels off (conformance.portability)
        torch.backends.mkldnn.enabled = False
    return torch


def torch_dtype(dtype: str):
    return getattr(import_torch(), dtype)


def to_torch(array: np.ndarray, dtype: str, device: str, *, requires_grad: bool = False):
    """A NumPy array (bfloat16 from ml_dtypes included) as a tensor on ``device``."""
    t = import_torch()
    if array.dtype == np.bool_:
        return t.from_numpy(np.ascontiguousarray(array)).to(device)
    # torch cannot read ml_dtypes' bfloat16; float32 holds every bfloat16 value exactly.
    host = np.ascontiguousarray(array.astype(np.float32) if dtype == "bfloat16" else array)
    tensor = t.from_numpy(host).to(device=device, dtype=torch_dtype(dtype))
    return tensor.requires_grad_(requires_grad)


def to_numpy(tensor, dtype: str, device: str) -> np.ndarray:
    """Back to NumPy in ``dtype``, after checking the tensor really lives on ``device``."""
    if tensor.device.type != device:
        raise RuntimeError(f"result is on {tensor.device.type}, but the test asked for {device}")
    host = tensor.detach().to("cpu")
    if dtype == "bfloat16":
        import ml_dtypes

        return host.float().numpy().astype(ml_dtypes.bfloat16)
    return host.numpy()
