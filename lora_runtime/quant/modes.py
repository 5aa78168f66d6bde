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
from lora_runtime.quant.calibrate import TensorRange
from lora_runtime.quant.encodings import Encoding
from lora_runtime.quant.presets import Preset
from lora_runtime.quant.rules import asymmetric_per_tensor, float16, symmetric_per_block, symmetric_per_channel

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
        out[t] = float16(t) if bits == "float16" else asymmetric_per_tensor(t, r.min, r.max, bw=int(bits))
    return out


def lora_weight_encodings(values: Mapping[str, Sequence[np.ndarray]], preset: Preset) -> dict[str, Encoding]:
    """One symmetric encoding per LoRA slot over the values every adapter puts there (per row or tensor)."""
    spec = preset.lora_weights
    out = {}
    for name, arrays in values.items():
        stacked = np.stack([np.asarray(a, np.float32) for a in arrays])  # (adapters, rows, cols)
        if spec.enc_type == "PER_CHANNEL":
            out[name] = symmetric_per_channel(name, stacked, axis=1, bw=spec.bw, rule=preset.symmetric_scale)
        else:
            whole = symmetric_per_channel(name, stacked.reshape(1, -1), axis=0, bw=spec.bw, rule=preset.symmetric_scale)
            out[name] = Encoding(name, "INT", "PER_TENSOR", spec.bw, True, whole.scale, whole.offset)
    return out


def weight_encoding(name: str, weight: np.ndarray, preset: Preset) -> Encoding:
    """A base linear weight's encoding, ``weight`` laid out (in, out): per output channel, or per block of input
    features, by the preset's symmetric rule."""
    spec = preset.weights
    if spec.enc_type == "PER_BLOCK" and spec.block_size:
        return symmetric_per_block(name, weight, spec.block_size, spec.bw, rule=preset.symmetric_scale)
    return symmetric_per_channel(name, weight, axis=1, bw=spec.bw, rule=preset.symmetric_scale)
