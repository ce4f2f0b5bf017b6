"""Adapters run in a worker process, so a crash, a hang or an out-of-memory kill of the
implementation under test becomes one failed test instead of the end of the run.

The suite starts one worker (``python -m mha_conformance.execution.worker``) and sends it one request per
test over a pipe; the worker resolves the adapter by the same reference the user gave
(``--adapter``), keeps each prepared module for reuse, runs it and sends back the arrays.
Messages are a JSON header plus raw array bytes (never pickle). A worker that does not
answer within the case timeout is killed with its process group, and one that dies is
reported with its exit code or signal; either way the next test gets a fresh worker.
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
#: What a case sends the worker: inputs, weights, mask and grad_output (never the expectations).
CASE_TENSORS = (
    "query",
    "key",
    "value",
    "w_q",
    "b_q",
    "w_k",
    "b_k",
    "w_v",
    "b_v",
    "w_o",
    "b_o",
    "mask",
    "grad_output",
)
#: Startup (imports of the framework under test, e.g. TensorFlow's ~6 s) gets its own allowance.
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


class Worker:
    """The suite's side: one worker process, restarted after a crash or a timeout."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.sent: set[str] = set()  # cases this worker process already holds

    def _start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mha_conformance.execution.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        self.sent = set()

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

    def execute(
        self,
        ref: str,
        case: Any,
        dtype: str,
        device: str,
        op: str = "forward",
        inputs: dict[str, np.ndarray] | None = None,
    ) -> Execution:
        """Run one request; ``case`` (a GoldenCase) travels with the first request that needs it."""
        fresh = self.proc is None or self.proc.poll() is not None
        if fresh:
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
        if case.id not in self.sent:
            request["spec"] = case.spec
            arrays.update({f"case/{n}": a for n, a in case.tensors.items() if n in CASE_TENSORS})
        limit = self.timeout + (STARTUP_TIMEOUT if fresh else 0.0) if self.timeout > 0 else None
        try:
            write_frame(self.proc.stdin.fileno(), encode(request, arrays))
            payload = read_frame(
                self.proc.stdout.fileno(), None if limit is None else time.monotonic() + limit
            )
        except TimeoutError:
            self.stop()
            return Execution(
                "timeout",
                message=f"the adapter did not finish within {self.timeout:g} s (--case-timeout); its worker was killed",
            )
        except BrokenPipeError:
            payload = None
        if payload is None:
            code = self.proc.wait()
            self.stop()
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            hint = " (SIGKILL: often the kernel's out-of-memory killer)" if code == -signal.SIGKILL else ""
            return Execution("crash", message=f"the adapter's worker process died with {how}{hint}")
        self.sent.add(case.id)
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
    cases: dict[str, golden.GoldenCase] = {}
    while True:
        payload = read_frame(0)
        if payload is None:
            return
        request, arrays = decode(payload)
        try:
            if request["adapter"] not in adapters:
                (adapters[request["adapter"]],) = registry.resolve([request["adapter"]])
            if "spec" in request:
                tensors = {n.removeprefix("case/"): a for n, a in arrays.items() if n.startswith("case/")}
                cases[request["case"]] = golden.GoldenCase(request["spec"], tensors, {}, Path("<sent>"))
            inputs = {n: arrays[n] for n in request["inputs"]} if request["inputs"] else None
            ex = harness.execute(
                adapters[request["adapter"]],
                cases[request["case"]],
                request["dtype"],
                request["device"],
                request.get("op", "forward"),
                inputs,
            )
        except Exception as exc:  # the harness itself failed inside the worker
            ex = Execution("error", message=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-4)}")
        arrays = {k: v for k, v in ex.result.items() if isinstance(v, np.ndarray)}
        others = {k: harness.kind_of(v) for k, v in ex.result.items() if k != "meta" and k not in arrays}
        meta = ex.result.get("meta") or {}
        header = {"status": ex.status, "message": ex.message, "meta": meta, "not_arrays": others}
        write_frame(proto_out, encode(header, arrays))


if __name__ == "__main__":
    serve()
