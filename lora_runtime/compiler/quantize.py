"""The INT8 stage of a compile: calibrate the float graph, make the encodings, rewrite to QDQ, measure.

Called by ``compile_bundle`` inside its staging directory, after the float graph and the patches are
written (the float graph is what calibration runs and what accuracy is measured against)::

    float bundle ──► ranges per use-case (calibration samples) ──► encodings (per mode) ──► QDQ graph
         └──────────► FP32 outputs on held-out samples ──────────────────────► SQNR of the INT8 graph

Two plans, one pass: for ONNX Runtime's CPU provider the inputs of linear layers and of each branch's second
MatMul are quantized (ORT fuses them into integer kernels; LoRA weights stay float slots, quantized in the
graph); for the HTP, every op gets a full QDQ group and the LoRA slots hold integer codes (``full_qdq``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from lora_runtime.arrays import Spill, give_back_memory
from lora_runtime.bundle import Bundle
from lora_runtime.compiler.adapter import Adapter
from lora_runtime.compiler.encodings_out import (
    active_values,
    all_values,
    by_slot,
    encoding_slots,
    lora_values,
    write_encodings_files,
)
from lora_runtime.compiler.full_qdq import (
    activation_encodings,
    constant_encodings,
    float_activations,
    float_constants,
    kv_pairs,
    requantized_operands,
    shared_roots,
    strength_ranges,
)
from lora_runtime.compiler.options import QuantOptions
from lora_runtime.compiler.passes.branch import BranchTensors
from lora_runtime.compiler.passes.qdq import QdqOptions, QdqPlan, activation_tensors, apply_qdq
from lora_runtime.compiler.passes.qdq_weights import int32_biases, linear_weights, norm_scales
from lora_runtime.compiler.patches import PatchLayout, external_parameters
from lora_runtime.compiler.points import Candidate
from lora_runtime.errors import BaseModelError, TargetError
from lora_runtime.eval.accuracy import measuring_options, park_first_outputs, score_against
from lora_runtime.eval.greedy import described, greedy_agreement, greedy_count, reference_tokens
from lora_runtime.eval.ort_reference import quantize_static_sqnr
from lora_runtime.eval.twin import folded_session
from lora_runtime.external_data import read_tensor, share_data
from lora_runtime.llm.chat import Chat
from lora_runtime.manifest import Accuracy, Manifest, MixedPrecision, Quantization
from lora_runtime.names import (
    DECODE_GRAPH,
    GROUP_PATCH,
    QDQ_DATA,
    QDQ_DECODE_DATA,
    SCALING,
    STRENGTH,
    UNION_ENCODINGS,
    adapter_patch,
)
from lora_runtime.progress import Stage
from lora_runtime.quant.calibrate import TensorRange, collect_ranges, split_held_out, union
from lora_runtime.quant.encodings import Encoding, EncodingsFile
from lora_runtime.quant.gptq import Hessians
from lora_runtime.quant.modes import activation_encodings as cpu_activation_encodings
from lora_runtime.quant.modes import lora_weight_encodings, updatable, weight_encoding
from lora_runtime.quant.overrides import Given, Targets, given_files
from lora_runtime.quant.overrides import apply as apply_files
from lora_runtime.quant.precision import choose_precision
from lora_runtime.quant.presets import Preset, load_preset
from lora_runtime.runtime.session import make_session

Say = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class FloatStage:
    """The float bundle being compiled: where it is, its graph and manifest, and what made them."""

    root: Path
    model: onnx.ModelProto
    manifest: Manifest
    base_dir: Path  # the base model's folder (its external data)
    branches: Mapping[str, BranchTensors]
    layout: PatchLayout
    adapters: tuple[Adapter, ...]
    full: bool  # full QDQ groups and integer LoRA slots (the HTP target)
    decode: onnx.ModelProto | None = None  # the decode graph (--decode-shape), quantized with the same encodings


@dataclasses.dataclass(frozen=True)
class QuantResult:
    manifest: Manifest  # with encoding slots, per-use-case encodings patches and the accuracy measured
    files: tuple[str, ...]  # bundle-relative files written (data, encodings files, encodings patches)
    held_out: tuple[dict[str, np.ndarray], ...]  # the samples accuracy was measured on
    fp32: Mapping[str, list[dict[str, np.ndarray]]]  # the FP32 graph's outputs on them, per use-case


@dataclasses.dataclass(frozen=True)
class _Encodings:
    plan: QdqPlan
    union: dict[str, Encoding]
    per_use_case: dict[str, dict[str, Encoding]]
    layout: PatchLayout | None = None  # full groups: the layout with integer LoRA slots


def quantize_bundle(stage: FloatStage, options: QuantOptions, samples: Sequence[dict[str, np.ndarray]],
                    overrides: EncodingsFile | None, say: Say = lambda _m: None) -> QuantResult:
    """Rewrite ``stage.model`` (whose float version is at ``stage.root``) to QDQ; write encodings; measure.

    ``options.weight_rounding == "gptq"`` chooses the base weights' codes with GPTQ (lora_runtime.quant.gptq)
    from the calibration inputs of every use-case; the encodings (the grid) are the same as with "nearest".
    Memory: one ONNX Runtime session at a time, whose float weights are one copy (the FP32 reference, calibration,
    the QDQ graph through :func:`folded_session`); what grows with the samples (the FP32 logits, the rows of the
    sensitivity pass) waits in scratch files; GPTQ's statistics go layer by layer as their weights are rounded.
    """
    o, p = options, load_preset(options.preset)
    model, manifest = stage.model, stage.manifest
    float_bundle = Bundle(stage.root, manifest)
    lora_slots = sorted(s for b in stage.branches.values() for s in (b.a_slot, b.b_slot))
    linear = linear_weights(model.graph, frozenset(lora_slots))
    tensors = float_activations(model, stage.branches) if stage.full else activation_tensors(model, stage.branches)
    branch = [b.scaled for b in stage.branches.values()]
    calib, held = split_held_out(samples)
    names = manifest.use_case_names
    given = given_files(overrides, o.encodings_per_use_case, model.graph, names)  # names checked before calibrating
    chat = imported_chat(stage.base_dir)
    with Spill(stage.root / ".fp32-logits") as parked:
        prompts = greedy_count(names) if chat is not None else 0  # a prompt's 16 tokens: ~3 held-out runs' time
        runs, work = len(held) * len(names) + prompts, len(held) * len(names) + 3 * prompts
        count = Stage(say, "FP32 reference (held-out samples, greedy prompts)", runs, "runs", work=work)
        session = make_session(float_bundle, session_options=measuring_options())
        fp32 = park_first_outputs(float_bundle, names, held, session, parked, lambda u: count.step(u, work=1))
        fp32_greedy = reference_tokens(float_bundle, chat, names, session=session,
                                       step=lambda u: count.step(u, work=3)) if chat is not None else {}
        del session
        give_back_memory()
        gram = {c.x: np.zeros(()) for c in linear.values()} if o.weight_rounding == "gptq" else None
        count = Stage(say, f"calibration of {len(tensors)} tensors", len(calib) * len(names), "runs")
        with Spill(stage.root / ".calibration-rows") as kept:
            ranges = collect_ranges(float_bundle, tensors, calib, names, method=o.method,
                                    keep_values=kept if o.sensitive_db is not None else None, gram=gram,
                                    step=count.step)
            give_back_memory()  # the calibration session's
            mixed = None
            if o.sensitive_db is not None:  # outlier-heavy activations at 16 bits, or float16
                say(f"sensitivity pass: {len(tensors)} activations at the preset's bitwidth")
                start = {t: (p.lora_activations if t in branch else p.activations).bw for t in tensors}
                mixed = MixedPrecision(o.sensitive_db, choose_precision(kept, union(ranges), o.sensitive_db, start))
        ort_sqnr = quantize_static_sqnr(float_bundle, names, calib, held, fp32, say) if o.ort_reference else None

        values = lora_values(float_bundle, lora_slots)
        graphs = 2 if stage.decode is not None else 1  # the decode graph's weights are rounded again
        uses = Counter(c.x for c in linear.values())
        hessians = Hessians(gram, {x: k * graphs for x, k in uses.items()}, say,
                            work=graphs * sum(c.in_features * c.out_features for c in linear.values())) \
            if gram is not None else Hessians()
        del gram
        if stage.full:
            enc = _full_plan(stage, p, tensors, ranges, values, hessians)
        else:
            precision = {t: bits for t, (bits, _db) in (mixed.tensors if mixed else {}).items()}
            enc = _cpu_plan(o.mode, p, tensors, branch, ranges, values, float_bundle, precision, hessians)
        enc = _with_overrides(enc, stage, p, o.mode, given, tensors, linear, by_slot(values))
        say(f"rewriting to QDQ ({o.mode} encodings, {o.weight_rounding} weight rounding"
            + (", full QDQ groups)" if stage.full else ")"))
        done = apply_qdq(model, QdqOptions(enc.plan, stage.branches, stage.base_dir, stage.root, QDQ_DATA, say))
        give_back_memory()  # GPTQ's statistics
        weights = {e.name: e for e in done.weight_encodings}
        (stage.root / manifest.graph).write_bytes(model.SerializeToString())
        decode_files = _quantize_decode(stage, enc.plan, p, say) if stage.decode is not None else []

        params = [*weights.values(), *enc.plan.constants.values()]
        files = [QDQ_DATA, *decode_files, *write_encodings_files(stage.root, o.mode, params, enc.union,
                                                                 enc.per_use_case, tensors, branch, lora_slots)]
        live = enc.plan.updatable
        slots, patches = encoding_slots(stage.root, live, enc.union, enc.per_use_case, lora_slots)
        files += [*patches.values(), *([UNION_ENCODINGS] if slots else [])]
        use_cases = tuple(dataclasses.replace(u, encodings=patches.get(u.name)) for u in manifest.use_cases)
        patched = enc.layout.slots if enc.layout is not None else manifest.slots
        manifest = dataclasses.replace(manifest, slots=patched + tuple(slots), use_cases=use_cases,
                                       union_encodings=UNION_ENCODINGS if slots else None)
        if stage.full:  # the strength's encoding is a constant of the graph: strengths outside it would clip
            manifest = dataclasses.replace(manifest, target=dataclasses.replace(
                manifest.target, strength_range=_covered(enc.union[STRENGTH])))

        say("measuring INT8 against FP32: its session, weights dequantized ahead (lora_runtime.eval.twin)")
        count = Stage(say, "INT8 vs FP32 (held-out samples, greedy prompts)", runs, "runs", work=work)
        int8 = Bundle(stage.root, manifest)
        with folded_session(int8, measuring_options()) as session:
            scores = score_against(int8, names, held, session, fp32, lambda u: count.step(u, work=1))
            greedy = greedy_agreement(fp32_greedy, int8, chat, names, session=session,
                                      step=lambda u: count.step(u, work=3)) if chat is not None else {}
            del session
        give_back_memory()
        accuracy = Accuracy(
            "fp32", "this bundle (QDQ on ONNX Runtime's CPU provider)", "its FP32 graph",
            f"{len(held)} held-out calibration samples", {u: scores[u].sqnr_db for u in names},
            {u: scores[u].agreement for u in names}, greedy=described() if chat is not None else "",
            greedy_agreement=greedy)
        fp32 = {u: fp32[u] for u in names} if stage.full else {}  # the HTP stage compares with them too
    measured = [accuracy]
    if ort_sqnr is not None:
        measured.append(Accuracy("ort_quantize_static", "ONNX Runtime's quantize_static of the merged use-case",
                                 "its FP32 graph", accuracy.inputs, ort_sqnr))
    info = Quantization(o.mode, o.preset, o.weight_rounding, o.method, len(calib), len(held), len(tensors),
                        len(weights), len(lora_slots), len(live),
                        tuple(f for f in files if f.startswith("encodings/")),
                        _execution({w: c.x for w, c in linear.items()}, weights, enc.union, stage.full), mixed)
    return QuantResult(dataclasses.replace(manifest, quantization=info, accuracy=tuple(measured)), tuple(files),
                       tuple(held), fp32)


def _cpu_plan(mode: str, p: Preset, tensors: Sequence[str], branch: Sequence[str],
              ranges: Mapping[str, Mapping[str, TensorRange]], values: Mapping[str, Mapping[str, np.ndarray]],
              bundle: Bundle, precision: Mapping[str, int | str], gram: Hessians) -> _Encodings:
    """Quantized inputs of linear layers and of each branch's second MatMul; per mode, updatable ones."""
    def encodings(r: Mapping[str, TensorRange], lora: Mapping[str, Sequence[np.ndarray]]) -> dict[str, Encoding]:
        return cpu_activation_encodings(r, tensors, branch, p, precision) | lora_weight_encodings(lora, p)

    lora_slots = sorted(by_slot(values))
    union_enc = encodings(union(ranges), all_values(values))
    per_use_case = {u: encodings(ranges[u], active_values(bundle, values, u)) for u in ranges}
    floats = frozenset(t for t in tensors if union_enc[t].dtype == "FLOAT")
    live = updatable(mode, tensors, branch, lora_slots) - floats  # a float16 activation has no parameters
    plan = QdqPlan(activations={t: union_enc[t] for t in tensors}, lora_weights={s: union_enc[s] for s in lora_slots},
                   weight_bw=p.weights.bw, updatable=live, gram=gram,
                   weight_block=p.weights.block_size if p.weights.enc_type == "PER_BLOCK" else None)
    return _Encodings(plan, union_enc, per_use_case)


def _full_plan(stage: FloatStage, p: Preset, tensors: Sequence[str], ranges: Mapping[str, Mapping[str, TensorRange]],
               values: Mapping[str, Mapping[str, np.ndarray]], gram: Hessians) -> _Encodings:
    """Every float tensor and constant quantized, one non-updatable set; LoRA slots as integer patches."""
    if p.weights.enc_type != "PER_CHANNEL" or p.lora_weights.enc_type != "PER_TENSOR" or \
            p.activations.bw != p.lora_activations.bw:
        raise TargetError(f"preset {p.name!r} cannot run on the HTP as full QDQ groups: it needs per-channel base "
                          "weights, per-tensor LoRA weights and one activation bitwidth (w8a8, w8a16, lora_a16w16)")
    model, bw = stage.model, p.activations.bw
    lora = lora_weight_encodings(all_values(values), p)
    linear = linear_weights(model.graph, frozenset(lora))
    biases = int32_biases(model.graph, linear)
    constants = float_constants(model, set(linear) | set(biases), stage.branches)
    scales = norm_scales(model.graph)  # a16w8 norms: QNN takes their scale at the weights' width
    const_enc = constant_encodings(model, [c for c in constants if c not in scales], stage.base_dir, bw) | \
        constant_encodings(model, [c for c in constants if c in scales], stage.base_dir, p.weights.bw)
    scalings = [v[SCALING] for v in values.values() if SCALING in v]
    r = strength_ranges(union(ranges), scalings)
    roots = shared_roots(model, set(tensors) | set(constants) | set(lora))  # a Transpose keeps its slot's
    acts = activation_encodings(tensors, r, roots, const_enc | lora, bw)
    for past, present in kv_pairs(model):  # a static KV cache: what the graph writes, it reads back unchanged
        if past in acts and present in acts:
            acts[past] = dataclasses.replace(acts[present], name=past)
    layout = stage.layout.integer(lora)
    headers = layout.write(stage.root, stage.adapters)  # the float patches are calibrated and measured: replace
    m = stage.manifest
    rel = GROUP_PATCH if m.generation == "v3" else (adapter_patch(m.default_adapter) if m.default_adapter else None)
    declared: dict[str, onnx.TensorProto | onnx.ValueInfoProto] = {
        s.name: helper.make_tensor_value_info(s.name, helper.np_dtype_to_tensor_dtype(s.numpy_dtype), list(s.shape))
        for s in layout.slots if s.name in lora}
    if rel is not None:  # every parameter moved in the rewritten patch (lora_scaling too: the header changed)
        declared |= external_parameters(headers[rel], rel)
    plan = QdqPlan(activations=acts, lora_weights=lora, weight_bw=p.weights.bw, gram=gram, full=True,
                   constants=const_enc, integer_slots=declared,
                   requantize=requantized_operands(model, acts, p.weights.bw),
                   norm_biases={b: xw for b, xw in biases.items() if xw[1] not in linear})
    union_enc = {**acts, **lora, **const_enc}
    return _Encodings(plan, union_enc, {u: union_enc for u in ranges}, layout)


def _quantize_decode(stage: FloatStage, plan: QdqPlan, p: Preset, say: Say) -> list[str]:
    """The decode graph with the main graph's encodings (its constants encoded over their own values), its
    base tensors shared with the main graph's data file; returns the files written besides the graph."""
    decode = stage.decode
    assert decode is not None
    tensors = float_activations(decode, stage.branches) if plan.full else activation_tensors(decode, stage.branches)
    missing = [t for t in tensors if t not in plan.activations]
    if missing:
        raise TargetError(f"the decode graph computes {missing[0]!r}, which the main graph does not: the two cannot "
                          "share encodings (compile the decode shapes as a bundle of their own)")
    acts = {t: plan.activations[t] for t in tensors}
    constants: dict[str, Encoding] = {}
    if plan.full:
        linear = linear_weights(decode.graph, frozenset(plan.lora_weights))
        floats = float_constants(decode, set(linear) | set(int32_biases(decode.graph, linear)), stage.branches)
        scales = norm_scales(decode.graph)
        constants = constant_encodings(decode, [c for c in floats if c not in scales], stage.base_dir,
                                       p.activations.bw) | \
            constant_encodings(decode, [c for c in floats if c in scales], stage.base_dir, p.weights.bw)
    say("rewriting the decode graph to QDQ with the same encodings")
    apply_qdq(decode, QdqOptions(dataclasses.replace(plan, activations=acts, constants=constants), stage.branches,
                                 stage.base_dir, stage.root, QDQ_DECODE_DATA, say))
    left = share_data(decode, stage.root, QDQ_DECODE_DATA, stage.model)
    (stage.root / DECODE_GRAPH).write_bytes(decode.SerializeToString())
    return [QDQ_DECODE_DATA] if left else []


def _with_overrides(enc: _Encodings, stage: FloatStage, p: Preset, mode: str, given: Given | None,
                    tensors: Sequence[str], linear: Mapping[str, Candidate],
                    slot_values: Mapping[str, Mapping[str, np.ndarray]]) -> _Encodings:
    """The base weights' encodings by the preset's symmetric rule (the QDQ pass's own is absmax), then the user's
    files in force (``lora_runtime.quant.overrides``: which entries are used, carried, ignored or refused)."""
    inits = {t.name: t for t in stage.model.graph.initializer}
    weights = {}
    for w, c in linear.items():  # one weight in memory at a time
        a = read_tensor(inits[w], stage.base_dir).astype(np.float32)
        weights[w] = weight_encoding(w, a.T if c.transposed else a, p)
    union_enc, per_use_case = enc.union, enc.per_use_case
    if given is not None:
        # full QDQ groups: the LoRA slots' integer codes are already written with their encodings
        slot_shapes = {s: next(iter(v.values())).shape for s, v in slot_values.items() if enc.layout is None}
        shapes = {t: None for t in [*tensors, *enc.plan.constants]} | slot_shapes | \
            {w: (c.in_features, c.out_features) for w, c in linear.items()}
        targets = Targets(shapes, {s: 0 for s in slot_shapes} | {w: 1 for w in linear},
                          {s: 0 for s in slot_shapes} | {w: 0 if c.transposed else 1 for w, c in linear.items()},
                          enc.plan.updatable, mode, frozenset(slot_values) - set(slot_shapes),
                          "for LoRA weights whose integer codes the HTP patches hold")
        union_enc, per_use_case, weights = apply_files(given, targets, union_enc, per_use_case, weights)
    floats = {t for t, e in union_enc.items() if e.dtype == "FLOAT"}  # a float16 activation has no parameters
    plan = dataclasses.replace(
        enc.plan, activations={t: union_enc[t] for t in enc.plan.activations},
        lora_weights={s: union_enc[s] for s in enc.plan.lora_weights}, updatable=enc.plan.updatable - floats,
        constants={t: union_enc[t] for t in enc.plan.constants}, weight_overrides=weights)
    return dataclasses.replace(enc, plan=plan, union=union_enc, per_use_case=per_use_case)


def _execution(linear_inputs: Mapping[str, str], weights: Mapping[str, Encoding], acts: Mapping[str, Encoding],
               full: bool) -> str:
    """How the base linear layers of the QDQ graph run, in words (see ``passes.qdq_weights``)."""
    inputs = {w: x for w, x in linear_inputs.items() if w in weights}
    if full:
        return f"{len(inputs)} base linear layers: full QDQ groups (int{next(iter(weights.values())).bw} weights)" \
            if weights else "no base linear layers"
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


def _covered(enc: Encoding) -> tuple[float, float]:
    """The values an asymmetric encoding takes without clipping: AIMET's x = (q + offset) * scale with q in
    [0, 2^bw - 1], widened by half a step each side (what still rounds to the first or last code)."""
    s = enc.scale[0]
    return float((enc.offset[0] - 0.5) * s), float(((1 << enc.bw) - 0.5 + enc.offset[0]) * s)


def imported_chat(base_dir: Path) -> Chat | None:
    """The tokenizer of an imported LLM (``import-model`` wrote it next to the base), or None."""
    try:
        return Chat.load(base_dir)
    except BaseModelError:  # not an imported LLM, or no tokenizers package: no greedy-token report
        return None
