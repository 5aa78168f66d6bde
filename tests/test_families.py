"""The LLM families ``import-model`` names as supported, against transformers: tiny random checkpoints written
by ``tools/make_family_fixtures.py`` (Hugging Face folders and the logits transformers computes, with and
without a real PEFT adapter). What the builder does not compute is refused with one line naming it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from conftest import FIXTURES

from lora_runtime import Runtime, compile_bundle
from lora_runtime.errors import BaseModelError
from lora_runtime.models.hf import build_from_hf
from lora_runtime.tensorfile import read_header, save_tensors

FAMILIES = FIXTURES / "families"


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"])
def test_family_matches_transformers_and_peft(family, tmp_path):
    folder = FAMILIES / family
    want = np.load(folder / "expected.npz")
    path, _ = build_from_hf(folder, tmp_path / "onnx", kv_cache=False, max_seq=64)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input_ids": want["input_ids"]})[0]
    np.testing.assert_allclose(got, want["base"], atol=2e-5, rtol=1e-4)
    b = compile_bundle(path, {"a": folder / "adapter"}, tmp_path / "b", generation="v3", use_cases=["a=a", "base="])
    rt = Runtime.open(b.path)
    for use_case, key in (("a", "adapter"), ("base", "base")):
        rt.switch(use_case)
        np.testing.assert_allclose(rt.run({"input_ids": want["input_ids"]})["logits"], want[key], atol=2e-5,
                                   rtol=1e-4, err_msg=f"{family} {use_case}")


def _variant(tmp_path, family: str, **config) -> object:
    folder = tmp_path / family
    shutil.copytree(FAMILIES / family, folder)
    cfg = json.loads((folder / "config.json").read_text()) | config
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize(("change", "match"), [
    ({"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"}, r"architectures \[.Gemma3ForCausalLM.\]"),
    ({"hidden_act": "relu"}, "hidden_act = 'relu' is not supported"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, "partial_rotary_factor = 0.5"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling .*llama3.* is not supported"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping = 50.0 is not supported"),
    ({"sliding_window": 16}, "sliding_window = 16 is not supported beyond the window: import with --max-seq 16"),
])
def test_what_the_builder_does_not_compute_is_refused(tmp_path, change, match):
    family = "mistral" if "sliding_window" in change else "llama"
    with pytest.raises(BaseModelError, match=match):
        build_from_hf(_variant(tmp_path, family, **change), tmp_path / "onnx", kv_cache=False, max_seq=64)
    assert not (tmp_path / "onnx").exists()


def test_a_window_the_sequences_fit_in_is_full_attention(tmp_path):
    folder = _variant(tmp_path, "mistral", sliding_window=16)
    path, shape = build_from_hf(folder, tmp_path / "onnx", kv_cache=False, max_seq=16)
    assert shape.max_seq == 16
    want = np.load(folder / "expected.npz")  # 7 tokens: inside the window, the logits do not change
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(["logits"], {"input_ids": want["input_ids"]})[0], want["base"], atol=2e-5,
                               rtol=1e-4)


def test_a_tensor_the_graph_has_no_place_for_is_refused(tmp_path):
    """Qwen3's q/k norms in an otherwise Llama folder (or Qwen2's biases under a Llama config): never dropped."""
    folder = _variant(tmp_path, "llama")
    tf = read_header(folder / "model.safetensors")
    tensors = {n: tf.read(n) for n in tf.entries} | {"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}
    save_tensors(folder / "model.safetensors", tensors)
    with pytest.raises(BaseModelError, match=r"1 tensor\(s\) the Llama builder has no place for, e.g. "
                                             r"model.layers.0.self_attn.q_norm.weight"):
        build_from_hf(folder, tmp_path / "onnx", kv_cache=False, max_seq=64)
    qwen = _variant(tmp_path / "q", "qwen2", architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(BaseModelError, match=r"6 tensor\(s\) .*q_proj.bias"):
        build_from_hf(qwen, tmp_path / "onnx2", kv_cache=False, max_seq=64)


@pytest.mark.parametrize("family", ["qwen3", "gemma", "gemma2", "phi3"])
def test_kv_cache_graph_decodes_as_transformers(family, tmp_path):
    """The import's KV-cache graph: six tokens, then the seventh with their keys and values, as transformers."""
    want = np.load(FAMILIES / family / "expected.npz")
    ids = want["input_ids"]
    path, shape = build_from_hf(FAMILIES / family, tmp_path / "onnx", kv_cache=True, max_seq=64)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    empty = {i.name: np.zeros((1, shape.n_kv_heads, 0, shape.head_dim), np.float32)
             for i in sess.get_inputs() if i.name.startswith("past_")}
    names = [o.name for o in sess.get_outputs()]
    first = dict(zip(names, sess.run(None, {"input_ids": ids[:, :6]} | empty)))
    past = {n: first[n.replace("past_", "present_")] for n in empty}
    last = sess.run(["logits"], {"input_ids": ids[:, 6:]} | past)[0]
    np.testing.assert_allclose(last[0, -1], want["base"][0, 6], atol=2e-5, rtol=1e-4)
