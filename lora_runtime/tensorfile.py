"""Safetensors files, read and written with every byte checked.

The format: an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``), then the data
section. We read it ourselves instead of through the ``safetensors`` package for three reasons:
the header is validated before a byte of data is trusted (sizes, overlaps, holes, limits), BF16
converts exactly to float32 by bit shifting (numpy has no bfloat16), and the data layout is known
to the byte, so a cold switch can copy a whole patch with one ``readinto``. Files we write are
standard safetensors (the tests read them back with the ``safetensors`` package). Never pickle.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_runtime.errors import TensorFileError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors package refuses larger headers too

_NUMPY_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; converted to float32 on read
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "U16": np.dtype("<u2"),
    "BOOL": np.dtype("?"),
}
_SAFETENSORS_DTYPES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<f8"): "F64",
                       np.dtype("<i8"): "I64", np.dtype("<i4"): "I32", np.dtype("u1"): "U8", np.dtype("<u2"): "U16",
                       np.dtype("i1"): "I8", np.dtype("<i2"): "I16"}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file; ``begin``/``end`` are absolute byte offsets in the file."""

    name: str
    dtype: str  # safetensors spelling: "F32", "BF16", ...
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class TensorFile:
    """The validated header of a safetensors file: what is where, without reading the data."""

    path: Path
    entries: dict[str, TensorEntry]  # in data order
    metadata: dict[str, str]
    data_start: int
    file_size: int
    stamp: tuple[int, int, int] = (-1, -1, -1)  # (inode, size, mtime_ns) of the file the header was read from

    def read(self, name: str, *, float32: bool = False) -> np.ndarray:
        """Read one tensor. BF16 always comes back as exact float32; ``float32=True`` widens F16 too."""
        entry = self.entries[name]
        raw = np.empty(entry.shape, dtype=_NUMPY_DTYPES[entry.dtype])
        with open(self.path, "rb") as f:
            f.seek(entry.begin)
            got = f.readinto(memoryview(raw).cast("B")) if raw.nbytes else 0
        if got != entry.nbytes:
            raise TensorFileError(f"{self.path}: tensor {name!r} is truncated ({got} of {entry.nbytes} bytes)")
        if entry.dtype == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        if float32 and entry.dtype == "F16":
            return raw.astype(np.float32)
        return raw


def read_header(path: str | os.PathLike[str]) -> TensorFile:
    """Parse and check a safetensors header: sizes, dtypes, and that the offsets tile the data exactly."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            file_size, stamp = st.st_size, (st.st_ino, st.st_size, st.st_mtime_ns)
            head = f.read(8)
            if len(head) < 8:
                raise TensorFileError(f"{path}: not a safetensors file ({file_size} bytes, need at least 8)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > file_size:
                raise TensorFileError(
                    f"{path}: safetensors header claims {n} bytes but the file has {file_size} bytes")
            header_bytes = f.read(n)
    except OSError as e:
        raise TensorFileError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        header = json.loads(header_bytes, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError) as e:
        raise TensorFileError(f"{path}: safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise TensorFileError(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + n
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise TensorFileError(f"{path}: safetensors __metadata__ must map strings to strings, got {metadata!r:.80}")
    entries = [_parse_entry(path, name, spec, data_start) for name, spec in header.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    cursor = data_start
    for e in entries:
        if e.begin != cursor:
            raise TensorFileError(f"{path}: tensor {e.name!r} starts at byte {e.begin - data_start} of the data, "
                                  f"expected {cursor - data_start} (overlap or hole)")
        cursor = e.end
    if cursor != file_size:
        raise TensorFileError(f"{path}: tensors cover {cursor - data_start} data bytes but the file holds "
                              f"{file_size - data_start} (truncated or trailing bytes)")
    return TensorFile(path, {e.name: e for e in entries}, dict(metadata), data_start, file_size, stamp)


def load_tensors(path: str | os.PathLike[str], *, float32: bool = False) -> dict[str, np.ndarray]:
    """Read every tensor of a safetensors file, in data order."""
    tf = read_header(path)
    return {name: tf.read(name, float32=float32) for name in tf.entries}


def save_tensors(path: str | os.PathLike[str], tensors: dict[str, np.ndarray],
                 metadata: dict[str, str] | None = None) -> TensorFile:
    """Write tensors in the given order (the data layout follows it byte for byte) and return the header."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for name, array in tensors.items():
        a = np.asarray(array, order="C")  # not ascontiguousarray: it turns a 0-d array into shape (1,)
        dtype = _SAFETENSORS_DTYPES.get(a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype)
        if dtype is None:
            raise TensorFileError(f"{path}: cannot store tensor {name!r} of dtype {a.dtype}")
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a.astype(a.dtype.newbyteorder("<"), copy=False))
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data section starts 8-byte aligned, as the safetensors package writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(memoryview(a).cast("B") if a.nbytes else b"")
    return read_header(path)


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _parse_entry(path: Path, name: str, spec: object, data_start: int) -> TensorEntry:
    if not isinstance(spec, dict):
        raise TensorFileError(f"{path}: header entry {name!r} is not an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in _NUMPY_DTYPES:
        raise TensorFileError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                            for d in shape)):
        raise TensorFileError(f"{path}: tensor {name!r} has invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise TensorFileError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    expected = math.prod(shape) * _NUMPY_DTYPES[dtype].itemsize  # Python ints: np.prod would wrap at 2**63
    if offsets[1] - offsets[0] != expected:
        raise TensorFileError(f"{path}: tensor {name!r} of {dtype} {tuple(shape)} needs {expected} bytes, "
                              f"header says {offsets[1] - offsets[0]}")
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
