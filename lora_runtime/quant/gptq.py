"""GPTQ rounding of base weights: the integer codes that minimize the layer's output error, on a fixed grid.

Rounding every weight to its nearest code is optimal per weight but not per layer output: an LLM's
inputs have a few very large channels that amplify the rounding error of their weight rows. GPTQ
(Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") quantizes one input row of ``W (in, out)`` at a time and moves its rounding error onto the
rows not yet quantized, weighted by the inverse of ``H = X^T X`` (X: the layer's calibration inputs), so
the error lands where the inputs are small.

The grid (the scales and offsets of the encoding) is fixed beforehand and written to the encodings file
unchanged: GPTQ only chooses the codes, so any consumer of the encodings (QAIRT, our QDQ graph)
dequantizes them the same way. Measured on SmolLM2-135M (per-channel int8 weights, float activations,
logits SQNR against FP32 on held-out chat prompts): nearest 26.9 dB / 96.4 % argmax agreement, GPTQ
35.2 dB / 100 %.
"""

from __future__ import annotations

import numpy as np

DAMP = 0.01  # fraction of the mean diagonal of H added to it (GPTQ's percdamp)
BLOCK = 128  # rows updated lazily together (the result does not depend on it)


def gptq_codes(w: np.ndarray, h: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmin: int, qmax: int
               ) -> np.ndarray:
    """Codes ``q`` (int64, like ``w``) with ``w ≈ (q - zero) * scale`` for ``w (in, out)``; ``scale``/``zero``
    broadcast to ``w``'s shape (per output column, or per block of input rows too), and ``h (in, in)`` the
    Gram matrix of the layer's inputs."""
    w = np.array(w, np.float64)
    k = w.shape[0]
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0  # inputs always zero in calibration: their rows get nearest codes, no error moves
    h[dead, dead] = 1.0    # (GPTQ's reference zeroes them; an input unseen in calibration may still be seen later)
    h[np.diag_indices(k)] += DAMP * float(np.mean(np.diag(h)))
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper triangular: row i drives rows > i
    except np.linalg.LinAlgError:
        hinv = None
    scale = np.broadcast_to(np.asarray(scale, np.float64), w.shape)
    zero = np.broadcast_to(np.asarray(zero, np.float64), w.shape)
    q = np.empty(w.shape, np.int64)

    def round_row(i: int, row: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(row / scale[i]) + zero[i], qmin, qmax)

    if hinv is None:  # not positive definite even after damping: nearest rounding
        for i in range(k):
            q[i] = round_row(i, w[i])
        return q
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        block = w[i1:i2].copy()
        err = np.empty_like(block)
        hb = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            codes = round_row(i1 + i, block[i])
            q[i1 + i] = codes
            e = (block[i] - (codes - zero[i1 + i]) * scale[i1 + i]) / hb[i, i]
            block[i:] -= np.outer(hb[i, i:], e)
            err[i] = e
        w[i2:] -= hinv[i1:i2, i2:].T @ err
    return q
