"""Write tests/fixtures/aimet/: real aimet-onnx exports of bundles' float graphs (AIMET runs in its own venv).

    python3.11 -m venv /work/aimetvenv                              # outside the repo
    /work/aimetvenv/bin/pip install aimet-onnx==2.42.0                # pulls torch (CPU), onnx, onnxruntime
    /work/aimetvenv/bin/python tools/make_aimet_fixtures.py [--out tests/fixtures/aimet]

lora_runtime itself is imported from this checkout (it needs only numpy, onnx and onnxruntime, which aimet-onnx
brings). For each model the float graph is compiled here, as ``compile_bundle(..., generation="v3")`` makes it,
then given to AIMET's ``QuantizationSimModel`` (default config, min-max, int8/int8) and calibrated on seeded
samples, each run with one use-case's strength vector on ``lora_alpha``:

- ``<model>_w8a8.encodings.gz``: ``sim.export(...)`` in 1.0.0 (AIMET's default), every quantizer calibrated over
  all use-cases; ``<model>_w8a8_v2.encodings.gz``: the same sim exported in 2.0.0 (with its int32 biases and the
  outputs of data-movement ops).
- ``tiny_lora.encodings.gz`` and ``tiny_lora_<adapter>.encodings.gz``: aimet_onnx's LoRA workflow
  (``aimet_onnx.experimental.lora``): LoRA quantizers off, the base calibrated with every strength 0 and frozen,
  then per adapter the LoRA quantizers (int16 weights, int8 activations) calibrated with that adapter alone and
  captured (``get_lora_encodings``), written by ``export_for_deployment``.

The files are AIMET's bytes, gzip-compressed (mtime 0, so two runs give the same files); ``aimet.json`` records
the versions, the graphs (use-cases, sha256 of the float graph AIMET saw) and what was done. Tests rebuild the
same float graphs from the seeded default model and the gpt2 fixture: they do not need AIMET.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from lora_runtime import compile_bundle  # noqa: E402
from lora_runtime.models.default import build_default  # noqa: E402

TINY_USE_CASES = ["base=", "summarize=summarize", "translate=translate", "tone=tone"]
GPT2_USE_CASES = ["base=", "p=p", "q=q", "pq=p:1,q:0.6"]
SEED, SAMPLES, SEQ = 0, 4, 8


def float_graphs(work: Path) -> dict[str, tuple[Path, list[str]]]:
    """The float bundles AIMET is given: the seeded tiny default model, and the gpt2 fixture (dynamo export)."""
    tiny = build_default("tiny", work / "tiny")
    gpt2 = ROOT / "tests" / "fixtures" / "gpt2"
    return {
        "tiny": (compile_bundle(tiny.base, tiny.adapters, work / "tiny_v3", generation="v3",
                                use_cases=TINY_USE_CASES).path, TINY_USE_CASES),
        "gpt2": (compile_bundle(gpt2 / "dynamo.onnx", {a: gpt2 / "adapters" / a for a in ("p", "q")},
                                work / "gpt2_v3", generation="v3", use_cases=GPT2_USE_CASES).path, GPT2_USE_CASES),
    }


def feeds(bundle: Path, model: onnx.ModelProto) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per use-case, the seeded samples with that use-case's strength vector."""
    from lora_runtime.bundle import open_bundle

    m = open_bundle(bundle).manifest
    rng = np.random.default_rng(SEED)
    inputs = {i.name for i in model.graph.input}
    samples = [{"input_ids": rng.integers(0, 64, (1, SEQ), dtype=np.int64)} for _ in range(SAMPLES)]
    if "attention_mask" in inputs:
        samples = [s | {"attention_mask": np.ones((1, SEQ), np.int64)} for s in samples]
    return {u.name: [s | {"lora_alpha": np.asarray(m.strength_value(u.strengths), np.float32)} for s in samples]
            for u in m.use_cases}


def w8a8(model: onnx.ModelProto, per_use_case: dict, out: Path, name: str, notes: dict) -> None:
    from aimet_onnx.quantsim import QuantizationSimModel

    sim = QuantizationSimModel(model, param_type="int8", activation_type="int8", quant_scheme="min_max")
    sim.compute_encodings([f for fs in per_use_case.values() for f in fs])
    with tempfile.TemporaryDirectory() as tmp:
        sim.export(tmp, name, export_model=False)
        sim.export(tmp, f"{name}_v2", export_model=False, encoding_version="2.0.0")
        for stem, version in ((name, "1.0.0"), (f"{name}_v2", "2.0.0")):
            notes[_pack(Path(tmp) / f"{stem}.encodings", out)] = {
                "encoding_version": version, "how": "QuantizationSimModel(default config, min_max, int8/int8), "
                "compute_encodings over every use-case's samples, export(export_model=False"
                + (", encoding_version='2.0.0')" if version == "2.0.0" else ")")}


def lora_workflow(model: onnx.ModelProto, bundle: Path, per_use_case: dict, out: Path, notes: dict) -> None:
    from aimet_onnx.experimental import lora
    from aimet_onnx.experimental.lora.prepare_lora import _trace_lora_activations
    from aimet_onnx.quantsim import QuantizationSimModel

    from lora_runtime.bundle import open_bundle

    m = open_bundle(bundle).manifest
    params = sorted(s.name for s in m.slots if s.kind in ("lora_A", "lora_B"))
    lora_names = {"params": params, "activations": _trace_lora_activations(model, params), "scales": {}}
    sim = QuantizationSimModel(model, param_type="int8", activation_type="int8", quant_scheme="min_max")
    lora.disable_lora_quantizers(sim, lora_names)
    sim.compute_encodings(per_use_case["base"])  # every strength 0: the base alone
    lora.freeze_base_model(sim, lora_names)
    lora.enable_lora_calibration(sim, lora_names, param_type="int16", activation_type="int8")
    adapters = {}
    for a in m.adapters:
        lora.unfreeze_lora_quantizers(sim, lora_names)
        sim.compute_encodings(per_use_case[a.name])  # the use-case named after the adapter: it alone at 1
        adapters[a.name] = lora.get_lora_encodings(sim, lora_names)
    with tempfile.TemporaryDirectory() as tmp:
        lora.export_for_deployment(sim, lora_names, adapters, tmp, "tiny_lora")
        how = ("aimet_onnx.experimental.lora: disable_lora_quantizers, compute_encodings with every strength 0, "
               "freeze_base_model, enable_lora_calibration(int16 params, int8 activations), per adapter "
               "unfreeze_lora_quantizers + compute_encodings with it alone + get_lora_encodings; "
               "export_for_deployment(prefix 'tiny_lora')")
        notes[_pack(Path(tmp) / "tiny_lora.encodings", out)] = {"encoding_version": "1.0.0", "how": how}
        for a in adapters:
            notes[_pack(Path(tmp) / f"tiny_lora_{a}.encodings", out)] = {
                "encoding_version": "per-adapter (1.0.0 entries)", "adapter": a, "how": how,
                "lora_names": {"params": len(params), "activations": len(lora_names["activations"])}}


def _pack(path: Path, out: Path) -> str:
    target = out / f"{path.name}.gz"
    with open(target, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write(path.read_bytes())
    return target.name


def main() -> None:
    import aimet_onnx
    import onnxruntime
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "aimet")
    args = ap.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    notes: dict[str, dict] = {}
    graphs = {}
    with tempfile.TemporaryDirectory() as work:
        for name, (bundle, use_cases) in float_graphs(Path(work)).items():
            path = bundle / "model.onnx"
            model = onnx.load(str(path))  # the LoRA slots' default values come from the group patch
            per_use_case = feeds(bundle, model)
            graphs[name] = {"generation": "v3", "use_cases": use_cases,
                            "float_graph_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
            w8a8(model, per_use_case, args.out, f"{name}_w8a8", notes)
            if name == "tiny":
                lora_workflow(onnx.load(str(path)), bundle, per_use_case, args.out, notes)
    for f, n in notes.items():
        n["model"] = f.split("_")[0]
    meta = {"versions": {"aimet-onnx": aimet_onnx.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "torch": torch.__version__,
                         "python": sys.version.split()[0]},
            "graphs": graphs | {"tiny": graphs["tiny"] | {"model": "build_default('tiny')"},
                                "gpt2": graphs["gpt2"] | {"model": "tests/fixtures/gpt2/dynamo.onnx, adapters p, q"}},
            "calibration": {"seed": SEED, "samples_per_use_case": SAMPLES, "seq": SEQ,
                            "input_ids": "numpy default_rng(seed).integers(0, 64, (1, seq)) per sample"},
            "files": notes}
    (args.out / "aimet.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    total = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {len(notes)} exports to {args.out} ({total / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
