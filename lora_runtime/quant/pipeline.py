"""INT8 for a bundle being compiled: calibrate the float graph, write encodings, rewrite to QDQ, measure.

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
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from lora_runtime.accuracy import sqnr_db
from lora_runtime.bundle import UNION_ENCODINGS, Bundle, Manifest, Slot
from lora_runtime.compiler.points import find_candidates
from lora_runtime.quant.calibrate import TensorRange, collect_ranges, split_held_out
from lora_runtime.quant.encodings import (
    VERSION,
    Encoding,
    EncodingsFile,
    Preset,
    check_fits,
    load_preset,
    to_qdq,
    write_encodings,
)
from lora_runtime.quant.modes import (
    activation_encodings,
    choose_precision,
    lora_weight_encodings,
    union_ranges,
    updatable,
)
from lora_runtime.quant.qdq import QdqPlan, activation_tensors, apply_qdq, lora_scale_name, scale_input_names
from lora_runtime.runtime.simple import make_session, run_use_case
from lora_runtime.tensorfile import read_header, save_tensors

DATA_FILE = "base.qdq.data"
WEIGHT_ROUNDING = ("nearest", "gptq")
GREEDY_TOKENS = 16  # an imported LLM's report: how many of the first greedy tokens agree with FP32


@dataclasses.dataclass(frozen=True)
class QuantResult:
    manifest: Manifest  # with encoding slots and per-use-case encodings patches
    files: list[str]  # bundle-relative files written (data, encodings files, encodings patches)


def quantize_bundle(root: Path, model: onnx.ModelProto, manifest: Manifest, base_dir: Path, *, mode: str,
                    preset: str, samples: Sequence[dict[str, np.ndarray]], method: str = "minmax",
                    ort_reference: bool = True, overrides: EncodingsFile | None = None,
                    sensitive_db: float | None = None, weight_rounding: str = "nearest",
                    say: Callable[[str], None] = lambda _m: None) -> QuantResult:
    """Rewrite ``model`` (whose float version is at ``root``/graph) to QDQ; write encodings; measure SQNR.

    ``weight_rounding="gptq"`` chooses the base weights' codes with GPTQ (lora_runtime.quant.gptq) from the
    calibration inputs of every use-case; the encodings (the grid) are the same as with ``"nearest"``
    (``compile_bundle`` checks the choice).
    """
    p = load_preset(preset)
    float_bundle = Bundle(root, manifest)
    lora_slots = sorted(s.name for s in manifest.slots if s.kind in ("lora_A", "lora_B"))
    modules = [pt.module for pt in manifest.points]
    tensors = activation_tensors(model, frozenset(lora_slots), modules)
    branch = [f"{m}.lora/scaled" for m in modules]
    calib, held = split_held_out(samples)
    names = manifest.use_case_names
    say(f"calibrating {len(tensors)} tensors on {len(calib)} samples x {len(names)} use-cases")
    count = iter(range(1, len(calib) * len(names) + 1))
    kept: dict[str, list[np.ndarray]] | None = {} if sensitive_db is not None else None
    linear = [c for c in find_candidates(model.graph) if c.weight not in lora_slots]  # the base linear layers
    gram: dict[str, np.ndarray] | None = None
    if weight_rounding == "gptq":
        gram = {c.x: np.zeros(()) for c in linear}
    ranges = collect_ranges(float_bundle, tensors, calib, names, method=method, keep_values=kept, gram=gram,
                            step=lambda u: say(f"calibrating {u}: {next(count)}/{len(calib) * len(names)}"))
    chosen: dict[str, tuple[int | str, float]] = {}
    if kept is not None:  # mixed precision: outlier-heavy activations at 16 bits, or float16 past that
        start = {t: (p.lora_activations if t in branch else p.activations).bw for t in tensors}
        chosen = choose_precision(kept, union_ranges(ranges), sensitive_db, start)
    precision = {t: bits for t, (bits, _db) in chosen.items()}
    session = make_session(float_bundle)
    fp32 = {u: [run_use_case(float_bundle, u, s, session=session) for s in held] for u in names}
    del session
    chat = _chat(base_dir)
    if chat is not None:
        say("greedy decoding of the held-out prompts with FP32")
        fp32_greedy = _greedy_runs(float_bundle, chat, names)
    ort_sqnr = _ort_reference(float_bundle, names, calib, held, fp32, say) if ort_reference else None

    values = _lora_values(float_bundle, lora_slots)
    union = _encodings(union_ranges(ranges), tensors, branch, values, p, precision)
    per_use_case = {u: _encodings(ranges[u], tensors, branch, _active(float_bundle, values, u), p, precision)
                    for u in names}
    weight_overrides = {}
    if overrides is not None:  # the user's entries win, in every use-case's set
        weights_shape = {c.weight: (c.in_features, c.out_features) for c in linear}
        shapes = {t: None for t in tensors} | {s: v[0].shape for s, v in values.items()} | weights_shape
        check_fits(overrides, shapes, {s: 0 for s in lora_slots} | {w: 1 for w in weights_shape})
        mine = {e.name: e for e in overrides.activation_encodings + overrides.param_encodings}
        weight_overrides = {k: v for k, v in mine.items() if k in weights_shape}
        for enc in [union, *per_use_case.values()]:
            enc.update({k: v for k, v in mine.items() if k in enc})
    floats = frozenset(t for t in tensors if union[t].dtype == "FLOAT")
    live = updatable(mode, tensors, branch, lora_slots) - floats  # a float16 activation has no parameters
    plan = QdqPlan(activations={t: union[t] for t in tensors}, lora_weights={s: union[s] for s in lora_slots},
                   weight_bw=p.weights.bw, updatable=live, weight_overrides=weight_overrides, gram=gram or {},
                   weight_block=p.weights.block_size if p.weights.enc_type == "PER_BLOCK" else None)
    say(f"rewriting to QDQ ({mode} encodings, {weight_rounding} weight rounding)")
    weights = {e.name: e for e in apply_qdq(model, base_dir, root, DATA_FILE, plan, frozenset(lora_slots), say=say)}
    (root / manifest.graph).write_bytes(model.SerializeToString())

    files = [DATA_FILE] + _write_encodings_files(root, mode, weights, union, per_use_case, tensors, branch, lora_slots)
    slots, patches = _encoding_slots(root, live, union, per_use_case, lora_slots)
    files += list(patches.values()) + ([UNION_ENCODINGS] if slots else [])
    use_cases = tuple(dataclasses.replace(u, encodings=patches.get(u.name)) for u in manifest.use_cases)
    manifest = dataclasses.replace(manifest, slots=manifest.slots + tuple(slots), use_cases=use_cases,
                                   union_encodings=UNION_ENCODINGS if slots else None)

    say("measuring INT8 against FP32 on held-out samples")
    int8 = Bundle(root, manifest)
    session = make_session(int8)
    runs = {u: [run_use_case(int8, u, s, session=session) for s in held] for u in names}
    sqnr = {u: _sqnr(fp32[u], runs[u]) for u in names}
    agree = {u: _argmax_agreement(fp32[u], runs[u]) for u in names}
    extra = {"mode": mode, "preset": preset, "weight_rounding": weight_rounding,
             "calibration": {"method": method, "samples": len(calib), "held_out": len(held)},
             "activations": len(tensors), "base_weights": len(weights), "lora_weights": len(lora_slots),
             "updatable": len(live), "files": [f for f in files if f.startswith("encodings/")], "sqnr_db": sqnr,
             "argmax_agreement": agree}
    if chat is not None:
        say("greedy decoding of the held-out prompts quantized")
        from lora_runtime.llm import GREEDY_PROMPTS, prefix_agreement

        test = _greedy_runs(int8, chat, names)
        extra["greedy_agreement"] = {"prompts": len(GREEDY_PROMPTS), "tokens": GREEDY_TOKENS, "use_cases": {
            u: prefix_agreement(fp32_greedy[u], test[u], GREEDY_TOKENS) for u in names}}
    extra["execution"] = _execution({c.weight: c.x for c in linear}, weights, union)
    if sensitive_db is not None:
        extra["mixed_precision"] = {
            "threshold_db": sensitive_db, "16bit_activations": sum(b == 16 for b in precision.values()),
            "float16_activations": sum(b == "float16" for b in precision.values()),
            "tensors": {t: {"bits": b, "db_at_preset": round(db, 1)}
                        for t, (b, db) in sorted(chosen.items(), key=lambda kv: kv[1][1])}}
    if ort_sqnr is not None:
        extra["ort_quantize_static_sqnr_db"] = ort_sqnr
    return QuantResult(dataclasses.replace(manifest, extra={**manifest.extra, "encodings": extra}), files)


def _execution(linear_inputs: Mapping[str, str], weights: Mapping[str, Encoding], acts: Mapping[str, Encoding]
               ) -> str:
    """How the base linear layers of the QDQ graph run on ONNX Runtime, in words (see lora_runtime.quant.qdq)."""
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


def _chat(base_dir: Path):  # noqa: ANN202  (lora_runtime.llm.Chat, imported late: llm imports the compiler)
    """The tokenizer of an imported LLM (``import-model`` wrote it next to the base), or None."""
    from lora_runtime.errors import BaseModelError
    from lora_runtime.llm import Chat

    try:
        return Chat.load(base_dir)
    except BaseModelError:  # not an imported LLM, or no tokenizers package: no greedy-token report
        return None


def _greedy_runs(bundle: Bundle, chat, names: Sequence[str]) -> dict[str, list[list[int]]]:  # noqa: ANN001
    from lora_runtime.llm import greedy_runs

    return greedy_runs(bundle, chat, names, tokens=GREEDY_TOKENS)


def _sqnr(reference: Sequence[Mapping[str, np.ndarray]], test: Sequence[Mapping[str, np.ndarray]]) -> float:
    """SQNR of the first output (the logits) over all held-out samples together. An LLM's other outputs are
    its KV caches: their error is intermediate, it reaches the logits of the next step."""
    key = next(iter(reference[0]))
    return sqnr_db(np.concatenate([r[key].ravel() for r in reference]), np.concatenate([t[key].ravel() for t in test]))


def _argmax_agreement(reference: Sequence[Mapping[str, np.ndarray]], test: Sequence[Mapping[str, np.ndarray]]
                      ) -> float:
    """Share of positions whose argmax over the last axis agrees (first output: the logits)."""
    key = next(iter(reference[0]))
    same = [np.argmax(r[key], -1) == np.argmax(t[key], -1) for r, t in zip(reference, test)]
    return float(np.mean(np.concatenate([s.ravel() for s in same])))


def _ort_reference(bundle: Bundle, names: Sequence[str], calib: Sequence[dict[str, np.ndarray]],
                   held: Sequence[dict[str, np.ndarray]], fp32: Mapping[str, list], say: Callable[[str], None]
                   ) -> dict[str, float]:
    """ONNX Runtime's own ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, MatMul/Gemm)
    of each use-case merged into the base weights: the ideal fully-updatable reference."""
    import tempfile

    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from lora_runtime.compiler.export import merge_use_case

    class Reader(CalibrationDataReader):
        def __init__(self, samples: Sequence[dict[str, np.ndarray]]) -> None:
            self.it = iter(samples)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    out = {}
    with tempfile.TemporaryDirectory(prefix=".lora_runtime-ort-reference-", dir=bundle.path.parent) as tmp:
        for u in names:
            say(f"ONNX Runtime quantize_static reference: {u}")
            merged = merge_use_case(bundle, Path(tmp) / f"{u}.onnx", use_case=u)
            q = Path(tmp) / f"{u}.int8.onnx"
            user = [{k: v for k, v in s.items()} for s in calib]
            logging.disable(logging.WARNING)  # its "consider pre-processing" advice, on the root logger, per call
            ort.set_default_logger_severity(3)  # its calibration sessions log every initializer a fusion left unused
            try:
                quantize_static(str(merged), str(q), Reader(user), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=True)
            finally:
                logging.disable(logging.NOTSET)
                ort.set_default_logger_severity(2)  # ONNX Runtime's default
            so = ort.SessionOptions()
            so.log_severity_level = 3
            sess = ort.InferenceSession(str(q), so, providers=["CPUExecutionProvider"])
            names_out = [o.name for o in sess.get_outputs()]
            runs = [dict(zip(names_out, sess.run(names_out, s))) for s in held]
            out[u] = _sqnr(fp32[u], runs)
    return out


def _encodings(ranges: Mapping[str, TensorRange], tensors: Sequence[str], branch: Sequence[str],
               values: Mapping[str, Sequence[np.ndarray]], p: Preset, precision: Mapping[str, int | str]
               ) -> dict[str, Encoding]:
    return activation_encodings(ranges, tensors, branch, p, precision) | lora_weight_encodings(values, p)


def _lora_values(bundle: Bundle, slots: Sequence[str]) -> dict[str, list[np.ndarray]]:
    """Every value each LoRA slot takes: one per adapter patch (v1/v2) or the group (v3), as float32."""
    m = bundle.manifest
    patches = [m.group_patch] if m.group_patch else [a.patch for a in m.adapters if a.patch]
    out: dict[str, list[np.ndarray]] = {s: [] for s in slots}
    for rel in patches:
        tf = read_header(bundle.file(rel or ""))
        for s in slots:
            out[s].append(tf.read(s, float32=True))
    return out


def _active(bundle: Bundle, values: Mapping[str, list[np.ndarray]], use_case: str) -> dict[str, list[np.ndarray]]:
    """The LoRA values a use-case uses: its adapter's patch (v1/v2); the group with inactive adapters' rank
    columns zeroed (v3: they are multiplied by a zero strength anyway). The base model alone: everything."""
    m = bundle.manifest
    active = {a for a, s in m.use_case(use_case).strengths.items() if s}
    if not active:
        return dict(values)
    if m.generation != "v3":
        (adapter,) = active
        i = [a.name for a in m.adapters if a.patch].index(adapter)
        return {s: [v[i]] for s, v in values.items()}
    out = {}
    for point in m.points:
        keep = np.zeros(point.rank, bool)
        for c in point.columns:
            keep[c.start:c.stop] = c.adapter in active
        a, b = f"{point.module}.lora_A.weight", f"{point.module}.lora_B.weight"
        out[a] = [values[a][0] * keep[:, None]]
        out[b] = [values[b][0] * keep[None, :]]
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
        write("encodings/all.encodings", [union[t] for t in tensors],
              [*weights.values(), *(union[s] for s in lora_slots)])
    elif mode == "adapter-only":
        write("encodings/base.encodings", [union[t] for t in base_acts], list(weights.values()))
        for u, enc in per_use_case.items():
            write(f"encodings/use-cases/{u}.encodings", [enc[t] for t in branch], [enc[s] for s in lora_slots])
    else:
        for u, enc in per_use_case.items():
            write(f"encodings/use-cases/{u}.encodings", [enc[t] for t in tensors],
                  [*weights.values(), *(enc[s] for s in lora_slots)])
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
                scales[lora_scale_name(n)] = np.asarray(enc[n].scale, np.float32).reshape(-1, 1)
            else:
                s_name, z_name = scale_input_names(n)
                scale, zp, _ = to_qdq(enc[n])
                scales[s_name], zps[z_name] = scale, zp
        return scales | zps

    layout = values(union)
    slots = [Slot(k, tuple(v.shape), str(v.dtype), "encoding") for k, v in layout.items()]
    (root / "patches" / "encodings").mkdir(parents=True, exist_ok=True)
    save_tensors(root / UNION_ENCODINGS, layout)
    patches = {}
    for u, enc in per_use_case.items():
        rel = f"patches/encodings/{u}.safetensors"
        save_tensors(root / rel, values(enc))
        patches[u] = rel
    return slots, patches
