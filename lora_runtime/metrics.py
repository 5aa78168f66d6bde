"""How close two outputs are: SQNR, argmax agreement, greedy-token agreement. Pure numpy, no graphs.

    SQNR (dB) = 10 log10( sum(ref^2) / sum((ref - test)^2) )
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB; +inf when identical."""
    ref = np.asarray(reference, np.float64)
    noise = float(np.sum((ref - np.asarray(test, np.float64)) ** 2))
    return sqnr_from(float(np.sum(ref ** 2)), noise)


def sqnr_from(signal: float, noise: float) -> float:
    """SQNR in dB from the sums of squares of the reference and of the difference (accumulated over parts)."""
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def argmax_agreement(reference: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> float:
    """Share of positions whose argmax over the last axis agrees, over pairs of arrays (e.g. logits)."""
    same = [np.argmax(r, -1) == np.argmax(t, -1) for r, t in zip(reference, test)]
    return float(np.mean(np.concatenate([s.ravel() for s in same])))


def prefix_agreement(reference: Sequence[Sequence[int]], test: Sequence[Sequence[int]], tokens: int) -> float:
    """Mean share of the first ``tokens`` greedy tokens that agree before the first difference (a sequence
    equal to the reference, also one that ended early at EOS, agrees fully)."""
    shares = []
    for r, t in zip(reference, test):
        if list(r) == list(t):
            shares.append(1.0)
            continue
        same = next(i for i, (a, b) in enumerate(zip([*r, None], [*t, None])) if a != b)
        shares.append(same / tokens)
    return float(np.mean(shares)) if shares else 1.0
