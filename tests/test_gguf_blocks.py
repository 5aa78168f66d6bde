"""A GGUF's quantized blocks kept (``import-model`` by default): the blocks read against gguf's own dequantizer,
and SmolLM2's Q4_1/Q8_0 file imported with its blocks against transformers + PEFT (tests/fixtures/smollm2) and
against the float32 import of the same file."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import FIXTURES

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from lora_runtime import Runtime, compile_bundle  # noqa: E402
from lora_runtime.compiler.options import CompileOptions, QuantOptions  # noqa: E402
from lora_runtime.errors import BaseModelError, UseCaseError  # noqa: E402
from lora_runtime.llm import Chat, generate  # noqa: E402
from lora_runtime.models.blocks import KEPT, from_ggml  # noqa: E402

REF = json.loads((FIXTURES / "smollm2" / "reference.json").read_text())
NPZ = np.load(FIXTURES / "smollm2" / "reference.npz")


@pytest.mark.parametrize("kind", KEPT)
def test_blocks_are_what_gguf_dequantizes(kind):
    """Random blocks (codes and float16 scales/minimums as raw bytes): codes, scales and offsets give back
    gguf.quants.dequantize's values (exactly; Q4_K up to the float32 rounding of its multiplied-out offsets)."""
    rng = np.random.default_rng(3)
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    per_block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, k = 6, 2 * per_block
    raw = rng.integers(0, 256, (rows, k // per_block, block_bytes), dtype=np.uint8)
    heads = 4 if kind in ("Q4_1", "Q4_K") else 2  # float16 fields at the block's start: d (and Q4_1's m, dmin)
    raw[..., :heads] = (rng.standard_normal((rows, k // per_block, heads // 2)) * 0.02).astype(np.float16).view(
        np.uint8).reshape(rows, k // per_block, heads)
    raw = raw.reshape(rows, -1)
    b = from_ggml(raw, kind, rows, k)
    want = gguf.quants.dequantize(raw, qtype).reshape(rows, k)
    if kind == "Q4_K":  # scale and offset multiplied out in float32: a rounding of the offset (~1 ulp of 8 d sc)
        np.testing.assert_allclose(b.dequantize(), want, rtol=0, atol=1e-6 * np.abs(want).max())
    else:
        np.testing.assert_array_equal(b.dequantize(), want.astype(np.float32))
    assert b.bits == (8 if kind == "Q8_0" else 4) and (b.offsets is not None) == (kind in ("Q4_1", "Q4_K"))
    assert b.block_size == 32
    assert from_ggml(raw, "Q6_K", rows, k) is None  # a type not kept: the importer dequantizes it


def test_a_q4_k_gguf_runs_its_blocks(tmp_path):
    """A tiny llama GGUF whose linear layers are Q4_K (random valid blocks; gguf has no Q4_K quantizer): the graph
    keeps them (MatMulNBits + the offset correction) and computes the numpy forward of what gguf dequantizes."""
    import dataclasses

    import onnxruntime as ort
    from test_gguf import GGUF_OF, permute
    from test_llama_graph import SHAPE, _numpy_forward

    from lora_runtime.models.gguf import build_from_gguf
    from lora_runtime.models.llama import linear_shapes

    s = dataclasses.replace(SHAPE, d_model=256, d_ff=256, n_layers=1, vocab=64)  # rows of 256 values: Q4_K's unit
    rng = np.random.default_rng(11)
    q4k = gguf.GGMLQuantizationType.Q4_K
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    for add, value in ((w.add_block_count, s.n_layers), (w.add_context_length, s.max_seq),
                       (w.add_embedding_length, s.d_model), (w.add_feed_forward_length, s.d_ff),
                       (w.add_head_count, s.n_heads), (w.add_head_count_kv, s.n_kv_heads),
                       (w.add_rope_freq_base, s.rope_theta), (w.add_layer_norm_rms_eps, s.rms_eps),
                       (w.add_vocab_size, s.vocab)):
        add(value)
    ref: dict[str, np.ndarray] = {}

    def blocks(rows: int, k: int) -> np.ndarray:
        raw = rng.integers(0, 256, (rows, k // 256, 144), dtype=np.uint8)
        raw[..., :4] = (np.abs(rng.standard_normal((rows, k // 256, 2))) * 0.002).astype(np.float16).view(
            np.uint8).reshape(rows, k // 256, 4)
        return raw.reshape(rows, -1)

    def put(name: str, gname: str, rows: int, k: int, heads: int | None = None) -> None:
        raw = blocks(rows, k)
        w.add_tensor(gname, raw, raw_shape=raw.shape, raw_dtype=q4k)
        real = gguf.quants.dequantize(raw, q4k).reshape(rows, k)
        if heads:  # the file holds q/k permuted as llama.cpp's converter writes them: un-permute by index
            idx = permute(np.arange(rows)[:, None].astype(np.float64), heads)[:, 0].astype(int)
            real = real[np.argsort(idx)]
        ref[name] = real.T

    emb = rng.standard_normal((s.vocab, s.d_model)).astype(np.float32)
    w.add_tensor("token_embd.weight", emb)
    ref["model.embed_tokens.weight"] = emb
    for module, (d_in, d_out) in linear_shapes(s).items():
        if module == "lm_head":
            put("lm_head.weight", "output.weight", d_out, d_in)
            continue
        i, hf = module.split(".", 3)[2], module.split(".", 3)[3]
        heads = s.n_heads if hf.endswith("q_proj") else s.n_kv_heads if hf.endswith("k_proj") else None
        put(f"{module}.weight", f"blk.{i}.{GGUF_OF[hf]}.weight", d_out, d_in, heads)
    for i in range(s.n_layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            value = (1 + 0.1 * rng.standard_normal(s.d_model)).astype(np.float32)
            w.add_tensor(f"blk.{i}.{GGUF_OF[norm]}.weight", value)
            ref[f"model.layers.{i}.{norm}.weight"] = value
    ref["model.norm.weight"] = np.ones(s.d_model, np.float32)
    w.add_tensor("output_norm.weight", ref["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path, _ = build_from_gguf(tmp_path / "k.gguf", tmp_path / "onnx", kv_cache=False, max_seq=s.max_seq)
    ops = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    assert ops["MatMulNBits"] == 8 and ops["ReduceSum"] == 5  # 7 layers + head; q/k/v and gate/up share sums
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = rng.integers(0, s.vocab, (1, 7), dtype=np.int64)
    want = _numpy_forward(ids, ref, s)
    np.testing.assert_allclose(sess.run(None, {"input_ids": ids})[0], want, atol=1e-4 * np.abs(want).max(), rtol=1e-4)


def _session(model: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _prefill(sess, ids):
    empty = np.zeros((1, 3, 0, 64), np.float32)
    feeds = {i.name: empty for i in sess.get_inputs() if i.name.startswith("past_")}
    if any(i.name == "seqlens_k" for i in sess.get_inputs()):  # the ort flavour: lengths, no mask of ours
        feeds |= {"seqlens_k": np.array([len(ids) - 1], np.int32),
                  "total_sequence_length": np.array(len(ids), np.int32)}
    return sess.run(["logits"], {"input_ids": np.array([ids], np.int64)} | feeds)[0][0]


def test_smollm2_with_its_blocks_kept_is_the_file_s_own_weights(smollm2_blocks, smollm2_model):
    """Q4_1 linear layers as MatMulNBits (+ the block-sum correction), the Q8_0 embedding table as
    GatherBlockQuantized; logits as transformers' on the dequantized weights, >= 60 dB against the float32
    import of the same file, greedy tokens as transformers'."""
    graph = onnx.load(str(smollm2_blocks / "base.onnx"), load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    # q/k/v and gate/up packed: one MatMulNBits each; gate/up split back per module (a Split naming its modules),
    # q/k/v read packed by the attention, which records the Split a compile puts back
    assert ops["MatMulNBits"] == 4 * 30 and ops["GatherBlockQuantized"] == 1
    packed = [json.loads(n.doc_string.split(" ", 1)[1])["modules"] for n in graph.node if n.op_type == "Split"]
    assert len(packed) == 30 and packed[0] == [f"model.layers.0.mlp.{m}_proj" for m in ("gate", "up")]
    qkv = [json.loads(json.loads(n.doc_string.split(" ", 1)[1])["doc"].split(" ", 1)[1])["modules"]
           for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(qkv) == 30 and qkv[0] == [f"model.layers.0.self_attn.{m}_proj" for m in "qkv"]
    assert ops["GroupQueryAttention"] == 30 and not ops["Softmax"]  # the default import's graph: ort
    made = json.loads((smollm2_blocks / "chat.json").read_text())
    assert (made["weights"], made["graph"], made["packed_attention"]) == ("blocks", "ort", True)
    size = (smollm2_blocks / "base.onnx.data").stat().st_size
    # the 4-bit layers and the 8-bit table at an eighth and a quarter of float32; the tied head is float32 at
    # accuracy level 0 (an 8-bit MatMulNBits below level 4 has no fast kernel): 35 % of the float import in all
    assert size < 0.4 * (smollm2_model / "base.onnx.data").stat().st_size
    blocks, floats = _session(str(smollm2_blocks / "base.onnx")), _session(str(smollm2_model / "base.onnx"))
    for p in REF["prompts"]:
        got, ref = _prefill(blocks, p["input_ids"]), _prefill(floats, p["input_ids"])
        sqnr = 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((got - ref).astype(np.float64) ** 2))
        assert sqnr >= 60.0, (p["name"], sqnr)
        assert got.argmax(-1).tolist() == p["argmax_per_position"], p["name"]
        want = NPZ[p["logits_last_npz_key"]]
        assert np.abs(got[-1] - want).max() / np.abs(want).max() < 1e-4, p["name"]


def test_adapters_on_a_blocks_base_generate_as_peft(smollm2_blocks, tmp_path):
    """LoRA attaches to the MatMulNBits ops by their PEFT module paths: greedy answers under each shipped adapter
    equal transformers + PEFT's (where the margin is safe)."""
    from lora_runtime.demo_llm import shipped_adapters

    adapters = shipped_adapters()
    b = compile_bundle(smollm2_blocks / "base.onnx", adapters, tmp_path / "b", generation="v3",
                       use_cases=["base="] + [f"{a}={a}" for a in adapters])
    assert b.manifest.base.blocks == "120 MatMulNBits 4-bit, 1 GatherBlockQuantized 8-bit"  # q/k/v, gate/up packed
    # o/down are MatMulNBits, the tied lm_head (signoff) a MatMul; q, v (listify) and gate, up (caps) are slices of
    # the packed ops
    kinds = {p.module.rsplit(".", 1)[-1]: p.op_type for p in b.manifest.points}
    assert kinds == {"o_proj": "MatMulNBits", "down_proj": "MatMulNBits", "q_proj": "packed slice",
                     "v_proj": "packed slice", "gate_proj": "packed slice", "up_proj": "packed slice",
                     "lm_head": "MatMul"}, kinds
    rt, chat = Runtime.open(b.path), Chat.load(b.path)
    ad = REF["adapters"]
    checked = 0
    for use_case, outputs in [("base", ad["base"])] + [(a, v["prompts"]) for a, v in ad["adapters"].items()]:
        rt.switch(use_case)
        for o in outputs:
            if o["greedy_min_margin"] < 0.02:
                continue
            want = [t for t in o["greedy_tokens"][:12] if t != ad["greedy"]["stop_after_eos"]]
            g = generate(rt, chat, o["input_ids"], max_new_tokens=12)
            assert g.ids[: len(want)] == want, (use_case, o["question"], chat.decode(g.ids))
            checked += 1
    assert checked >= 6


def test_what_needs_float_weights_is_refused_on_a_blocks_base(smollm2_blocks, smollm2_model, tmp_path):
    """--encodings (and --target htp, --base-weights int8, modules_to_save) read float weights: one line naming the
    base and the way out, nothing written; merge of a blocks bundle likewise; calibration-data of its ort graph."""
    from lora_runtime.compiler.options import WeightOnlyOptions
    from lora_runtime.demo_llm import shipped_adapters
    from lora_runtime.describe import base_dtype
    from lora_runtime.errors import InputError
    from lora_runtime.export import merge_use_case
    from lora_runtime.llm import calibration_data

    listify = {"listify": shipped_adapters()["listify"]}
    base = smollm2_blocks / "base.onnx"
    with pytest.raises(InputError, match="ort-graph import .* --graph standard"):
        calibration_data(smollm2_blocks, tmp_path / "ort.npz", samples=2, seq_len=16)
    assert not (tmp_path / "ort.npz").exists()
    calib = calibration_data(smollm2_model, tmp_path / "calib.npz", samples=2, seq_len=16)
    with pytest.raises(BaseModelError, match=r"base\.onnx: the base keeps the GGUF's quantized blocks .* --weights "
                                             r"float32"):
        compile_bundle(base, listify, tmp_path / "q", CompileOptions(
            "v3", quant=QuantOptions("non-updatable", calib, preset="w8a16")))
    assert not (tmp_path / "q").exists()
    i4 = compile_bundle(base, listify, tmp_path / "i4", CompileOptions("v3", weight_only=WeightOnlyOptions.of("int4")))
    assert i4.manifest.weight_only.weights == 1  # the float32 tied head; the Q4_1 blocks stay as the file holds them
    assert base_dtype(i4.manifest) == "int4 (its float layers) with GGUF blocks kept (" + i4.manifest.base.blocks + ")"
    acc = i4.manifest.accuracy_of("float32_bundle")  # no calibration samples: an LLM is measured on chat prompts
    assert acc.inputs == "4 held-out chat prompts" and acc.greedy == "4 prompts x 16 tokens"
    assert 15.0 < acc.sqnr_db["listify"] < 60.0 and 0.5 < acc.argmax_agreement["listify"] <= 1.0  # the head alone
    assert 0.0 <= acc.greedy_agreement["listify"] <= 1.0
    b = compile_bundle(base, listify, tmp_path / "b", generation="v3")
    with pytest.raises(UseCaseError, match="quantized blocks"):
        merge_use_case(b, tmp_path / "merged.onnx", use_case="listify")
    assert not (tmp_path / "merged.onnx").exists()
