"""load_adapter on every real PEFT fixture, and one refusal per kind of unusable folder.

Expected tensors come from the ``safetensors`` package (BF16 through ml_dtypes on the raw bytes), expected
rank and scaling from the ``cases.json`` that tools/make_fixtures.py wrote from PEFT itself."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from conftest import FIXTURES

from lora_runtime.compiler.adapter import Adapter, load_adapter
from lora_runtime.errors import AdapterError

PREFIX = "base_model.model."
FIXTURE_ADAPTERS = [(family, name) for family in ("llama", "gpt2")
                    for name in sorted(p.name for p in (FIXTURES / family / "adapters").iterdir())]


def _cases(family: str) -> dict:
    return json.loads((FIXTURES / family / "cases.json").read_text())


def _independent_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor as float32, without lora_runtime: safetensors for F32/F16, raw bits + ml_dtypes for BF16."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    if any(spec["dtype"] == "BF16" for spec in header.values()):
        out = {}
        for name, spec in header.items():
            begin, end = spec["data_offsets"]
            bits = np.frombuffer(raw[8 + n + begin : 8 + n + end], dtype=ml_dtypes.bfloat16)
            out[name] = bits.astype(np.float32).reshape(spec["shape"])
        return out
    return {k: v.astype(np.float32) for k, v in safetensors.numpy.load_file(str(path)).items()}


@pytest.mark.parametrize(("family", "name"), FIXTURE_ADAPTERS, ids=[f"{f}/{n}" for f, n in FIXTURE_ADAPTERS])
def test_fixture_adapter_loads_as_peft_saved_it(family, name):
    folder = FIXTURES / family / "adapters" / name
    info = _cases(family)["adapters"][name]
    adapter = load_adapter(folder)
    assert isinstance(adapter, Adapter)
    assert adapter.name == name and adapter.source == str(folder)
    assert adapter.sha256 == hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert [p.module for p in adapter.pairs] == sorted(info["modules"])
    assert 2 * len(adapter.pairs) == info["num_tensors"]
    want = _independent_tensors(folder / "adapter_model.safetensors")
    for pair in adapter.pairs:
        spec = info["modules"][pair.module]
        assert pair.dtype == info["tensor_dtype"]
        assert pair.a.dtype == np.float32 and pair.b.dtype == np.float32
        np.testing.assert_array_equal(pair.a, want[f"{PREFIX}{pair.module}.lora_A.weight"])
        np.testing.assert_array_equal(pair.b, want[f"{PREFIX}{pair.module}.lora_B.weight"])
        assert pair.rank == spec["r"] == pair.a.shape[0] == pair.b.shape[1]
        assert pair.in_features == pair.a.shape[1] and pair.out_features == pair.b.shape[0]
        assert pair.scaling == pytest.approx(spec["scaling"], rel=1e-12), pair.module
        assert adapter.pair(pair.module) is pair
    assert adapter.pair("model.nowhere") is None
    assert adapter.nbytes == 4 * sum(v.size for v in want.values())


def test_fixture_shapes_and_configs_by_hand():
    """Spot values written out from tools/README.md, not read back from the files."""
    a = load_adapter(FIXTURES / "llama/adapters/a")
    q0 = a.pair("model.layers.0.self_attn.q_proj")
    v0 = a.pair("model.layers.0.self_attn.v_proj")
    assert (q0.a.shape, q0.b.shape, q0.scaling) == ((4, 32), (32, 4), 2.0)  # r4 alpha8
    assert (v0.a.shape, v0.b.shape) == ((4, 32), (16, 4))  # v_proj is 32 -> 16 (GQA)
    assert a.nbytes == 4 * 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)  # 2 layers of q and v, float32
    b = load_adapter(FIXTURES / "llama/adapters/b")
    assert b.config.use_rslora and b.config.r == 8
    assert b.pair("model.layers.1.self_attn.o_proj").rank == 2
    assert b.pair("model.layers.1.self_attn.o_proj").scaling == pytest.approx(16 / 2**0.5)
    assert b.pair("model.layers.0.mlp.down_proj").scaling == pytest.approx(4 / 8**0.5)
    c = load_adapter(FIXTURES / "llama/adapters/c")
    assert c.config.target_modules == r".*\.mlp\.(gate|up)_proj"
    q = load_adapter(FIXTURES / "gpt2/adapters/q")
    assert q.config.fan_in_fan_out
    assert [p.module for p in q.pairs if p.module.endswith("c_proj")] == [
        "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]


def test_name_overrides_the_folder_name():
    assert load_adapter(FIXTURES / "llama/adapters/a", name="summarize-v2").name == "summarize-v2"


# --- refusals, each built from a copy of llama/a ------------------------------------------------------------------

Q0 = "model.layers.0.self_attn.q_proj"
A_Q0, B_Q0 = f"{PREFIX}{Q0}.lora_A.weight", f"{PREFIX}{Q0}.lora_B.weight"


def _edit_config(folder, **changes) -> None:
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _edit_tensors(folder, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = safetensors.numpy.load_file(str(path))
    edit(tensors)
    safetensors.numpy.save_file(tensors, str(path), metadata={"format": "pt"})


def _rename(old: str, new: str):
    def edit(t):
        t[new] = t.pop(old)
    return edit


def _set(key: str, value: np.ndarray):
    def edit(t):
        t[key] = value
    return edit


def _with_nan(t):
    t[A_Q0] = t[A_Q0].copy()
    t[A_Q0][1, 2] = np.nan


def _with_inf(t):
    t[B_Q0] = t[B_Q0].copy()
    t[B_Q0][0, 0] = -np.inf


def _only_garbage_bin(folder):
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not a pickle at all \xff\xfe")


def _truncate(folder):
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-5])



# (id, how to break the copy, the culprit the message names, what it must say)
BROKEN = [
    ("missing folder", lambda f: shutil.rmtree(f), "{folder}", r"adapter folder not found"),
    ("missing config", lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json",
     r"missing; a PEFT adapter folder needs adapter_config.json"),
    ("config not JSON", lambda f: (f / "adapter_config.json").write_text("{'r': 4,}"), "adapter_config.json",
     r"not valid JSON"),
    ("config not UTF-8", lambda f: (f / "adapter_config.json").write_bytes(b'{"r": "\xff"}'), "adapter_config.json",
     r"not valid JSON"),
    ("only a pickle", _only_garbage_bin, "adapter_model.safetensors",
     r"missing; found adapter_model\.bin: pickle files are never loaded, re-save with "
     r"save_pretrained\(\.\.\., safe_serialization=True\)"),
    ("no weights at all", lambda f: (f / "adapter_model.safetensors").unlink(), "adapter_model.safetensors",
     r"adapter_model\.safetensors: missing$"),
    ("DoRA config", lambda f: _edit_config(f, use_dora=True), "adapter_config.json", r"use_dora is true"),
    ("LoHa config", lambda f: _edit_config(f, peft_type="LOHA"), "adapter_config.json", r"only LoRA"),
    ("DoRA magnitude key", lambda f: _edit_tensors(f, _set(f"{PREFIX}{Q0}.lora_magnitude_vector",
                                                           np.ones(32, np.float32))),
     f"{PREFIX}{Q0}.lora_magnitude_vector", r"is a DoRA magnitude"),
    ("embedding LoRA key", lambda f: _edit_tensors(f, _set(f"{PREFIX}model.embed_tokens.lora_embedding_A",
                                                           np.ones((4, 64), np.float32))),
     f"{PREFIX}model.embed_tokens.lora_embedding_A", r"is an embedding LoRA"),
    ("modules_to_save norm", lambda f: (_edit_config(f, modules_to_save=["model.norm"]),
                                        _edit_tensors(f, _set(f"{PREFIX}model.norm.weight", np.ones(32, np.float32)))),
     f"{PREFIX}model.norm.weight", r"a norm layer's weight: module 'model.norm' in modules_to_save is not a Linear"),
    ("bias key", lambda f: _edit_tensors(f, _set(f"{PREFIX}{Q0}.lora_B.bias", np.ones(32, np.float32))),
     f"{PREFIX}{Q0}.lora_B.bias", r"is not a LoRA A/B weight \(expected keys"),
    ("key without the PEFT prefix", lambda f: _edit_tensors(f, _rename(A_Q0, f"{Q0}.lora_A.weight")),
     f"'{Q0}.lora_A.weight'", r"is not a LoRA A/B weight"),
    ("A/B rank mismatch", lambda f: _edit_tensors(f, _set(B_Q0, np.ones((32, 3), np.float32))),
     f"'{Q0}'", r"lora_A \(4, 32\) and lora_B \(32, 3\) disagree on the rank"),
    ("config r differs", lambda f: _edit_config(f, r=8), A_Q0,
     rf"has rank 4 but the config gives module '{re.escape(Q0)}' rank 8"),
    ("rank_pattern differs", lambda f: _edit_config(f, rank_pattern={"layers.1.self_attn.v_proj": 2}),
     f"{PREFIX}model.layers.1.self_attn.v_proj.lora_A.weight", r"has rank 4 but the config gives .* rank 2"),
    ("NaN in A", lambda f: _edit_tensors(f, _with_nan), A_Q0, r"holds NaN or infinite values"),
    ("inf in B", lambda f: _edit_tensors(f, _with_inf), B_Q0, r"holds NaN or infinite values"),
    ("integer tensor", lambda f: _edit_tensors(f, _set(A_Q0, np.ones((4, 32), np.int32))), A_Q0,
     r"has dtype I32; LoRA weights must be F32, F16 or BF16"),
    ("float64 tensor", lambda f: _edit_tensors(f, _set(B_Q0, np.ones((32, 4), np.float64))), B_Q0,
     r"has dtype F64"),
    ("3-D tensor", lambda f: _edit_tensors(f, _set(A_Q0, np.ones((4, 32, 1), np.float32))), A_Q0,
     r"has shape \(4, 32, 1\); expected 2-D"),
    ("4-D conv tensor", lambda f: _edit_tensors(f, _set(A_Q0, np.ones((4, 32, 1, 1), np.float32))), A_Q0,
     r"has shape \(4, 32, 1, 1\); expected 2-D \(Conv LoRA is not supported\)"),
    ("module not targeted", lambda f: _edit_config(f, target_modules=["v_proj"]), f"'{Q0}'",
     r"has LoRA tensors but target_modules \('v_proj',\) does not select it"),
    ("module excluded", lambda f: _edit_config(f, exclude_modules=["layers.0.self_attn.q_proj"]), f"'{Q0}'",
     r"does not select it"),
    ("only lora_A", lambda f: _edit_tensors(f, lambda t: t.pop(B_Q0)), f"'{Q0}'", r"has no lora_B\.weight tensor"),
    ("only lora_B", lambda f: _edit_tensors(f, lambda t: t.pop(A_Q0)), f"'{Q0}'", r"has no lora_A\.weight tensor"),
    ("no tensors", lambda f: _edit_tensors(f, lambda t: t.clear()), "adapter_model.safetensors",
     r"holds no LoRA tensors"),
    ("truncated safetensors", _truncate, "adapter_model.safetensors", r"truncated or trailing bytes"),
]


@pytest.mark.parametrize(("breaker", "culprit", "message"), [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_broken_adapter_is_refused_naming_the_culprit(tmp_path, breaker, culprit, message):
    folder = tmp_path / "a"
    shutil.copytree(FIXTURES / "llama/adapters/a", folder)
    load_adapter(folder)  # the unbroken copy loads, so the refusal below comes from the breakage
    breaker(folder)
    with pytest.raises(AdapterError) as info:
        load_adapter(folder)
    text = str(info.value)
    assert culprit.format(folder=folder) in text, text
    assert re.search(message, text), text


def test_pickle_is_refused_before_any_read(tmp_path, monkeypatch):
    """A folder with only adapter_model.bin: refused by name, and the .bin is never opened."""
    folder = tmp_path / "a"
    shutil.copytree(FIXTURES / "llama/adapters/a", folder)
    _only_garbage_bin(folder)
    opened: list[str] = []
    real_open = open

    def spy(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    monkeypatch.setattr(io, "open", spy)
    with pytest.raises(AdapterError, match="pickle files are never loaded"):
        load_adapter(folder)
    assert any(p.endswith("adapter_config.json") for p in opened)  # the spy does see the files that are read
    assert not [p for p in opened if p.endswith(".bin")]


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", ""])
def test_invalid_adapter_name_is_refused(name):
    with pytest.raises(AdapterError, match=r"invalid adapter name"):
        load_adapter(FIXTURES / "llama/adapters/a", name=name)


def test_f16_adapter_widens_exactly(tmp_path):
    """A hand-made F16 adapter with values exactly representable in half precision."""
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 3, "target_modules": ["proj"]}))
    a = np.array([[0.5, -1.25, 2.0**-14], [65504.0, 0.0, -0.099975586]], np.float16)  # (r=2, in=3)
    b = np.array([[1.0, -2.0]], np.float16)  # (out=1, r=2)
    safetensors.numpy.save_file({f"{PREFIX}m.proj.lora_A.weight": a, f"{PREFIX}m.proj.lora_B.weight": b},
                                str(folder / "adapter_model.safetensors"))
    (pair,) = load_adapter(folder).pairs
    assert pair.dtype == "F16" and pair.a.dtype == np.float32
    np.testing.assert_array_equal(pair.a, [[0.5, -1.25, 2.0**-14], [65504.0, 0.0, -0.0999755859375]])
    np.testing.assert_array_equal(pair.b, [[1.0, -2.0]])
    assert (pair.rank, pair.in_features, pair.out_features, pair.scaling) == (2, 3, 1, 1.5)
