"""QAIRT's own LoRA artefacts next to every bundle, pointing at the bundle's files.

``lora_weight_list.txt`` lists the LoRA tensor names, for ``qairt-converter --lora_weight_list``;
``lora_config.yaml`` is QAIRT's use-case list (``use_case: [{name, model_name, lora_weights,
quant_overrides, output_path}]``), for its LoRA importer.
"""

from __future__ import annotations

import re
from pathlib import Path

from lora_runtime.manifest import Manifest
from lora_runtime.names import LORA_CONFIG_YAML, LORA_WEIGHT_LIST, use_case_encodings


def write_qairt_artefacts(root: Path, m: Manifest) -> list[str]:
    """Both files under ``root``; returns their bundle-relative paths."""
    names = sorted((s.name for s in m.slots if s.kind in ("lora_A", "lora_B")), key=_natural)
    (root / LORA_WEIGHT_LIST).write_text("".join(f"{n}\n" for n in names))
    files = m.quantization.files if m.quantization else ()
    lines = ["use_case:"]
    for u in m.use_cases:
        adapter = next(iter(u.strengths), None)
        if adapter is None:
            continue  # the base model alone has no LoRA weights to import
        weights = m.group_patch or m.adapter(adapter).patch or ""
        own = use_case_encodings(u.name)
        overrides = own if own in files else next(iter(files), "")
        lines += [f'  - name: "{u.name}"', f'    model_name: "{m.graph}"', f'    lora_weights: "{weights}"',
                  f'    quant_overrides: "{overrides}"', '    output_path: "./output"']
    (root / LORA_CONFIG_YAML).write_text("\n".join(lines) + "\n")
    return [LORA_WEIGHT_LIST, LORA_CONFIG_YAML]


def _natural(name: str) -> list:
    """``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
