"""Timed bodies for the Keras adapters (``Adapter.bench``, contract in ``impls/bench.py``).

The layer is the one the conformance path builds (``KerasMHA.build``: the same sublayers,
weights and dtype policy), called the same way (``KerasMHA.call``), on inputs and a mask
made backend tensors on the device once (``KerasMHA.tensors``). Each backend runs the layer
the way its users run it fast:

* TensorFlow: the call inside ``tf.function`` (a graph, traced in setup), with XLA on a GPU
  and without it on the CPU: Keras's own ``jit_compile="auto"`` policy for compiled models.
* JAX: ``layer.stateless_call`` under ``jax.jit`` (what Keras's own JAX trainer compiles),
  compiled in setup, weights passed as arguments rather than folded in as constants.
* torch: the layer called eagerly under ``torch.no_grad``: Keras on torch runs eagerly
  (``jit_compile="auto"`` means eager there).

The backward pass is that of ``sum(output * grad_output)`` with respect to the inputs and
every trainable weight of the layer; ``backward()`` returns the gradients, inputs first (one
input for self-attention, which passes one tensor three times). torch and JAX time the
backward alone (the graph, or the vjp's residuals, recorded once in setup); TensorFlow keeps
no graph between calls, so its timed backward is the whole ``tf.function(GradientTape)``
step, forward included (``meta["backward"]`` says so).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mha_conformance.impls.bench import Bench, bench_threads
from mha_conformance.impls.keras.backend import import_keras


@dataclass
class Built:
    """One configuration as the conformance path builds it, ready for a backend's closures."""

    adapter: Any
    layer: Any
    inputs: tuple[Any, Any, Any, Any]  # query, key, value, attention_mask (backend tensors or None)
    use_causal: bool
    grad_output: Any
    dtype: str
    device: str

    @property
    def self_attention(self) -> bool:
        q, kk, v, _ = self.inputs
        return q is kk and kk is v

    def call(self, q, kk, v, am):
        """The conformance path's call, output only (the scores adapter still computes its scores)."""
        return self.adapter.call(self.layer, q, kk, v, am, self.use_causal, training=False)[0]

    def scope(self):
        """The adapter's explicit device placement; the timed calls run inside it too, since
        every backend would otherwise put what the layer creates on a GPU where there is one."""
        return self.adapter._device_scope(self.device)

    def square(self, n: int, seed: int):
        """An n x n backend tensor in the benchmark's dtype, on the device."""
        values = np.random.default_rng(seed).standard_normal((n, n)).astype(np.float32)
        with self.scope():
            return self.adapter._tensor(values, self.dtype)

    def to_numpy(self, out) -> np.ndarray:
        return self.adapter._numpy(out, self.dtype)


def bench(adapter, case: Mapping[str, np.ndarray], spec: Mapping[str, Any], dtype: str, device: str) -> Bench:
    """The timed closures of a built-in Keras adapter on ``device`` (see ``impls/bench.py``)."""

    backend = adapter.keras_backend
    meta = fix_threads(backend, bench_threads())  # before TensorFlow's first op
    k = import_keras()
    layer = adapter.build(case, spec, dtype, device)
    q, kk, v, am, use_causal = adapter.tensors(spec, case, dtype, device)
    with adapter._device_scope(device):
        grad_output = adapter._tensor(upstream_gradient(spec), dtype)
        built = Built(adapter, layer, (q, kk, v, am), use_causal, grad_output, dtype, device)
        timed = {"tensorflow": _tensorflow, "jax": _jax, "torch": _torch}[backend](built)
    timed.meta.update(meta, keras=k.__version__, keras_backend=k.backend.backend())
    return timed


def upstream_gradient(spec: Mapping[str, Any]) -> np.ndarray:
    """The fixed ``grad_output`` [B, Tq, d_out] the timed backward uses: seeded, multiples of
    1/64 within [-4, 4], so exact in every benchmarked dtype."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((spec["batch"], spec["q_len"], spec["d_out"]))
    return (np.round(np.clip(values, -4, 4) * 64) / 64).astype(np.float32)


def fix_threads(backend: str, threads: int) -> dict[str, str]:
    """Fix the backend's CPU threads at ``threads`` where it still can; record what it uses."""
    if backend == "tensorflow":
        import tensorflow as tf

        try:  # possible only before TensorFlow's runtime starts (its first op)
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            how = "set before TensorFlow started"
        except RuntimeError:
            how = "not set: TensorFlow had already started, its own value is recorded (0 = every core)"
        inter = tf.config.threading.get_inter_op_parallelism_threads()
        return {
            "threads": str(tf.config.threading.get_intra_op_parallelism_threads()),
            "threads_requested": str(threads),
            "threads_how": f"intra-op threads {how}; inter-op {inter} (0 = TensorFlow's default)",
        }
    if backend == "jax":
        # XLA:CPU sizes its pool from the CPUs the process may use when its client starts: the
        # JAX adapters' timed paths pin the process before that (or restart the client).
        from mha_conformance.impls.jax.timed import fix_cpu_threads

        size, how = fix_cpu_threads(threads)
        return {"threads": str(size), "threads_requested": str(threads), "threads_how": how}
    import torch

    torch.set_num_threads(threads)
    return {"threads": str(torch.get_num_threads())}


def _tensorflow(built: Built) -> Bench:
    import tensorflow as tf

    q, kk, v, am = built.inputs
    variables = list(built.layer.trainable_variables)
    xla = built.device != "cpu"  # Keras's jit_compile="auto": XLA on GPUs, a plain graph on CPUs
    graph = tf.function(built.call, jit_compile=xla)
    last: list[Any] = [graph(q, kk, v, am)]  # traced here, never while timed

    def forward():
        with built.scope():
            last[0] = graph(q, kk, v, am)
        return last[0]

    @tf.function(jit_compile=xla)
    def step(q, kk, v, am, grad_output):
        # Inside the function one tensor passed three times is three placeholders: use one.
        inputs = [q] if built.self_attention else [q, kk, v]
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            out = built.call(*(inputs * 3 if built.self_attention else inputs), am)
        return tape.gradient(out, [*inputs, *variables], output_gradients=grad_output)

    def make_backward() -> Callable[[], Any]:
        with built.scope():
            last[0] = step(q, kk, v, am, built.grad_output)  # traced here

        def backward():
            with built.scope():
                last[0] = step(q, kk, v, am, built.grad_output)
            return last[0]

        return backward

    def matmul(n: int) -> Callable[[], Any]:
        a, b = built.square(n, 1), built.square(n, 2)
        product = tf.function(import_keras().ops.matmul, jit_compile=xla)
        with built.scope():
            product(a, b)

        def run():
            with built.scope():
                last[0] = product(a, b)
            return last[0]

        return run

    def sync() -> None:
        # A GPU queues work: wait for it. On the CPU TensorFlow returns when the function has
        # run; the host copy of the last result (a view there) makes that certain.
        if built.device != "cpu":
            tf.test.experimental.sync_devices()
        else:
            tf.nest.map_structure(lambda t: t.numpy(), last[0])

    return Bench(
        forward=forward,
        sync=sync,
        to_numpy=built.to_numpy,
        make_backward=make_backward,
        matmul=matmul,
        meta={
            "tensorflow": tf.__version__,
            "forward": f"tf.function (a graph, {'XLA' if xla else 'no XLA'})",
            "backward": "tf.function(GradientTape): the forward and the backward, one step",
        },
    )


def _jax(built: Built) -> Bench:
    import jax

    adapter, layer = built.adapter, built.layer
    if built.device == "cpu" and built.dtype == "float16" and not adapter.return_scores:
        raise NotImplementedError(
            f"{adapter.name}: float16 on CPU: XLA:CPU has no float16 x float16 -> float32 dot_general "
            "('F16_F16_F32' is not supported by dot_general on CPU): under jax.jit the fused path's "
            "jax.nn.dot_product_attention fails to compile, and Keras's fallback to its own attention catches "
            "errors only while tracing, not at compile time; time float16 on a GPU, or keras-mha-scores-jax"
        )
    target = jax.devices("cpu")[0] if built.device == "cpu" else adapter._gpu()
    # Committed to the device: a jitted call runs there whatever the default device is then.
    q, kk, v, am = jax.device_put(built.inputs, target)
    grad_output = jax.device_put(built.grad_output, target)
    trainable = jax.device_put([w.value for w in layer.trainable_variables], target)
    non_trainable = jax.device_put([w.value for w in layer.non_trainable_variables], target)

    def apply(trainable, q, kk, v, am):
        out, _ = layer.stateless_call(
            trainable,
            non_trainable,
            q,
            v,
            key=kk,
            attention_mask=am,
            use_causal_mask=built.use_causal,
            return_attention_scores=adapter.return_scores,
            training=False,
        )
        return out[0] if adapter.return_scores else out

    compiled = jax.jit(apply)
    last: list[Any] = [compiled(trainable, q, kk, v, am)]  # compiled here, never while timed

    def forward():
        last[0] = compiled(trainable, q, kk, v, am)
        return last[0]

    def make_backward() -> Callable[[], Any]:
        if built.self_attention:  # one input used three times, as the forward runs it

            def differentiated(x, trainable):
                return apply(trainable, x, x, x, am)

            primals = (q, trainable)
        else:

            def differentiated(q, kk, v, trainable):
                return apply(trainable, q, kk, v, am)

            primals = (q, kk, v, trainable)
        # The forward and its residuals once, here; the timed closure runs the jitted vjp alone.
        _, vjp = jax.jit(lambda *p: jax.vjp(differentiated, *p))(*primals)
        pull = jax.jit(lambda vjp, g: vjp(g))
        last[0] = pull(vjp, grad_output)  # compiled here

        def backward():
            last[0] = pull(vjp, grad_output)
            return last[0]

        return backward

    def matmul(n: int) -> Callable[[], Any]:
        a, b = jax.device_put((built.square(n, 1), built.square(n, 2)), target)
        product = jax.jit(import_keras().ops.matmul)
        product(a, b)

        def run():
            last[0] = product(a, b)
            return last[0]

        return run

    return Bench(
        forward=forward,
        sync=lambda: jax.block_until_ready(last[0]),
        to_numpy=built.to_numpy,
        make_backward=make_backward,
        matmul=matmul,
        meta={
            "jax": jax.__version__,
            "device_kind": target.device_kind,
            "forward": "jax.jit(layer.stateless_call)",
            "backward": "jax.jit of the vjp (residuals from setup)",
        },
    )


def _torch(built: Built) -> Bench:
    import torch

    q, kk, v, am = built.inputs

    def forward():
        with torch.no_grad(), built.scope():
            return built.call(q, kk, v, am)

    def make_backward() -> Callable[[], Any]:
        # The graph is recorded once, here: the inputs as leaves requiring grad (the layer's
        # weights are torch Parameters that already do). Each call runs the backward only.
        leaves = [x.detach().requires_grad_() for x in ((q,) if built.self_attention else (q, kk, v))]
        weights = [w.value for w in built.layer.trainable_variables]
        with built.scope():
            out = built.call(*(leaves * 3 if built.self_attention else leaves), am)

        def backward():
            # autograd.grad returns the gradients (inputs, then weights) instead of adding them to .grad
            return torch.autograd.grad(out, [*leaves, *weights], built.grad_output, retain_graph=True)

        return backward

    def matmul(n: int) -> Callable[[], Any]:
        a, b = built.square(n, 1), built.square(n, 2)

        def run():
            with torch.no_grad(), built.scope():
                return import_keras().ops.matmul(a, b)

        return run

    return Bench(
        forward=forward,
        sync=torch.cuda.synchronize if built.device == "cuda" else lambda: None,
        to_numpy=built.to_numpy,
        make_backward=make_backward,
        matmul=matmul,
        meta={
            "torch": torch.__version__,
            "forward": "eager under torch.no_grad",
            "backward": "autograd, graph recorded in setup (retain_graph)",
        },
    )


def bench_function(
    adapter, attend, params, args: tuple, dtype: str, device: str, meta: dict[str, str]
) -> Bench:
    """Timed closures over a pure function ``attend(params, *args)`` of backend tensors already
    on the device (``keras-ops-sdpa``): traced once here where the backend traces
    (``tf.function``, with XLA on GPUs as Keras's ``jit_compile="auto"``; ``jax.jit``), eager under
    ``torch.no_grad`` on torch. Forward only: the adapter has no gradient path. ``meta``: what
    :func:`fix_threads` recorded before the tensors were made."""
    backend = adapter.keras_backend
    k = import_keras()
    last: list[Any] = [None]
    if backend == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(attend, jit_compile=device != "cpu")
        how = f"tf.function ({'XLA' if device != 'cpu' else 'no XLA'})"

        def sync() -> None:
            if device != "cpu":
                tf.test.experimental.sync_devices()
            else:
                last[0].numpy()
    elif backend == "jax":
        import jax

        compiled, how = jax.jit(attend), "jax.jit"

        def sync() -> None:
            jax.block_until_ready(last[0])
    else:
        import torch

        def compiled(params, *args):
            with torch.no_grad():
                return attend(params, *args)

        how = "eager under torch.no_grad"
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward():
        with adapter._device_scope(device):
            last[0] = compiled(params, *args)
        return last[0]

    forward()  # traced and compiled here, never while timed
    sync()

    def matmul(n: int) -> Callable[[], Any]:
        values = [np.random.default_rng(seed).standard_normal((n, n)).astype(np.float32) for seed in (1, 2)]
        with adapter._device_scope(device):
            a, b = (adapter._tensor(x, dtype) for x in values)

        def run():
            with adapter._device_scope(device):
                last[0] = k.ops.matmul(a, b)
            return last[0]

        return run

    meta.update(keras=k.__version__, keras_backend=k.backend.backend(), forward=how)
    return Bench(
        forward=forward,
        sync=sync,
        to_numpy=lambda out: adapter._numpy(out, dtype),
        make_backward=None,  # forward only, as the conformance path
        matmul=matmul,
        meta=meta,
    )
