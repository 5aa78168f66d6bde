"""Accuracy of a bundle: its outputs against a reference's, per use-case, on the same inputs.

Inputs are the user's (``sample_inputs``), held-out calibration samples, or synthesized from the graph's
input types: token ids below 32 for int64 inputs (ones for inputs named like masks), standard normal
for floats. The first output is what is compared (the logits; an LLM's other outputs are its KV caches,
whose error is intermediate: it reaches the logits of the next step).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from lora_runtime.bundle import Bundle
from lora_runtime.errors import InputError
from lora_runtime.metrics import argmax_agreement, sqnr_db
from lora_runtime.runtime.session import make_session, run_use_case

Outputs = Mapping[str, np.ndarray]


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


def run_all(bundle: Bundle, use_cases: Sequence[str], samples: Sequence[Mapping[str, np.ndarray]]
            ) -> dict[str, list[dict[str, np.ndarray]]]:
    """Every sample under every use-case, through one session."""
    session = make_session(bundle)
    return {u: [run_use_case(bundle, u, s, session=session) for s in samples] for u in use_cases}


def logits_sqnr(reference: Sequence[Outputs], test: Sequence[Outputs]) -> float:
    """SQNR of the first output over all samples together."""
    key = next(iter(reference[0]))
    return sqnr_db(np.concatenate([r[key].ravel() for r in reference]), np.concatenate([t[key].ravel() for t in test]))


def logits_agreement(reference: Sequence[Outputs], test: Sequence[Outputs]) -> float:
    """Share of positions whose argmax of the first output agrees."""
    key = next(iter(reference[0]))
    return argmax_agreement([r[key] for r in reference], [t[key] for t in test])


def compare_bundles(test: Bundle, reference: Bundle,
                    inputs: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
    """SQNR (dB) of ``test`` against ``reference`` for every use-case, on the same inputs (the worst output)."""
    t_sess, r_sess = make_session(test), make_session(reference)
    feeds = dict(inputs) if inputs is not None else synthesize_inputs(t_sess, {s.name for s in test.manifest.slots})
    out = {}
    for u in test.manifest.use_cases:
        a = run_use_case(test, u.name, feeds, session=t_sess)
        b = run_use_case(reference, u.name, feeds, session=r_sess)
        out[u.name] = min(sqnr_db(b[k], a[k]) for k in b)
    return out
