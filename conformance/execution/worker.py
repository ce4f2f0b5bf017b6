"""Adapters run in a worker process, so a crash, a hang or an out-of-memory kill of the
implementation under test becomes one failed test instead of the end of the run.

The suite starts one worker (``python -m mha_conformance.execution.worker``) and sends it one request per
test over a pipe; the worker resolves the adapter by the same reference the user gave
(``--adapter``), keeps each prepared module for reuse, runs it and sends back the arrays.
Messages are a JSON header plus raw array bytes (never pickle). The worker answers each request
twice: "ready" once the module is prepared, then the result; startup and call have their own
limits, and a worker past either is killed with its process group and the test names the phase.
One that dies is reported with its exit code or signal; either way the next test gets a fresh
worker. The worker holds one case at a time, so its memory does not grow with the catalogue.
"""

from __future__ import annotations

import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from mha_conformance.execution import harness
from mha_conformance.execution.harness import Execution
from mha_conformance.impls import registry
from mha_conformance.vectors import golden

DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16)}
#: What a case sends the worker: inputs, weights, masks and grad_output (never the expectations).
CASE_TENSORS = (*golden.INPUT_NAMES, "grad_output")
#: Startup (a fresh worker's imports, e.g. TensorFlow's ~6 s, the adapter's ``prepare``, a first
#: jit compilation) has its own limit, apart from the call's (``--startup-timeout``).
STARTUP_TIMEOUT = 300.0


# ------------------------------------------------------------------------------ framing


def encode(header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> bytes:
    """JSON header (with each array's dtype, shape and byte length) followed by the bytes."""
    arrays = arrays or {}
    header = {**header, "arrays": [[n, str(a.dtype), list(a.shape), a.nbytes] for n, a in arrays.items()]}
    raw = json.dumps(header).encode()
    body = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values())
    return struct.pack("<I", len(raw)) + raw + body


def decode(payload: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    (size,) = struct.unpack("<I", payload[:4])
    header = json.loads(payload[4 : 4 + size])
    arrays, offset = {}, 4 + size
    for name, dtype, shape, nbytes in header.pop("arrays"):
        dt = DTYPES.get(dtype) or np.dtype(dtype)
        arrays[name] = np.frombuffer(payload[offset : offset + nbytes], dtype=dt).reshape(shape).copy()
        offset += nbytes
    return header, arrays


def write_frame(fd: int, payload: bytes) -> None:
    data = struct.pack("<Q", len(payload)) + payload
    while data:
        data = data[os.write(fd, data) :]


def read_frame(fd: int, deadline: float | None = None) -> bytes | None:
    """One frame, or None at end of file; TimeoutError past ``deadline`` (a time.monotonic())."""

    def exact(n: int) -> bytes | None:
        chunks, left = [], n
        while left:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                    raise TimeoutError
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                return None
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    head = exact(8)
    if head is None:
        return None
    return exact(struct.unpack("<Q", head)[0])


# ------------------------------------------------------------------------------- parent


#: The thread pools an adapter's frameworks size from the environment when they start: OpenMP's
#: (torch's intra-op pool, and Keras on torch through it) and TensorFlow's intra-op pool.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS")


def shared_core_threads(env: dict[str, str]) -> dict[str, str]:
    """Under pytest-xdist with N workers, N adapter workers share the cores: each gets
    ``cores // N`` threads (at least one) in the pools of :data:`THREAD_VARIABLES` that the user
    has not set. Oversubscribed, OpenMP's spinning threads slowed the torch backend's warm run
    over two workers to 251 s (170 s in one) and Keras on torch's to 53 s (19 s with one thread
    each). Verdicts do not depend on the thread count (``nox -s portability``)."""
    workers = int(env.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers < 2:
        return {}
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    return {name: threads for name in THREAD_VARIABLES if not env.get(name)}


class Worker:
    """The suite's side: one worker process, restarted after a crash or a timeout.

    Each request has two phases with their own limits: startup (a fresh process's imports, the
    adapter's import and ``prepare``), bounded by ``startup_timeout``, and the call, bounded by
    ``timeout`` (``--case-timeout``) from the moment the worker reports the module ready."""

    def __init__(self, timeout: float, startup_timeout: float = STARTUP_TIMEOUT) -> None:
        self.timeout = timeout
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.holds: str | None = None  # the one case this worker process holds

    def _start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        env.update(shared_core_threads(env))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mha_conformance.execution.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        self.holds = None

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            stream.close()
        self.proc = None

    def _read(self, limit: float) -> bytes | None:
        return read_frame(self.proc.stdout.fileno(), time.monotonic() + limit if limit > 0 else None)

    def _timed_out(self, phase: str) -> Execution:
        self.stop()
        if phase == "startup":
            what = (
                f"the adapter's startup (worker start, imports and prepare) did not finish within "
                f"{self.startup_timeout:g} s (--startup-timeout)"
            )
        else:
            what = f"the adapter call did not finish within {self.timeout:g} s (--case-timeout)"
        return Execution("timeout", message=f"{what}; its worker was killed")

    def _died(self) -> Execution:
        code = self.proc.wait()
        self.stop()
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        hint = " (SIGKILL: often the kernel's out-of-memory killer)" if code == -signal.SIGKILL else ""
        return Execution("crash", message=f"the adapter's worker process died with {how}{hint}")

    def execute(
        self,
        ref: str,
        case: Any,
        dtype: str,
        device: str,
        op: str = "forward",
        inputs: dict[str, np.ndarray] | None = None,
    ) -> Execution:
        """Run one request; ``case`` (a GoldenCase) travels with the first request that needs it,
        and replaces the one the worker held."""
        if self.proc is None or self.proc.poll() is not None:
            self.stop()
            self._start()
        request = {
            "adapter": ref,
            "case": case.id,
            "dtype": dtype,
            "device": device,
            "op": op,
            "inputs": sorted(inputs or {}),
        }
        arrays = dict(inputs or {})
        if case.id != self.holds:
            request["spec"] = case.spec
            arrays.update({f"case/{n}": a for n, a in case.tensors.items() if n in CASE_TENSORS})
        phase = "startup"
        try:
            write_frame(self.proc.stdin.fileno(), encode(request, arrays))
            payload = self._read(self.startup_timeout)
            if payload is not None and decode(payload)[0].get("phase") == "ready":
                phase = "call"
                payload = self._read(self.timeout)
        except TimeoutError:
            return self._timed_out(phase)
        except BrokenPipeError:
            payload = None
        if payload is None:
            return self._died()
        self.holds = case.id
        header, arrays = decode(payload)
        others = {name: harness.NotAnArray(kind) for name, kind in header.get("not_arrays", {}).items()}
        result = {**arrays, **others, "meta": header.get("meta", {})}
        return Execution(header["status"], result, header.get("message", ""))


# ------------------------------------------------------------------------------- worker


def serve() -> None:
    """The worker loop: protocol frames on the original stdout; anything the adapter prints
    goes to stderr so it can never corrupt a frame."""
    proto_out = os.dup(1)
    os.dup2(2, 1)
    adapters: dict[str, Any] = {}
    case: golden.GoldenCase | None = None  # the one case held; a new one replaces it
    while True:
        payload = read_frame(0)
        if payload is None:
            return
        request, arrays = decode(payload)
        try:
            if request["adapter"] not in adapters:
                (adapters[request["adapter"]],) = registry.resolve([request["adapter"]])
            adapter = adapters[request["adapter"]]
            if "spec" in request:
                tensors = {n.removeprefix("case/"): a for n, a in arrays.items() if n.startswith("case/")}
                case = golden.GoldenCase(request["spec"], tensors, {}, Path("<sent>"))
            op = request.get("op", "forward")
            built = harness.prepare(adapter, case, request["dtype"], request["device"], op)
            if isinstance(built, Execution):
                ex = built
            else:
                write_frame(proto_out, encode({"phase": "ready"}))
                inputs = {n: arrays[n] for n in request["inputs"]} if request["inputs"] else None
                ex = harness.call(adapter, built, case, request["dtype"], op, inputs)
        except Exception as exc:  # the harness itself failed inside the worker
            ex = Execution("error", message=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-4)}")
        arrays = {k: v for k, v in ex.result.items() if isinstance(v, np.ndarray)}
        others = {k: harness.kind_of(v) for k, v in ex.result.items() if k != "meta" and k not in arrays}
        meta = ex.result.get("meta") or {}
        header = {"phase": "result", "status": ex.status, "message": ex.message, "meta": meta}
        write_frame(proto_out, encode({**header, "not_arrays": others}, arrays))


if __name__ == "__main__":
    serve()
