"""Encodings presets: the bitwidth per tensor role, read from the JSON files shipped with the package.

``lora_runtime/data/presets/<name>.json`` is the only copy (the repository's ``encodings/presets`` links to
it): ``activations`` and ``weights`` of the base, ``lora_activations`` and ``lora_weights`` of the branches,
each ``{"bw", "is_sym", "enc_type"}`` and ``block_size`` for a ``PER_BLOCK`` role. An optional top-level
``"symmetric_scale"`` picks the scale rule of symmetric weights: ``"aimet"`` (the default: AIMET's own rule, so
encodings computed here equal AIMET's) or ``"absmax"`` (``lora_runtime.quant.rules.symmetric_scales``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lora_runtime.quant.encodings import ENC_TYPES, EncodingsError
from lora_runtime.quant.rules import SYMMETRIC_RULES

PRESET_DIR = Path(__file__).resolve().parent.parent / "data" / "presets"
ROLES = ("activations", "weights", "lora_activations", "lora_weights")


@dataclass(frozen=True)
class RoleSpec:
    """How one role of tensors is quantized."""

    bw: int
    is_sym: bool
    enc_type: str
    block_size: int | None = None  # PER_BLOCK: input features per block


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    activations: RoleSpec
    weights: RoleSpec
    lora_activations: RoleSpec
    lora_weights: RoleSpec
    symmetric_scale: str = "aimet"  # how symmetric weights get their scale (rules.symmetric_scales)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> Preset:
    """The named preset (``w8a8``, ``w8a16``, ``w4a16``, ``lora_a16w16``) as typed values."""
    path = PRESET_DIR / f"{name}.json"
    if name not in preset_names():
        raise EncodingsError(f"preset {name!r} is unknown; choose one of {preset_names()}")
    try:
        raw = json.loads(path.read_text())
        roles = {r: RoleSpec(int(raw[r]["bw"]), bool(raw[r]["is_sym"]), str(raw[r]["enc_type"]),
                             raw[r].get("block_size")) for r in ROLES}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EncodingsError(f"{path}: not a valid preset ({type(e).__name__}: {e})") from e
    for role, spec in roles.items():
        if spec.enc_type not in ENC_TYPES or (spec.block_size is not None) != (spec.enc_type == "PER_BLOCK"):
            raise EncodingsError(f"{path}: role {role!r} has enc_type {spec.enc_type!r} and block_size "
                                 f"{spec.block_size!r}")
    rule = raw.get("symmetric_scale", "aimet")
    if rule not in SYMMETRIC_RULES:
        raise EncodingsError(f"{path}: symmetric_scale {rule!r} is not one of {list(SYMMETRIC_RULES)}")
    return Preset(str(raw.get("name", name)), str(raw.get("description", "")), **roles, symmetric_scale=rule)
