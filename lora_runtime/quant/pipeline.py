"""INT8 for a bundle being compiled: calibrate the float graph, write encodings, rewrite to QDQ, measure.

Called by ``compile_bundle`` inside its staging directory, after the float graph and the patches are
written (the float graph is what calibration runs and what accuracy is measured against)::

    float bundle ──► ranges per use-case (calibration samples) ──► encodings (per mode) ──► QDQ graph
         └──────────► FP32 outputs on held-out samples ──────────────────────► SQNR of the INT8 graph
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx

from lora_runtime.accuracy import sqnr_db
from lora_runtime.bundle import Bundle, Manifest
from lora_runtime.quant.calibrate import collect_ranges, split_held_out
from lora_runtime.quant.encodings import VERSION, EncodingsFile, load_preset, write_encodings
from lora_runtime.quant.modes import activation_encodings, lora_weight_encodings
from lora_runtime.quant.qdq import QdqPlan, activation_tensors, apply_qdq
from lora_runtime.runtime.simple import make_session, run_use_case
from lora_runtime.tensorfile import read_header

DATA_FILE = "base.qdq.data"
ALL = "encodings/all.encodings"


@dataclasses.dataclass(frozen=True)
class QuantResult:
    extra: dict  # for manifest.extra["encodings"]
    files: list[str]  # bundle-relative files written (data + encodings)


def quantize_bundle(root: Path, model: onnx.ModelProto, manifest: Manifest, base_dir: Path, *, mode: str,
                    preset: str, samples: Sequence[dict[str, np.ndarray]], method: str = "minmax",
                    say: Callable[[str], None] = lambda _m: None) -> QuantResult:
    """Rewrite ``model`` (whose float version is at ``root``/graph) to QDQ; write encodings; measure SQNR."""
    p = load_preset(preset)
    float_bundle = Bundle(root, manifest)
    lora_slots = frozenset(s.name for s in manifest.slots if s.kind in ("lora_A", "lora_B"))
    modules = [pt.module for pt in manifest.points]
    tensors = activation_tensors(model, lora_slots, modules)
    branch = [f"{m}.lora/scaled" for m in modules]
    calib, held = split_held_out(samples)
    names = manifest.use_case_names
    say(f"calibrating {len(tensors)} tensors on {len(calib)} samples x {len(names)} use-cases")
    ranges = collect_ranges(float_bundle, tensors, calib, names, method=method)
    session = make_session(float_bundle)
    fp32 = {u: [run_use_case(float_bundle, u, s, session=session) for s in held] for u in names}
    del session

    acts = activation_encodings(ranges, tensors, branch, p)
    lora = lora_weight_encodings(_lora_values(float_bundle, lora_slots), p)
    plan = QdqPlan(activations=acts, lora_weights=lora, weight_bw=p.weights.bw)
    say("rewriting to QDQ")
    weights = apply_qdq(model, base_dir, root, DATA_FILE, plan, lora_slots)
    (root / "encodings").mkdir(exist_ok=True)
    write_encodings(root / ALL, EncodingsFile(VERSION, tuple(acts.values()),
                                              tuple(weights) + tuple(lora.values())))
    (root / manifest.graph).write_bytes(model.SerializeToString())

    say("measuring INT8 against FP32 on held-out samples")
    session = make_session(float_bundle)  # now the QDQ graph
    sqnr = {u: min(sqnr_db(ref[k], out[k]) for ref, s in zip(fp32[u], held)
                   for out in [run_use_case(float_bundle, u, s, session=session)] for k in ref) for u in names}
    extra = {"mode": mode, "preset": preset, "calibration": {"method": method, "samples": len(calib),
                                                             "held_out": len(held)},
             "files": {"all": ALL}, "activations": len(acts), "base_weights": len(weights),
             "lora_weights": len(lora), "sqnr_db": sqnr}
    return QuantResult(extra, [DATA_FILE, ALL])


def _lora_values(bundle: Bundle, slots: frozenset[str]) -> dict[str, list[np.ndarray]]:
    """Every value each LoRA slot takes: one per adapter patch (v1/v2) or the group (v3), as float32."""
    m = bundle.manifest
    patches = [m.group_patch] if m.group_patch else [a.patch for a in m.adapters if a.patch]
    out: dict[str, list[np.ndarray]] = {s: [] for s in sorted(slots)}
    for rel in patches:
        tf = read_header(bundle.file(rel or ""))
        for s in slots:
            out[s].append(tf.read(s, float32=True))
    return out
