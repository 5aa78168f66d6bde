"""What a bundle holds, for people (``describe``) and machines (``summary``): ``lora-runtime inspect``."""

from __future__ import annotations

from typing import Any

from lora_runtime.bundle import Bundle
from lora_runtime.manifest import Accuracy, Manifest, Quantization


def summary(bundle: Bundle) -> dict[str, Any]:
    """The manifest plus derived numbers: slot bytes and each adapter's padding cost."""
    m = bundle.manifest
    patch_bytes = sum(s.nbytes for s in m.patched_slots)
    adapters = []
    for a in m.adapters:
        adapters.append({"name": a.name, "own_bytes": a.nbytes,
                         "patch_bytes": patch_bytes if m.generation != "v3" else None,
                         "padding_bytes": patch_bytes - a.nbytes if m.generation != "v3" else 0,
                         "points": sum(1 for p in m.points for c in p.columns if c.adapter == a.name),
                         "saved_modules": list(a.saved)})
    return {"path": str(bundle.path), "generation": m.generation,
            "slot_bytes": sum(s.nbytes for s in m.slots), "patch_bytes": patch_bytes,
            "saved_bytes": sum(s.nbytes for s in m.saved_slots), "saved_by_use_case": saved_by_use_case(m),
            "file_bytes": sum(f.nbytes for f in m.files.values()),
            "adapters": adapters, "manifest": m.to_json()}


def saved_by_use_case(m: Manifest) -> dict[str, dict[str, str]]:
    """Per use-case, where each saved module (``modules_to_save``) comes from: an adapter's name, or "base"."""
    return {u.name: {s.module: src or "base" for s, src in zip(m.saved_modules, m.saved_sources(u.strengths))}
            for u in m.use_cases} if m.saved_modules else {}


def base_dtype(m: Manifest) -> str:
    """The base weights as the bundle holds them (float32, float16 or both, the base's own)."""
    kept = f" with GGUF blocks kept ({m.base.blocks})" if m.base.blocks else ""
    if m.weight_only is not None:
        wide = m.weight_only.int8_modules
        return (m.weight_only.dtype + (f" ({', '.join(wide)}: int8)" if wide else "")
                + ("" if m.base.dtype == "float32" else f" ({m.base.dtype} activations)")
                + (f" (its float layers){kept}" if kept else ""))
    if m.quantization is not None:
        return f"int{m.quantization.preset[1]} QDQ ({m.quantization.preset})"
    return m.base.dtype + kept


def _inputs(what: str) -> str:
    """``Accuracy.inputs`` as a phrase: "given"/"synthesized" (one set of inputs) or a count of samples."""
    return f"{what} inputs" if what in ("given", "synthesized") else what


def weight_only_report(m: Manifest) -> list[str]:
    """What ``compile --base-weights`` prints: the quantized base and its accuracy against the float32 bundle."""
    q, acc = m.weight_only, m.accuracy_of("float32_bundle")
    if q is None:
        return []
    blocks = "/".join(map(str, q.block_sizes))
    lines = [f"base weights {base_dtype(m)}, block size {blocks}, {q.data_bytes / 1e6:.1f} MB"]
    if acc is not None:
        lines.append(f"  vs the float32 bundle on {_inputs(acc.inputs)}: output SQNR"
                     + (", argmax agreement" if acc.argmax_agreement else "")
                     + (f", greedy tokens agreeing ({acc.greedy})" if acc.greedy else ""))
        lines += [f"    {u:<16} {v:5.1f} dB"
                  + (f", argmax {acc.argmax_agreement[u]:.1%}" if u in acc.argmax_agreement else "")
                  + (f", greedy {acc.greedy_agreement[u]:.0%}" if u in acc.greedy_agreement else "")
                  for u, v in acc.sqnr_db.items()]
    return lines


def describe(bundle: Bundle) -> str:
    m = bundle.manifest
    s = summary(bundle)
    lines = [f"bundle {bundle.path}",
             f"  generation {m.generation}; base {m.base.name} ({m.base.dtype}, sha256 {m.base.sha256[:12]}…)",
             f"  {len(m.points)} attachment points, {len(m.slots)} slots, {s['slot_bytes'] / 1e6:.3f} MB of slots, "
             f"{s['file_bytes'] / 1e6:.3f} MB on disk", *([
                 "  base path: with every strength 0 the graph skips its LoRA branches (compile --no-base-path: flat)"]
                 if m.target.base_path else []), "", "  adapters"]
    for a, info in zip(m.adapters, s["adapters"]):
        cfg = a.config
        pad = (f"patch {info['patch_bytes'] / 1e6:.3f} MB, padding {info['padding_bytes'] / 1e6:.3f} MB "
               f"({100 * info['padding_bytes'] / max(info['patch_bytes'], 1):.0f}%)" if m.generation != "v3" else
               "in the group patch")
        lines.append(f"    {a.name:<16} r={cfg.get('r')} alpha={cfg.get('lora_alpha')} rslora={cfg.get('use_rslora')} "
                     f"{info['points']} points, {a.nbytes / 1e6:.3f} MB own; {pad}"
                     + (f"; saves {', '.join(a.saved)}" if a.saved else ""))
    q = m.weight_only
    if q:
        wide = f" ({q.int8_weights} of them int8: {', '.join(q.int8_modules)})" if q.int8_modules else ""
        wide += f", embedding {', '.join(q.embeddings)} int8" if q.embeddings else ""
        lines += ["", f"  base weights {q.dtype} ({q.op}): {q.weights} linear weights{wide}, block size "
                  f"{'/'.join(map(str, q.block_sizes))}, {q.data_bytes / 1e6:.2f} MB in the bundle; weight SQNR "
                  f"mean {q.weight_sqnr_db_mean:.1f} dB, min {q.weight_sqnr_db_min:.1f} dB; encodings: "
                  f"{q.encodings or q.encodings_note}"]
    if m.quantization:
        lines += ["", *("  " + line for line in encodings_report(m))]
    if m.target.name != "cpu":
        lines += ["", *("  " + line for line in target_report(m, every_op=True))]
    twin = m.accuracy_of("float32_bundle")
    lora_dtype = next((sl.dtype for sl in m.slots if sl.kind == "lora_A"), "float32")
    lines += ["", f"  use-cases (LoRA slots {lora_dtype}, base weights {base_dtype(m)}"
              + (f"; output SQNR vs {twin.reference} on {_inputs(twin.inputs)})" if twin else ")")]
    saved = saved_by_use_case(m)
    for u in m.use_cases:
        mix = ", ".join(f"{k}:{v:g}" for k, v in u.strengths.items()) or "(base model)"
        acc = f"  {twin.sqnr_db[u.name]:.1f} dB" if twin and u.name in twin.sqnr_db else ""
        heads = "  saved: " + ", ".join(f"{k}<-{v}" for k, v in saved[u.name].items()) if saved else ""
        lines.append(f"    {u.name:<16} {mix:<40}{acc}{heads}")
    lines += ["", "  attachment points (module: op, in x out, slot rank, adapters[columns])"]
    for p in m.points:
        cols = " ".join(f"{c.adapter}[{c.start}:{c.stop}]" for c in p.columns)
        inside = f" (rows {p.rows[0]}:{p.rows[1]} of {p.packed}'s branch)" if p.packed and p.rows else ""
        lines.append(f"    {p.module}: {p.op_type} {p.in_features}x{p.out_features} r={p.rank} {cols}{inside}")
    if m.saved_modules:
        lines += ["", f"  saved modules (modules_to_save: swapped whole per use-case; {s['saved_bytes'] / 1e6:.3f} MB "
                  "of slots per set)"]
        lines += [f"    {x.module}: {x.op_type} {x.in_features}x{x.out_features}{' + bias' if x.bias_slot else ''}, "
                  f"saved by {', '.join(x.adapters)}" for x in m.saved_modules]
    return "\n".join(lines)


def encodings_report(m: Manifest) -> list[str]:
    """The INT8 part of a manifest in words: what was quantized how, and how accurate every use-case is
    against FP32 (used by ``inspect`` and by ``compile``'s output)."""
    q: Quantization | None = m.quantization
    acc: Accuracy | None = m.accuracy_of("fp32")
    if q is None or acc is None:
        return []
    ref = m.accuracy_of("ort_quantize_static")
    lines = [f"INT8: {q.mode} encodings, preset {q.preset}, {q.weight_rounding} weight rounding; {q.activations} "
             f"activations, {q.base_weights} base weights, {q.lora_weights} LoRA weights, {q.updatable} updatable; "
             f"files {', '.join(q.files)}",
             f"  vs FP32 on {q.held_out} held-out samples: logit SQNR, argmax agreement"
             + (f", greedy tokens agreeing ({acc.greedy})" if acc.greedy else "")
             + (" (ORT quantize_static of the merged use-case)" if ref else "")]
    for u, v in acc.sqnr_db.items():
        lines.append(f"  {u:<16} {v:6.1f} dB"
                     + (f", argmax {acc.argmax_agreement[u]:.1%}" if u in acc.argmax_agreement else "")
                     + (f", greedy {acc.greedy_agreement[u]:.0%}" if u in acc.greedy_agreement else "")
                     + (f"   (ORT {ref.sqnr_db[u]:.1f} dB, {v - ref.sqnr_db[u]:+.1f})" if ref and u in ref.sqnr_db
                        else ""))
    mp = q.mixed_precision
    if mp:
        lines.append(f"  mixed precision: {mp.wide16} activations at 16 bits, {mp.float16} in float16 (per-token "
                     f"SQNR at the preset's bitwidth below {mp.threshold_db} dB)")
    if q.execution:
        lines.append(f"  execution: {q.execution}")
    return lines


def target_report(m: Manifest, every_op: bool = False) -> list[str]:
    """Where the bundle runs (``--target htp``): static shapes, placement and QNN kernels the compiler saw,
    and how the HTP's outputs compare with the CPU's and the FP32 graph's. ``every_op``: every QNN op type
    with its dtypes and count, not only the linear kernels."""
    t = m.target
    shapes = ", ".join(f"{k}={v}" for k, v in t.static_shapes.items()) or "none"
    lines = [f"target {t.name.upper()} (QNN soc_model {t.soc_model}{f', htp_arch {t.htp_arch}' if t.htp_arch else ''});"
             f" static shapes {shapes}; " + (f"ahead-of-time context {t.context}" if t.context else "compiled on open"),
             f"  placement: {t.placement or 'not checked'}"]
    if t.strength_range:
        lo, hi = t.strength_range
        lines.append(f"  strengths: the lora_alpha encoding covers [{lo:.4g}, {hi:.4g}]")
    if t.qnn_ops:
        kernels = [f"{n} {op}" for op, n in t.qnn_ops.items() if op.startswith(("FullyConnected", "MatMul"))]
        floats = sum(n for op, n in t.qnn_ops.items() if "float" in op.split("->")[-1] and "Dequantize" not in op)
        lines.append(f"  QNN kernels: {'; '.join(kernels)}; {floats} ops with float outputs")
        if every_op:
            lines += ["  QNN ops (inputs -> output dtypes):", *(f"    {n:5d} {op}" for op, n in t.qnn_ops.items())]
    cpu, fp32 = m.accuracy_of("htp_vs_cpu"), m.accuracy_of("htp_vs_fp32")
    if cpu:
        lines.append(f"  HTP vs {cpu.reference} on {cpu.inputs}" + (" | vs FP32" if fp32 else "") + " (logit SQNR):")
        for u, v in cpu.sqnr_db.items():
            lines.append(f"    {u:<16} {v:6.1f} dB" + (f" | {fp32.sqnr_db[u]:6.1f} dB" if fp32 else ""))
    d = t.decode
    if d is not None:
        shapes = ", ".join(f"{k}={v}" for k, v in d.static_shapes.items())
        lines += [f"decode graph {d.graph}: static shapes {shapes}; "
                  + (f"ahead-of-time context {d.context}" if d.context else "compiled on open"),
                  f"  placement: {d.placement or 'not checked'}"]
        dec = m.accuracy_of("htp_vs_cpu_decode")
        if dec:
            lines.append(f"  HTP vs {dec.reference} on {dec.inputs} (logit SQNR, argmax agreement):")
            lines += [f"    {u:<16} {v:6.1f} dB, {dec.argmax_agreement.get(u, float('nan')):.0%}"
                      for u, v in dec.sqnr_db.items()]
    return lines
