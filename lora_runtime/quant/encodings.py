"""The AIMET/QAIRT encodings JSON, version 1.0.0: read, validate, write, and check against a graph.

The file (what AIMET-ONNX ``QuantizationSimModel.export`` writes with ``quantsim.encoding_version = "1.0.0"``)::

    {"version": "1.0.0", "producer": {"package": "aimet-onnx", "version": "2.42.0"},   # optional
     "activation_encodings": [{"name", "dtype": "INT", "enc_type": "PER_TENSOR", "bw", "is_sym",
                               "scale": [s], "offset": [o]}, ...],
     "param_encodings":      [{... "enc_type": "PER_CHANNEL", "scale": [s0, s1, ...], "offset": [...]},
                              {... "enc_type": "PER_BLOCK", "block_size": 64, ...}, ...],
     "quantizer_args": {...},        # optional, opaque debug info (aimet_onnx always writes it)
     "excluded_layers": [...]}       # optional (aimet_torch writes it)

A ``"dtype": "FLOAT"`` entry carries only ``name``, ``dtype``, ``enc_type`` and ``bw`` (16 or 32).
AIMET's ``LPBQ`` and ``VECTOR`` entries are recognised and refused: nothing here can execute them. An INT entry
may carry AIMET's ``zero_point_shift`` (one fraction per scale, the same for all: ``x = (q + offset + shift) *
scale``); it is read and written back, and refused where a tensor would have to execute it (ONNX zero points are
integers). Other top-level keys are ignored with one warning line (``EncodingsWarning``).

``quant.reader.read_encodings`` also reads AIMET's version 2.0.0 and aimet_onnx's per-adapter LoRA files, into this form
(``lora_runtime.quant.aimet_formats``).

Offset convention (AIMET ``trim_functions.cpp``): the integer grid is unsigned, ``q`` in ``[0, 2^bw - 1]``, and

    x = (q + offset) * scale          offset <= 0, so -offset is the grid point that represents 0.0

Symmetric encodings use ``offset = -2^(bw-1)`` (``-128`` for 8 bits; ``-(2^(bw-1) - 1)`` in AIMET's "strict"
mode); asymmetric ones ``offset = -round(-min / scale)``. ONNX ``DequantizeLinear`` computes ``(q' - zp) * scale``;
``lora_runtime.quant.rules.to_qdq`` maps the two; the same module computes encodings from numbers.

Writing is canonical: keys sorted and 4-space indent as AIMET writes them (``json.dump(..., sort_keys=True,
indent=4)``), plus a trailing newline; offsets as JSON integers; floats by ``repr`` so they read back
bit-exactly. ``read_encodings(write_encodings(f))`` equals ``f`` and a written file rewrites to the same bytes.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from lora_runtime.errors import LoraRuntimeError

VERSION = "1.0.0"
DTYPES = ("INT", "FLOAT")
ENC_TYPES = ("PER_TENSOR", "PER_CHANNEL", "PER_BLOCK")
UNSUPPORTED_ENC_TYPES = ("LPBQ", "VECTOR")  # valid in AIMET 1.0.0, not executable here
FLOAT_BWS = (16, 32)
_MIN_BW, _MAX_BW = 2, 32
EPSILON = 1e-5  # AIMET quantization_utils.hpp: max - min is at least this (gateMinMax)

_TOP_KEYS = ("version", "activation_encodings", "param_encodings")
_OPTIONAL_TOP_KEYS = ("quantizer_args", "excluded_layers", "producer")
_INT_KEYS = ("name", "dtype", "enc_type", "bw", "is_sym", "scale", "offset")
_FLOAT_KEYS = ("name", "dtype", "enc_type", "bw")


class EncodingsError(LoraRuntimeError):
    """An encodings file (or an encoding built in memory) is malformed or does not fit the graph."""


class EncodingsWarning(UserWarning):
    """Part of an encodings file was ignored (unknown top-level keys, entries for tensors not quantized here)."""


@dataclass(frozen=True)
class Encoding:
    """One tensor's quantization parameters; field names are the file's keys.

    ``scale``/``offset`` hold one entry for PER_TENSOR, one per output channel for PER_CHANNEL, one per block
    for PER_BLOCK; both are empty for ``dtype == "FLOAT"`` (whose ``is_sym`` is False and not written).
    """

    name: str
    dtype: str
    enc_type: str
    bw: int
    is_sym: bool
    scale: tuple[float, ...]
    offset: tuple[int, ...]
    block_size: int | None = None  # PER_BLOCK only: elements per block along the block axis
    zero_point_shift: tuple[float, ...] | None = None  # AIMET's fractional offset part, one per scale
    axis: int | None = field(default=None, compare=False)  # channel axis in the tensor's layout (2.0.0 files say)

    def validate(self, source: str = "<memory>") -> None:
        """Raise EncodingsError naming ``source`` and the tensor unless this entry is well formed."""

        def bad(why: str) -> EncodingsError:
            return EncodingsError(f"{source}: encoding of tensor {self.name!r}: {why}")

        if not isinstance(self.name, str) or not self.name:
            raise EncodingsError(f"{source}: an encoding has name {self.name!r}; expected a non-empty string")
        if self.dtype not in DTYPES:
            raise bad(f"dtype {self.dtype!r} is not one of {list(DTYPES)}")
        if self.enc_type in UNSUPPORTED_ENC_TYPES:
            raise bad(f"enc_type {self.enc_type!r} is valid AIMET but not supported by lora_runtime; "
                      f"re-export with {list(ENC_TYPES)}")
        if self.enc_type not in ENC_TYPES:
            raise bad(f"enc_type {self.enc_type!r} is not one of {list(ENC_TYPES)}")
        if not _is_int(self.bw):
            raise bad(f"bw {self.bw!r} is not an integer")
        if self.dtype == "FLOAT":
            if self.bw not in FLOAT_BWS:
                raise bad(f"FLOAT bw {self.bw} is not one of {list(FLOAT_BWS)}")
            if self.enc_type != "PER_TENSOR" or self.scale or self.offset or self.is_sym or self.block_size \
                    or self.zero_point_shift:
                raise bad("a FLOAT encoding has enc_type PER_TENSOR and no is_sym, scale, offset or block_size")
            return
        if not _MIN_BW <= self.bw <= _MAX_BW:
            raise bad(f"bw {self.bw} is outside {_MIN_BW}..{_MAX_BW}")
        if not isinstance(self.is_sym, bool):
            raise bad(f"is_sym {self.is_sym!r} is not true/false")
        if not self.scale:
            raise bad("scale is empty")
        if len(self.scale) != len(self.offset):
            raise bad(f"{len(self.scale)} scales but {len(self.offset)} offsets")
        if self.enc_type == "PER_TENSOR" and len(self.scale) != 1:
            raise bad(f"PER_TENSOR with {len(self.scale)} scales; use PER_CHANNEL or a single scale")
        if self.enc_type == "PER_BLOCK":
            if not _is_int(self.block_size) or self.block_size < 1:
                raise bad(f"PER_BLOCK needs a positive integer block_size, got {self.block_size!r}")
        elif self.block_size is not None:
            raise bad(f"block_size is only meaningful for PER_BLOCK, not {self.enc_type}")
        for i, s in enumerate(self.scale):
            if isinstance(s, bool) or not isinstance(s, float | int) or not math.isfinite(s) or s <= 0:
                raise bad(f"scale[{i}] = {s!r} is not a positive finite number")
        shift = self.zero_point_shift
        if shift is not None:
            if len(shift) != len(self.scale) or any(not _is_number(x) or not 0 <= x < 1 for x in shift):
                raise bad(f"zero_point_shift {list(shift)!r} is not one fraction in [0, 1) per scale")
            if len(set(shift)) > 1:
                raise bad("zero_point_shift differs between channels (AIMET loads one shift per tensor)")
        lowest = -(2**self.bw - 1)
        sym_offsets = (-(2 ** (self.bw - 1)), -(2 ** (self.bw - 1) - 1), 0)
        for i, o in enumerate(self.offset):
            if not _is_int(o) or not lowest <= o <= 0:
                raise bad(f"offset[{i}] = {o!r} is outside [{lowest}, 0] for bw {self.bw} "
                          "(AIMET: x = (q + offset) * scale, q in [0, 2^bw - 1])")
            if self.is_sym and o not in sym_offsets:
                raise bad(f"offset[{i}] = {o} is not symmetric for bw {self.bw}; expected one of {list(sym_offsets)}")

    def to_json(self) -> dict[str, Any]:
        """The entry as AIMET writes it (key order is fixed at dump time by sort_keys)."""
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "enc_type": self.enc_type, "bw": self.bw}
        if self.dtype == "INT":
            out["is_sym"] = self.is_sym
            out["scale"] = [float(s) for s in self.scale]
            out["offset"] = [int(o) for o in self.offset]
            if self.block_size is not None:
                out["block_size"] = self.block_size
            if self.zero_point_shift is not None:
                out["zero_point_shift"] = [float(x) for x in self.zero_point_shift]
        return out

    @classmethod
    def from_json(cls, entry: Any, source: str = "<memory>") -> Encoding:
        """Parse and validate one entry of ``activation_encodings`` / ``param_encodings``."""
        if not isinstance(entry, dict):
            raise EncodingsError(f"{source}: an encoding is a {type(entry).__name__}, expected an object")
        name = entry.get("name")
        label = f"{source}: encoding of tensor {name!r}"
        if not isinstance(name, str) or not name:
            raise EncodingsError(f"{source}: an encoding has no usable 'name' (got {name!r})")
        dtype = entry.get("dtype")
        required = _FLOAT_KEYS if dtype == "FLOAT" else _INT_KEYS
        missing = [k for k in required if k not in entry]
        if missing:
            raise EncodingsError(f"{label}: missing key(s) {missing}")
        allowed = set(required) | ({"block_size", "zero_point_shift"} if dtype != "FLOAT" else set())
        if entry.get("enc_type") in UNSUPPORTED_ENC_TYPES:
            allowed = set(entry)  # let validate() give the precise message
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise EncodingsError(f"{label}: unknown key(s) {unknown}")
        if dtype == "FLOAT":
            enc = cls(name, dtype, entry["enc_type"], entry["bw"], False, (), ())
        else:
            scale, offset = entry["scale"], entry["offset"]
            if not isinstance(scale, list) or not isinstance(offset, list):
                raise EncodingsError(f"{label}: scale and offset must be lists")
            shift = entry.get("zero_point_shift")
            if shift is not None and not isinstance(shift, list):
                raise EncodingsError(f"{label}: zero_point_shift must be a list")
            enc = cls(name, dtype, entry["enc_type"], entry["bw"], entry["is_sym"],
                      tuple(float(s) if _is_number(s) else s for s in scale),
                      tuple(_as_int(o) for o in offset), entry.get("block_size"),
                      None if shift is None else tuple(shift))
        enc.validate(source)
        return enc


@dataclass(frozen=True)
class EncodingsFile:
    """A whole encodings file. ``source`` (the path, for messages) takes no part in equality."""

    version: str
    activation_encodings: tuple[Encoding, ...]
    param_encodings: tuple[Encoding, ...]
    quantizer_args: Mapping[str, Any] | None = field(default=None, hash=False)  # opaque, kept for round trip
    excluded_layers: tuple[str, ...] | None = None
    source: str = field(default="<memory>", compare=False, repr=False)
    producer: Mapping[str, Any] | None = field(default=None, hash=False)  # AIMET's {"package", "version"}, kept
    read_as: str = field(default=VERSION, compare=False, repr=False)  # the layout read: 1.0.0, 2.0.0, per-adapter

    @property
    def from_aimet(self) -> bool:
        """Written by AIMET itself: its ``producer`` says so, or it is aimet_onnx's per-adapter layout."""
        package = (self.producer or {}).get("package")
        return self.read_as == "per-adapter" or (isinstance(package, str) and package.startswith("aimet"))

    def validate(self) -> None:
        """Raise EncodingsError unless every entry is valid and every tensor is named once."""
        if self.version != VERSION:
            raise EncodingsError(f"{self.source}: version {self.version!r} is not supported; expected {VERSION!r}")
        seen: set[str] = set()
        for enc in self.activation_encodings + self.param_encodings:
            enc.validate(self.source)
            if enc.name in seen:
                raise EncodingsError(f"{self.source}: tensor {enc.name!r} has more than one encoding")
            seen.add(enc.name)

    @cached_property
    def _by_name(self) -> dict[str, Encoding]:
        return {e.name: e for e in self.activation_encodings + self.param_encodings}

    def find(self, name: str) -> Encoding | None:
        """The encoding of tensor ``name``, or None when the file does not name it."""
        return self._by_name.get(name)

    def __getitem__(self, name: str) -> Encoding:
        enc = self._by_name.get(name)
        if enc is None:
            raise EncodingsError(f"{self.source}: no encoding for tensor {name!r}")
        return enc

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version,
            "activation_encodings": [e.to_json() for e in self.activation_encodings],
            "param_encodings": [e.to_json() for e in self.param_encodings],
        }
        if self.quantizer_args is not None:
            out["quantizer_args"] = dict(self.quantizer_args)
        if self.excluded_layers is not None:
            out["excluded_layers"] = list(self.excluded_layers)
        if self.producer is not None:
            out["producer"] = dict(self.producer)
        return out

    @classmethod
    def from_json(cls, data: Any, source: str = "<memory>") -> EncodingsFile:
        """Parse and validate a decoded 1.0.0 document (any layout AIMET writes: ``quant.reader``)."""
        if not isinstance(data, dict):
            raise EncodingsError(f"{source}: top level is a {type(data).__name__}, expected an object")
        if "version" not in data:
            raise EncodingsError(f"{source}: missing key 'version'; expected {VERSION!r} "
                                 f"(re-export from AIMET with quantsim.encoding_version = {VERSION!r})")
        if data["version"] != VERSION:
            raise EncodingsError(f"{source}: version {data['version']!r} is not supported; expected {VERSION!r}")
        missing = [k for k in _TOP_KEYS if k not in data]
        if missing:
            raise EncodingsError(f"{source}: missing key(s) {missing}")
        warn_unknown_keys(data, (*_TOP_KEYS, *_OPTIONAL_TOP_KEYS), source)
        lists = {}
        for key in ("activation_encodings", "param_encodings"):
            if not isinstance(data[key], list):
                raise EncodingsError(f"{source}: {key} is a {type(data[key]).__name__}, expected a list")
            lists[key] = tuple(Encoding.from_json(e, source) for e in data[key])
        qargs = data.get("quantizer_args")
        if qargs is not None and not isinstance(qargs, dict):
            raise EncodingsError(f"{source}: quantizer_args is a {type(qargs).__name__}, expected an object")
        excluded = data.get("excluded_layers")
        if excluded is not None and (not isinstance(excluded, list) or not all(isinstance(x, str) for x in excluded)):
            raise EncodingsError(f"{source}: excluded_layers must be a list of strings")
        f = cls(data["version"], lists["activation_encodings"], lists["param_encodings"], qargs,
                None if excluded is None else tuple(excluded), source, producer_of(data, source))
        f.validate()
        return f


def producer_of(data: Mapping[str, Any], source: str) -> Mapping[str, Any] | None:
    """AIMET's ``producer`` object (``{"package": "aimet-onnx", "version": ...}``), or None."""
    producer = data.get("producer")
    if producer is not None and not isinstance(producer, dict):
        raise EncodingsError(f"{source}: producer is a {type(producer).__name__}, expected an object")
    return producer


def warn_unknown_keys(data: Mapping[str, Any], known: Sequence[str], source: str) -> None:
    """Keys AIMET writes that carry nothing for us are ignored; any other top-level key: one warning line."""
    unknown = sorted(set(data) - set(known))
    if unknown:
        warnings.warn(f"{source}: unknown top-level key(s) {unknown} ignored", EncodingsWarning, stacklevel=3)


def dumps_encodings(f: EncodingsFile) -> str:
    """The canonical text of ``f``: AIMET's layout (sorted keys, indent 4) plus a trailing newline."""
    f.validate()
    return json.dumps(f.to_json(), sort_keys=True, indent=4, allow_nan=False) + "\n"


def write_encodings(path: str | os.PathLike[str], f: EncodingsFile) -> None:
    """Validate ``f`` and write it canonically (atomic: a temporary file renamed over ``path``)."""
    text = dumps_encodings(f)
    target = os.fspath(path)
    tmp = f"{target}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
    os.replace(tmp, target)


def check_bw(name: str, bw: int) -> None:
    if not _is_int(bw) or not _MIN_BW <= bw <= _MAX_BW:
        raise EncodingsError(f"tensor {name!r}: bw {bw!r} is outside {_MIN_BW}..{_MAX_BW}")


# --- checking a file against a graph ----------------------------------------------------------------------------


def check_fits(f: EncodingsFile, tensors: Mapping[str, Sequence[int | None] | None],
               channel_axes: Mapping[str, int] | None = None) -> None:
    """Raise EncodingsError naming the tensor when ``f`` does not fit the graph's tensors.

    ``tensors`` maps graph tensor names to shapes (None, or None entries, where unknown). Every encoded tensor
    must exist. PER_CHANNEL: the channel count must equal ``shape[channel_axes[name]]`` when the axis is given,
    else some dimension of the shape. PER_BLOCK: the block count must be ``numel / block_size``.
    """
    axes = channel_axes or {}
    for enc in f.activation_encodings + f.param_encodings:
        if enc.name not in tensors:
            raise EncodingsError(f"{f.source}: tensor {enc.name!r} is not in the graph")
        shape = tensors[enc.name]
        if shape is None or any(d is None for d in shape) or enc.dtype != "INT":
            continue
        dims = tuple(int(d) for d in shape)  # type: ignore[arg-type]
        n = len(enc.scale)
        if enc.enc_type == "PER_CHANNEL":
            axis = axes.get(enc.name)
            if axis is not None:
                if not -len(dims) <= axis < len(dims) or dims[axis] != n:
                    raise EncodingsError(f"{f.source}: tensor {enc.name!r} of shape {list(dims)} has no axis "
                                         f"{axis} of size {n} for its {n} per-channel scales")
            elif n not in dims:
                raise EncodingsError(f"{f.source}: tensor {enc.name!r} of shape {list(dims)} has no dimension "
                                     f"of size {n} for its {n} per-channel scales")
        elif enc.enc_type == "PER_BLOCK":
            numel = math.prod(dims)
            if enc.block_size is None or numel % enc.block_size or numel // enc.block_size != n:
                raise EncodingsError(f"{f.source}: tensor {enc.name!r} of shape {list(dims)} does not split into "
                                     f"{n} blocks of {enc.block_size}")


# --- small JSON type helpers ------------------------------------------------------------------------------------


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _as_int(x: object) -> object:
    """AIMET-ONNX writes offsets as floats (``-128.0``): accept integral floats, leave anything else to fail."""
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return x
