"""Adapters that misbehave in every way the harness must survive, and one that behaves.

Used by tests/test_reliability.py through ``--adapter tests.faulty_adapters:<name>``.
"""

from __future__ import annotations

import os
import resource
import signal
import time

import numpy as np

from tests.loop_impls import per_head


def good(case, spec, dtype, device):
    f64 = {k: v if v.dtype == np.bool_ else v.astype(np.float64) for k, v in case.items()}
    out, _ = per_head(spec, f64)
    return {"output": out.astype(case["query"].dtype)}


def _shape(case, spec):
    return (spec["batch"], spec["q_len"], spec["d_out"])


def raises(case, spec, dtype, device):
    raise RuntimeError("kernel launch failed: invalid configuration argument")


def returns_nan(case, spec, dtype, device):
    out = good(case, spec, dtype, device)["output"]
    out[0, 0, 0] = np.nan
    return {"output": out}


def wrong_shape(case, spec, dtype, device):
    return {"output": np.zeros(_shape(case, spec)[::-1], dtype=case["query"].dtype)}


def wrong_dtype(case, spec, dtype, device):
    return {
        "output": good(case, spec, dtype, device)["output"].astype(
            np.float16 if dtype != "float16" else np.float32
        )
    }


def returns_list(case, spec, dtype, device):
    return [good(case, spec, dtype, device)["output"]]


def returns_tensor(case, spec, dtype, device):
    import torch

    return {"output": torch.zeros(_shape(case, spec))}


def returns_nothing(case, spec, dtype, device):
    return None


def hangs(case, spec, dtype, device):
    time.sleep(3600)


def segfaults(case, spec, dtype, device):
    os.kill(os.getpid(), signal.SIGSEGV)


def exits(case, spec, dtype, device):
    os._exit(3)


def killed_like_oom(case, spec, dtype, device):
    """What the kernel's out-of-memory killer does to a process: SIGKILL."""
    os.kill(os.getpid(), signal.SIGKILL)


def out_of_memory(case, spec, dtype, device):
    """A real allocation failure under an address-space limit (the limit stays in the worker)."""
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
    hog = np.ones((1 << 40) // 8)  # 1 TiB
    return {"output": hog}
