"""AIMET's other encodings layouts, read into the 1.0.0 form: version 2.0.0, and aimet_onnx's per-adapter files.

**2.0.0** (aimet-onnx 2.42 ``QuantizationSimModel.export(..., encoding_version="2.0.0")``)::

    {"version": "2.0.0", "producer": {"package": "aimet-onnx", "version": "2.42.0"},
     "encodings": [{"name": "x", "output_dtype": "uint8", "y_scale": 0.02, "y_zero_point": 131},
                   {"name": "w", "output_dtype": "int8", "y_scale": [s0, s1, ...], "axis": 1},
                   {"name": "w4", "output_dtype": "int4", "y_scale": [[...], ...], "axis": 0, "block_size": 32},
                   {"name": "bias", "output_dtype": "int32", "y_scale": [...], "axis": 0}, ...]}

ONNX's convention, ``x = (q - y_zero_point) * y_scale`` with ``q`` of ``output_dtype`` (no ``y_zero_point``: 0).
In the 1.0.0 form (unsigned ``q``, ``x = (q + offset) * scale``): ``offset = -y_zero_point`` for ``uintN``,
``-y_zero_point - 2^(N-1)`` for ``intN``; a fractional zero point leaves AIMET's ``zero_point_shift`` (its
``_to_1_0_0``: ``offset // 1`` and ``offset % 1``). A signed type with zero point 0 (or -1, AIMET's strict
symmetric) is ``is_sym``; any other zero point is the same grid written unsigned. ``axis`` makes a PER_CHANNEL
entry (PER_BLOCK with ``block_size``: ``axis`` is the block axis, a 2-D scale is laid out (out, block) as 1.0.0
does); it is kept as :attr:`Encoding.axis` (the channel axis) to be checked against the graph. ``float16`` /
``float32`` without a scale are AIMET's FLOAT entries (its 2.0.0 export leaves plain float16 out anyway);
scaled floats (fp8) and LPBQ (``per_block_int_scale``) are refused. 2.0.0 also names the outputs of
data-movement ops (Reshape, Transpose) with their input's encoding, and int32 biases.

**Per-adapter** (``aimet_onnx.experimental.lora``: ``get_lora_encodings`` per adapter, written by
``export_for_deployment`` as ``<prefix>_<adapter>.encodings``, ``json.dump(..., indent=2)``): a plain object
``{tensor name: entry}``, entries in the 1.0.0 form (its default) or 2.0.0, without ``name``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from lora_runtime.quant.encodings import (
    VERSION,
    Encoding,
    EncodingsError,
    EncodingsFile,
    producer_of,
    warn_unknown_keys,
)

V2 = "2.0.0"
PER_ADAPTER = "per-adapter"
_V2_KEYS = ("name", "output_dtype", "y_scale", "y_zero_point", "axis", "block_size")
_LPBQ_KEYS = ("per_block_int_scale", "per_channel_float_scale")
_FLOATS = {"float16": 16, "float32": 32}


def is_per_adapter(data: Mapping[str, Any]) -> bool:
    """aimet_onnx's per-adapter layout: no version, every value an entry (1.0.0 ``dtype`` or 2.0.0 ``output_dtype``)."""
    return "version" not in data and bool(data) and all(
        isinstance(v, dict) and ("dtype" in v or "output_dtype" in v) for v in data.values())


def from_json(data: Mapping[str, Any], source: str) -> EncodingsFile:
    """A decoded 2.0.0 or per-adapter document as an :class:`EncodingsFile` (validated; ``read_as`` says which)."""
    if data.get("version") == V2:
        warn_unknown_keys(data, ("version", "encodings", "producer"), source)
        entries = data.get("encodings")
        if not isinstance(entries, list):
            raise EncodingsError(f"{source}: 2.0.0 needs an 'encodings' list, got {type(entries).__name__}")
        encs = [v2_entry(e, source) for e in entries]
        producer, read_as = producer_of(data, source), V2
    else:
        encs = [_adapter_entry(name, e, source) for name, e in data.items()]
        producer, read_as = None, PER_ADAPTER
    # 2.0.0 does not split activations from parameters: signed (weights, biases) are written as parameters
    params = tuple(e for e in encs if e.is_sym or e.axis is not None)
    acts = tuple(e for e in encs if not (e.is_sym or e.axis is not None))
    f = EncodingsFile(VERSION, acts, params, None, None, source, producer, read_as)
    f.validate()
    return f


def _adapter_entry(name: str, entry: Any, source: str) -> Encoding:
    if "name" in entry and entry["name"] != name:
        raise EncodingsError(f"{source}: the entry keyed {name!r} names tensor {entry['name']!r}")
    if "output_dtype" in entry:
        return v2_entry(entry, source, name)
    return Encoding.from_json({**entry, "name": name}, source)


def v2_entry(entry: Any, source: str, name: str | None = None) -> Encoding:
    """One 2.0.0 entry in the 1.0.0 form (see the module docstring)."""
    if not isinstance(entry, dict):
        raise EncodingsError(f"{source}: an encoding is a {type(entry).__name__}, expected an object")
    name = entry.get("name", name)
    if not isinstance(name, str) or not name:
        raise EncodingsError(f"{source}: an encoding has no usable 'name' (got {name!r})")

    def bad(why: str) -> EncodingsError:
        return EncodingsError(f"{source}: encoding of tensor {name!r}: {why}")

    if any(k in entry for k in _LPBQ_KEYS):
        raise bad("LPBQ (per_block_int_scale) is valid AIMET but not supported by lora_runtime; re-export with "
                  "per-channel or per-block encodings")
    unknown = sorted(set(entry) - set(_V2_KEYS))
    if unknown:
        raise bad(f"unknown key(s) {unknown}")
    dtype = entry.get("output_dtype")
    kind = re.fullmatch(r"(u?)int([0-9]+)", dtype) if isinstance(dtype, str) else None
    if kind is None:
        if dtype in _FLOATS and set(entry) <= {"name", "output_dtype"}:
            return Encoding(name, "FLOAT", "PER_TENSOR", _FLOATS[dtype], False, (), ())
        raise bad(f"output_dtype {dtype!r} is not supported (integer types, or float16/float32 without y_scale)")
    if "y_scale" not in entry:
        raise bad("missing key(s) ['y_scale']")
    signed, bw = not kind.group(1), int(kind.group(2))
    scale, shape = _nested(entry["y_scale"], "y_scale", bad)
    zp, zp_shape = _nested(entry.get("y_zero_point", 0), "y_zero_point", bad)
    if zp_shape not in ((), shape) and len(zp) != len(scale):
        raise bad(f"y_zero_point of shape {list(zp_shape)} does not match y_scale of shape {list(shape)}")
    axis, block = entry.get("axis"), entry.get("block_size")
    if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
        raise bad(f"axis {axis!r} is not an integer")
    channel = axis
    if block is not None:
        if axis is None or len(shape) != 2:
            raise bad("block_size needs an axis and a 2-D y_scale (AIMET's layout of a blocked weight)")
        if axis in (0, -2):  # (blocks, out) -> (out, blocks), the 1.0.0 order
            scale, zp = _transposed(scale, shape), _transposed(zp, shape) if len(zp) > 1 else zp
        channel = 1 if axis in (0, -2) else 0
        enc_type = "PER_BLOCK"
    elif axis is not None:
        enc_type = "PER_CHANNEL"
    elif len(scale) == 1:
        enc_type = "PER_TENSOR"
    else:
        raise bad(f"{len(scale)} scales but no axis")
    zps = zp * len(scale) if len(zp) == 1 else zp
    real = [-float(z) - (2 ** (bw - 1) if signed else 0) for z in zps]
    offsets = tuple(math.floor(r) for r in real)
    shifts = tuple(r - math.floor(r) for r in real)
    sym = (-(2 ** (bw - 1)), -(2 ** (bw - 1) - 1))
    is_sym = signed and not any(shifts) and len(set(offsets)) == 1 and offsets[0] in sym
    return Encoding(name, "INT", enc_type, bw, is_sym, tuple(float(s) for s in scale), offsets, block,
                    shifts if any(shifts) else None, channel)


def _nested(x: Any, what: str, bad: Callable[[str], EncodingsError]) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """A number or a (nested, rectangular) list of numbers: its values in row-major order, and its shape."""
    if isinstance(x, list):
        parts = [_nested(v, what, bad) for v in x]
        shapes = {p[1] for p in parts}
        if len(shapes) > 1:
            raise bad(f"{what} is not a rectangular list")
        return tuple(v for p in parts for v in p[0]), (len(x), *(shapes.pop() if shapes else ()))
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        raise bad(f"{what} holds {x!r}, not a finite number")
    return (x,), ()


def _transposed(values: tuple[float, ...], shape: tuple[int, ...]) -> tuple[float, ...]:
    rows, cols = shape
    return tuple(values[r * cols + c] for c in range(cols) for r in range(rows))
