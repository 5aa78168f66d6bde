"""The encodings modes, in one place: which encodings exist, what they are calibrated on, where they live.

=============  ===================================================  ===============================
mode           calibrated on                                        in the bundle
=============  ===================================================  ===============================
non-updatable  the union of all use-cases; one set                  ``encodings/all.encodings``
adapter-only   base tensors: the union; LoRA-branch tensors: each   ``encodings/base.encodings`` +
               use-case                                             ``encodings/use-cases/<use-case>.encodings``
full           every tensor per use-case (base weights keep one)    ``encodings/use-cases/<use-case>.encodings``
=============  ===================================================  ===============================

Which generation takes which mode is QAIRT's table: v1 non-updatable only, v2 full only, v3 all three.
Base weights are constants in every mode (they never change); with non-updatable encodings every
encoding is a constant of the graph, so v3 switches stay hot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lora_runtime.errors import UseCaseError
from lora_runtime.quant.calibrate import TensorRange, union
from lora_runtime.quant.encodings import Encoding, Preset, asymmetric_per_tensor, symmetric_per_channel

MODES = ("none", "non-updatable", "adapter-only", "full")
ALLOWED = {"v1": ("none", "non-updatable"), "v2": ("none", "full"), "v3": MODES}


def check_mode(generation: str, mode: str) -> None:
    if mode not in MODES:
        raise UseCaseError(f"encodings must be one of {', '.join(MODES)}, got {mode!r}")
    if mode not in ALLOWED[generation]:
        raise UseCaseError(f"{generation} takes encodings {' or '.join(ALLOWED[generation])} (QAIRT's table), not "
                           f"{mode!r}" + ("; use --generation v3" if generation != "v3" else ""))


def updatable(mode: str, tensors: Sequence[str], branch: Sequence[str], lora_slots: Sequence[str]) -> frozenset[str]:
    """Names whose encodings change per use-case: none; the LoRA branch's; or every activation's too."""
    if mode == "adapter-only":
        return frozenset(branch) | frozenset(lora_slots)
    if mode == "full":
        return frozenset(tensors) | frozenset(lora_slots)
    return frozenset()


def activation_encodings(ranges: Mapping[str, TensorRange], tensors: Sequence[str], branch: Sequence[str],
                         preset: Preset, precision: Mapping[str, int | str] | None = None) -> dict[str, Encoding]:
    """One asymmetric per-tensor encoding per activation from its range (branch tensors: the LoRA preset);
    ``precision``: what mixed precision chose instead for some tensors (16 bits, or ``"float16"``)."""
    out = {}
    chosen = precision or {}
    for t in tensors:
        spec = preset.lora_activations if t in branch else preset.activations
        r = ranges[t]
        bits = chosen.get(t, spec.bw)
        out[t] = FLOAT16(t) if bits == "float16" else asymmetric_per_tensor(t, r.min, r.max, bw=int(bits))
    return out


def FLOAT16(name: str) -> Encoding:  # noqa: N802  (an encoding constructor, like the dtype it names)
    """AIMET's entry for an activation that stays floating point (16 bits): no scale, no offset."""
    return Encoding(name, "FLOAT", "PER_TENSOR", 16, False, (), ())


def union_ranges(ranges: Mapping[str, Mapping[str, TensorRange]]) -> dict[str, TensorRange]:
    return union(ranges)


def lora_weight_encodings(values: Mapping[str, Sequence[np.ndarray]], preset: Preset) -> dict[str, Encoding]:
    """One symmetric encoding per LoRA slot over the values every adapter puts there (per row or tensor)."""
    spec = preset.lora_weights
    out = {}
    for name, arrays in values.items():
        stacked = np.stack([np.asarray(a, np.float32) for a in arrays])  # (adapters, rows, cols)
        if spec.enc_type == "PER_CHANNEL":
            out[name] = symmetric_per_channel(name, stacked, axis=1, bw=spec.bw)
        else:
            whole = symmetric_per_channel(name, stacked.reshape(1, -1), axis=0, bw=spec.bw)
            out[name] = Encoding(name, "INT", "PER_TENSOR", spec.bw, True, whole.scale, whole.offset)
    return out


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
