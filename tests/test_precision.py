"""16-bit LoRA slots: half the bytes, outputs equal to float32 math over the float16-rounded weights."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import FIXTURES
from reference import merged_outputs
from safetensors.numpy import load_file, save_file

from lora_runtime import AdapterError, Runtime, compile_bundle, run_use_case
from lora_runtime.cli import main
from lora_runtime.demo import demo_use_cases


def _rounded_adapters(adapters, tmp_path):
    """Copies of the adapters with A/B rounded to float16 and stored back as float32 (the independent twin)."""
    out = {}
    for name, path in adapters.items():
        out[name] = tmp_path / "rounded" / name
        shutil.copytree(path, out[name])
        t = load_file(str(path / "adapter_model.safetensors"))
        save_file({k: v.astype(np.float16).astype(np.float32) for k, v in t.items()},
                  str(out[name] / "adapter_model.safetensors"))
    return out


@pytest.mark.parametrize("generation", ["v1", "v2", "v3"])
def test_float16_slots(tiny, tmp_path, generation):
    cases = demo_use_cases(generation, list(tiny.adapters))
    f32 = compile_bundle(tiny.base, tiny.adapters, tmp_path / "f32", generation=generation, use_cases=cases)
    f16 = compile_bundle(tiny.base, tiny.adapters, tmp_path / "f16", generation=generation, use_cases=cases,
                         lora_dtype="float16")
    patches = lambda b: sum(f.nbytes for k, f in b.manifest.files.items() if k.startswith("patches/"))  # noqa: E731
    assert 0.45 < patches(f16) / patches(f32) < 0.55
    assert {s.dtype for s in f16.manifest.slots if s.kind in ("lora_A", "lora_B")} == {"float16"}

    rounded = _rounded_adapters(tiny.adapters, tmp_path)
    feeds = tiny.inputs(seed=8)
    rt = Runtime.open(f16.path)
    sqnr = f16.manifest.extra["accuracy"]["use_cases"]
    for u in f16.manifest.use_cases:
        want = merged_outputs(tiny.base, u.strengths, rounded, feeds)["logits"]
        np.testing.assert_allclose(run_use_case(f16, u.name, feeds)["logits"], want, atol=1e-4, rtol=0)
        rt.switch(u.name)
        np.testing.assert_allclose(rt.run(feeds)["logits"], want, atol=1e-4, rtol=0)
        exact = run_use_case(f32, u.name, feeds)["logits"]
        if u.strengths:
            assert 50.0 <= sqnr[u.name] < 200.0  # measured and recorded: some loss, and small
            noise = np.sum((exact - want) ** 2)
            assert noise > 0  # rounding did change something, so the check above is not vacuous
        else:
            assert sqnr[u.name] == float("inf")


@pytest.mark.parametrize("generation", ["v1", "v2", "v3"])
def test_float16_peft_adapter_is_exact_in_float16_slots(tmp_path, generation):
    root = FIXTURES / "llama"
    b = compile_bundle(root / "dynamo.onnx", {"h16": root / "adapters/h16"}, tmp_path / "b",
                       generation=generation, use_cases=["h16=h16"], lora_dtype="float16")
    with np.load(root / "inputs.npz") as z:
        feeds = {"input_ids": z["input_ids"]}
    got = run_use_case(b, "h16", feeds)["logits"]
    np.testing.assert_allclose(got, np.load(root / "expected.npz")["h16"], atol=1e-4, rtol=0)


def test_values_beyond_float16_are_refused(tiny, tmp_path):
    folder = tmp_path / "big"
    shutil.copytree(tiny.adapters["tone"], folder)
    t = load_file(str(folder / "adapter_model.safetensors"))
    key = sorted(k for k in t if "lora_B" in k)[0]
    t[key][0, 0] = 1e6
    save_file(t, str(folder / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="beyond float16"):
        compile_bundle(tiny.base, {"big": folder}, tmp_path / "b", generation="v2", lora_dtype="float16")
    assert not (tmp_path / "b").exists()
    compile_bundle(tiny.base, {"big": folder}, tmp_path / "b", generation="v2")  # float32 slots hold it


def test_cli_lora_dtype_and_inspect(tiny, tmp_path, capsys):
    args = ["compile", "--base", str(tiny.base), "--generation", "v3", "-o", str(tmp_path / "b"),
            "--lora-dtype", "float16"] + [a for n, p in tiny.adapters.items() for a in ("--adapter", f"{n}={p}")]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "b")]) == 0
    text = capsys.readouterr().out
    assert "LoRA slots float16" in text and " dB" in text
    assert main(["inspect", str(tmp_path / "b"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["manifest"]["extra"]["accuracy"]["use_cases"]) == {"summarize", "translate", "tone"}
