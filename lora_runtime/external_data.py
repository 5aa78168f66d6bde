"""ONNX external data, read and written one tensor at a time (never a whole model in memory).

Base models are used where they lie: a tensor is read by its offset in its data file, and new tensors
are appended to a data file as they are produced. Big tensors start on 64 KiB boundaries, so ONNX
Runtime can map them instead of copying (64 KiB is the largest mmap allocation granularity it meets,
Windows'; Linux needs 4096). ``onnx.load`` is not used for data: it refuses hard-linked data files,
and hard links are how a bundle shares the base weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lora_runtime.errors import BaseModelError
from lora_runtime.names import PATCHES

DATA_ALIGN = 65536


class DataWriter:
    """Appends tensors to an open data file and returns initializers that point at them."""

    def __init__(self, f: BinaryIO, location: str) -> None:
        self.f, self.location = f, location

    def tensor(self, name: str, value: np.ndarray | bytes, data_type: int, dims: list[int]) -> TensorProto:
        raw = value if isinstance(value, bytes) else np.ascontiguousarray(value).tobytes()
        offset = self.f.tell()
        offset += -offset % (DATA_ALIGN if len(raw) >= DATA_ALIGN else 64)  # big tensors page-aligned: mapped
        self.f.seek(offset)
        self.f.write(raw)
        t = TensorProto(name=name, data_type=data_type, dims=dims, data_location=TensorProto.EXTERNAL)
        for key, v in (("location", self.location), ("offset", str(offset)), ("length", str(len(raw)))):
            t.external_data.add(key=key, value=v)
        return t

    def array(self, name: str, value: np.ndarray) -> TensorProto:
        """A numpy array, little-endian, with its own ONNX dtype and shape."""
        value = np.ascontiguousarray(value, value.dtype.newbyteorder("<"))
        return self.tensor(name, value, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape))


def tensor_nbytes(t: TensorProto) -> int:
    """An initializer's bytes from its shape and type (wherever its data is: inline or external)."""
    return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def read_tensor(t: TensorProto, base_dir: Path) -> np.ndarray:
    """One initializer's values, reading external data by offset (never the whole file)."""
    if t.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    count = int(np.prod(t.dims, dtype=np.int64))
    path = base_dir / info.get("location", "")
    if not path.resolve().is_relative_to(base_dir.resolve()) or not path.is_file():
        raise BaseModelError(f"{base_dir}: external data {info.get('location')!r} of {t.name!r} is missing or "
                             "outside the model's folder")
    with open(path, "rb") as f:
        f.seek(int(info.get("offset", 0)))
        raw = f.read(count * dtype.itemsize)
    if len(raw) != count * dtype.itemsize:
        raise BaseModelError(f"{base_dir / info['location']}: external data of {t.name!r} is truncated")
    return np.frombuffer(raw, dtype).reshape(tuple(t.dims))


def location(t: TensorProto) -> str | None:
    """The data file of an external initializer, or None when its data is inline."""
    if t.data_location != TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in t.external_data}.get("location", "")


def in_patch(t: TensorProto) -> bool:
    """LoRA parameters whose data is a bundle's patch file (v2/v3 defaults)."""
    return (location(t) or "").startswith(PATCHES + "/")


def inline(t: TensorProto, base_dir: Path) -> None:
    """Read an external initializer's data into the proto (in place)."""
    if t.data_location == TensorProto.EXTERNAL:
        t.raw_data = read_tensor(t, base_dir).tobytes()
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT


def share_data(model: onnx.ModelProto, root: Path, data: str, other: onnx.ModelProto) -> int:
    """Point ``model``'s initializers stored in ``root/data`` at ``other``'s identical ones (same name, same
    bytes), rewrite ``data`` with the rest (deleted when nothing is left); returns the bytes left in it."""
    theirs = {t.name: t for t in other.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    mine = [t for t in model.graph.initializer if location(t) == data]
    left: list[tuple[TensorProto, np.ndarray]] = []
    for t in mine:
        twin = theirs.get(t.name)
        value = read_tensor(t, root)
        if twin is not None and twin.data_type == t.data_type and list(twin.dims) == list(t.dims) \
                and np.array_equal(read_tensor(twin, root), value):
            del t.external_data[:]
            t.external_data.extend(twin.external_data)
        else:
            left.append((t, value.copy()))
    path = root / data
    if not left:
        path.unlink()
        return 0
    with open(path, "wb") as f:
        writer = DataWriter(f, data)
        for t, value in left:
            moved = writer.array(t.name, value)
            del t.external_data[:]
            t.external_data.extend(moved.external_data)
    return path.stat().st_size
