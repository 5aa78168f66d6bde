"""What a bundle holds, for people (``describe``) and machines (``summary``)."""

from __future__ import annotations

from typing import Any

from lora_runtime.bundle import Bundle, patched_slots


def summary(bundle: Bundle) -> dict[str, Any]:
    """The manifest plus derived numbers: slot bytes and each adapter's padding cost."""
    m = bundle.manifest
    patch_bytes = sum(s.nbytes for s in patched_slots(m))
    adapters = []
    for a in m.adapters:
        adapters.append({"name": a.name, "own_bytes": a.nbytes,
                         "patch_bytes": patch_bytes if m.generation != "v3" else None,
                         "padding_bytes": patch_bytes - a.nbytes if m.generation != "v3" else 0,
                         "points": sum(1 for p in m.points for c in p.columns if c.adapter == a.name)})
    return {"path": str(bundle.path), "generation": m.generation,
            "slot_bytes": sum(s.nbytes for s in m.slots), "patch_bytes": patch_bytes,
            "file_bytes": sum(f.nbytes for f in m.files.values()),
            "adapters": adapters, "manifest": m.to_json()}


def describe(bundle: Bundle) -> str:
    m = bundle.manifest
    s = summary(bundle)
    lines = [f"bundle {bundle.path}", f"  generation {m.generation}; base {m.base.name} (sha256 {m.base.sha256[:12]}…)",
             f"  {len(m.points)} attachment points, {len(m.slots)} slots, {s['slot_bytes'] / 1e6:.3f} MB of slots, "
             f"{s['file_bytes'] / 1e6:.3f} MB on disk", "", "  adapters"]
    for a, info in zip(m.adapters, s["adapters"]):
        cfg = a.config
        pad = (f"patch {info['patch_bytes'] / 1e6:.3f} MB, padding {info['padding_bytes'] / 1e6:.3f} MB "
               f"({100 * info['padding_bytes'] / max(info['patch_bytes'], 1):.0f}%)" if m.generation != "v3" else
               "in the group patch")
        lines.append(f"    {a.name:<16} r={cfg.get('r')} alpha={cfg.get('lora_alpha')} rslora={cfg.get('use_rslora')} "
                     f"{info['points']} points, {a.nbytes / 1e6:.3f} MB own; {pad}")
    q = m.extra.get("base_weights")
    if q:
        lines += ["", f"  base weights {q['dtype']} ({q['op']}): {q['weights']} linear weights, block size "
                  f"{'/'.join(map(str, q['block_size']))}, {q['data_bytes'] / 1e6:.2f} MB in the bundle; weight SQNR "
                  f"mean {q['weight_sqnr_db_mean']:.1f} dB, min {q['weight_sqnr_db_min']:.1f} dB; encodings: "
                  f"{q.get('encodings', '-')}"]
    enc = m.extra.get("encodings")
    if enc:
        lines += ["", *("  " + line for line in encodings_report(enc))]
    accuracy = m.extra.get("accuracy", {})
    sqnr = accuracy.get("use_cases", {})
    lora_dtype = next((sl.dtype for sl in m.slots if sl.kind == "lora_A"), "float32")
    lines += ["", f"  use-cases (LoRA slots {lora_dtype}, base weights {q['dtype'] if q else 'float32'}"
              + (f"; output SQNR vs {accuracy['reference']} on {accuracy['inputs']} inputs)" if sqnr else ")")]
    for u in m.use_cases:
        mix = ", ".join(f"{k}:{v:g}" for k, v in u.strengths.items()) or "(base model)"
        acc = f"  {sqnr[u.name]:.1f} dB" if u.name in sqnr else ""
        lines.append(f"    {u.name:<16} {mix:<40}{acc}")
    lines += ["", "  attachment points (module: op, in x out, slot rank, adapters[columns])"]
    for p in m.points:
        cols = " ".join(f"{c.adapter}[{c.start}:{c.stop}]" for c in p.columns)
        lines.append(f"    {p.module}: {p.op_type} {p.in_features}x{p.out_features} r={p.rank} {cols}")
    return "\n".join(lines)


def encodings_report(enc: dict) -> list[str]:
    """The INT8 part of a manifest (``extra.encodings``) in words: what was quantized how, and how accurate
    every use-case is against FP32 (used by ``inspect`` and by ``compile``'s output)."""
    ref = enc.get("ort_quantize_static_sqnr_db", {})
    agree = enc.get("argmax_agreement", {})
    greedy = enc.get("greedy_agreement")
    lines = [f"INT8: {enc['mode']} encodings, preset {enc['preset']}, {enc.get('weight_rounding', 'nearest')} "
             f"weight rounding; {enc['activations']} activations, {enc['base_weights']} base weights, "
             f"{enc['lora_weights']} LoRA weights, {enc['updatable']} updatable; files {', '.join(enc['files'])}",
             f"  vs FP32 on {enc['calibration']['held_out']} held-out samples: logit SQNR, argmax agreement"
             + (f", greedy tokens agreeing ({greedy['prompts']} prompts x {greedy['tokens']} tokens)" if greedy else "")
             + (" (ORT quantize_static of the merged use-case)" if ref else "")]
    for u, v in enc["sqnr_db"].items():
        lines.append(f"  {u:<16} {v:6.1f} dB" + (f", argmax {agree[u]:.1%}" if u in agree else "")
                     + (f", greedy {greedy['use_cases'][u]:.0%}" if greedy and u in greedy["use_cases"] else "")
                     + (f"   (ORT {ref[u]:.1f} dB, {v - ref[u]:+.1f})" if u in ref else ""))
    mp = enc.get("mixed_precision")
    if mp:
        lines.append(f"  mixed precision: {mp['16bit_activations']} activations at 16 bits, "
                     f"{mp.get('float16_activations', 0)} in float16 (per-token SQNR at the preset's bitwidth below "
                     f"{mp['threshold_db']} dB)")
    if enc.get("execution"):
        lines.append(f"  execution: {enc['execution']}")
    return lines
