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


SYMMETRIC_RULES = ("aimet", "absmax")  # the presets' "symmetric_scale"; compiles use "aimet" unless one says


def symmetric_scales(lo: np.ndarray, hi: np.ndarray, bw: int, rule: str = "absmax") -> tuple[float, ...]:
    """Symmetric scales (grid ``-2^(bw-1) .. 2^(bw-1) - 1`` times the scale, offset ``-2^(bw-1)``) of ranges.

    - ``"aimet"``: ``max(-lo / 2^(bw-1), hi / (2^(bw-1) - 1))``, what AIMET computes (measured on aimet-onnx 2.42
      exports): the most negative value lands on the code -2^(bw-1), which absmax never uses; the scale is up to
      2^(bw-1) / (2^(bw-1) - 1) finer (0.8 % at 8 bits, 14 % at 4) when the largest magnitude is negative.
    - ``"absmax"``: ``max(|lo|, |hi|) / (2^(bw-1) - 1)`` (quantization_utils.cpp: ``delta = max / floor(numSteps /
      2)``): the grid is symmetric around 0 and -2^(bw-1) is never used.

    A channel of zeros gets AIMET's minimum range (``EPSILON``) so its scale stays positive.
    """
    if rule not in SYMMETRIC_RULES:
        raise EncodingsError(f"symmetric scale rule {rule!r} is not one of {list(SYMMETRIC_RULES)}")
    lo, hi = np.minimum(np.asarray(lo, np.float64), 0.0), np.maximum(np.asarray(hi, np.float64), 0.0)
    steps = 2 ** (bw - 1) - 1
    if rule == "aimet":
        s = np.maximum(-lo / 2 ** (bw - 1), hi / steps)
        return tuple(_f32(float(v) if v > 0 else EPSILON / steps) for v in np.atleast_1d(s))
    absmax = np.maximum(-lo, hi)
    return tuple(_f32(max(float(a), EPSILON) / steps) for a in np.atleast_1d(absmax))


def symmetric_per_channel(name: str, weight: np.ndarray, axis: int, bw: int = 8, rule: str = "absmax") -> Encoding:
    """AIMET's symmetric (non-strict) encoding, one scale per index of ``axis``; ``rule``: see
    :func:`symmetric_scales` (``offset = -2^(bw-1)``, AIMET: ``offset = -ceil(numSteps / 2)``)."""
    w = np.asarray(weight, dtype=np.float64)
    check_bw(name, bw)
    if w.ndim == 0 or not -w.ndim <= axis < w.ndim:
        raise EncodingsError(f"tensor {name!r}: axis {axis} does not exist in shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise EncodingsError(f"tensor {name!r}: weight has NaN or infinite values")
    others = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    lo, hi = (w.min(axis=others), w.max(axis=others)) if others else (w, w)
    scale = symmetric_scales(lo, hi, bw, rule)
    return Encoding(name, "INT", "PER_CHANNEL", bw, True, scale, (-(2 ** (bw - 1)),) * len(scale))


def symmetric_per_block(name: str, weight: np.ndarray, block_size: int, bw: int, rule: str = "absmax") -> Encoding:
    """The symmetric encoding per block of ``block_size`` input features of ``weight (in, out)``: scales in
    (out, block) order (QAIRT's blockwise layout for an (out, in) weight); ``rule``: see :func:`symmetric_scales`."""
    w = np.asarray(weight, dtype=np.float64)
    check_bw(name, bw)
    if w.ndim != 2 or block_size < 1 or w.shape[0] % block_size:
        raise EncodingsError(f"tensor {name!r}: {w.shape[0] if w.ndim == 2 else w.shape} input features do not "
                             f"split into blocks of {block_size}")
    if not np.all(np.isfinite(w)):
        raise EncodingsError(f"tensor {name!r}: weight has NaN or infinite values")
    blocks = w.reshape(-1, block_size, w.shape[1])
    scale = symmetric_scales(blocks.min(axis=1).T.ravel(), blocks.max(axis=1).T.ravel(), bw, rule)  # (out, blocks)
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
