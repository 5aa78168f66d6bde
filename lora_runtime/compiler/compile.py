"""compile_bundle: base ONNX + PEFT adapters + use-cases -> a v1 / v2 / v3 bundle.

Data flows one way::

    adapters ─► attachment points ─► branch plan ─► patch layout ─► patches ─► branch pass ─► [saved-module
    pass] ─► [weight-only or QDQ pass] ─► QAIRT artefacts ─► manifest

Everything the user gave is validated before the first byte is written, and the bundle appears only when
complete (``lora_runtime.staging``).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from lora_runtime.arrays import Spill
from lora_runtime.bundle import Bundle, file_table, open_bundle, sha256_file, write_manifest
from lora_runtime.compiler.adapter import Adapter
from lora_runtime.compiler.base import base_float_type, check_adapter_bases, check_structure, link_data, load_base
from lora_runtime.compiler.htp import htp_stage
from lora_runtime.compiler.options import CompileOptions, WeightOnlyOptions
from lora_runtime.compiler.packed import packed_ops
from lora_runtime.compiler.passes.base_path import add_base_paths
from lora_runtime.compiler.passes.branch import BranchOptions, add_branches
from lora_runtime.compiler.passes.pack_qkv import pack_attention
from lora_runtime.compiler.passes.saved import SavedOptions, swap_saved
from lora_runtime.compiler.passes.static_shape import StaticShapeOptions, make_static
from lora_runtime.compiler.passes.weight_only import WeightOnlyPassOptions, module_weights, quantize_weights
from lora_runtime.compiler.patches import PatchLayout, SavedLayout, external_parameters, plan_branches, point_records
from lora_runtime.compiler.points import attach, attach_saved, blocks_summary, find_candidates
from lora_runtime.compiler.qairt import write_qairt_artefacts
from lora_runtime.compiler.quantize import FloatStage, imported_chat, quantize_bundle
from lora_runtime.compiler.use_cases import UseCaseSpec, check_use_cases, default_adapter, load_adapters
from lora_runtime.errors import AdapterError, BaseModelError, UseCaseError
from lora_runtime.eval.accuracy import compare_bundles, park_first_outputs, score_against
from lora_runtime.eval.greedy import described, greedy_agreement, greedy_count, prompt_scores, reference_tokens
from lora_runtime.llm.generate import GREEDY_PROMPTS
from lora_runtime.manifest import (
    Accuracy,
    AdapterInfo,
    BaseInfo,
    DecodeGraph,
    Manifest,
    Target,
    UseCase,
    WeightOnly,
)
from lora_runtime.names import (
    BASE_WEIGHT_ENCODINGS,
    DECODE_GRAPH,
    GRAPH,
    GROUP_PATCH,
    SAVED_PATCH,
    SIDECARS,
    adapter_patch,
    saved_patch,
    weight_only_data,
)
from lora_runtime.progress import Stage
from lora_runtime.quant.calibrate import input_grams, load_calibration, split_held_out
from lora_runtime.quant.encodings import VERSION, EncodingsFile, write_encodings
from lora_runtime.quant.gptq import Hessians
from lora_runtime.quant.presets import load_preset
from lora_runtime.quant.reader import read_encodings
from lora_runtime.runtime.session import make_session
from lora_runtime.staging import staging
from lora_runtime.version import versions

Report = Callable[[str], None]
MASK_FLOOR = -50.0  # the HTP: attention-mask constants at or below -1e4 are raised to this (see passes.static_shape)
MAX_AUTO_ENCODINGS = 1 << 20  # scale entries written to base_weights.encodings without being asked


def compile_bundle(base: str | os.PathLike[str],
                   adapters: Mapping[str, str | os.PathLike[str] | Adapter] | Sequence[Adapter],
                   out: str | os.PathLike[str], options: CompileOptions | None = None, *,
                   generation: str | None = None, use_cases: Sequence[UseCaseSpec | str] | None = None,
                   force: bool = False, sample_inputs: Mapping[str, np.ndarray] | None = None,
                   report: Report | None = None) -> Bundle:
    """Compile ``base`` + ``adapters`` into a bundle at ``out`` and return it, opened and validated.

    ``options`` says how (:class:`CompileOptions`); ``generation="v3"`` alone is short for
    ``CompileOptions("v3")``. ``use_cases`` default to one per adapter at strength 1.0. The base model's
    external data files are hard-linked into the bundle, never rewritten. With float16 slots or quantized base
    weights, the float32 twin is compiled too and each use-case's output SQNR against it is recorded (on
    ``sample_inputs``, or synthesized ones); with encodings, the SQNR against the FP32 graph on held-out
    calibration samples. Raises a :class:`LoraRuntimeError` subclass naming the culprit on bad input, with
    nothing written.
    """
    options = _options(options, generation)
    say = report or (lambda _msg: None)
    sample_list = [dict(sample_inputs)] if sample_inputs is not None else None
    q = options.quant
    samples = overrides = None
    if q is not None:  # everything the INT8 stage reads is checked before anything is written
        load_preset(q.preset)
        samples = load_calibration(q.calibration)
        overrides = read_encodings(q.encodings_file) if q.encodings_file is not None else None
    wo = options.weight_only
    wo_samples = wo_held = None  # GPTQ's samples, and those it does not see, to measure accuracy on
    if wo is not None and wo.calibration is not None:
        wo_samples, wo_held = split_held_out(load_calibration(wo.calibration))
    say("loading adapters")
    loaded = load_adapters(adapters, base=base)
    _check_saved(loaded, options)
    specs = check_use_cases(use_cases, loaded, options.generation)
    say("reading the base model")
    base = Path(base)
    model, data_files = load_base(base)
    base_type = base_float_type(model, base)
    _check_base_type(base, base_type, options)
    blocks = _check_blocks(base, model, loaded, options)
    wide = _int8_weights(base, model, wo)
    check_adapter_bases(model, base, loaded)
    say("resolving attachment points")
    gen = options.generation
    points = attach(model.graph, loaded, base)
    branches = plan_branches(points, loaded, gen, packed_ops(model.graph) if options.packed_branches else None)
    layout = PatchLayout.of(branches, gen, len(loaded), options.lora_dtype)
    saved = SavedLayout.of(attach_saved(model.graph, loaded, base, points), model.graph, base.parent)
    with staging(out, force=force) as tmp:
        say("writing patches")
        patches = layout.write(tmp, loaded)
        saved_files = saved.write(tmp, loaded)
        default = default_adapter(specs, loaded) if gen == "v2" else None
        parameter_patch = GROUP_PATCH if gen == "v3" else (adapter_patch(default) if default else None)
        parameters = external_parameters(patches[parameter_patch], parameter_patch) if parameter_patch else {}
        say(f"rewriting the graph ({len(branches)} points, {gen})")
        made = add_branches(model, BranchOptions(tuple(branches), gen, len(loaded), parameters, options.lora_dtype))
        if saved.points:  # modules_to_save: v1 graph inputs, v2/v3 parameters holding the base's values
            types = {sl.name: onnx.helper.np_dtype_to_tensor_dtype(sl.numpy_dtype) for sl in saved.slots}
            defaults = external_parameters(saved_files[SAVED_PATCH], SAVED_PATCH) if gen != "v1" else {}
            swap_saved(model, SavedOptions(saved.points, types, defaults))
        decode = copy.deepcopy(model) if options.decode_shapes else None
        target = _static(model, base.parent, options, say)
        if decode is not None:
            target = dataclasses.replace(target, decode=_static_decode(decode, base.parent, options, say))
        manifest = Manifest(
            generation=gen, base=BaseInfo(base.name, sha256_file(base), base.stat().st_size, (), base_type, blocks),
            points=point_records(branches, loaded, gen), slots=(*layout.slots, *saved.slots),
            adapters=tuple(AdapterInfo(a.name, a.source, a.sha256, a.config.to_json(), a.nbytes,
                                       adapter_patch(a.name) if gen != "v3" else None,
                                       tuple(s.module for s in a.saved), saved_patch(a.name) if a.saved else None)
                           for a in loaded),
            use_cases=tuple(UseCase(s.name, dict(s.strengths)) for s in specs), files={}, versions=versions(),
            group_patch=GROUP_PATCH if gen == "v3" else None, default_adapter=default, target=target,
            saved_modules=saved.records(), saved_patch=SAVED_PATCH if saved.points else None)
        for u in manifest.use_cases:  # strengths that overflow float32 once scaled are refused here, not as NaNs
            manifest.strength_value(u.strengths)
        own: list[str] = [*patches, *saved_files]
        if options.weight_only is not None:
            say(f"quantizing base weights to {options.weight_only.dtype}")
            summary, files = _quantize_weights(model, base, tmp, options.weight_only,
                                               frozenset(s.name for s in layout.slots), wide, wo_samples, say)
            manifest = dataclasses.replace(manifest, weight_only=summary)
            own += files
            data_files = []  # the bundle holds every base tensor it needs; the float32 data is not linked
        for rel in data_files:
            link_data(base.parent / rel, tmp / rel, options.copy_base_data)
        check_structure(model, base)
        graphs = [g for g in (model, decode) if g is not None and options.target == "cpu" and q is None]
        for g in graphs:
            pack_attention(g)  # attentions whose q/k/v no branch touches read them packed
        if graphs and options.base_path and gen == "v3" and add_base_paths(graphs, made, say):
            manifest = dataclasses.replace(manifest, target=dataclasses.replace(manifest.target, base_path=True))
        (tmp / GRAPH).write_bytes(model.SerializeToString())
        if decode is not None:
            (tmp / DECODE_GRAPH).write_bytes(decode.SerializeToString())
            own.append(DECODE_GRAPH)
        manifest = dataclasses.replace(manifest, base=dataclasses.replace(manifest.base, data_files=tuple(data_files)))
        held, fp32 = sample_list, None
        if q is not None and samples is not None:
            stage = FloatStage(tmp, model, manifest, base.parent, made.points, layout, tuple(loaded),
                               full=options.target == "htp", decode=decode)
            result = quantize_bundle(stage, q, samples, overrides, say)
            for rel in data_files:  # the QDQ graph holds every base tensor it needs in its own data file
                (tmp / rel).unlink()
            data_files = []
            own += result.files
            manifest = dataclasses.replace(result.manifest, base=dataclasses.replace(manifest.base, data_files=()))
            held, fp32 = list(result.held_out), result.fp32
            check_structure(model, base)
        if options.target == "htp":
            checked = htp_stage(Bundle(tmp, manifest), options.htp, held, fp32, say)
            manifest = dataclasses.replace(manifest, target=checked.target,
                                           accuracy=(*manifest.accuracy, *checked.accuracy))
            own += checked.files
        for sidecar in SIDECARS:  # a real LLM's tokenizer and chat settings travel with the bundle
            if (base.parent / sidecar).is_file():
                shutil.copyfile(base.parent / sidecar, tmp / sidecar)
                own.append(sidecar)
        own += write_qairt_artefacts(tmp, manifest)
        say("hashing and writing the manifest")
        manifest = dataclasses.replace(manifest, files=file_table(tmp, [GRAPH, *data_files, *own],
                                                                  cached=tuple(data_files)))
        if (options.lora_dtype != "float32" or options.weight_only is not None) and options.measure_accuracy:
            say("measuring accuracy against the float32 bundle")
            manifest = _with_accuracy(Bundle(tmp, manifest), base, loaded, specs, options, sample_inputs, wo_held, say)
        write_manifest(tmp, manifest)
    return open_bundle(out)


def _static(model: onnx.ModelProto, base_dir: Path, options: CompileOptions, say: Report) -> Target:
    """Static shapes (``--static-shape``; every free dimension for the HTP), and the target the manifest records."""
    htp = options.htp if options.target == "htp" else None
    if options.static_shapes or htp is not None:
        say("fixing shapes and folding constants")
        make_static(model, StaticShapeOptions(options.static_shapes, base_dir, htp_forms=htp is not None,
                                              mask_floor=MASK_FLOOR if htp is not None else None))
    return Target(options.target, htp.soc_model if htp else None, htp.htp_arch if htp else None,
                  dict(options.static_shapes))


def _static_decode(model: onnx.ModelProto, base_dir: Path, options: CompileOptions, say: Report) -> DecodeGraph:
    """The decode graph: the main graph's static shapes with ``--decode-shape``'s dims instead."""
    dims = {**options.static_shapes, **options.decode_shapes}
    unknown = sorted(set(options.decode_shapes) - set(options.static_shapes))
    if unknown:
        raise UseCaseError(f"--decode-shape {unknown[0]}=...: not a --static-shape dim of the main graph "
                           f"({', '.join(sorted(options.static_shapes))})")
    say("fixing the decode graph's shapes")
    htp = options.target == "htp"
    make_static(model, StaticShapeOptions(dims, base_dir, htp_forms=htp, mask_floor=MASK_FLOOR if htp else None))
    return DecodeGraph(DECODE_GRAPH, dims)


def _check_base_type(base: Path, base_type: str, options: CompileOptions) -> None:
    """What a float16 base (or a float32 one with float16 linear layers) cannot take: refused before anything is
    written, never a bundle that cannot run."""
    if base_type == "float32":
        return
    if options.quant is not None:
        raise BaseModelError(f"{base}: base is {base_type}: --encodings builds its QDQ graph for float32 bases "
                             "(float32 scales, Q/DQ and int8 kernels around float32 activations); export the base in "
                             "float32, which the encodings then quantize")


def _check_blocks(base: Path, model: onnx.ModelProto, adapters: Sequence[Adapter], options: CompileOptions) -> str:
    """What a CPU-only base (GGUF blocks kept, or ONNX Runtime's fused attention) cannot take, refused in one line:
    those read or rewrite float weights, or need plain ONNX ops. Returns the blocks summary ("" for none)."""
    blocks = blocks_summary(model.graph)
    fused = any(n.op_type == "GroupQueryAttention" for n in model.graph.node)
    if not blocks and not fused:
        return blocks
    what = ("--encodings" if options.quant is not None else "--target htp" if options.target == "htp"
            else "--static-shape" if (options.static_shapes or options.decode_shapes) and fused else None)
    if blocks and what is None:
        what = ("--base-weights int8" if options.weight_only is not None and options.weight_only.bits == 8
                else "modules_to_save" if any(a.saved for a in adapters) else None)
    if what is not None:
        held = " and ".join(x for x in (blocks and f"keeps the GGUF's quantized blocks ({blocks})",
                                        fused and "is ONNX Runtime's fused graph (GroupQueryAttention)") if x)
        fix = " ".join(x for x in (blocks and "--weights float32", fused and "--graph standard") if x)
        raise BaseModelError(f"{base}: the base {held}, and {what} needs float weights and plain ONNX ops; import "
                             f"the model with {fix} for it")
    return blocks


def _check_saved(adapters: Sequence[Adapter], options: CompileOptions) -> None:
    """What saved modules (``modules_to_save``) do not go with yet: refused before the base is read."""
    saving = next((a for a in adapters if a.saved), None)
    if saving is None:
        return
    what = ("--encodings" if options.quant is not None else "--target htp" if options.target == "htp"
            else "--base-weights" if options.weight_only is not None else None)
    if what is not None:
        raise AdapterError(f"adapter {saving.name!r} saves {saving.saved[0].module!r} whole (modules_to_save): "
                           f"saved modules are float slots of the base op, which {what} does not take yet; compile "
                           "without it")


def _options(options: CompileOptions | None, generation: str | None) -> CompileOptions:
    if options is None:
        if generation is None:
            raise UseCaseError("give the generation (v1, v2 or v3), or CompileOptions")
        return CompileOptions(generation)
    if generation is not None and generation != options.generation:
        raise UseCaseError(f"generation {generation!r} contradicts the options' {options.generation!r}")
    return options


def _int8_weights(base: Path, model: onnx.ModelProto, o: WeightOnlyOptions | None) -> frozenset[str]:
    """The weights ``--int8-modules`` names (checked before anything is written: a name matching none is refused)."""
    if o is None or not o.int8_modules:
        return frozenset()
    found = module_weights(model.graph, o.int8_modules)
    for m, weights in found.items():
        if not weights:
            known = sorted({c.aliases[0].rsplit(".", 1)[-1] for c in find_candidates(model.graph) if c.aliases})
            raise UseCaseError(f"--int8-modules {m!r}: no float linear layer of {base} is that module (its layers: "
                               f"{', '.join(known[:12]) or 'none'})")
    return frozenset(w for weights in found.values() for w in weights)


def _quantize_weights(model: onnx.ModelProto, base: Path, tmp: Path, o: WeightOnlyOptions, slots: frozenset[str],
                      wide: frozenset[str], samples: Sequence[dict[str, np.ndarray]] | None, say: Report
                      ) -> tuple[WeightOnly, list[str]]:
    """The weight-only pass, and the same numbers for QAIRT tooling: int8 and int4 per block (or per channel).
    Per-block scales in JSON cost ~55 bytes each (2.5x the int4 weights themselves): "auto" writes them up to
    a million. With ``samples``, the linear inputs' statistics are collected on the base model first (GPTQ)."""
    data = weight_only_data(o.dtype)
    hessians = _base_hessians(model, base, slots, samples, say) if o.rounding == "gptq" and samples else None
    say(f"quantizing base weights ({o.grid}, {o.rounding} codes)")
    result = quantize_weights(model, WeightOnlyPassOptions(base.parent, tmp, data, o.bits, o.block_size,
                                                           o.accuracy_level, slots, o.is_symmetric, hessians, wide))
    done, tables = result.weights, result.embeddings
    entries = sum(len(q.encoding.scale) for q in (*done, *tables))
    write = o.encodings == "always" or (o.encodings == "auto" and entries <= MAX_AUTO_ENCODINGS)
    if write:
        (tmp / "encodings").mkdir(exist_ok=True)
        write_encodings(tmp / BASE_WEIGHT_ENCODINGS, EncodingsFile(VERSION, (), tuple(q.encoding
                                                                                      for q in (*done, *tables))))
    finite = [q.sqnr_db for q in done if np.isfinite(q.sqnr_db)]
    summary = WeightOnly(
        o.dtype, len(done), tuple(sorted({q.block_size for q in done})), (tmp / data).stat().st_size,
        min(finite, default=None), float(np.mean(finite)) if finite else None,
        f"com.microsoft.MatMulNBits (weight-only, {o.grid}, {o.rounding} codes, accuracy_level {o.accuracy_level})",
        BASE_WEIGHT_ENCODINGS if write else None,
        "" if write else f"not written: {entries} scale entries (--base-encodings always writes them)",
        o.int8_modules, len(wide), tuple(q.encoding.name for q in tables))
    return summary, [data] + ([BASE_WEIGHT_ENCODINGS] if write else [])


def _base_hessians(model: onnx.ModelProto, base: Path, slots: frozenset[str],
                   samples: Sequence[dict[str, np.ndarray]], say: Report) -> Hessians:
    """GPTQ's statistics of every linear input the weight-only pass reads, from the calibration samples run through
    the base model alone (the adapters' branches add to the outputs, not to these inputs)."""
    base_model = onnx.load(str(base), load_external_data=False)
    produced = {i.name for i in base_model.graph.input} | {t for n in base_model.graph.node for t in n.output}
    del base_model
    linear = [c for c in find_candidates(model.graph) if c.weight not in slots and c.x in produced]
    tensors = sorted({c.x for c in linear})
    count = Stage(say, f"calibration of {len(tensors)} linear inputs (GPTQ)", len(samples), "runs")
    gram, rows = input_grams(base, tensors, samples, count.step)
    widest = max((c.in_features for c in linear), default=0)
    if rows < 2 * widest:  # H = X^T X of too few rows: GPTQ fits the calibration tokens and loses on others
        warnings.warn(f"{rows} calibration tokens for linear inputs of up to {widest} features: GPTQ needs at least "
                      f"{2 * widest} (more samples or a longer --seq-len), or its codes fit the calibration data only",
                      UserWarning, stacklevel=2)
    return Hessians(gram, Counter(c.x for c in linear), say, work=sum(c.in_features * c.out_features for c in linear),
                    act_order=True)


def _with_accuracy(bundle: Bundle, base: Path, adapters: list[Adapter], specs: list[UseCaseSpec],
                   options: CompileOptions, sample_inputs: Mapping[str, np.ndarray] | None,
                   held: Sequence[dict[str, np.ndarray]] | None = None, say: Report | None = None) -> Manifest:
    """The manifest with each use-case's output SQNR against the same bundle with float32 slots and weights: on
    ``sample_inputs`` (the worst output); else on ``held`` (calibration samples GPTQ did not see) or, for an
    imported LLM without them, on held-out chat prompts: the first output (the logits), its argmax agreement and
    the greedy tokens of the chat prompts; else on synthesized inputs (the worst output)."""
    float32 = CompileOptions(options.generation, copy_base_data=options.copy_base_data, measure_accuracy=False)
    names, chat, held = bundle.manifest.use_case_names, imported_chat(base.parent), list(held or ())
    if chat is not None and bundle.manifest.target.decode is not None:
        chat = None  # (a static-shape bundle with a decode graph: measured on samples alone)
    # next to the bundle: the same filesystem, so the base data links instead of copying
    with tempfile.TemporaryDirectory(prefix=".lora_runtime-reference-", dir=bundle.path.parent) as ref_dir:
        reference = compile_bundle(base, adapters, Path(ref_dir) / "f32", float32, use_cases=specs)
        if sample_inputs is not None or not (held or chat):
            accuracy = Accuracy("float32_bundle", "this bundle", "the float32 bundle (float32 base weights and LoRA "
                                "slots)", "given" if sample_inputs is not None else "synthesized",
                                compare_bundles(bundle, reference, sample_inputs))
            return dataclasses.replace(bundle.manifest, accuracy=(*bundle.manifest.accuracy, accuracy))
        prompts = greedy_count(names) if chat is not None else 0
        runs = 2 * (len(held) * len(names) + prompts * (1 if held else 2))
        count = Stage(say, f"accuracy against float32 ({'held-out samples' if held else 'chat prompts'}"
                           f"{', greedy prompts' if chat is not None else ''})", runs, "runs")
        test_session, ref_session = make_session(bundle), make_session(reference)
        if held:
            inputs = f"{len(held)} held-out calibration samples"
            with Spill(Path(ref_dir) / ".float32-logits") as parked:
                ref = park_first_outputs(reference, names, held, ref_session, parked, count.step)
                scores = score_against(bundle, names, held, test_session, ref, count.step)
        else:
            inputs = f"{len(GREEDY_PROMPTS)} held-out chat prompts"
            scores = prompt_scores(bundle, reference, chat, names, test_session=test_session,
                                   reference_session=ref_session, step=count.step)
        greedy = {}
        if chat is not None:
            tokens = reference_tokens(reference, chat, names, session=ref_session, step=count.step)
            greedy = greedy_agreement(tokens, bundle, chat, names, session=test_session, step=count.step)
    accuracy = Accuracy("float32_bundle", "this bundle", "the float32 bundle (float32 base weights and LoRA slots)",
                        inputs, {u: scores[u].sqnr_db for u in names}, {u: scores[u].agreement for u in names},
                        greedy_agreement=greedy, greedy=described() if chat is not None else "")
    return dataclasses.replace(bundle.manifest, accuracy=(*bundle.manifest.accuracy, accuracy))
