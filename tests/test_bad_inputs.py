"""The catalogue of bad inputs: each gets a specific exception naming the culprit, and changes nothing.

Compile cases prove that no bundle (and no temporary directory) is left behind; bundle and run-time
cases prove that the resident use-case still gives its exact output afterwards.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lora_runtime import (
    AdapterError,
    AttachmentError,
    BaseModelError,
    BundleError,
    InputError,
    LoraRuntimeError,
    Runtime,
    TensorFileError,
    UseCaseError,
    compile_bundle,
    load_adapter,
    open_bundle,
)
from lora_runtime.compiler.options import CompileOptions, QuantOptions
from lora_runtime.manifest import digest as _digest

ST, CFG = "adapter_model.safetensors", "adapter_config.json"


@dataclass
class Ctx:
    """A private copy of the tiny default model and adapters that a case may break."""

    base: Path
    adapters: dict[str, Path]
    use_cases: list[str] = field(default_factory=lambda: ["s=summarize", "t=translate:0.5", "base="])
    generation: str = "v3"

    def tensors(self, adapter: str) -> dict[str, np.ndarray]:
        return load_file(str(self.adapters[adapter] / ST))

    def save(self, adapter: str, tensors: dict[str, np.ndarray]) -> None:
        save_file(tensors, str(self.adapters[adapter] / ST))

    def config(self, adapter: str, **changes: object) -> None:
        path = self.adapters[adapter] / CFG
        path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _first(tensors: dict[str, np.ndarray], kind: str = "lora_A") -> str:
    return next(k for k in sorted(tensors) if kind in k)


def _edit(fn: Callable[[dict[str, np.ndarray]], None], adapter: str = "summarize") -> Callable[[Ctx], None]:
    def run(ctx: Ctx) -> None:
        t = ctx.tensors(adapter)
        fn(t)
        ctx.save(adapter, t)
    return run


def _truncate(ctx: Ctx) -> None:
    p = ctx.adapters["summarize"] / ST
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _header_lies(ctx: Ctx) -> None:
    p = ctx.adapters["summarize"] / ST
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    key = _first(header)
    header[key]["data_offsets"][1] += 4  # claims more bytes than its shape needs
    blob = json.dumps(header).encode()
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def _huge_header(ctx: Ctx) -> None:
    p = ctx.adapters["summarize"] / ST
    p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")


def _pickle_only(ctx: Ctx) -> None:
    (ctx.adapters["summarize"] / ST).unlink()
    (ctx.adapters["summarize"] / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n")  # never unpickled


def _wrong_in_features(t: dict[str, np.ndarray]) -> None:
    for k in [k for k in t if "lora_A" in k]:
        t[k] = np.zeros((t[k].shape[0], t[k].shape[1] + 1), np.float32)


def _rank_mismatch(t: dict[str, np.ndarray]) -> None:
    k = _first(t, "lora_B")
    t[k] = t[k][:, :-1].copy()


def _rank_vs_config(t: dict[str, np.ndarray]) -> None:
    a = _first(t)
    b = a.replace("lora_A", "lora_B")
    t[a], t[b] = t[a][:-1].copy(), t[b][:, :-1].copy()


def _nan(t: dict[str, np.ndarray]) -> None:
    t[_first(t)][0, 0] = np.nan


def _inf(t: dict[str, np.ndarray]) -> None:
    t[_first(t, "lora_B")][0, 0] = np.inf


def _integer(t: dict[str, np.ndarray]) -> None:
    k = _first(t)
    t[k] = t[k].astype(np.int32)


def _rename_module(new: str) -> Callable[[dict[str, np.ndarray]], None]:
    def fn(t: dict[str, np.ndarray]) -> None:
        for k in list(t):
            if ".layers.0.self_attn.q_proj." in k:
                t[k.replace("model.layers.0.self_attn.q_proj", new)] = t.pop(k)
    return fn


def _modules_to_save(t: dict[str, np.ndarray]) -> None:
    t["base_model.model.lm_head.weight"] = np.zeros((4, 4), np.float32)


def _embedding(t: dict[str, np.ndarray]) -> None:
    t["base_model.model.model.embed_tokens.lora_embedding_A"] = np.zeros((8, 256), np.float32)


def _dora(t: dict[str, np.ndarray]) -> None:
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = np.ones(64, np.float32)


def _base_truncated(ctx: Ctx) -> None:
    ctx.base.write_bytes(ctx.base.read_bytes()[:200])


def _base_external_missing(ctx: Ctx) -> None:
    import onnx

    model = onnx.load(str(ctx.base))
    onnx.save(model, str(ctx.base), save_as_external_data=True, location="w.data", size_threshold=0)
    (ctx.base.parent / "w.data").unlink()


# (id, how to break the inputs, exception, text the message must contain)
COMPILE_CASES: list[tuple[str, Callable[[Ctx], None], type[LoraRuntimeError], str]] = [
    ("truncated-safetensors", _truncate, AdapterError, "adapter_model.safetensors"),
    ("safetensors-header-lies-about-size", _header_lies, AdapterError, "header says"),
    ("safetensors-header-too-large", _huge_header, AdapterError, "header claims"),
    ("missing-adapter-config", lambda c: (c.adapters["summarize"] / CFG).unlink(), AdapterError, "missing"),
    ("invalid-adapter-config", lambda c: (c.adapters["summarize"] / CFG).write_text("{r: 8"), AdapterError,
     "not valid JSON"),
    ("pickle-only-adapter", _pickle_only, AdapterError, "pickle files are never loaded"),
    ("dora-config", lambda c: c.config("summarize", use_dora=True), AdapterError, "DoRA"),
    ("dora-magnitude-tensor", _edit(_dora), AdapterError, "DoRA"),
    ("other-peft-type", lambda c: c.config("summarize", peft_type="LOHA"), AdapterError, "only LoRA"),
    ("modules-to-save-weights", _edit(_modules_to_save), AdapterError, "not a LoRA A/B weight"),
    ("embedding-lora", _edit(_embedding), AdapterError, "embedding LoRA"),
    ("shape-does-not-fit-op", _edit(_wrong_in_features), AttachmentError, "do not fit"),
    ("a-b-rank-mismatch", _edit(_rank_mismatch), AdapterError, "disagree on the rank"),
    ("config-r-vs-tensor-rank", _edit(_rank_vs_config), AdapterError, "but the config gives"),
    ("nan-weights", _edit(_nan), AdapterError, "NaN or infinite"),
    ("inf-weights", _edit(_inf), AdapterError, "NaN or infinite"),
    ("integer-weights", _edit(_integer), AdapterError, "dtype I32"),
    ("target-matches-nothing", _edit(_rename_module("model.layers.7.self_attn.q_proj")), AttachmentError,
     "matches no MatMul/Gemm"),
    ("target-matches-twice", _edit(_rename_module("self_attn.q_proj")), AttachmentError, "matches 2 ops"),
    ("unknown-adapter-in-use-case", lambda c: c.use_cases.append("x=nope"), UseCaseError, "unknown adapter"),
    ("nan-strength", lambda c: c.use_cases.append("x=summarize:nan"), UseCaseError, "not finite"),
    ("duplicate-use-case", lambda c: c.use_cases.append("s=tone"), UseCaseError, "given twice"),
    ("use-case-name-with-dotdot", lambda c: c.use_cases.append("..=tone"), UseCaseError, "invalid use-case name"),
    ("use-case-name-with-separator", lambda c: c.use_cases.append("a/b=tone"), UseCaseError,
     "invalid use-case name"),
    ("adapter-name-with-separator", lambda c: c.adapters.__setitem__("x/y", c.adapters["tone"]), AdapterError,
     "invalid adapter name"),
    ("multi-adapter-use-case-in-v2", lambda c: (c.use_cases.append("m=summarize,tone"),
                                                setattr(c, "generation", "v2")), UseCaseError, "v3"),
    ("unknown-generation", lambda c: setattr(c, "generation", "v4"), UseCaseError, "generation"),
    ("missing-base-model", lambda c: c.base.unlink(), BaseModelError, "base model not found"),
    ("truncated-base-model", _base_truncated, BaseModelError, "base.onnx"),
    ("base-external-data-missing", _base_external_missing, BaseModelError, "w.data"),
]


@pytest.fixture
def ctx(tiny, tmp_path) -> Ctx:
    base = tmp_path / "in" / "base.onnx"
    base.parent.mkdir()
    shutil.copy(tiny.base, base)
    adapters = {}
    for name, path in tiny.adapters.items():
        adapters[name] = tmp_path / "in" / name
        shutil.copytree(path, adapters[name])
    return Ctx(base, adapters)


@pytest.mark.parametrize(("case", "breaker", "exc", "message"), COMPILE_CASES, ids=[c[0] for c in COMPILE_CASES])
def test_compile_rejects_and_writes_nothing(ctx, tmp_path, case, breaker, exc, message):
    breaker(ctx)
    out = tmp_path / "out" / "bundle"
    with pytest.raises(exc) as info:
        compile_bundle(ctx.base, ctx.adapters, out, generation=ctx.generation, use_cases=ctx.use_cases)
    text = str(info.value)
    assert message in text and "\n" not in text, text
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_duplicate_adapter_names_in_the_api(tiny, tmp_path):
    a = load_adapter(tiny.adapters["tone"])
    with pytest.raises(UseCaseError, match="given twice"):
        compile_bundle(tiny.base, [a, a], tmp_path / "b", generation="v3")
    assert not (tmp_path / "b").exists()


# ---- bundles and the runtime ------------------------------------------------------------------------

@pytest.fixture
def served(tiny, tmp_path):
    """A v2 bundle, a runtime serving 'translate', and that use-case's output to compare against."""
    b = compile_bundle(tiny.base, tiny.adapters, tmp_path / "b", generation="v2")
    rt = Runtime.open(b.path)
    rt.switch("translate")
    feeds = tiny.inputs(seed=11)
    return b, rt, feeds, rt.run(feeds)["logits"]


def _intact(rt: Runtime, feeds, before) -> None:
    assert rt.current == "translate"
    np.testing.assert_array_equal(rt.run(feeds)["logits"], before)


def _manifest_edit(path: Path, fn: Callable[[dict], None]) -> None:
    data = json.loads((path / "manifest.json").read_text())
    fn(data)
    (path / "manifest.json").write_text(json.dumps(data))


BUNDLE_CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("tampered-manifest", lambda p: _manifest_edit(p, lambda d: d["use_cases"][0]["strengths"].update(
        summarize=9.0)), "manifest_sha256 does not match"),
    ("tampered-patch", lambda p: _flip(p / "patches/tone.safetensors", -5), "SHA-256 does not match"),
    ("truncated-patch", lambda p: _cut(p / "patches/tone.safetensors"), "the manifest says"),
    ("missing-patch", lambda p: (p / "patches/tone.safetensors").unlink(), "is missing"),
    ("tampered-graph", lambda p: _flip(p / "model.onnx", 100), "SHA-256 does not match"),
    ("manifest-not-json", lambda p: (p / "manifest.json").write_text("{"), "not valid JSON"),
    ("unknown-slot-dtype", lambda p: _consistent_edit(p, lambda d: d["slots"][0].update(dtype="float8")),
     "dtype 'float8'"),
    ("no-manifest", lambda p: (p / "manifest.json").unlink(), "not a bundle"),
]


def _consistent_edit(path: Path, fn: Callable[[dict], None]) -> None:
    """An edit with a recomputed manifest digest: only the content check can catch it."""
    data = json.loads((path / "manifest.json").read_text())
    fn(data)
    data["manifest_sha256"] = _digest(data)
    (path / "manifest.json").write_text(json.dumps(data))


def _flip(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-4])


@pytest.mark.parametrize(("case", "breaker", "message"), BUNDLE_CASES, ids=[c[0] for c in BUNDLE_CASES])
def test_bad_bundle_is_refused_at_open(served, case, breaker, message):
    b, rt, feeds, before = served
    breaker(b.path)
    with pytest.raises(BundleError, match=message):
        Runtime.open(b.path)
    _intact(rt, feeds, before)  # a runtime already serving is unaffected


def test_path_outside_the_bundle_is_refused(served):
    b, rt, feeds, before = served
    _consistent_edit(b.path, lambda d: d["files"].__setitem__("../escape", d["files"].pop("model.onnx")))
    with pytest.raises(BundleError, match="not inside the bundle"):
        open_bundle(b.path)
    _intact(rt, feeds, before)


def test_bundle_for_another_base_model(served, tiny, tmp_path):
    b, rt, feeds, before = served
    other = tmp_path / "other.onnx"
    other.write_bytes(tiny.base.read_bytes() + b"\0")  # not the same file
    with pytest.raises(BundleError, match="compiled for base model"):
        Runtime.open(b.path, base=other)
    assert Runtime.open(b.path, base=tiny.base).current == "summarize"  # the right base opens


def test_patch_corrupted_after_open_fails_the_switch_only(served):
    b, rt, feeds, before = served
    _cut(b.path / "patches/tone.safetensors")
    with pytest.raises(BundleError, match="tone.safetensors"):
        rt.switch("tone")
    _intact(rt, feeds, before)


@pytest.mark.parametrize(("feeds_fn", "message"), [
    (lambda f: {"ids": f["input_ids"]}, "unknown ['ids'], missing ['input_ids']"),
    (lambda f: {"input_ids": f["input_ids"].astype(np.float32)}, "dtype float32"),
    (lambda f: {"input_ids": f["input_ids"][0]}, "shape"),
    (lambda f: {"input_ids": np.zeros((2, 4), np.int64)}, "shape (2, 4)"),
    (lambda f: f | {"lora_alpha": np.array(3.0, np.float32)}, "unknown ['lora_alpha']"),
], ids=["wrong-name", "wrong-dtype", "wrong-rank", "wrong-batch", "feeding-a-slot"])
def test_bad_run_inputs(served, feeds_fn, message):
    b, rt, feeds, before = served
    with pytest.raises(InputError) as info:
        rt.run(feeds_fn(feeds))
    assert message in str(info.value)
    _intact(rt, feeds, before)


@pytest.mark.parametrize(("call", "exc", "message"), [
    (lambda rt: rt.switch("nope"), UseCaseError, "unknown use-case 'nope'"),
    (lambda rt: rt.set_strengths({"nope": 1.0}), UseCaseError, "unknown adapter 'nope'"),
    (lambda rt: rt.set_strengths({"tone": float("nan")}), InputError, "finite"),
    (lambda rt: rt.set_strengths({"tone": float("inf")}), InputError, "finite"),
    (lambda rt: rt.set_strengths({"tone": True}), InputError, "finite"),
    (lambda rt: rt.set_strengths({"tone": 1.0, "summarize": 1.0}), UseCaseError, "v3"),
    (lambda rt: rt.preload(["nope"]), UseCaseError, "unknown use-case"),
], ids=["unknown-use-case", "unknown-adapter", "nan-strength", "inf-strength", "bool-strength",
        "mix-in-v2", "preload-unknown"])
def test_bad_switches(served, call, exc, message):
    b, rt, feeds, before = served
    with pytest.raises(exc, match=message.replace("(", r"\(")):
        call(rt)
    _intact(rt, feeds, before)


def test_tensorfile_errors_are_lora_runtime_errors():
    assert issubclass(TensorFileError, LoraRuntimeError) and issubclass(BundleError, LoraRuntimeError)


# ---- encodings files that do not fit the graph -------------------------------------------------------

ENCODINGS_CASES = [
    ("not-json", "{", "not readable JSON"),
    ("wrong-version", {"version": "0.6.1", "activation_encodings": [], "param_encodings": []}, "version"),
    ("unknown-tensor", {"version": "1.0.0", "param_encodings": [], "activation_encodings": [
        {"name": "no.such.tensor", "dtype": "INT", "enc_type": "PER_TENSOR", "bw": 8, "is_sym": False,
         "scale": [0.1], "offset": [-3]}]}, "no.such.tensor"),
    ("channel-count", {"version": "1.0.0", "activation_encodings": [], "param_encodings": [
        {"name": "model.layers.0.self_attn.q_proj.weight", "dtype": "INT", "enc_type": "PER_CHANNEL", "bw": 8,
         "is_sym": True, "scale": [0.1] * 5, "offset": [-128] * 5}]}, "model.layers.0.self_attn.q_proj.weight"),
    ("negative-scale", {"version": "1.0.0", "param_encodings": [], "activation_encodings": [
        {"name": "x", "dtype": "INT", "enc_type": "PER_TENSOR", "bw": 8, "is_sym": False, "scale": [-0.1],
         "offset": [0]}]}, "scale"),
]


@pytest.mark.parametrize(("case", "content", "message"), ENCODINGS_CASES, ids=[c[0] for c in ENCODINGS_CASES])
def test_encodings_file_that_does_not_fit(ctx, tmp_path, case, content, message):
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=np.zeros((4, 1, 8), np.int64))
    enc = tmp_path / "user.encodings"
    enc.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(LoraRuntimeError) as info:
        compile_bundle(ctx.base, ctx.adapters, tmp_path / "out" / "b",
                       CompileOptions("v3", quant=QuantOptions("non-updatable", calib, encodings_file=enc)))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
