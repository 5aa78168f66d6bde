"""Generate the float16 base fixtures under ``tests/fixtures/llama_fp16/``.

Reproduce (the fixture venv of ``tools/make_fixtures.py``; run from the repository root):

    /work/fxvenv/bin/python tools/make_fp16_fixtures.py [--out tests/fixtures/llama_fp16]

The model is the llama fixture's tiny random Llama (``make_fixtures.build_llama(1000)``, the same inputs),
converted with ``model.half()`` and exported by both exporters. The adapters are the llama fixture's own
(``tests/fixtures/llama/adapters``), loaded onto the half model with PEFT's defaults: ``autocast_adapter_dtype``
keeps their weights in float32, so PEFT computes each branch in float32 on the float16 input cast up, adds it
to the float16 base output (the sum in float32) and casts the result back to float16. Writes:

    dynamo.onnx        torch.onnx.export(model.half(), dynamo=True), float16 weights inside the file
    torchscript.onnx   the TorchScript exporter (dynamo=False); it keeps each o_proj MatMul in float32
    expected.npz       <use-case>: PEFT's logits on the half model (float16 values, stored as float32);
                       float32/base: the float32 model's logits; ort/<file>: ONNX Runtime's logits of each
                       float16 export (the base alone)
    cases.json         use-cases (the llama fixture's), the measured float16 noise of the base alone per
                       export (max |ONNX Runtime - torch|, both float16), the tolerance the tests use, versions

The script fails (non-zero exit) if the inputs or the float32 model differ from the llama fixture's, if an
export does not run or drifts from torch by more than 4e-3, or if PEFT's LoRA weights are not float32.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))

import make_fixtures as mf  # noqa: E402  (the llama fixture's model, inputs, exporters and PEFT helpers)

LLAMA = ROOT / "tests" / "fixtures" / "llama"
SEED = 1000  # make_fixtures: build_llama(seed=1000), inputs make_inputs(seed + 100)
CASES = ("base", "a", "b", "c_half", "h16", "ab", "abc")  # the llama fixture's use-cases (bf16: an adapter dtype
# already covered by the llama fixture; the point here is the base's dtype)
NOISE_FACTOR = 4.0  # tests: tolerance = NOISE_FACTOR x the largest float16 noise of the base alone
MAX_NOISE = 4e-3  # an export further than this from torch's float16 logits is a broken export, not noise


def export_all(half: torch.nn.Module, inputs: dict[str, torch.Tensor], out: Path) -> None:
    mf.log("exporting torchscript.onnx")
    mf.export_torchscript(half, inputs, out / "torchscript.onnx")
    mf.log("exporting dynamo.onnx")
    mf.export_dynamo(half, inputs, out / "dynamo.onnx", with_mask=False)


def ort_logits(path: Path, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = s.run(["logits"], {i.name: inputs[i.name].numpy() for i in s.get_inputs()})[0]
    if out.dtype != np.float16:
        mf.fail(f"{path}: logits are {out.dtype}, expected float16")
    return out.astype(np.float32)


def peft_half(half: torch.nn.Module, names: list[str]):
    """The adapters on the half model, loaded as a user would (PEFT's defaults), LoRA weights left as PEFT made
    them: float32 (autocast_adapter_dtype)."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(half), str(LLAMA / "adapters" / names[0]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(LLAMA / "adapters" / n), adapter_name=n)
    pm.eval()
    lora = {p.dtype for n, p in pm.named_parameters() if ".lora_" in n}
    if lora != {torch.float32}:
        mf.fail(f"PEFT's LoRA weights on the half model are {lora}, expected float32 (autocast_adapter_dtype)")
    return pm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "llama_fp16"))
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # bit-for-bit reproducible CPU reductions
    warnings.filterwarnings("ignore")

    model = mf.build_llama(seed=SEED)
    inputs = mf.make_inputs(SEED + 100)
    shipped = np.load(LLAMA / "inputs.npz")
    if any(not np.array_equal(shipped[k], v.numpy()) for k, v in inputs.items()):
        mf.fail("the inputs differ from tests/fixtures/llama/inputs.npz")
    f32 = mf.run_torch(model, inputs)
    f32_err = float(np.abs(f32 - np.load(LLAMA / "expected.npz")["base"]).max())
    if f32_err > 1e-5:
        mf.fail(f"the float32 model differs from the llama fixture's by {f32_err}")
    use_cases = {c: json.loads((LLAMA / "cases.json").read_text())["use_cases"][c] for c in CASES}

    half = copy.deepcopy(model).half().eval()
    half_base = mf.run_torch(half, inputs)
    export_all(half, inputs, out)
    expected: dict[str, np.ndarray] = {"float32/base": f32}
    noise = {}
    for name in ("dynamo.onnx", "torchscript.onnx"):
        got = ort_logits(out / name, inputs)
        noise[name] = float(np.abs(got - half_base).max())
        mf.log(f"  {name}: float16 base, max |ONNX Runtime - torch| = {noise[name]:.3e}")
        if noise[name] > MAX_NOISE:
            mf.fail(f"{name}: ONNX Runtime's float16 logits differ from torch's by {noise[name]}")
        expected[f"ort/{name}"] = got

    pm = peft_half(half, sorted({a for case in use_cases.values() for a in case}))
    checks = {}
    for case, strengths in use_cases.items():
        got = mf.peft_logits(pm, strengths, inputs)
        if not strengths:
            if not np.array_equal(got, half_base):
                mf.fail("PEFT's base (adapters disabled) differs from the half model")
        expected[case] = got
        checks[case] = {"max_abs_vs_float32_peft": float(np.abs(got - np.load(LLAMA / "expected.npz")[case]).max()),
                        "relative_logit_change": round(mf.rel_change(got, half_base), 4)}
        mf.log(f"  case {case:7s} {json.dumps(strengths):32s} |half - float32 PEFT| max "
               f"{checks[case]['max_abs_vs_float32_peft']:.2e}")
    np.savez(out / "expected.npz", **expected)

    worst = max(noise.values())
    cases = {
        "output": "logits",
        "use_cases": use_cases,
        "float16_noise": noise,
        "noise_factor": NOISE_FACTOR,
        "tolerance": NOISE_FACTOR * worst,
        "checks": checks,
        "versions": mf.versions(),
        "notes": (
            "The llama fixture's model (tools/make_fixtures.build_llama(1000), its inputs.npz) after model.half(), "
            "exported by both exporters. expected.npz <use-case>: real PEFT on the half model, the llama fixture's "
            "adapters loaded with PeftModel.from_pretrained/load_adapter defaults (autocast_adapter_dtype=True: "
            "LoRA weights float32, each branch computed in float32 on x cast up, added to the float16 base output "
            "in float32, the sum cast back to float16); strengths scale LoraLayer.scaling as in the llama fixture. "
            "float16_noise: max |ONNX Runtime - torch| of the float16 base logits per export (different kernels "
            "rounding in float16); tolerance = noise_factor x the larger one. torchscript.onnx keeps both o_proj "
            "MatMuls in float32 (float32 weights after the float32 softmax): a float16 graph with float32 islands."),
    }
    (out / "cases.json").write_text(json.dumps(cases, indent=2) + "\n")
    mf.log(f"wrote {out}: tolerance {cases['tolerance']:.3e} ({NOISE_FACTOR:g} x {worst:.3e})")


if __name__ == "__main__":
    main()
