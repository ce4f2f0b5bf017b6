"""Timed bodies for the JAX adapters (``Adapter.bench``, contract in ``impls/bench.py``).

Each body runs the very function the adapter's conformance path runs (``jax_sdpa.attention``,
``flax_mha.flax_forward``) on weights and inputs built by the adapter's own methods and put on
the device once. In setup, the function is ``jax.jit``-compiled with its static part bound
(the same function and static arguments as the conformance path's, compiled once more
here: the same program, so bitwise the same output) and called once; the timed closures only call the compiled function and keep a
reference to what it returned, which ``sync`` blocks on (JAX dispatches asynchronously on
every device, the CPU included). The backward is ``jax.vjp``'s pullback, jitted: the forward
residuals are computed once in setup, each timed call runs only the backward pass (as
``out.backward(retain_graph=True)`` does in the torch bodies).

**Threads.** XLA:CPU sizes its intra-op (Eigen) thread pool once, when the CPU client starts,
from the CPUs the process may run on (``sched_getaffinity``); no flag sets a count
(``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false`` only forces one thread). So
:func:`fix_cpu_threads` restricts the process to ``MHA_BENCH_THREADS`` CPUs and, if the client
already started (``JaxAdapter.devices()`` starts it) and no JAX array is alive yet, makes it
start again; asv runs each benchmark in a fresh process, where that always holds. From a
shell, ``taskset -c 0-3 python ...`` fixes the same pool before JAX starts. ``meta["threads"]``
records the pool size that results.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mha_conformance.impls.adapter import refusal
from mha_conformance.impls.bench import Bench, bench_threads
from mha_conformance.impls.jax.common import JaxAdapter, import_jax


def fix_cpu_threads(threads: int) -> tuple[int, str]:
    """Make XLA:CPU's intra-op pool ``threads`` wide where this process can: ``(size, how)``.

    The size is the number of CPUs the process may use when the CPU client (re)starts, which
    is what XLA reads; fewer than asked when fewer are available to the process.
    """
    if not hasattr(os, "sched_setaffinity"):
        return os.cpu_count() or 1, "not fixable on this OS: XLA:CPU uses every core"
    j = import_jax()
    cpus = sorted(os.sched_getaffinity(0))
    wanted = cpus[:threads]
    if threads > len(cpus):
        how = f"asked for {threads}; the process may use only {len(cpus)} CPUs (sched_getaffinity)"
        return len(cpus), how
    if threads == len(cpus):
        return len(cpus), "every CPU the process may use (sched_getaffinity)"
    if j.live_arrays():
        return len(cpus), (
            f"asked for {threads}, but JAX arrays were alive, so XLA:CPU could not restart with fewer "
            "CPUs; run the benchmark in a fresh process (as asv does) or under taskset"
        )
    from jax.extend.backend import clear_backends

    os.sched_setaffinity(0, wanted)
    clear_backends()  # the CPU client starts again on first use, sized from the new affinity
    # The calling thread's affinity: XLA:CPU sizes and starts its pool from this thread, and
    # asv's fresh process runs nothing else (threads started later inherit it).
    return len(wanted), f"pinned to CPUs {wanted[0]}-{wanted[-1]} before XLA:CPU started"


def _apply(pullback, grad_output):
    """Run a ``jax.vjp`` pullback (a pytree of the forward residuals) at ``grad_output``."""
    return pullback(grad_output)


def _first(out):
    """The attention output of a forward result (Flax's sow path also returns the weights)."""
    return out[0] if isinstance(out, tuple) else out


def timed(
    adapter: JaxAdapter,
    dtype: str,
    device: str,
    forward: Callable[[], Any],
    pullback: Callable[[], tuple[Any, Any]],
    meta: dict[str, str],
) -> Bench:
    """A Bench around a jitted ``forward()`` and a jitted ``pullback() -> (output, vjp)``,
    both with their arguments already on the device; everything compiles here, in setup."""
    j = import_jax()
    pending: list[Any] = [None]  # the last result, which sync() waits for

    def timed_forward():
        pending[0] = forward()
        return pending[0]

    def sync() -> None:
        j.block_until_ready(pending[0])

    timed_forward()  # compiles in setup
    sync()

    def make_backward() -> Callable[[], Any]:
        out, vjp = pullback()  # the forward and its residuals, once
        rng = np.random.default_rng(0)
        grad_output = adapter.put(rng.standard_normal(_first(out).shape), dtype, device)
        apply = j.jit(_apply)

        def backward():
            pending[0] = apply(vjp, grad_output)
            return pending[0]

        backward()  # compiles in setup
        sync()
        return backward

    def matmul(n: int) -> Callable[[], Any]:
        rng = np.random.default_rng(1)
        a, b = (adapter.put(rng.standard_normal((n, n)), dtype, device) for _ in range(2))
        product = j.jit(j.numpy.matmul)

        def run():
            pending[0] = product(a, b)
            return pending[0]

        run()  # compiles in setup
        sync()
        return run

    return Bench(
        forward=timed_forward,
        sync=sync,
        to_numpy=lambda out: adapter.fetch(_first(out), dtype, device),
        make_backward=make_backward,
        matmul=matmul,
        meta=meta,
    )


def setup(adapter: JaxAdapter, spec: Mapping[str, Any], dtype: str, device: str) -> dict[str, str]:
    """Refuse what the adapter refuses, fix the threads, and the meta every body records."""
    reason = refusal(adapter, spec, dtype, device)
    if reason:
        raise NotImplementedError(reason)
    threads, how = fix_cpu_threads(bench_threads())
    return {
        "threads": str(threads),
        "threads_how": how,
        **adapter.versions(),
        "device": adapter.device(device).device_kind,
        "device_name": adapter.device_name(device),
    }


def device_inputs(
    adapter: JaxAdapter, case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str, device: str
):
    """query, key and value on the device (self-attention: one array, passed three times)."""
    query = adapter.put(case["query"], dtype, device)
    if spec["self_attention"]:
        return query, query, query
    return query, adapter.put(case["key"], dtype, device), adapter.put(case["value"], dtype, device)
