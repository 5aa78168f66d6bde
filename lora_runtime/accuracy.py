"""Accuracy of a reduced-precision bundle: SQNR of its outputs against a reference, per use-case.

    SQNR (dB) = 10 log10( sum(ref^2) / sum((ref - test)^2) )

Inputs are the user's (``sample_inputs``) or synthesized from the graph's input types: token ids
below 32 for int64 inputs (ones for inputs named like masks), standard normal for floats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

from lora_runtime.bundle import Bundle
from lora_runtime.errors import InputError
from lora_runtime.runtime.simple import make_session, run_use_case


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB; +inf when identical."""
    ref = np.asarray(reference, np.float64)
    noise = float(np.sum((ref - np.asarray(test, np.float64)) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def synthesize_inputs(session: ort.InferenceSession, reserved: set[str], seed: int = 0,
                      seq_len: int = 16) -> dict[str, np.ndarray]:
    """Seeded inputs for a graph's non-LoRA inputs; dynamic dims become 1 (first) or ``seq_len``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        if i.name in reserved:
            continue
        shape = [d if isinstance(d, int) and d > 0 else (1 if j == 0 else seq_len) for j, d in enumerate(i.shape)]
        if i.type == "tensor(int64)":
            feeds[i.name] = (np.ones(shape, np.int64) if "mask" in i.name
                             else rng.integers(0, 32, size=shape, dtype=np.int64))
        elif i.type == "tensor(float)":
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
        else:
            raise InputError(f"cannot synthesize input {i.name!r} of type {i.type}; pass sample inputs")
    return feeds


def compare_bundles(test: Bundle, reference: Bundle,
                    inputs: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
    """SQNR (dB) of ``test`` against ``reference`` for every use-case, on the same inputs."""
    t_sess, r_sess = make_session(test), make_session(reference)
    feeds = dict(inputs) if inputs is not None else synthesize_inputs(t_sess, {s.name for s in test.manifest.slots})
    out = {}
    for u in test.manifest.use_cases:
        a = run_use_case(test, u.name, feeds, session=t_sess)
        b = run_use_case(reference, u.name, feeds, session=r_sess)
        out[u.name] = min(sqnr_db(b[k], a[k]) for k in b)
    return out
