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

Cost: the factor of ``H^-1`` depends only on the input, so layers reading the same tensor (q/k/v, gate/up)
share one (``inverse_factor``, then ``gptq_round`` per weight); output columns are independent, so a wide
weight (``lm_head``) is rounded a slice of columns at a time, in little memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from lora_runtime.arrays import blas_threads, give_back_memory
from lora_runtime.progress import Stage

DAMP = 0.01  # fraction of the mean diagonal of H added to it (GPTQ's percdamp)
BLOCK = 128  # rows updated lazily together (the result does not depend on it)
COLUMNS = 4096  # output columns rounded together (each column's codes depend only on its own weights)
_LEAF = 64  # blocked Cholesky: below this size, LAPACK's


def inverse_factor(h: np.ndarray) -> np.ndarray | None:
    """GPTQ's ``U``: the upper triangular factor of the damped ``H^-1 = U^T U`` (float64), or None when ``H``
    is not positive definite even after damping (then nearest rounding)."""
    h = np.array(h, np.float64)
    k = h.shape[0]
    dead = np.diag(h) == 0  # inputs always zero in calibration: their rows get nearest codes, no error moves
    h[dead, dead] = 1.0    # (GPTQ's reference zeroes them; an input unseen in calibration may still be seen later)
    h[np.diag_indices(k)] += DAMP * float(np.mean(np.diag(h))) if k else 0.0
    # H reversed (J H J) = M M^T with M lower makes H = V V^T with V = J M J upper, so H^-1 = V^-T V^-1 and
    # U = V^-1 = J M^-1 J: one Cholesky and one triangular inverse, no general inverse
    try:
        _, m_inv = _cholesky_inverse(h[::-1, ::-1])
    except np.linalg.LinAlgError:
        return None
    return np.ascontiguousarray(m_inv[::-1, ::-1])


def gptq_codes(w: np.ndarray, h: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmin: int, qmax: int
               ) -> np.ndarray:
    """Codes ``q`` (int64, like ``w``) with ``w ≈ (q - zero) * scale`` for ``w (in, out)``; ``scale``/``zero``
    broadcast to ``w``'s shape (per output column, or per block of input rows too), and ``h (in, in)`` the
    Gram matrix of the layer's inputs."""
    return gptq_round(w, inverse_factor(h), scale, zero, qmin, qmax)


def gptq_round(w: np.ndarray, factor: np.ndarray | None, scale: np.ndarray, zero: np.ndarray, qmin: int, qmax: int,
               dtype: type = np.int64) -> np.ndarray:
    """:func:`gptq_codes` from the input's :func:`inverse_factor` (None: nearest rounding), as ``dtype``."""
    n = w.shape[1]
    scale = np.broadcast_to(np.asarray(scale, np.float64), w.shape)
    zero = np.broadcast_to(np.asarray(zero, np.float64), w.shape)
    q = np.empty(w.shape, dtype)
    for c in range(0, max(n, 1), COLUMNS):
        cols = slice(c, min(c + COLUMNS, n))
        q[:, cols] = _round_columns(np.array(w[:, cols], np.float64), factor, scale[:, cols], zero[:, cols], qmin,
                                    qmax)
    return q


class Hessians:
    """GPTQ's statistics for a graph's linear layers: ``X^T X`` (float32) of each linear input, collected by
    calibration. :meth:`round` turns one into its :func:`inverse_factor` once for the weights that read it in a
    row (q/k/v, gate/up) and frees it after its last reader (``uses``: readers per input, counting every graph
    that is rewritten with these statistics); each weight rounded is one unit of a ``GPTQ`` :class:`Stage`
    (``work``: the elements of all the weights it will round, for the ETA)."""

    def __init__(self, grams: dict[str, np.ndarray] | None = None, uses: Mapping[str, int] | None = None,
                 say: Callable[[str], None] | None = None, work: float | None = None, act_order: bool = False
                 ) -> None:
        self.act_order = act_order  # rows in order of decreasing input energy (GPTQ's "act-order", desc_act)
        self._grams = grams if grams is not None else {}
        self._uses = dict(uses) if uses is not None else dict.fromkeys(self._grams, 1)
        self._last: tuple[str, np.ndarray | None, np.ndarray | None] | None = None
        # work: the weights' elements (an ETA that knows lm_head is 10% of SmolLM2's), counted as they are rounded
        self.stage = Stage(say, "GPTQ", sum(self._uses.get(x, 0) for x in self._grams), "layers", work=work)

    def __contains__(self, x: object) -> bool:
        return x in self._grams

    def __len__(self) -> int:
        return len(self._grams)

    def diagonal(self, x: str) -> np.ndarray | None:
        """The diagonal of input ``x``'s ``X^T X`` (each feature's sum of squares), None when not collected."""
        g = self._grams.get(x)
        return None if g is None else np.diag(g).copy()

    def round(self, x: str, weight: str, w: np.ndarray, scale: np.ndarray, zero: np.ndarray | float, qmin: int,
              qmax: int, dtype: type = np.int64) -> np.ndarray:
        """GPTQ's codes of ``weight`` (``w (in, out)``, read from input ``x``): see :func:`gptq_codes`."""
        with blas_threads(1):  # many small and medium BLAS calls (see lora_runtime.arrays.blas_threads)
            if self._last is None or self._last[0] != x:
                self._last = None  # the previous input's factor goes before the next one is made
                h = self._grams[x]
                order = np.argsort(-np.diag(h), kind="stable") if self.act_order else None
                self._last = (x, inverse_factor(h if order is None else h[np.ix_(order, order)]), order)
            _, factor, order = self._last
            self._uses[x] = self._uses.get(x, 1) - 1
            if self._uses[x] <= 0:  # its last reader: the statistics go now, the factor after this weight
                del self._grams[x]
            if order is None:
                codes = gptq_round(w, factor, scale, np.asarray(zero), qmin, qmax, dtype)
            else:  # the grid stays where it was (per row): rows, scales and zeros permuted together, then back
                full = [np.broadcast_to(np.asarray(a), w.shape)[order] for a in (w, scale, zero)]
                codes = np.empty(w.shape, dtype)
                codes[order] = gptq_round(*full[:1], factor, *full[1:], qmin, qmax, dtype)
        if x not in self._grams:
            self._last = None
            give_back_memory(collect=False)  # the statistics and the factor are gone: their pages too
        self.stage.step(weight, work=w.size)
        return codes


def _round_columns(w: np.ndarray, hinv: np.ndarray | None, scale: np.ndarray, zero: np.ndarray, qmin: int,
                   qmax: int) -> np.ndarray:
    k = w.shape[0]
    q = np.empty(w.shape, np.float64)

    def round_row(i: int, row: np.ndarray) -> np.ndarray:  # np.clip's, in fewer calls
        return np.minimum(np.maximum(np.rint(row / scale[i]) + zero[i], qmin), qmax)

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
            r = i1 + i
            codes = round_row(r, block[i])
            q[r] = codes
            e = (block[i] - (codes - zero[r]) * scale[r]) / hb[i, i]
            block[i + 1:] -= hb[i, i + 1:, None] * e  # the rows after it in the block (row i is done)
            err[i] = e
        w[i2:] -= hinv[i1:i2, i2:].T @ err
    return q


def _cholesky_inverse(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``L`` (lower, ``a = L L^T``) and ``L^-1``, blocked so that the work is matrix products."""
    n = a.shape[0]
    if n <= _LEAF:
        lo = np.linalg.cholesky(a)
        return lo, np.linalg.inv(lo)
    m = n // 2
    l11, i11 = _cholesky_inverse(a[:m, :m])
    l21 = a[m:, :m] @ i11.T
    l22, i22 = _cholesky_inverse(a[m:, m:] - l21 @ l21.T)
    lo, inv = np.zeros_like(a), np.zeros_like(a)
    lo[:m, :m], lo[m:, :m], lo[m:, m:] = l11, l21, l22
    inv[:m, :m], inv[m:, :m], inv[m:, m:] = i11, -(i22 @ l21) @ i11, i22
    return lo, inv
