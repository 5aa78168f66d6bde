"""GGUF -> ONNX: a tiny llama GGUF written the way llama.cpp's converter writes one (permuted q/k,
quantized blocks), read back by lora_runtime and compared with the numpy forward of the original weights."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

gguf = pytest.importorskip("gguf")

from test_llama_graph import SHAPE, _numpy_forward  # noqa: E402

from lora_runtime.errors import BaseModelError  # noqa: E402
from lora_runtime.models.gguf import build_from_gguf, open_gguf, unpermute  # noqa: E402
from lora_runtime.models.llama import linear_shapes  # noqa: E402

GGUF_OF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
           "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, restated."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, qtype, tied: bool):
    rng = np.random.default_rng(7)
    hf: dict[str, np.ndarray] = {}  # HF layout: linear (out, in)
    s = SHAPE
    hf["model.embed_tokens.weight"] = rng.standard_normal((s.vocab, s.d_model)).astype(np.float32)
    for module, (d_in, d_out) in linear_shapes(s).items():
        hf[f"{module}.weight"] = (rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(np.float32)
    for i in range(s.n_layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            hf[f"model.layers.{i}.{norm}.weight"] = (1 + 0.1 * rng.standard_normal(s.d_model)).astype(np.float32)
    hf["model.norm.weight"] = (1 + 0.1 * rng.standard_normal(s.d_model)).astype(np.float32)
    if tied:
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"].copy()

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(s.n_layers)
    w.add_context_length(s.max_seq)
    w.add_embedding_length(s.d_model)
    w.add_feed_forward_length(s.d_ff)
    w.add_head_count(s.n_heads)
    w.add_head_count_kv(s.n_kv_heads)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(s.rms_eps)
    w.add_vocab_size(s.vocab)

    def add(name: str, value: np.ndarray) -> None:
        if value.ndim == 2 and value.shape[1] % 32 == 0 and qtype != gguf.GGMLQuantizationType.F32:
            q = gguf.quants.quantize(value, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
            hf_value = gguf.quants.dequantize(q, qtype).reshape(value.shape)  # what the file really holds
        else:
            w.add_tensor(name, value)
            hf_value = value
        return hf_value

    real: dict[str, np.ndarray] = {}
    real["model.embed_tokens.weight"] = add("token_embd.weight", hf["model.embed_tokens.weight"])
    for i in range(s.n_layers):
        for hf_name, g_name in GGUF_OF.items():
            value = hf[f"model.layers.{i}.{hf_name}.weight"]
            if g_name == "attn_q":
                stored = add(f"blk.{i}.{g_name}.weight", permute(value, s.n_heads))
                real[f"model.layers.{i}.{hf_name}.weight"] = unpermute_ref(stored, s.n_heads)
            elif g_name == "attn_k":
                stored = add(f"blk.{i}.{g_name}.weight", permute(value, s.n_kv_heads))
                real[f"model.layers.{i}.{hf_name}.weight"] = unpermute_ref(stored, s.n_kv_heads)
            else:
                real[f"model.layers.{i}.{hf_name}.weight"] = add(f"blk.{i}.{g_name}.weight", value)
    real["model.norm.weight"] = add("output_norm.weight", hf["model.norm.weight"])
    if not tied:
        real["lm_head.weight"] = add("output.weight", hf["lm_head.weight"])
    else:
        real["lm_head.weight"] = real["model.embed_tokens.weight"]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # numpy reference layout: linear weights (in, out)
    return {k: (v.T if v.ndim == 2 and k != "model.embed_tokens.weight" else v) for k, v in real.items()}, hf


def unpermute_ref(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of permute(), independently: invert the index map."""
    rows = w.shape[0]
    idx = permute(np.arange(rows)[:, None].astype(np.float64), heads)[:, 0].astype(int)
    out = np.empty_like(w)
    out[idx] = w
    return out


@pytest.mark.parametrize(("qtype", "tied", "keep"), [
    ("F32", False, True), ("Q8_0", True, True), ("Q8_0", True, False), ("Q4_0", False, True), ("Q4_0", False, False),
    ("Q4_1", False, True), ("Q4_1", True, True), ("Q4_1", False, False)])
def test_gguf_graph_matches_the_weights_it_holds(tmp_path, qtype, tied, keep):
    """Kept blocks (MatMulNBits, GatherBlockQuantized, Q4_1's block-sum correction) or dequantized to float32:
    the same weights, the numpy forward of what gguf itself dequantizes."""
    q = getattr(gguf.GGMLQuantizationType, qtype)
    reference, original = _write_gguf(tmp_path / "tiny.gguf", q, tied)
    path, model = build_from_gguf(tmp_path / "tiny.gguf", tmp_path / "onnx", kv_cache=False, max_seq=SHAPE.max_seq,
                                  keep_blocks=keep)
    assert dataclasses.replace(model.shape, rms_eps=SHAPE.rms_eps) == SHAPE and model.tied == tied
    ops = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    kept = keep and qtype != "F32"
    # 4-bit: every linear layer the file holds as blocks (rows of a multiple of 32 values) and the head; 8-bit
    # linear layers run float at accuracy level 0 (see blocks.py), the 8-bit embedding table stays blocks
    linear = [n for n, t in model.tensors.items() if t.tensor_type.name == qtype and n != "token_embd.weight"]
    assert ops["MatMulNBits"] == (len(linear) + tied if kept and qtype != "Q8_0" else 0)
    assert ops["GatherBlockQuantized"] == (1 if kept and qtype == "Q8_0" else 0)
    # Q4_1: block sums once per input (q/k/v share one, gate/up one)
    shared = sum(f"blk.{i}.{x}.weight" in linear for i in range(SHAPE.n_layers) for x in ("attn_k", "attn_v", "ffn_up"))
    assert ops["ReduceSum"] == (len(linear) + tied - shared if kept and qtype == "Q4_1" else 0)
    assert model.shape.rms_eps == pytest.approx(SHAPE.rms_eps, rel=1e-6)  # GGUF stores it as float32
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(5).integers(0, SHAPE.vocab, (1, 9), dtype=np.int64)
    got = sess.run(None, {"input_ids": ids})[0]
    np.testing.assert_allclose(got, _numpy_forward(ids, reference), atol=3e-4, rtol=1e-4)
    if qtype == "F32":  # lossless: the original Hugging Face weights, un-permuted, give the same logits
        hf = {k: (v.T if v.ndim == 2 and k != "model.embed_tokens.weight" else v) for k, v in original.items()}
        np.testing.assert_allclose(got, _numpy_forward(ids, hf), atol=3e-4, rtol=1e-4)


def test_kept_8_bit_blocks_at_accuracy_level_4_run_as_blocks(tmp_path):
    """Accuracy level 4 (activations to 8-bit blocks, llama.cpp's arithmetic): every Q8_0 weight stays blocks, the
    tied head reads the embedding's own bytes; close to the exact forward, not equal to it."""
    reference, _ = _write_gguf(tmp_path / "tiny.gguf", gguf.GGMLQuantizationType.Q8_0, True)
    path, _ = build_from_gguf(tmp_path / "tiny.gguf", tmp_path / "onnx", kv_cache=False, max_seq=SHAPE.max_seq,
                              accuracy_level=4)
    graph = onnx.load(str(path), load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["MatMulNBits"] >= 5 * SHAPE.n_layers + 1 and ops["GatherBlockQuantized"] == 1
    head = next(n for n in graph.node if n.name == "lm_head.MatMulNBits")
    assert head.input[1] == "model.embed_tokens.weight.q8"  # one copy of the tied table
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(5).integers(0, SHAPE.vocab, (1, 9), dtype=np.int64)
    got, want = sess.run(None, {"input_ids": ids})[0], _numpy_forward(ids, reference)
    sqnr = 10 * np.log10(np.sum(want.astype(np.float64) ** 2) / np.sum((got - want).astype(np.float64) ** 2))
    assert 25 < sqnr < 90, sqnr  # int8 activations: near, and not exact


@pytest.mark.parametrize(("qtype", "tied", "head", "level"), [
    ("Q8_0", True, "Q4_0", 0), ("F32", False, "Q4_0", 0), ("Q4_1", False, "Q8_0", 4), ("Q4_0", False, "Q4_0", 0)])
def test_output_tensor_type_requantizes_only_the_head(tmp_path, qtype, tied, head, level):
    """``--output-tensor-type``: lm_head as llama-quantize makes it (gguf's quantizer over the values the file
    holds; kept as is when it already has that type), everything else as the file holds it, the tied embedding
    lookup too; the logits are the numpy forward of those weights."""
    q, h = (getattr(gguf.GGMLQuantizationType, t) for t in (qtype, head))
    reference, _ = _write_gguf(tmp_path / "tiny.gguf", q, tied)
    path, _ = build_from_gguf(tmp_path / "tiny.gguf", tmp_path / "onnx", kv_cache=False, max_seq=SHAPE.max_seq,
                              accuracy_level=level, output_type=head)
    graph = onnx.load(str(path), load_external_data=False).graph
    mm = next(n for n in graph.node if n.name == "lm_head.MatMulNBits")
    assert next(a.i for a in mm.attribute if a.name == "bits") == (4 if head == "Q4_0" else 8)
    gathers = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gathers) == (qtype == "Q8_0") and all(mm.input[1] not in g.input for g in gathers)
    file_head = reference["lm_head.weight"].T  # (out, in): what the file holds
    if qtype != head:
        file_head = gguf.quants.dequantize(gguf.quants.quantize(file_head, h), h).reshape(file_head.shape)
    want_ref = dict(reference, **{"lm_head.weight": file_head.T})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(5).integers(0, SHAPE.vocab, (1, 9), dtype=np.int64)
    got, want = sess.run(None, {"input_ids": ids})[0], _numpy_forward(ids, want_ref)
    if level == 0:  # float compute over the blocks: the same values
        np.testing.assert_allclose(got, want, atol=3e-4, rtol=1e-4)
    else:  # int8 activations (level 4): near
        sqnr = 10 * np.log10(np.sum(want.astype(np.float64) ** 2) / np.sum((got - want).astype(np.float64) ** 2))
        assert sqnr > 25, sqnr
    if qtype != head:  # and not the file's own head
        assert not np.allclose(sess.run(None, {"input_ids": ids})[0], _numpy_forward(ids, reference), atol=3e-4)


def test_output_tensor_type_refusals(tmp_path):
    """Q8_0 below accuracy level 4 (it would run float), with dequantized weights, an unknown type: refused."""
    _write_gguf(tmp_path / "tiny.gguf", gguf.GGMLQuantizationType.Q4_0, False)
    for kw, msg in (({"output_type": "Q8_0"}, "needs accuracy level 4"),
                    ({"output_type": "Q4_0", "keep_blocks": False}, "blocks kept"),
                    ({"output_type": "Q6_K"}, "one of Q4_0, Q8_0")):
        with pytest.raises(BaseModelError, match=msg):
            build_from_gguf(tmp_path / "tiny.gguf", tmp_path / "onnx", kv_cache=False, max_seq=SHAPE.max_seq, **kw)


def test_output_tensor_type_needs_whole_blocks_in_the_head(tmp_path, monkeypatch):
    """A head whose rows (d_model values) are not whole 32-value blocks cannot be Q4_0: refused by name."""
    import test_gguf

    monkeypatch.setattr(test_gguf, "SHAPE", dataclasses.replace(SHAPE, d_model=48))
    _write_gguf(tmp_path / "tiny.gguf", gguf.GGMLQuantizationType.F32, False)
    with pytest.raises(BaseModelError, match=r"output\.weight has rows of 48 values, not whole 32-value blocks"):
        build_from_gguf(tmp_path / "tiny.gguf", tmp_path / "onnx", kv_cache=False, max_seq=SHAPE.max_seq,
                        output_type="Q4_0")


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).standard_normal((32, 8))
    for heads in (1, 2, 4):
        np.testing.assert_array_equal(unpermute(permute(w, heads), heads), w)


def test_not_a_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(BaseModelError, match="x.gguf"):
        open_gguf(tmp_path / "x.gguf")
    with pytest.raises(BaseModelError, match="not found"):
        open_gguf(tmp_path / "missing.gguf")


def test_hugging_face_folder_matches_the_same_weights(tmp_path):
    """config.json + sharded safetensors (BF16 and F32) -> the graph; against numpy on the stored values."""
    import json

    from lora_runtime.models.hf import build_from_hf
    from lora_runtime.tensorfile import read_header, save_tensors

    def load_tensors(path):  # BF16 -> float32, through the reader under test
        tf = read_header(path)
        return {n: tf.read(n) for n in tf.entries}

    _, hf = _write_gguf(tmp_path / "unused.gguf", gguf.GGMLQuantizationType.F32, tied=False)
    folder = tmp_path / "hf"
    folder.mkdir()
    s = SHAPE
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": s.vocab, "hidden_size": s.d_model,
        "num_hidden_layers": s.n_layers, "num_attention_heads": s.n_heads, "num_key_value_heads": s.n_kv_heads,
        "intermediate_size": s.d_ff, "max_position_embeddings": s.max_seq, "rms_norm_eps": s.rms_eps,
        "rope_theta": s.rope_theta, "tie_word_embeddings": False}))
    names = sorted(hf)
    bf16 = {k: (hf[k].view(np.uint32) >> 16).astype(np.uint16) for k in names[: len(names) // 2]}
    save_tensors(folder / "model-00001-of-00002.safetensors", {k: hf[k] for k in names[len(names) // 2:]})
    path = folder / "model-00002-of-00002.safetensors"
    header, blob, offset = {}, b"", 0  # a BF16 shard, written by hand: the raw upper halves of float32
    for k, v in bf16.items():
        header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [offset, offset + v.nbytes]}
        offset += v.nbytes
        blob += v.tobytes()
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + blob)
    stored = load_tensors(folder / "model-00001-of-00002.safetensors") | load_tensors(path)  # BF16 -> float32
    out, shape = build_from_hf(folder, tmp_path / "onnx", kv_cache=False, max_seq=s.max_seq)
    assert shape == s
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(6).integers(0, s.vocab, (1, 7), dtype=np.int64)
    ref = {k: (v.T if v.ndim == 2 and k != "model.embed_tokens.weight" else v) for k, v in stored.items()}
    np.testing.assert_allclose(sess.run(None, {"input_ids": ids})[0], _numpy_forward(ids, ref), atol=3e-4, rtol=1e-4)


def test_prefix_agreement():
    from lora_runtime.metrics import prefix_agreement

    assert prefix_agreement([[1, 2, 3, 4]], [[1, 2, 3, 4]], 4) == 1.0
    assert prefix_agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]], 4) == 0.5  # agrees until the first difference
    assert prefix_agreement([[1, 2]], [[1, 2]], 4) == 1.0  # both stopped at EOS after two tokens
    assert prefix_agreement([[1, 2]], [[1, 2, 5, 6]], 4) == 0.5  # one stopped, the other went on
    assert prefix_agreement([[7, 2], [1, 2, 3, 4]], [[1, 2], [1, 2, 3, 4]], 4) == 0.5


def test_calibration_data_refuses_more_samples_than_prompts(tmp_path):
    from lora_runtime.errors import InputError
    from lora_runtime.llm import CALIBRATION_PROMPTS, GREEDY_PROMPTS, calibration_data

    with pytest.raises(InputError, match=f"1 to {len(CALIBRATION_PROMPTS)} samples"):
        calibration_data(tmp_path, tmp_path / "c.npz", samples=len(CALIBRATION_PROMPTS) + 1)
    assert not (tmp_path / "c.npz").exists()
    assert len(set(CALIBRATION_PROMPTS)) == len(CALIBRATION_PROMPTS)
    assert not set(GREEDY_PROMPTS) & set(CALIBRATION_PROMPTS)  # the greedy-token report uses held-out prompts


def test_a_gguf_tensor_the_graph_has_no_place_for_is_refused(tmp_path):
    """Llama 3's rope_freqs.weight (scaled rotary) or attention biases change the math: refused, never dropped."""
    w = gguf.GGUFWriter(str(tmp_path / "extra.gguf"), "llama")
    s = SHAPE
    for add, value in ((w.add_block_count, s.n_layers), (w.add_embedding_length, s.d_model),
                       (w.add_feed_forward_length, s.d_ff), (w.add_head_count, s.n_heads)):
        add(value)
    w.add_tensor("token_embd.weight", np.zeros((s.vocab, s.d_model), np.float32))
    w.add_tensor("rope_freqs.weight", np.ones(s.d_model // s.n_heads // 2, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(BaseModelError, match=r"extra.gguf: 1 tensor\(s\) the Llama builder has no place for, "
                                             r"e.g. rope_freqs.weight"):
        open_gguf(tmp_path / "extra.gguf")
