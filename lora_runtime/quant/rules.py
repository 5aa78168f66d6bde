"""AIMET's rules, from numbers to encodings, and from encodings to ONNX QuantizeLinear/DequantizeLinear.

Weights are symmetric (per channel, or per block of input features), activations asymmetric per tensor,
as AIMET computes them (``quantization_utils.cpp``); scales are rounded to float32 so the file holds
exactly the scale ONNX Runtime uses. ``to_qdq`` maps AIMET's ``x = (q + offset) * scale`` (unsigned
``q``) to ONNX's ``x = (q' - zp) * scale``.
"""

from __future__ import annotations

import math

import numpy as np

from lora_runtime.quant.encodings import EPSILON, Encoding, EncodingsError, check_bw


def _f32(x: float) -> float:
    """Round to the nearest float32: the file then holds exactly the scale ONNX Runtime will use."""
    return float(np.float32(x))


def _round_half_away(x: float) -> int:
    """C ``round``, as AIMET uses (numpy rounds half to even)."""
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def symmetric_per_channel(name: str, weight: np.ndarray, axis: int, bw: int = 8) -> Encoding:
    """AIMET's symmetric (non-strict) rule, one scale per index of ``axis``.

    ``scale = absmax / (2^(bw-1) - 1)`` and ``offset = -2^(bw-1)`` (quantization_utils.cpp: ``delta = max /
    floor(numSteps / 2)``, ``offset = -ceil(numSteps / 2)`` with ``numSteps = 2^bw - 1``). An all-zero channel
    gets AIMET's minimum range (``EPSILON``) so its scale stays positive.
    """
    w = np.asarray(weight, dtype=np.float64)
    check_bw(name, bw)
    if w.ndim == 0 or not -w.ndim <= axis < w.ndim:
        raise EncodingsError(f"tensor {name!r}: axis {axis} does not exist in shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise EncodingsError(f"tensor {name!r}: weight has NaN or infinite values")
    others = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    absmax = np.max(np.abs(w), axis=others) if others else np.abs(w)
    steps = 2 ** (bw - 1) - 1
    scale = tuple(_f32(max(float(a), EPSILON) / steps) for a in np.atleast_1d(absmax))
    return Encoding(name, "INT", "PER_CHANNEL", bw, True, scale, (-(2 ** (bw - 1)),) * len(scale))


def symmetric_per_block(name: str, weight: np.ndarray, block_size: int, bw: int) -> Encoding:
    """AIMET's symmetric rule per block of ``block_size`` input features of ``weight (in, out)``: scales in
    (out, block) order (QAIRT's blockwise layout for an (out, in) weight)."""
    w = np.asarray(weight, dtype=np.float64)
    check_bw(name, bw)
    if w.ndim != 2 or block_size < 1 or w.shape[0] % block_size:
        raise EncodingsError(f"tensor {name!r}: {w.shape[0] if w.ndim == 2 else w.shape} input features do not "
                             f"split into blocks of {block_size}")
    if not np.all(np.isfinite(w)):
        raise EncodingsError(f"tensor {name!r}: weight has NaN or infinite values")
    absmax = np.abs(w.reshape(-1, block_size, w.shape[1])).max(axis=1).T  # (out, blocks)
    steps = 2 ** (bw - 1) - 1
    scale = tuple(_f32(max(float(a), EPSILON) / steps) for a in absmax.ravel())
    return Encoding(name, "INT", "PER_BLOCK", bw, True, scale, (-(2 ** (bw - 1)),) * len(scale), block_size)


def asymmetric_per_tensor(name: str, min: float, max: float, bw: int = 8) -> Encoding:
    """AIMET/QNN asymmetric rule for an observed range.

    The range is first widened to hold 0.0 (AIMET ``gateMinMax``: ``min <= 0 <= max``, ``max - min >= 1e-5``);
    then ``scale = (max - min) / (2^bw - 1)`` and ``offset = -round(-min / scale)``, clamped to
    ``[-(2^bw - 1), 0]``, so 0.0 is exactly representable.
    """
    check_bw(name, bw)
    if not (math.isfinite(min) and math.isfinite(max)) or min > max:
        raise EncodingsError(f"tensor {name!r}: range [{min}, {max}] is not a finite range with min <= max")
    lo, hi = float(np.minimum(min, 0.0)), float(np.maximum(max, 0.0))
    hi = float(np.maximum(hi, lo + EPSILON))
    steps = 2**bw - 1
    scale = _f32((hi - lo) / steps)
    zero = _round_half_away(-lo / scale)
    zero = int(np.clip(zero, 0, steps))
    return Encoding(name, "INT", "PER_TENSOR", bw, False, (scale,), (-zero,))


# --- mapping to ONNX QuantizeLinear / DequantizeLinear ----------------------------------------------------------

_QDQ_TYPES = {(8, True): np.int8, (8, False): np.uint8, (16, True): np.int16, (16, False): np.uint16}


def to_qdq(enc: Encoding, axis: int | None = None) -> tuple[np.ndarray, np.ndarray, int | None]:
    """``(scale, zero_point, axis)`` for ONNX QuantizeLinear/DequantizeLinear, exactly equivalent to ``enc``.

    AIMET: ``x = (q + offset) * scale`` with unsigned ``q`` in ``[0, 2^bw - 1]``. ONNX: ``x = (q' - zp) * scale``.

    - asymmetric (``is_sym`` False): unsigned type, ``q' = q``, ``zp = -offset``.
    - symmetric: signed type, ``q' = q - 2^(bw-1)``, ``zp = -(offset + 2^(bw-1))``; for the usual
      ``offset = -2^(bw-1)`` that is ``zp = 0`` (strict symmetric gives 1, unsigned-symmetric ``-2^(bw-1)``).

    Only bw 8 and 16 map (uint8/int8, uint16/int16). PER_TENSOR gives 0-d arrays and axis None; PER_CHANNEL
    gives 1-d arrays and needs the channel ``axis`` of the tensor (the file does not record it).
    """
    if enc.dtype != "INT":
        raise EncodingsError(f"tensor {enc.name!r}: a {enc.dtype} encoding has no QDQ form")
    zp_type = _QDQ_TYPES.get((enc.bw, enc.is_sym))
    if zp_type is None:
        raise EncodingsError(f"tensor {enc.name!r}: bw {enc.bw} has no ONNX QuantizeLinear integer type here; "
                             "use bw 8 or 16")
    if enc.enc_type == "PER_BLOCK":
        raise EncodingsError(f"tensor {enc.name!r}: PER_BLOCK encodings have no QDQ mapping here yet")
    shift = 2 ** (enc.bw - 1) if enc.is_sym else 0
    zp = np.array([-(o + shift) for o in enc.offset], dtype=np.int64)
    scale = np.array(enc.scale, dtype=np.float32)
    if enc.enc_type == "PER_TENSOR":
        return scale.reshape(()), zp.astype(zp_type).reshape(()), None
    if axis is None:
        raise EncodingsError(f"tensor {enc.name!r}: a PER_CHANNEL encoding needs the tensor's channel axis")
    return scale, zp.astype(zp_type), axis




def float16(name: str) -> Encoding:
    """AIMET's entry for an activation that stays floating point (16 bits): no scale, no offset."""
    return Encoding(name, "FLOAT", "PER_TENSOR", 16, False, (), ())
