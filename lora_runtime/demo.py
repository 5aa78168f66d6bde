"""``lora-runtime demo``: the main job on the embedded default model, start to finish."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from lora_runtime.compiler.compile import compile_bundle
from lora_runtime.compiler.options import CompileOptions, QuantOptions
from lora_runtime.models.default import DefaultModel, build_default, recipe
from lora_runtime.progress import Progress
from lora_runtime.runtime.switcher import Runtime


def demo_use_cases(generation: str, adapters: list[str]) -> list[str]:
    """Base, each adapter alone (the second one at 0.8), and for v3 a weighted mix of all of them."""
    cases = ["base="] + [f"{a}={a}:{0.8 if i == 1 else 1.0}" for i, a in enumerate(adapters)]
    if generation == "v3":
        cases.append("mix=" + ",".join(f"{a}:{s}" for a, s in zip(adapters, (1.0, 0.5, 0.7))))
    return cases


def run_demo(size: str, out: Path) -> None:
    r = recipe(size)
    t0 = time.perf_counter()
    print(f"building the default model '{size}' ({r.n_layers} layers, d={r.d_model}) and "
          f"{len(r.adapters)} adapters in {out}", file=sys.stderr)
    model = build_default(r, out / f"model-{size}")
    feeds = model.inputs()
    names = [a.name for a in r.adapters]
    rows = []
    with Progress("demo", total=3) as bar:
        for gen in ("v1", "v2", "v3"):
            path = out / f"bundle-{size}-{gen}"
            bundle = compile_bundle(model.base, model.adapters, path, generation=gen,
                                    use_cases=demo_use_cases(gen, names), force=True)
            rt = Runtime.open(bundle.path)
            base = None
            for u in bundle.manifest.use_cases:
                report = rt.switch(u.name)
                t = time.perf_counter()
                logits = rt.run(feeds)["logits"]
                dt = time.perf_counter() - t
                if base is None:
                    base = logits
                rows.append((gen, u.name, ", ".join(f"{k}:{v:g}" for k, v in u.strengths.items()) or "-",
                             float(np.abs(logits - base).max()), report, dt * 1e3))
            bar.step(gen)
    print(f"\n{'gen':<4} {'use-case':<12} {'adapters:strength':<36} {'max|Δ| vs base':>14} "
          f"{'switch':>6} {'switch us':>10} {'run ms':>8}")
    for gen, name, mix, delta, report, ms in rows:
        print(f"{gen:<4} {name:<12} {mix:<36} {delta:>14.4f} {report.kind:>6} {report.seconds * 1e6:>10.0f} "
              f"{ms:>8.2f}")
    _switching_session(out / f"bundle-{size}-v2", out / f"bundle-{size}-v3", feeds)
    int8 = _int8(model, out / f"bundle-{size}-v3-int8", names) if size != "1b" else None
    bundles = [out / f"bundle-{size}-{g}" for g in ("v1", "v2", "v3")] + ([int8] if int8 else [])
    print(f"\nbundles: {', '.join(map(str, bundles))}")
    print(f"inspect one with: lora-runtime inspect {bundles[-1]}   ({time.perf_counter() - t0:.1f}s)")


def _int8(model: DefaultModel, path: Path, names: list[str]) -> Path:
    """v3 with fully updatable INT8 encodings, calibrated on seeded inputs: accuracy and a switching check."""
    calibration = path.parent / "calibration.npz"
    np.savez(calibration, **{k: np.stack([model.inputs(seed=100 + i)[k] for i in range(32)])
                             for k in model.inputs()})
    options = CompileOptions("v3", quant=QuantOptions("full", calibration))
    bundle = compile_bundle(model.base, model.adapters, path, options, use_cases=demo_use_cases("v3", names),
                            force=True)
    q, acc = bundle.manifest.quantization, bundle.manifest.accuracy_of("fp32")
    peer = bundle.manifest.accuracy_of("ort_quantize_static")
    ref = peer.sqnr_db if peer else {}
    rt = Runtime.open(bundle.path)
    kinds = {rt.switch(u).kind for u in rt.use_cases}
    print(f"\nINT8 v3, fully updatable encodings ({q.preset}; base layers run as integer kernels): SQNR vs "
          f"FP32 on {q.held_out} held-out inputs, ONNX Runtime's quantize_static of the "
          f"merged use-case in brackets; switches: {', '.join(sorted(kinds))}")
    for u, v in acc.sqnr_db.items():
        print(f"  {u:<12} {v:6.1f} dB" + (f"  ({ref[u]:.1f} dB)" if u in ref else ""))
    return path


def _switching_session(v2: Path, v3: Path, feeds: dict[str, np.ndarray], rounds: int = 3) -> None:
    """A serving loop: switch, run, switch... and the median latency of each kind of switch."""
    print("\nswitching session (switch + run in a loop, one runtime per bundle, no session rebuilt):")
    for path in (v2, v3):
        rt = Runtime.open(path)
        opened = time.perf_counter()
        Runtime.open(path)
        open_s = time.perf_counter() - opened
        lat: dict[str, list[float]] = {}
        for _ in range(rounds):
            for name in rt.use_cases:
                report = rt.switch(name)
                rt.run(feeds)
                lat.setdefault(report.kind, []).append(report.seconds)
        parts = [f"{kind} p50 {np.median(v) * 1e6:.0f} us ({len(v)} switches)" for kind, v in sorted(lat.items())]
        print(f"  {rt.manifest.generation}: {'; '.join(parts)}; Runtime.open {open_s * 1e3:.0f} ms")
