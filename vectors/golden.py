"""Reading and writing golden case files: the vector contract in code.

One safetensors file per case, ``vectors/<case id>.safetensors``, and ``vectors/MANIFEST.json``
with each file's sha256. Nothing here unpickles: safetensors holds raw arrays and JSON.
Every problem raises :class:`VectorError` naming the file, the case and the tensor, and
saying what to do, before any adapter sees the data.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load

from mha_conformance.impls import reference

VECTORS_DIR = Path(__file__).resolve().parent
MANIFEST = "MANIFEST.json"
#: Format 1: inputs, weights and grad_output stored float32. Format 2: stored in the dtype the
#: spec's ``input_dtype`` names (float64 for the full-precision float64 cases), else as format 1.
#: Format 3 (contract v2): a case may also use the attention variants (``attn_bias`` with its
#: gradient, ``softcap``, ``window``, ``kv_lengths``; impls/reference.py). A file is written in the
#: lowest format that holds it, so format-1 readers read every case whose inputs are float32 and
#: that uses no variant, and format-2 readers every case but the variants.
FORMAT_VERSION = "3"
READABLE_FORMATS = ("1", "2", "3")
#: A case header lists a few dozen tensors and three JSON strings; anything bigger is damage.
MAX_HEADER_BYTES = 1 << 20
REQUIRED_SPEC_KEYS = (
    "id batch q_len kv_len d_in kdim vdim num_heads num_kv_heads head_dim v_head_dim d_out "
    "causal scale qkv_bias out_proj out_bias dropout fully_masked_rows dtypes"
).split()
INPUT_NAMES = (
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
    "attn_bias",
)
REGENERATE = (
    "run `python -m mha_conformance.vectors generate` (or restore the file with `git checkout vectors/`)"
)


class VectorError(Exception):
    """A golden file or the manifest is missing, damaged or inconsistent."""


@dataclass
class GoldenCase:
    """One case: its spec, its tensors, and its precision baselines."""

    spec: dict[str, Any]
    tensors: dict[str, np.ndarray]
    baseline: dict[str, Any]
    path: Path
    #: Made in memory (a transformed or fuzzed case), not read from the store: a worker
    #: process must be sent its tensors rather than load it by id.
    synthetic: bool = False
    #: The file's sha256, so a worker process can tell it reads the same bytes as the suite.
    sha256: str = ""

    @property
    def id(self) -> str:
        return self.spec["id"]

    def inputs(self) -> dict[str, np.ndarray]:
        """Inputs, weights, biases and mask: what an adapter may see (never expectations)."""
        return {k: v for k, v in self.tensors.items() if k in INPUT_NAMES}


def input_dtype(spec: dict[str, Any]) -> str:
    """The dtype a case stores its inputs, weights and grad_output in."""
    return spec.get("input_dtype", "float32")


def file_format(spec: dict[str, Any]) -> str:
    """The lowest format that holds the case: 3 where it uses a variant, 2 where inputs are stored in
    float64, else 1."""
    if reference.case_variants(spec):
        return "3"
    return "2" if input_dtype(spec) != "float32" else "1"


def expected_layout(spec: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor a case file must hold, with its shape and storage dtype.

    Inputs, weights and ``grad_output`` are stored in ``spec["input_dtype"]`` (float32 unless the
    case is float64 alone) holding values exactly representable in every listed dtype; ``mask``
    is bool; ``attn_bias`` is stored like the inputs (``-inf`` allowed); expectations and gradients
    are float64.
    """
    b, tq, tk = spec["batch"], spec["q_len"], spec["kv_len"]
    h, hkv, hd, hdv = spec["num_heads"], spec["num_kv_heads"], spec["head_dim"], spec["v_head_dim"]
    f32, f64 = input_dtype(spec), "float64"
    inputs = {
        "query": (b, tq, spec["d_in"]),
        "key": (b, tk, spec["kdim"]),
        "value": (b, tk, spec["vdim"]),
        "w_q": (spec["d_in"], h * hd),
        "w_k": (spec["kdim"], hkv * hd),
        "w_v": (spec["vdim"], hkv * hdv),
    }
    if spec["qkv_bias"]:
        inputs.update(b_q=(h * hd,), b_k=(hkv * hd,), b_v=(hkv * hdv,))
    if spec["out_proj"]:
        inputs["w_o"] = (h * hdv, spec["d_out"])
        if spec["out_bias"]:
            inputs["b_o"] = (spec["d_out"],)
    check_variants(spec)
    if spec.get("attn_bias") is not None:
        inputs["attn_bias"] = tuple(spec["attn_bias"]["shape"])
    layout = {name: (shape, f32) for name, shape in inputs.items()}
    layout["grad_output"] = ((b, tq, spec["d_out"]), f32)
    layout["output"] = ((b, tq, spec["d_out"]), f64)
    if spec.get("store_weights", True):  # a kernel-scale case too large for them has none
        layout["attn_weights"] = ((b, h, tq, tk), f64)
    for grad in spec["gradients"]:
        layout[grad] = (inputs[grad.removeprefix("grad_")], f64)
    if spec.get("mask") is not None:
        layout["mask"] = (tuple(spec["mask"]["shape"]), "bool")
    return layout


def check_variants(spec: dict[str, Any]) -> None:
    """Raise ValueError where a variant's spec entry is out of its contract (docs/semantics.md#variants)."""
    b, h, tq, tk = spec["batch"], spec["num_heads"], spec["q_len"], spec["kv_len"]
    lengths, window, cap, bias = (spec.get(k) for k in ("kv_lengths", "window", "softcap", "attn_bias"))
    if lengths is not None and (
        len(lengths) != b or not all(isinstance(n, int) and 0 <= n <= tk for n in lengths)
    ):
        raise ValueError(f"kv_lengths {lengths} must be {b} integers in 0..{tk}")
    if window is not None and (len(window) != 2 or not all(isinstance(n, int) and n >= -1 for n in window)):
        raise ValueError(f"window {window} must be [left, right], integers >= -1 (-1: unbounded)")
    if cap is not None and not (isinstance(cap, (int, float)) and cap > 0):
        raise ValueError(f"softcap {cap} must be a positive number")
    if bias is not None:
        shape = tuple(bias.get("shape", ()))
        if len(shape) != 4 or shape[0] not in (1, b) or shape[1] not in (1, h) or shape[2:] != (tq, tk):
            raise ValueError(f"attn_bias shape {list(shape)} must be [{b}|1, {h}|1, {tq}, {tk}]")


SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "bool": "BOOL"}


def serialize(arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """The safetensors encoding with a canonical header, so equal content gives equal bytes.

    The safetensors library keeps metadata in a hash map and writes it in a per-process
    random order; golden files must be byte-identical across runs, so the header is written
    here with sorted keys (tensors ordered by alignment, then name, as the library does).
    """
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n)):
        buf = np.ascontiguousarray(arrays[name]).astype(arrays[name].dtype.newbyteorder("<")).tobytes()
        dtype = SAFETENSORS_DTYPES[arrays[name].dtype.name]
        header[name] = {
            "dtype": dtype,
            "shape": list(arrays[name].shape),
            "data_offsets": [offset, offset + len(buf)],
        }
        chunks.append(buf)
        offset += len(buf)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(chunks)


def write_case(root: Path, spec: dict[str, Any], tensors: dict[str, np.ndarray], baseline: dict) -> Path:
    """Write one case file; metadata values are JSON strings, as safetensors requires."""
    layout = expected_layout(spec)
    arrays = {name: np.asarray(tensors[name], dtype=dtype) for name, (_, dtype) in layout.items()}
    metadata = {
        "format_version": file_format(spec),
        "spec": json.dumps(spec, sort_keys=True),
        "baseline": json.dumps(baseline, sort_keys=True),
    }
    path = root / f"{spec['id']}.safetensors"
    path.write_bytes(serialize(arrays, metadata))
    return path


def inputs_digest(tensors: dict[str, np.ndarray]) -> str:
    """The sha256 of a case's inputs, weights, mask, bias and ``grad_output``: each tensor's name,
    dtype, shape and little-endian bytes, in name order. These never touch BLAS, so the digest is
    the same on every machine, unlike the file's, which holds the truth too (vectors/verify.py)."""
    digest = hashlib.sha256()
    for name in sorted(n for n in tensors if n in INPUT_NAMES or n == "grad_output"):
        array = np.ascontiguousarray(tensors[name])
        array = array.astype(array.dtype.newbyteorder("<"))
        digest.update(f"{name}:{array.dtype.name}:{list(array.shape)};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def manifest_entry(path: Path) -> dict[str, Any]:
    """A case's manifest entry: its file, the file's sha256 and size, and :func:`inputs_digest`."""
    data = path.read_bytes()
    return {
        "file": path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "inputs_sha256": inputs_digest(st_load(data)),
    }


def read_manifest(root: Path = VECTORS_DIR) -> dict[str, Any]:
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise VectorError(f"{path}: the manifest is missing; {REGENERATE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VectorError(f"{path}: the manifest is not valid JSON ({exc}); {REGENERATE}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("cases"), dict):
        raise VectorError(f"{path}: the manifest has no 'cases' object; {REGENERATE}")
    version = manifest.get("format_version")
    if version not in READABLE_FORMATS:
        raise VectorError(
            f"{path}: vector format version {version!r}, but this suite reads {', '.join(READABLE_FORMATS)}; "
            "use the mha-conformance release that wrote these vectors, or regenerate them with this one "
            "(python -m mha_conformance.vectors generate)"
        )
    return manifest


def case_ids(root: Path = VECTORS_DIR) -> list[str]:
    """Every case the manifest lists, in catalogue order."""
    return list(read_manifest(root)["cases"])


def _parse_header(path: Path, data: bytes) -> dict[str, Any]:
    """Check the safetensors header by hand before the library trusts it."""
    if len(data) < 8:
        raise VectorError(f"{path}: truncated ({len(data)} bytes, no header); {REGENERATE}")
    (size,) = struct.unpack("<Q", data[:8])
    if size > MAX_HEADER_BYTES or size > len(data) - 8:
        raise VectorError(
            f"{path}: header claims {size} bytes but the file has {len(data) - 8} after the "
            f"length field (limit {MAX_HEADER_BYTES}); the file is truncated or damaged; {REGENERATE}"
        )
    try:
        header = json.loads(data[8 : 8 + size])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VectorError(f"{path}: header is not valid JSON ({exc}); {REGENERATE}") from None
    if not isinstance(header, dict):
        raise VectorError(f"{path}: header is not a JSON object; {REGENERATE}")
    return header


def _metadata(path: Path, header: dict[str, Any]) -> tuple[dict, dict]:
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise VectorError(f"{path}: no metadata (spec, baseline, format_version); {REGENERATE}")
    if meta.get("format_version") not in READABLE_FORMATS:
        raise VectorError(
            f"{path}: format_version {meta.get('format_version')!r}, this code reads "
            f"{', '.join(READABLE_FORMATS)}; update mha-conformance or {REGENERATE}"
        )
    parsed = []
    for key in ("spec", "baseline"):
        try:
            value = json.loads(meta[key])
        except KeyError:
            raise VectorError(f"{path}: metadata has no '{key}'; {REGENERATE}") from None
        except (json.JSONDecodeError, TypeError) as exc:
            raise VectorError(f"{path}: metadata '{key}' is not valid JSON ({exc}); {REGENERATE}") from None
        if not isinstance(value, dict):
            raise VectorError(f"{path}: metadata '{key}' is not a JSON object; {REGENERATE}")
        parsed.append(value)
    spec, baseline = parsed
    missing = [k for k in REQUIRED_SPEC_KEYS + ["gradients"] if k not in spec]
    if missing:
        raise VectorError(f"{path}: spec lacks {', '.join(missing)}; {REGENERATE}")
    return spec, baseline


def load_case(case_id: str, root: Path = VECTORS_DIR, manifest: dict | None = None) -> GoldenCase:
    """Load and validate one case: hash, header, metadata, tensor names, shapes and dtypes."""
    manifest = manifest or read_manifest(root)
    entry = manifest["cases"].get(case_id)
    if entry is None:
        raise VectorError(f"case {case_id}: not in {root / MANIFEST}; check the id or {REGENERATE}")
    path = root / f"{case_id}.safetensors"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise VectorError(f"case {case_id}: {path} is missing; {REGENERATE}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.get("sha256"):
        raise VectorError(
            f"case {case_id}: {path} has sha256 {digest[:12]}..., the manifest says "
            f"{str(entry.get('sha256'))[:12]}...; the file was changed or damaged; {REGENERATE}"
        )
    header = _parse_header(path, data)
    spec, baseline = _metadata(path, header)
    if spec["id"] != case_id:
        raise VectorError(f"{path}: holds case {spec['id']!r}, expected {case_id!r}; {REGENERATE}")
    stated = header["__metadata__"]["format_version"]
    if stated != file_format(spec):
        raise VectorError(
            f"{path}: format_version {stated!r} but its inputs are stored {input_dtype(spec)} (format "
            f"{file_format(spec)}); {REGENERATE}"
        )
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types for damaged data
        raise VectorError(f"case {case_id}: {path} cannot be read ({exc}); {REGENERATE}") from None
    check_layout(path, spec, tensors)
    return GoldenCase(spec, tensors, baseline, path, sha256=digest)


def check_layout(path: Path, spec: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """Every expected tensor present with its shape and dtype, and nothing else."""
    try:
        layout = expected_layout(spec)
    except (KeyError, TypeError, ValueError) as exc:
        raise VectorError(f"{path}: spec is malformed ({exc!r}); {REGENERATE}") from None
    missing = sorted(set(layout) - set(tensors))
    extra = sorted(set(tensors) - set(layout))
    if missing or extra:
        raise VectorError(
            f"case {spec['id']}: {path} is missing tensors {missing} / has unexpected {extra}; {REGENERATE}"
        )
    for name, (shape, dtype) in layout.items():
        arr = tensors[name]
        if arr.shape != shape or arr.dtype != np.dtype(dtype):
            raise VectorError(
                f"case {spec['id']}: tensor '{name}' in {path} is {arr.dtype}{list(arr.shape)}, "
                f"the spec implies {dtype}{list(shape)}; {REGENERATE}"
            )
