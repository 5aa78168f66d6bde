"""The encodings a compile writes: the AIMET/QAIRT files of each mode, and updatable encodings as slots.

=============  ===================================================================================
non-updatable  ``encodings/all.encodings``: every tensor, one set
adapter-only   ``encodings/base.encodings`` (base tensors) + ``encodings/use-cases/<u>.encodings`` (branches)
full           ``encodings/use-cases/<u>.encodings``: every tensor, per use-case
=============  ===================================================================================

Updatable encodings are encoding slots: their scales and zero points are graph inputs whose values each
use-case carries in ``patches/encodings/<u>.safetensors`` (``patches/encodings.union.safetensors`` for
ad-hoc strengths). The LoRA weights' encodings are computed over the values each use-case uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from lora_runtime.bundle import Bundle
from lora_runtime.manifest import Slot
from lora_runtime.names import (
    ALL_ENCODINGS,
    BASE_ENCODINGS,
    UNION_ENCODINGS,
    encodings_patch,
    lora_a,
    lora_b,
    scale_of,
    use_case_encodings,
    zero_point_of,
)
from lora_runtime.quant.encodings import VERSION, Encoding, EncodingsFile, write_encodings
from lora_runtime.quant.rules import to_qdq
from lora_runtime.tensorfile import read_header, save_tensors


def lora_values(bundle: Bundle, slots: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """Patch -> slot -> the values it holds (one patch per adapter in v1/v2, the group in v3), as float32.
    Keyed by adapter name (v1/v2) or ``"group"`` (v3)."""
    m = bundle.manifest
    patches = {"group": m.group_patch} if m.group_patch else {a.name: a.patch for a in m.adapters if a.patch}
    out = {}
    for key, rel in patches.items():
        tf = read_header(bundle.file(rel or ""))
        out[key] = {s: tf.read(s, float32=True) for s in slots}
    return out


def by_slot(values: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    for patch, slots in values.items():
        for s, v in slots.items():
            out.setdefault(s, {})[patch] = v
    return out


def all_values(values: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """Every value each LoRA slot takes, over all patches."""
    return {s: list(v.values()) for s, v in by_slot(values).items()}


def active_values(bundle: Bundle, values: Mapping[str, Mapping[str, np.ndarray]], use_case: str
            ) -> dict[str, list[np.ndarray]]:
    """The LoRA values a use-case uses: its adapter's patch (v1/v2); the group with inactive adapters' rank
    columns zeroed (v3: they are multiplied by a zero strength anyway). The base model alone: everything."""
    m = bundle.manifest
    active = {a for a, s in m.use_case(use_case).strengths.items() if s}
    if not active:
        return all_values(values)
    if m.generation != "v3":
        (adapter,) = active
        return {s: [v] for s, v in values[adapter].items()}
    group = values["group"]
    out = {}
    for point in m.points:
        keep = np.zeros(point.rank, bool)
        for c in point.columns:
            keep[c.start:c.stop] = c.adapter in active
        a, b = lora_a(point.module), lora_b(point.module)
        out[a] = [group[a] * keep[:, None]]
        out[b] = [group[b] * keep[None, :]]
    return out


def write_encodings_files(root: Path, mode: str, params: Sequence[Encoding], union: Mapping[str, Encoding],
                          per_use_case: Mapping[str, Mapping[str, Encoding]], tensors: Sequence[str],
                          branch: Sequence[str], lora_slots: Sequence[str]) -> list[str]:
    """The AIMET/QAIRT files of the mode; ``params`` are the base's (weights, and constants in full QDQ groups)."""
    (root / "encodings" / "use-cases").mkdir(parents=True, exist_ok=True)
    base_acts = [t for t in tensors if t not in branch]
    written = []

    def write(rel: str, acts: Sequence[Encoding], params: Sequence[Encoding]) -> None:
        write_encodings(root / rel, EncodingsFile(VERSION, tuple(acts), tuple(params)))
        written.append(rel)

    if mode == "non-updatable":
        write(ALL_ENCODINGS, [union[t] for t in tensors], [*params, *(union[s] for s in lora_slots)])
    elif mode == "adapter-only":
        write(BASE_ENCODINGS, [union[t] for t in base_acts], list(params))
        for u, enc in per_use_case.items():
            write(use_case_encodings(u), [enc[t] for t in branch], [enc[s] for s in lora_slots])
    else:
        for u, enc in per_use_case.items():
            write(use_case_encodings(u), [enc[t] for t in tensors], [*params, *(enc[s] for s in lora_slots)])
    return written


def encoding_slots(root: Path, live: frozenset[str], union: Mapping[str, Encoding],
                    per_use_case: Mapping[str, Mapping[str, Encoding]],
                    lora_slots: Sequence[str]) -> tuple[list[Slot], dict[str, str]]:
    """The slot table for updatable encodings (scales first, then zero points) and each use-case's patch."""
    if not live:
        return [], {}
    names = sorted(live)

    def values(enc: Mapping[str, Encoding]) -> dict[str, np.ndarray]:
        scales, zps = {}, {}
        for n in names:
            if n in lora_slots:
                scales[scale_of(n)] = np.asarray(enc[n].scale, np.float32).reshape(-1, 1)
            else:
                scale, zp, _ = to_qdq(enc[n])
                scales[scale_of(n)], zps[zero_point_of(n)] = scale, zp
        return scales | zps

    layout = values(union)
    slots = [Slot(k, tuple(v.shape), str(v.dtype), "encoding") for k, v in layout.items()]
    (root / "patches" / "encodings").mkdir(parents=True, exist_ok=True)
    save_tensors(root / UNION_ENCODINGS, layout)
    patches = {}
    for u, enc in per_use_case.items():
        save_tensors(root / encodings_patch(u), values(enc))
        patches[u] = encodings_patch(u)
    return slots, patches
