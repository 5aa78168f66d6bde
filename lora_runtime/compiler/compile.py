"""compile_bundle: base ONNX + PEFT adapters + use-cases -> a v1 / v2 / v3 bundle.

Data flows one way: adapters -> attachment points -> branch plan -> patches -> graph -> bundle.
Everything is validated before the first byte is written, and the bundle appears only when complete.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from lora_runtime import __version__
from lora_runtime.bundle import (
    GRAPH,
    GROUP_PATCH,
    AdapterInfo,
    BaseInfo,
    Bundle,
    Column,
    Manifest,
    Point,
    Slot,
    UseCase,
    file_table,
    open_bundle,
    sha256_file,
    staging,
    write_manifest,
)
from lora_runtime.compiler.adapter import Adapter, load_adapter
from lora_runtime.compiler.branch import GENERATIONS, SCALING, STRENGTH, Branch, add_branches, lora_a_name, lora_b_name
from lora_runtime.compiler.points import AttachmentPoint, find_candidates, resolve
from lora_runtime.compiler.quantize_base import BASE_WEIGHTS, quantize_base
from lora_runtime.errors import AdapterError, AttachmentError, BaseModelError, LoraRuntimeError, UseCaseError
from lora_runtime.lora_config import check_name
from lora_runtime.quant.calibrate import load_calibration
from lora_runtime.quant.encodings import VERSION as ENCODINGS_VERSION
from lora_runtime.quant.encodings import EncodingsFile, load_preset, read_encodings, write_encodings
from lora_runtime.quant.modes import check_mode
from lora_runtime.quant.pipeline import WEIGHT_ROUNDING, quantize_bundle
from lora_runtime.tensorfile import TensorFile, save_tensors

Report = Callable[[str], None]
COMPILE_STEPS = 6  # how many times compile_bundle calls ``report`` (more with encodings or quantization)
LORA_DTYPES = ("float32", "float16")
BASE_WEIGHT_ENCODINGS = "encodings/base_weights.encodings"  # --base-weights int8/int4
SIDECARS = ("tokenizer.json", "chat.json")  # written by lora_runtime.llm.import_gguf next to base.onnx
MAX_AUTO_ENCODINGS = 1 << 20  # scale entries written to base_weights.encodings without being asked


@dataclass(frozen=True)
class UseCaseSpec:
    """A use-case as the user declares it: a name and the enabled adapters with their strengths."""

    name: str
    strengths: tuple[tuple[str, float], ...]


def parse_use_case(text: str) -> UseCaseSpec:
    """``NAME=ADAPTER[:STRENGTH][,ADAPTER[:STRENGTH]...]``; ``NAME=`` is the base model alone."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise UseCaseError(f"use-case {text!r}: expected NAME=ADAPTER[:STRENGTH][,...] (NAME= for the base model)")
    strengths = []
    for item in filter(None, (s.strip() for s in rest.split(","))):
        adapter, _, s = item.partition(":")
        try:
            value = float(s) if s else 1.0
        except ValueError:
            raise UseCaseError(f"use-case {name!r}: strength {s!r} of adapter {adapter!r} is not a number") from None
        strengths.append((adapter, value))
    return UseCaseSpec(name, tuple(strengths))


def parse_adapter_arg(text: str) -> tuple[str, str]:
    """``NAME=PEFT_DIR`` (or just ``PEFT_DIR``: the folder name is the adapter name)."""
    name, sep, path = text.partition("=")
    if not sep:
        return Path(text).name, text
    return name, path


def compile_bundle(base: str | os.PathLike[str],
                   adapters: Mapping[str, str | os.PathLike[str] | Adapter] | Sequence[Adapter],
                   out: str | os.PathLike[str], *, generation: str,
                   use_cases: Sequence[UseCaseSpec | str] | None = None, force: bool = False,
                   copy_base_data: bool = False, lora_dtype: str = "float32",
                   base_weights: str = "float32", block_size: int | None = None, base_encodings: str = "auto",
                   encodings: str = "none", calibration: str | os.PathLike[str] | None = None,
                   preset: str = "w8a8", calibration_method: str = "minmax", ort_reference: bool = True,
                   encodings_file: str | os.PathLike[str] | None = None, sensitive_db: float | None = None,
                   weight_rounding: str = "nearest",
                   sample_inputs: Mapping[str, np.ndarray] | None = None, measure_accuracy: bool = True,
                   report: Report | None = None) -> Bundle:
    """Compile ``base`` + ``adapters`` into a bundle at ``out`` and return it, opened and validated.

    ``use_cases`` default to one per adapter at strength 1.0. The base model's external data files
    are hard-linked into the bundle, never rewritten; where the filesystem cannot link (another
    device), ``copy_base_data=True`` copies them instead. ``lora_dtype="float16"`` stores LoRA A/B slots
    and patches in 16 bits (half the bytes a cold switch moves and a preloaded use-case holds); the
    branch widens them to float32 inside the graph; the output SQNR of every use-case against float32
    slots is then measured (on ``sample_inputs``, or synthesized ones) and recorded in the manifest.
    ``base_weights="int8"`` / ``"int4"`` quantizes every linear weight of the base (weight-only,
    ``MatMulNBits``; int8 per channel, int4 in blocks of ``block_size``, default 32) into the bundle's
    own data file, LoRA branches staying float; accuracy against the float32 bundle is recorded too.
    ``encodings`` ("non-updatable", ...) calibrates on ``calibration`` (an .npz of samples) with the
    encodings ``preset``, writes AIMET/QAIRT encodings files and rewrites the graph to QDQ (INT8 on
    ONNX Runtime); the SQNR of every use-case against FP32 on held-out samples goes into the manifest.
    ``weight_rounding="gptq"`` picks the base weights' integer codes with GPTQ instead of nearest rounding
    (same encodings; better accuracy on real LLMs; about a minute for SmolLM2-135M).
    Raises a :class:`LoraRuntimeError` subclass naming the culprit on bad input, with nothing written.
    """
    say = report or (lambda _msg: None)
    if generation not in GENERATIONS:
        raise UseCaseError(f"generation must be one of {', '.join(GENERATIONS)}, got {generation!r}")
    if lora_dtype not in LORA_DTYPES:
        raise UseCaseError(f"lora_dtype must be one of {', '.join(LORA_DTYPES)}, got {lora_dtype!r}")
    if base_weights not in BASE_WEIGHTS:
        raise UseCaseError(f"base_weights must be one of {', '.join(BASE_WEIGHTS)}, got {base_weights!r}")
    if base_encodings not in ("auto", "always", "never"):
        raise UseCaseError(f"base_encodings must be auto, always or never, got {base_encodings!r}")
    if block_size is not None and (block_size < 16 or block_size & (block_size - 1)):
        raise UseCaseError(f"block_size must be a power of two of at least 16, got {block_size}")
    check_mode(generation, encodings)
    samples = None
    if encodings != "none":
        load_preset(preset)
        if weight_rounding not in WEIGHT_ROUNDING:
            raise UseCaseError(f"weight rounding must be one of {', '.join(WEIGHT_ROUNDING)}, got {weight_rounding!r}")
        if calibration is None:
            raise UseCaseError(f"encodings {encodings} need calibration data: pass --calibration DATA.npz")
        if base_weights != "float32":
            raise UseCaseError("--encodings with --base-weights int8/int4 is not supported yet: the QDQ graph "
                               "quantizes the base weights itself (int8 per channel)")
        samples = load_calibration(calibration)
    overrides = read_encodings(encodings_file) if encodings_file is not None else None
    if overrides is not None and encodings == "none":
        raise UseCaseError("--encodings-file needs --encodings (non-updatable, adapter-only or full)")
    say("loading adapters")
    loaded = _load_adapters(adapters)
    specs = _check_use_cases(use_cases, loaded, generation)
    say("reading the base model")
    base = Path(base)
    model, data_files = _load_base(base)
    say("resolving attachment points")
    points = _resolve_points(model, base, loaded)
    branches = _plan(points, loaded, generation)
    slots = _slots(branches, generation, len(loaded), lora_dtype)
    with staging(out, force=force) as tmp:
        say("writing patches")
        patches = _write_patches(tmp, branches, loaded, generation, lora_dtype)
        default = _default_adapter(specs, loaded) if generation == "v2" else None
        parameters = {}
        if generation == "v3":
            parameters = _external_parameters(patches["group"], GROUP_PATCH)
        elif generation == "v2" and default is not None:
            parameters = _external_parameters(patches[default], _patch_rel(default))
        say(f"rewriting the graph ({len(branches)} points, {generation})")
        add_branches(model, branches, generation, len(loaded), parameters, lora_dtype)
        own_data: list[str] = []
        quantized = []
        if base_weights != "float32":
            say(f"quantizing base weights to {base_weights}")
            own_data = [f"base.{base_weights}.data"]
            quantized = quantize_base(model, base.parent, tmp, own_data[0], bits=int(base_weights[3:]),
                                      block_size=block_size, keep_float=frozenset(s.name for s in slots))
            data_files = []  # the bundle holds every base tensor it needs; the float32 data is not linked
        for rel in data_files:
            _link(base.parent / rel, tmp / rel, copy_base_data)
        (tmp / GRAPH).write_bytes(model.SerializeToString())
        _check_structure(model, base)
        manifest = Manifest(
            generation=generation,
            base=BaseInfo(base.name, sha256_file(base), base.stat().st_size, tuple(data_files)),
            points=tuple(_point(b, loaded, generation) for b in branches),
            slots=tuple(slots),
            adapters=tuple(AdapterInfo(a.name, a.source, a.sha256, a.config.to_json(), a.nbytes,
                                       _patch_rel(a.name) if generation != "v3" else None) for a in loaded),
            use_cases=tuple(UseCase(s.name, dict(s.strengths)) for s in specs),
            files={},
            versions=_versions(),
            group_patch=GROUP_PATCH if generation == "v3" else None,
            default_adapter=default,
        )
        if samples is not None:
            q = quantize_bundle(tmp, model, manifest, base.parent, mode=encodings, preset=preset, samples=samples,
                                method=calibration_method, ort_reference=ort_reference, overrides=overrides,
                                sensitive_db=sensitive_db, weight_rounding=weight_rounding, say=say)
            for rel in data_files:  # the QDQ graph holds every base tensor it needs in its own data file
                (tmp / rel).unlink()
            data_files, own_data = [], own_data + q.files
            manifest = dataclasses.replace(q.manifest, base=dataclasses.replace(manifest.base, data_files=()))
            _check_structure(model, base)
        if quantized:
            # the same numbers for QAIRT tooling: int8 per channel, int4 per block. Per-block scales in JSON
            # cost ~55 bytes each (2.5x the int4 weights themselves): "auto" writes them up to a million.
            entries = sum(len(q.encoding.scale) for q in quantized)
            write = base_encodings == "always" or (base_encodings == "auto" and entries <= MAX_AUTO_ENCODINGS)
            summary = _quant_summary(base_weights, quantized, tmp / own_data[0])
            if write:
                (tmp / "encodings").mkdir(exist_ok=True)
                write_encodings(tmp / BASE_WEIGHT_ENCODINGS, EncodingsFile(
                    ENCODINGS_VERSION, (), tuple(q.encoding for q in quantized)))
                own_data.append(BASE_WEIGHT_ENCODINGS)
            summary["encodings"] = BASE_WEIGHT_ENCODINGS if write else (
                f"not written: {entries} scale entries (--base-encodings always writes them)")
            manifest = dataclasses.replace(manifest, extra={**manifest.extra, "base_weights": summary})
        for sidecar in SIDECARS:  # a real LLM's tokenizer and chat settings travel with the bundle
            if (base.parent / sidecar).is_file():
                shutil.copyfile(base.parent / sidecar, tmp / sidecar)
                own_data.append(sidecar)
        own_data += write_qairt_artefacts(tmp, manifest)
        say("hashing and writing the manifest")
        rels = [GRAPH, *data_files, *own_data, *(GROUP_PATCH if k == "group" else _patch_rel(k) for k in patches)]
        manifest = dataclasses.replace(manifest, files=file_table(tmp, rels, cached=tuple(data_files)))
        if (lora_dtype != "float32" or base_weights != "float32") and measure_accuracy:
            say("measuring accuracy against the float32 bundle")
            manifest = _with_accuracy(Bundle(tmp, manifest), base, loaded, specs, generation, sample_inputs)
        write_manifest(tmp, manifest)
    return open_bundle(out)


def _with_accuracy(bundle: Bundle, base: Path, adapters: list[Adapter], specs: list[UseCaseSpec],
                   generation: str, sample_inputs: Mapping[str, np.ndarray] | None) -> Manifest:
    """The manifest with each use-case's output SQNR against the same bundle with float32 slots."""
    import tempfile

    from lora_runtime.accuracy import compare_bundles

    # next to the bundle: the same filesystem, so the base data links instead of copying
    with tempfile.TemporaryDirectory(prefix=".lora_runtime-reference-", dir=bundle.path.parent) as ref_dir:
        reference = compile_bundle(base, adapters, Path(ref_dir) / "f32", generation=generation, use_cases=specs,
                                   measure_accuracy=False)
        sqnr = compare_bundles(bundle, reference, sample_inputs)
    m = bundle.manifest
    accuracy = {"reference": "float32 bundle (float32 base weights and LoRA slots)", "metric": "output SQNR (dB)",
                "inputs": "given" if sample_inputs is not None else "synthesized", "use_cases": sqnr}
    return dataclasses.replace(m, extra={**m.extra, "accuracy": accuracy})


def write_qairt_artefacts(root: Path, m: Manifest) -> list[str]:
    """``lora_weight_list.txt`` (for ``qairt-converter --lora_weight_list``) and ``lora_config.yaml``
    (``use_case: [{name, model_name, lora_weights, quant_overrides, output_path}]``, for QAIRT's LoRA
    importer), pointing at the bundle's own files."""
    names = sorted((s.name for s in m.slots if s.kind in ("lora_A", "lora_B")), key=_natural)
    (root / "lora_weight_list.txt").write_text("".join(f"{n}\n" for n in names))
    enc = m.extra.get("encodings", {})
    lines = ["use_case:"]
    for u in m.use_cases:
        adapter = next(iter(u.strengths), None)
        if adapter is None:
            continue  # the base model alone has no LoRA weights to import
        weights = m.group_patch or m.adapter(adapter).patch or ""
        overrides = next((f for f in enc.get("files", []) if f.endswith(f"/{u.name}.encodings")),
                         next(iter(enc.get("files", [])), ""))
        lines += [f'  - name: "{u.name}"', f'    model_name: "{m.graph}"', f'    lora_weights: "{weights}"',
                  f'    quant_overrides: "{overrides}"', '    output_path: "./output"']
    (root / "lora_config.yaml").write_text("\n".join(lines) + "\n")
    return ["lora_weight_list.txt", "lora_config.yaml"]


def _natural(name: str) -> list:
    """``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _quant_summary(kind: str, quantized: list, data: Path) -> dict:
    """What the base quantization did: for the manifest and ``inspect``."""
    finite = [q.sqnr_db for q in quantized if np.isfinite(q.sqnr_db)]
    return {"dtype": kind, "weights": len(quantized), "block_size": sorted({q.block_size for q in quantized}),
            "data_bytes": data.stat().st_size, "weight_sqnr_db_min": min(finite, default=None),
            "weight_sqnr_db_mean": float(np.mean(finite)) if finite else None,
            "op": "com.microsoft.MatMulNBits (weight-only, symmetric, accuracy_level 4)"}


def _load_adapters(adapters: Mapping[str, str | os.PathLike[str] | Adapter] | Sequence[Adapter]) -> list[Adapter]:
    items = adapters.items() if isinstance(adapters, Mapping) else [(a.name, a) for a in adapters]
    loaded: list[Adapter] = []
    for name, a in items:
        if not isinstance(a, Adapter):
            a = load_adapter(a, name)
        elif a.name != name:
            raise UseCaseError(f"adapter {a.name!r} given under the name {name!r}")
        if any(b.name == a.name for b in loaded):
            raise UseCaseError(f"adapter name {a.name!r} is given twice")
        loaded.append(a)
    if not loaded:
        raise UseCaseError("no adapters given; pass at least one --adapter NAME=PEFT_DIR")
    return loaded


def _check_use_cases(use_cases: Sequence[UseCaseSpec | str] | None, adapters: list[Adapter],
                     generation: str) -> list[UseCaseSpec]:
    if use_cases is None:
        use_cases = [UseCaseSpec(a.name, ((a.name, 1.0),)) for a in adapters]
    specs = [parse_use_case(u) if isinstance(u, str) else u for u in use_cases]
    if not specs:
        raise UseCaseError("no use-cases given; pass at least one --use-case NAME=ADAPTER[:STRENGTH]")
    known = {a.name for a in adapters}
    seen: set[str] = set()
    for s in specs:
        try:
            check_name("use-case", s.name)
        except ValueError as e:
            raise UseCaseError(str(e)) from None
        if s.name in seen:
            raise UseCaseError(f"use-case {s.name!r} is given twice")
        seen.add(s.name)
        names = [a for a, _ in s.strengths]
        for a, v in s.strengths:
            if a not in known:
                raise UseCaseError(f"use-case {s.name!r}: unknown adapter {a!r} (known: {', '.join(sorted(known))})")
            if not math.isfinite(v):
                raise UseCaseError(f"use-case {s.name!r}: strength {v!r} of adapter {a!r} is not finite")
        if len(set(names)) != len(names):
            raise UseCaseError(f"use-case {s.name!r} names an adapter twice")
        if generation != "v3" and len(names) > 1:
            raise UseCaseError(f"use-case {s.name!r} enables {len(names)} adapters; {generation} holds one adapter "
                               "per use-case: compile with --generation v3 for multi-adapter use-cases")
    return specs


def _load_base(path: Path) -> tuple[onnx.ModelProto, list[str]]:
    if not path.is_file():
        raise BaseModelError(f"{path}: base model not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends; all mean the same to the user
        raise BaseModelError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from e
    if not model.graph.node:
        raise BaseModelError(f"{path}: the graph has no nodes (truncated or not an ONNX model)")
    data_files: list[str] = []
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            rel = {e.key: e.value for e in t.external_data}.get("location", "")
            if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise BaseModelError(f"{path}: initializer {t.name!r} has external data outside the model folder")
            if not (path.parent / rel).is_file():
                raise BaseModelError(f"{path}: external data file {rel!r} of initializer {t.name!r} is missing")
            if rel not in data_files:
                data_files.append(rel)
    return model, data_files


def _resolve_points(model: onnx.ModelProto, base: Path, adapters: list[Adapter]) -> list[AttachmentPoint]:
    candidates = find_candidates(model.graph)
    if not candidates:
        raise BaseModelError(f"{base}: no MatMul/Gemm with a constant 2-D weight: nothing to attach LoRA to")
    by_module: dict[str, AttachmentPoint] = {}
    for a in adapters:
        found = resolve(candidates, [p.module for p in a.pairs], f"adapter {a.name!r} on {base.name}")
        for pair in a.pairs:
            c = found[pair.module].candidate
            if (pair.in_features, pair.out_features) != (c.in_features, c.out_features):
                raise AttachmentError(
                    f"adapter {a.name!r}: {lora_a_name(pair.module)} {pair.a.shape} / {lora_b_name(pair.module)} "
                    f"{pair.b.shape} do not fit {c.op_type} {c.node!r} with in={c.in_features}, "
                    f"out={c.out_features} (A must be (r, in), B (out, r))")
        for module, point in found.items():
            other = next((p for p in by_module.values() if p.candidate.node == point.candidate.node
                          and p.module != module), None)
            if other is not None:
                raise AttachmentError(f"adapter {a.name!r}: module {module!r} resolves to op {point.candidate.node!r}, "
                                      f"which another adapter reaches as {other.module!r}; use one module path")
            by_module.setdefault(module, point)
    order = {c.node: i for i, c in enumerate(candidates)}
    return sorted(by_module.values(), key=lambda p: order[p.candidate.node])


def _plan(points: list[AttachmentPoint], adapters: list[Adapter], generation: str) -> list[Branch]:
    branches = []
    for p, point in enumerate(points):
        pairs = [(i, a.pair(point.module)) for i, a in enumerate(adapters) if a.pair(point.module)]
        if generation == "v3":
            cols = [(i, pair.scaling) for i, pair in pairs for _ in range(pair.rank)]
            branches.append(Branch(p, point.module, point.candidate, len(cols),
                                   tuple(i for i, _ in cols), tuple(s for _, s in cols)))
        else:
            branches.append(Branch(p, point.module, point.candidate, max(pair.rank for _, pair in pairs)))
    return branches


def _slots(branches: list[Branch], generation: str, n_adapters: int, lora_dtype: str) -> list[Slot]:
    """The slot table, in patch order: wider dtypes first, so every slot is aligned in the arena."""
    slots = []
    if generation != "v3":
        slots.append(Slot(SCALING, (len(branches),), "float32", "lora_scaling"))
    for b in branches:
        slots.append(Slot(lora_a_name(b.module), (b.rank, b.candidate.in_features), lora_dtype, "lora_A"))
        slots.append(Slot(lora_b_name(b.module), (b.candidate.out_features, b.rank), lora_dtype, "lora_B"))
    slots.append(Slot(STRENGTH, () if generation != "v3" else (n_adapters,), "float32", "strength"))
    return slots


def _in_dtype(tensors: dict[str, np.ndarray], lora_dtype: str, what: str) -> dict[str, np.ndarray]:
    """A/B converted to the slot dtype; float16 must hold every value (65504 at most)."""
    if lora_dtype == "float32":
        return tensors
    out = {}
    for name, t in tensors.items():
        if name == SCALING:
            out[name] = t
            continue
        peak = float(np.abs(t).max()) if t.size else 0.0
        if peak > float(np.finfo(np.float16).max):
            raise AdapterError(f"{what}: tensor {name!r} holds |x| = {peak:.4g}, beyond float16; "
                               "compile with --lora-dtype float32")
        out[name] = t.astype(np.float16)
    return out


def adapter_patch(branches: list[Branch], adapter: Adapter) -> dict[str, np.ndarray]:
    """v1/v2: one adapter's values for every patched slot, zero-padded to the slot ranks and points."""
    scaling = np.zeros(len(branches), np.float32)
    tensors: dict[str, np.ndarray] = {SCALING: scaling}
    for b in branches:
        a_slot = np.zeros((b.rank, b.candidate.in_features), np.float32)
        b_slot = np.zeros((b.candidate.out_features, b.rank), np.float32)
        pair = adapter.pair(b.module)
        if pair is not None:
            a_slot[: pair.rank] = pair.a
            b_slot[:, : pair.rank] = pair.b
            scaling[b.index] = pair.scaling
        tensors[lora_a_name(b.module)] = a_slot
        tensors[lora_b_name(b.module)] = b_slot
    return tensors


def group_patch(branches: list[Branch], adapters: list[Adapter]) -> dict[str, np.ndarray]:
    """v3: per point, A_cat = [A_1; ...; A_N] (R, in) and B_cat = [B_1 ... B_N] (out, R)."""
    tensors: dict[str, np.ndarray] = {}
    for b in branches:
        pairs = [p for p in (a.pair(b.module) for a in adapters) if p is not None]
        tensors[lora_a_name(b.module)] = np.concatenate([p.a for p in pairs], axis=0)
        tensors[lora_b_name(b.module)] = np.concatenate([p.b for p in pairs], axis=1)
    return tensors


def _write_patches(root: Path, branches: list[Branch], adapters: list[Adapter],
                   generation: str, lora_dtype: str) -> dict[str, TensorFile]:
    (root / "patches").mkdir()
    if generation == "v3":
        group = _in_dtype(group_patch(branches, adapters), lora_dtype, "the adapter group")
        return {"group": save_tensors(root / GROUP_PATCH, group)}
    return {a.name: save_tensors(root / _patch_rel(a.name),
                                 _in_dtype(adapter_patch(branches, a), lora_dtype, f"adapter {a.name!r}"))
            for a in adapters}


def _patch_rel(adapter: str) -> str:
    return f"patches/{adapter}.safetensors"


def _external_parameters(tf: TensorFile, rel: str) -> dict[str, TensorProto]:
    """Initializers whose data is the patch file itself: ONNX external data at the tensors' offsets."""
    out = {}
    for e in tf.entries.values():
        dtype = {"F32": TensorProto.FLOAT, "F16": TensorProto.FLOAT16}[e.dtype]
        t = TensorProto(name=e.name, data_type=dtype, dims=list(e.shape))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", rel), ("offset", str(e.begin)), ("length", str(e.nbytes))):
            t.external_data.add(key=key, value=value)
        out[e.name] = t
    return out


def _default_adapter(specs: list[UseCaseSpec], adapters: list[Adapter]) -> str:
    """v2's parameters hold the adapter of the first use-case that has one."""
    return next((s.strengths[0][0] for s in specs if s.strengths), adapters[0].name)


def _point(b: Branch, adapters: list[Adapter], generation: str) -> Point:
    cols, start = [], 0
    for a in adapters:
        pair = a.pair(b.module)
        if pair is None:
            continue
        if generation == "v3":
            cols.append(Column(a.name, start, start + pair.rank, pair.scaling))
            start += pair.rank
        else:
            cols.append(Column(a.name, 0, pair.rank, pair.scaling))
    c = b.candidate
    return Point(b.module, c.node, c.op_type, c.weight, c.transposed, c.in_features, c.out_features, b.rank,
                 tuple(cols))


def _check_structure(model: onnx.ModelProto, base: Path) -> None:
    """onnx.checker on the rewritten graph's structure, with every initializer's data left out.

    Not on the path: onnx refuses external data files that have several hard links ("potential
    hardlink attack"), and a hard link is how a bundle shares the base weights. Not on the proto
    as is: the checker then looks for external data relative to the current directory.
    """
    g = model.graph
    stub = onnx.GraphProto(name=g.name, node=g.node, input=g.input, output=g.output, value_info=g.value_info,
                           initializer=[TensorProto(name=t.name, data_type=t.data_type, dims=[0])
                                        for t in g.initializer])
    m = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, graph=stub,
                        functions=model.functions)
    try:
        onnx.checker.check_model(m)
    except onnx.checker.ValidationError as e:  # a bug of ours, or a base model onnx itself rejects
        raise BaseModelError(f"{base}: the rewritten graph fails onnx.checker: {str(e).splitlines()[0]}") from e


def _link(src: Path, dst: Path, copy: bool) -> None:
    """Base weights are referenced, not rewritten: a hard link, or a copy only when asked for."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError as e:
        if not copy:
            raise BaseModelError(f"{src}: cannot hard-link the base weights into the bundle ({e.strerror or e}; "
                                 f"another filesystem?); pass --copy-base-data to copy "
                                 f"{src.stat().st_size / 1e9:.2f} GB") from e
        shutil.copyfile(src, dst)


def _versions() -> dict[str, str]:
    import onnxruntime

    return {"lora_runtime": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


__all__ = ["UseCaseSpec", "compile_bundle", "parse_use_case", "parse_adapter_arg", "LoraRuntimeError"]
