"""The INT8 stage of a compile: calibrate the float graph, write encodings, rewrite to QDQ, measure.

Called by ``compile_bundle`` inside its staging directory, after the float graph and the patches are
written (the float graph is what calibration runs and what accuracy is measured against)::

    float bundle ──► ranges per use-case (calibration samples) ──► encodings (per mode) ──► QDQ graph
         └──────────► FP32 outputs on held-out samples ──────────────────────► SQNR of the INT8 graph

Updatable encodings become encoding slots: graph inputs whose values each use-case carries in a small
patch (``patches/encodings/<use-case>.safetensors``; ``patches/encodings.union.safetensors`` for ad-hoc
strengths). Per-use-case encodings files live in ``encodings/use-cases/`` so that no use-case name (``base``,
``all``) can collide with the shared ``encodings/base.encodings`` or ``encodings/all.encodings``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from lora_runtime.bundle import Bundle
from lora_runtime.compiler.options import QuantOptions
from lora_runtime.compiler.passes.branch import BranchTensors
from lora_runtime.compiler.passes.qdq import QdqOptions, QdqPlan, activation_tensors, apply_qdq
from lora_runtime.compiler.points import find_candidates
from lora_runtime.errors import BaseModelError
from lora_runtime.eval.accuracy import logits_agreement, logits_sqnr, run_all
from lora_runtime.eval.greedy import described, greedy_agreement, reference_tokens
from lora_runtime.eval.ort_reference import quantize_static_sqnr
from lora_runtime.llm.chat import Chat
from lora_runtime.manifest import Accuracy, Manifest, MixedPrecision, Quantization, Slot
from lora_runtime.names import (
    ALL_ENCODINGS,
    BASE_ENCODINGS,
    QDQ_DATA,
    UNION_ENCODINGS,
    encodings_patch,
    lora_a,
    lora_b,
    scale_of,
    use_case_encodings,
    zero_point_of,
)
from lora_runtime.quant.calibrate import collect_ranges, split_held_out, union
from lora_runtime.quant.encodings import VERSION, Encoding, EncodingsFile, check_fits, write_encodings
from lora_runtime.quant.modes import activation_encodings, lora_weight_encodings, updatable
from lora_runtime.quant.precision import choose_precision
from lora_runtime.quant.presets import Preset, load_preset
from lora_runtime.quant.rules import to_qdq
from lora_runtime.tensorfile import read_header, save_tensors

Say = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class QuantResult:
    manifest: Manifest  # with encoding slots, per-use-case encodings patches and the accuracy measured
    files: tuple[str, ...]  # bundle-relative files written (data, encodings files, encodings patches)


def quantize_bundle(root: Path, model: onnx.ModelProto, manifest: Manifest, base_dir: Path, options: QuantOptions,
                    samples: Sequence[dict[str, np.ndarray]], overrides: EncodingsFile | None,
                    branches: Mapping[str, BranchTensors], say: Say = lambda _m: None) -> QuantResult:
    """Rewrite ``model`` (whose float version is at ``root``/graph) to QDQ; write encodings; measure accuracy.

    ``options.weight_rounding == "gptq"`` chooses the base weights' codes with GPTQ (lora_runtime.quant.gptq)
    from the calibration inputs of every use-case; the encodings (the grid) are the same as with "nearest".
    """
    o, p = options, load_preset(options.preset)
    float_bundle = Bundle(root, manifest)
    lora_slots = sorted(s for b in branches.values() for s in (b.a_slot, b.b_slot))
    tensors = activation_tensors(model, branches)
    branch = [b.scaled for b in branches.values()]
    calib, held = split_held_out(samples)
    names = manifest.use_case_names
    say(f"calibrating {len(tensors)} tensors on {len(calib)} samples x {len(names)} use-cases")
    count = iter(range(1, len(calib) * len(names) + 1))
    kept: dict[str, list[np.ndarray]] | None = {} if o.sensitive_db is not None else None
    linear = [c for c in find_candidates(model.graph) if c.weight not in lora_slots]  # the base linear layers
    gram = {c.x: np.zeros(()) for c in linear} if o.weight_rounding == "gptq" else None
    ranges = collect_ranges(float_bundle, tensors, calib, names, method=o.method, keep_values=kept, gram=gram,
                            step=lambda u: say(f"calibrating {u}: {next(count)}/{len(calib) * len(names)}"))
    mixed = None
    if kept is not None and o.sensitive_db is not None:  # outlier-heavy activations at 16 bits, or float16
        start = {t: (p.lora_activations if t in branch else p.activations).bw for t in tensors}
        mixed = MixedPrecision(o.sensitive_db, choose_precision(kept, union(ranges), o.sensitive_db, start))
    precision = {t: bits for t, (bits, _db) in (mixed.tensors if mixed else {}).items()}
    fp32 = run_all(float_bundle, names, held)
    chat = _chat(base_dir)
    if chat is not None:
        say("greedy decoding of the held-out prompts with FP32")
        fp32_greedy = reference_tokens(float_bundle, chat, names)
    ort_sqnr = quantize_static_sqnr(float_bundle, names, calib, held, fp32, say) if o.ort_reference else None

    values = _lora_values(float_bundle, lora_slots)
    union_enc = _encodings(union(ranges), tensors, branch, _all(values), p, precision)
    per_use_case = {u: _encodings(ranges[u], tensors, branch, _active(float_bundle, values, u), p, precision)
                    for u in names}
    weight_overrides = {}
    if overrides is not None:  # the user's entries win, in every use-case's set
        weights_shape = {c.weight: (c.in_features, c.out_features) for c in linear}
        slot_shapes = {s: next(iter(v.values())).shape for s, v in _by_slot(values).items()}
        check_fits(overrides, {t: None for t in tensors} | slot_shapes | weights_shape,
                   {s: 0 for s in lora_slots} | {w: 1 for w in weights_shape})
        mine = {e.name: e for e in overrides.activation_encodings + overrides.param_encodings}
        weight_overrides = {k: v for k, v in mine.items() if k in weights_shape}
        for enc in [union_enc, *per_use_case.values()]:
            enc.update({k: v for k, v in mine.items() if k in enc})
    floats = frozenset(t for t in tensors if union_enc[t].dtype == "FLOAT")
    live = updatable(o.mode, tensors, branch, lora_slots) - floats  # a float16 activation has no parameters
    plan = QdqPlan(activations={t: union_enc[t] for t in tensors}, lora_weights={s: union_enc[s] for s in lora_slots},
                   weight_bw=p.weights.bw, updatable=live, weight_overrides=weight_overrides, gram=gram or {},
                   weight_block=p.weights.block_size if p.weights.enc_type == "PER_BLOCK" else None)
    say(f"rewriting to QDQ ({o.mode} encodings, {o.weight_rounding} weight rounding)")
    done = apply_qdq(model, QdqOptions(plan, branches, base_dir, root, QDQ_DATA, say))
    weights = {e.name: e for e in done.weight_encodings}
    (root / manifest.graph).write_bytes(model.SerializeToString())

    files = [QDQ_DATA, *_write_encodings_files(root, o.mode, weights, union_enc, per_use_case, tensors, branch,
                                               lora_slots)]
    slots, patches = _encoding_slots(root, live, union_enc, per_use_case, lora_slots)
    files += [*patches.values(), *([UNION_ENCODINGS] if slots else [])]
    use_cases = tuple(dataclasses.replace(u, encodings=patches.get(u.name)) for u in manifest.use_cases)
    manifest = dataclasses.replace(manifest, slots=manifest.slots + tuple(slots), use_cases=use_cases,
                                   union_encodings=UNION_ENCODINGS if slots else None)

    say("measuring INT8 against FP32 on held-out samples")
    int8 = Bundle(root, manifest)
    runs = run_all(int8, names, held)
    accuracy = Accuracy(
        "fp32", "this bundle (QDQ on ONNX Runtime's CPU provider)", "its FP32 graph",
        f"{len(held)} held-out calibration samples", {u: logits_sqnr(fp32[u], runs[u]) for u in names},
        {u: logits_agreement(fp32[u], runs[u]) for u in names})
    if chat is not None:
        say("greedy decoding of the held-out prompts quantized")
        accuracy = dataclasses.replace(accuracy, greedy=described(),
                                       greedy_agreement=greedy_agreement(fp32_greedy, int8, chat, names))
    measured = [accuracy]
    if ort_sqnr is not None:
        measured.append(Accuracy("ort_quantize_static", "ONNX Runtime's quantize_static of the merged use-case",
                                 "its FP32 graph", accuracy.inputs, ort_sqnr))
    info = Quantization(o.mode, o.preset, o.weight_rounding, o.method, len(calib), len(held), len(tensors),
                        len(weights), len(lora_slots), len(live),
                        tuple(f for f in files if f.startswith("encodings/")),
                        _execution({c.weight: c.x for c in linear}, weights, union_enc), mixed)
    return QuantResult(dataclasses.replace(manifest, quantization=info, accuracy=tuple(measured)), tuple(files))


def _execution(linear_inputs: Mapping[str, str], weights: Mapping[str, Encoding], acts: Mapping[str, Encoding]
               ) -> str:
    """How the base linear layers of the QDQ graph run on ONNX Runtime, in words (see ``passes.qdq_weights``)."""
    inputs = {w: x for w, x in linear_inputs.items() if w in weights}
    blocks = sum(1 for w in inputs if weights[w].enc_type == "PER_BLOCK")
    wide = sum(1 for w, x in inputs.items() if weights[w].enc_type != "PER_BLOCK"
               and (acts[x].dtype == "FLOAT" or acts[x].bw > 8))
    gemm = len(inputs) - blocks - wide
    parts = [f"{gemm} int8 GEMM (MatMulIntegerToFloat)"] if gemm else []
    if wide:
        parts.append(f"{wide} float MatMul on int8 weights dequantized at load (inputs wider than 8 bits)")
    if blocks:
        parts.append(f"{blocks} MatMulNBits with float32 compute (block-wise weights)")
    return f"{len(inputs)} base linear layers: " + ", ".join(parts)


def _chat(base_dir: Path) -> Chat | None:
    """The tokenizer of an imported LLM (``import-model`` wrote it next to the base), or None."""
    try:
        return Chat.load(base_dir)
    except BaseModelError:  # not an imported LLM, or no tokenizers package: no greedy-token report
        return None


def _encodings(ranges: Mapping, tensors: Sequence[str], branch: Sequence[str],
               values: Mapping[str, Sequence[np.ndarray]], p: Preset, precision: Mapping[str, int | str]
               ) -> dict[str, Encoding]:
    return activation_encodings(ranges, tensors, branch, p, precision) | lora_weight_encodings(values, p)


def _lora_values(bundle: Bundle, slots: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """Patch -> slot -> the values it holds (one patch per adapter in v1/v2, the group in v3), as float32.
    Keyed by adapter name (v1/v2) or ``"group"`` (v3)."""
    m = bundle.manifest
    patches = {"group": m.group_patch} if m.group_patch else {a.name: a.patch for a in m.adapters if a.patch}
    out = {}
    for key, rel in patches.items():
        tf = read_header(bundle.file(rel or ""))
        out[key] = {s: tf.read(s, float32=True) for s in slots}
    return out


def _by_slot(values: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    for patch, slots in values.items():
        for s, v in slots.items():
            out.setdefault(s, {})[patch] = v
    return out


def _all(values: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """Every value each LoRA slot takes, over all patches."""
    return {s: list(v.values()) for s, v in _by_slot(values).items()}


def _active(bundle: Bundle, values: Mapping[str, Mapping[str, np.ndarray]], use_case: str
            ) -> dict[str, list[np.ndarray]]:
    """The LoRA values a use-case uses: its adapter's patch (v1/v2); the group with inactive adapters' rank
    columns zeroed (v3: they are multiplied by a zero strength anyway). The base model alone: everything."""
    m = bundle.manifest
    active = {a for a, s in m.use_case(use_case).strengths.items() if s}
    if not active:
        return _all(values)
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


def _write_encodings_files(root: Path, mode: str, weights: Mapping[str, Encoding], union: Mapping[str, Encoding],
                           per_use_case: Mapping[str, Mapping[str, Encoding]], tensors: Sequence[str],
                           branch: Sequence[str], lora_slots: Sequence[str]) -> list[str]:
    """The AIMET/QAIRT files of the mode (see lora_runtime.quant.modes)."""
    (root / "encodings" / "use-cases").mkdir(parents=True, exist_ok=True)
    base_acts = [t for t in tensors if t not in branch]
    written = []

    def write(rel: str, acts: Sequence[Encoding], params: Sequence[Encoding]) -> None:
        write_encodings(root / rel, EncodingsFile(VERSION, tuple(acts), tuple(params)))
        written.append(rel)

    if mode == "non-updatable":
        write(ALL_ENCODINGS, [union[t] for t in tensors], [*weights.values(), *(union[s] for s in lora_slots)])
    elif mode == "adapter-only":
        write(BASE_ENCODINGS, [union[t] for t in base_acts], list(weights.values()))
        for u, enc in per_use_case.items():
            write(use_case_encodings(u), [enc[t] for t in branch], [enc[s] for s in lora_slots])
    else:
        for u, enc in per_use_case.items():
            write(use_case_encodings(u), [enc[t] for t in tensors], [*weights.values(), *(enc[s] for s in lora_slots)])
    return written


def _encoding_slots(root: Path, live: frozenset[str], union: Mapping[str, Encoding],
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
