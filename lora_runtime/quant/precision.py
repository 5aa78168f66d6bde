"""Mixed precision by a measured sensitivity pass: which activations are too coarse at the preset's bitwidth.

Each activation's own quantization error is measured per token on the calibration data; one below the
threshold gets 16 bits, and one still below it at 16 bits stays float16 (AIMET's ``FLOAT`` entry).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lora_runtime.quant.calibrate import TensorRange
from lora_runtime.quant.rules import asymmetric_per_tensor


def token_sqnr_db(rows: np.ndarray, lo: float, hi: float, bw: int) -> float:
    """SQNR of ``bw``-bit asymmetric quantization over ``[lo, hi]``, with each row (token) weighted equally:
    ``-10 log10(mean_row(noise / signal))``. A global SQNR would let the few tokens with massive activations
    (hundreds to thousands, which set the range) hide that every ordinary token is quantized coarsely."""
    x = np.atleast_2d(np.asarray(rows, np.float64))
    e = asymmetric_per_tensor("t", lo, hi, bw=bw)
    scale, zero = e.scale[0], -e.offset[0]
    q = (np.clip(np.rint(x / scale) + zero, 0, 2**bw - 1) - zero) * scale
    signal = np.sum(x**2, axis=-1)
    noise = np.sum((x - q) ** 2, axis=-1)
    live = signal > 0
    if not np.any(live):
        return float("inf")
    ratio = float(np.mean(noise[live] / signal[live]))
    return float("inf") if ratio == 0 else float(-10 * np.log10(ratio))


def choose_precision(values: Mapping[str, Sequence[np.ndarray]], ranges: Mapping[str, TensorRange],
                     threshold_db: float, start_bw: Mapping[str, int]) -> dict[str, tuple[int | str, float]]:
    """Mixed precision by a measured sensitivity pass: each activation whose own quantization at its preset
    bitwidth is worse than ``threshold_db`` (``token_sqnr_db`` on the kept calibration rows) is widened to
    16 bits, and to float16 if 16 bits are still worse. Returns tensor -> (bits or "float16", dB at the
    preset's bitwidth) for the tensors that changed."""
    out: dict[str, tuple[int | str, float]] = {}
    for t, chunks in values.items():
        rows = np.concatenate([np.atleast_2d(c) for c in chunks])
        bw = start_bw[t]
        db = token_sqnr_db(rows, ranges[t].min, ranges[t].max, bw)
        if db >= threshold_db:
            continue
        wide = 16 if bw < 16 and token_sqnr_db(rows, ranges[t].min, ranges[t].max, 16) >= threshold_db else "float16"
        out[t] = (wide, db)
    return out
