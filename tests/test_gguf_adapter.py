"""GGUF LoRA adapters (llama.cpp's format) in: a PEFT folder converted the way llama.cpp's convert_lora_to_gguf.py
converts it compiles to the same logits as the folder itself, on a GGUF-imported base (q/k un-permuted, GQA) and on
the real SmolLM2 with its shipped adapter; what is not a plain llama LoRA adapter is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from test_gguf import _write_gguf  # noqa: E402
from test_llama_graph import SHAPE  # noqa: E402

from lora_runtime import Runtime, compile_bundle, load_adapter  # noqa: E402
from lora_runtime.cli import main  # noqa: E402
from lora_runtime.errors import AdapterError, BaseModelError  # noqa: E402
from lora_runtime.models.gguf import build_from_gguf  # noqa: E402
from lora_runtime.tensorfile import read_header, save_tensors  # noqa: E402

Q = gguf.GGMLQuantizationType


def permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, restated (rows of an (out, ...) tensor)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def peft_to_gguf(folder, out, *, n_head: int, n_kv_head: int, n_layers: int, outtype: str = "f32",
                 kv: dict | None = None, extra: dict | None = None, drop: tuple[str, ...] = ()) -> None:
    """llama.cpp's convert_lora_to_gguf.py on a PEFT folder, restated without torch.

    Names: get_base_tensor_name (strip ``base_model.model.``, ``.lora_A/B.weight`` -> ``.weight``), then the LLAMA
    tensor map. q/k: LlamaModel.modify_tensors permutes the LoraTorchTensor, whose permute() permutes B's rows and
    leaves A (q with n_head, k with n_kv_head). Metadata: general.type=adapter, adapter.type=lora,
    adapter.lora.alpha (float32). Types: --outtype f32/f16/bf16/q8_0, Q8_0 falling back to F16 where it cannot.
    ``kv`` / ``extra`` / ``drop``: metadata and tensors changed, for the refusals."""
    lparams = json.loads((folder / "adapter_config.json").read_text())
    tf = read_header(folder / "adapter_model.safetensors")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    w = gguf.GGUFWriter(str(out), "llama")
    meta = {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": float(lparams["lora_alpha"])}
    meta.update(kv or {})
    for key, value in meta.items():
        if value is None:
            continue
        (w.add_float32 if isinstance(value, float) else w.add_string)(key, value)
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]
    tensors = {}
    for key in tf.entries:
        if not key.endswith(".lora_A.weight"):
            continue
        base = key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
        a = tf.read(key, float32=True)
        b = tf.read(key.replace(".lora_A.", ".lora_B."), float32=True)
        if base.endswith("q_proj.weight"):
            b = permute(b, n_head, n_head)
        elif base.endswith("k_proj.weight"):
            b = permute(b, n_head, n_kv_head)
        dest = names.get_name(base, try_suffixes=(".weight", ".bias"))
        tensors[dest + ".lora_a"], tensors[dest + ".lora_b"] = a, b
    tensors.update(extra or {})
    for name, value in tensors.items():
        if name in drop:
            continue
        if isinstance(value, tuple):  # (raw data, type): written as given
            w.add_tensor(name, value[0], raw_dtype=value[1])
            continue
        t = qtype
        try:
            data = gguf.quants.quantize(value, t)
        except gguf.QuantError:
            t, data = Q.F16, gguf.quants.quantize(value, Q.F16)
        w.add_tensor(name, data, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A llama GGUF (permuted q/k, 4 heads, 2 KV heads) imported with a KV cache, and a PEFT adapter on q/k/v/o and
    down (rank_pattern: k at rank 2) converted to GGUF."""
    d = tmp_path_factory.mktemp("gguf_adapter")
    _write_gguf(d / "base.gguf", Q.F32, tied=False)
    base, _ = build_from_gguf(d / "base.gguf", d / "model", kv_cache=True, max_seq=SHAPE.max_seq)
    nokv, _ = build_from_gguf(d / "base.gguf", d / "nokv", kv_cache=False, max_seq=SHAPE.max_seq)
    peft = d / "peft"
    peft.mkdir()
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
              "down_proj"], "rank_pattern": {"k_proj": 2}}
    (peft / "adapter_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(11)
    hd, tensors = SHAPE.d_model // SHAPE.n_heads, {}
    outs = {"q_proj": SHAPE.n_heads * hd, "k_proj": SHAPE.n_kv_heads * hd, "v_proj": SHAPE.n_kv_heads * hd,
            "o_proj": SHAPE.d_model, "down_proj": SHAPE.d_model}
    for i in range(SHAPE.n_layers):
        for m, out in outs.items():
            key = f"base_model.model.model.layers.{i}.{'mlp' if m == 'down_proj' else 'self_attn'}.{m}"
            r, d_in = (2 if m == "k_proj" else 4), (SHAPE.d_ff if m == "down_proj" else SHAPE.d_model)
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((r, d_in)) / np.sqrt(d_in)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((out, r)) * 0.3).astype(np.float32)
    save_tensors(peft / "adapter_model.safetensors", tensors)

    def convert(name: str, **kw):
        out = d / f"{name}.gguf"
        peft_to_gguf(peft, out, n_head=SHAPE.n_heads, n_kv_head=SHAPE.n_kv_heads, n_layers=SHAPE.n_layers, **kw)
        return out

    return {"dir": d, "base": base, "nokv": nokv, "peft": peft, "gguf": convert("a"), "convert": convert}


def _logits(bundle, ids: np.ndarray, kv_heads: int, head_dim: int, use_case: str = "a") -> np.ndarray:
    rt = Runtime.open(bundle)
    rt.switch(use_case)
    empty = np.zeros((1, kv_heads, 0, head_dim), np.float32)
    feeds = {"input_ids": ids} | {n: empty for n in rt.input_names if n.startswith("past_")}
    return rt.run(feeds)["logits"]


def test_gguf_adapter_loads_as_its_peft_folder(tiny):
    """Un-permuted B, untouched A, the same per-module rank and scaling (alpha / rank): bit for bit in F32."""
    peft = load_adapter(tiny["peft"])
    got = load_adapter(tiny["gguf"], base=tiny["base"])
    assert got.name == "a" and [p.module for p in got.pairs] == [p.module for p in peft.pairs]
    for p, g in zip(peft.pairs, got.pairs, strict=True):
        np.testing.assert_array_equal(g.a, p.a)
        np.testing.assert_array_equal(g.b, p.b)
        assert (g.rank, g.scaling, g.dtype) == (p.rank, p.scaling, "F32"), p.module
    stored = gguf.GGUFReader(str(tiny["gguf"]))
    q_b = next(t for t in stored.tensors if t.name == "blk.0.attn_q.weight.lora_b")
    q = peft.pair("model.layers.0.self_attn.q_proj").b
    assert not np.array_equal(np.asarray(q_b.data).reshape(q.shape), q)  # the file holds permuted rows
    assert got.config.extra["rotary_head_dim"] == SHAPE.d_model // SHAPE.n_heads


@pytest.mark.parametrize("generation", ["v1", "v2", "v3"])
def test_gguf_and_peft_bundles_give_the_same_logits(tiny, tmp_path, generation):
    ids = np.random.default_rng(3).integers(0, SHAPE.vocab, (1, 7), dtype=np.int64)
    out = {}
    for kind, src in (("peft", tiny["peft"]), ("gguf", tiny["gguf"])):
        b = compile_bundle(tiny["base"], {"a": src}, tmp_path / kind, generation=generation, use_cases=["a=a"])
        out[kind] = _logits(b.path, ids, SHAPE.n_kv_heads, SHAPE.d_model // SHAPE.n_heads)
    base = compile_bundle(tiny["base"], {"a": tiny["peft"]}, tmp_path / "base", generation=generation,
                          use_cases=["base="])
    assert np.abs(out["peft"] - _logits(base.path, ids, SHAPE.n_kv_heads, 8, "base")).max() > 1e-2  # it matters
    np.testing.assert_allclose(out["gguf"], out["peft"], atol=1e-5, rtol=0)


def test_cli_compiles_a_gguf_adapter(tiny, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["compile", "--base", str(tiny["base"]), "--adapter", str(tiny["gguf"]), "--adapter",
                 f"p={tiny['peft']}", "--generation", "v3", "-o", str(out)]) == 0
    ids = np.random.default_rng(4).integers(0, SHAPE.vocab, (1, 5), dtype=np.int64)
    rt = Runtime.open(out)
    empty = np.zeros((1, SHAPE.n_kv_heads, 0, 8), np.float32)
    feeds = {"input_ids": ids} | {n: empty for n in rt.input_names if n.startswith("past_")}
    rt.switch("a")
    a = rt.run(feeds)["logits"]
    rt.switch("p")
    np.testing.assert_allclose(a, rt.run(feeds)["logits"], atol=1e-5, rtol=0)


def test_16_bit_and_q8_0_adapters_load_what_the_file_holds(tiny):
    peft = load_adapter(tiny["peft"])
    for outtype in ("f16", "bf16", "q8_0"):
        got = load_adapter(tiny["convert"](outtype, outtype=outtype), base=tiny["base"])
        for p, g in zip(peft.pairs, got.pairs, strict=True):
            for mine, theirs in ((g.a, p.a), (g.b, p.b)):
                t = {"bf16": Q.BF16, "q8_0": Q.Q8_0 if theirs.shape[1] % 32 == 0 else Q.F16}.get(outtype, Q.F16)
                want = gguf.quants.dequantize(gguf.quants.quantize(theirs, t), t).reshape(theirs.shape)
                np.testing.assert_array_equal(mine, want)  # rounding is per element or per row block: permutation
            assert g.scaling == p.scaling  # of whole rows commutes with it
        assert {g.dtype for g in got.pairs} == {"f16": {"F16"}, "bf16": {"BF16"}, "q8_0": {"Q8_0", "F16"}}[outtype]


def test_head_size_comes_from_the_base_or_is_given(tiny, tmp_path):
    """A base without a KV cache does not tell its head size: a q/k adapter is refused unless head_dim is given."""
    with pytest.raises(AdapterError, match=r"a\.gguf: tensor blk\.0\.attn_k\.weight\.lora_b: .* no KV-cache inputs"):
        compile_bundle(tiny["nokv"], {"a": tiny["gguf"]}, tmp_path / "x", generation="v3")
    assert not (tmp_path / "x").exists()
    with pytest.raises(AdapterError, match="give head_dim="):
        load_adapter(tiny["gguf"])
    given = load_adapter(tiny["gguf"], head_dim=8)
    ids = np.random.default_rng(5).integers(0, SHAPE.vocab, (1, 6), dtype=np.int64)
    out = [_logits(compile_bundle(tiny["nokv"], [a], tmp_path / n, generation="v2").path, ids, 2, 8)
           for n, a in (("g", given), ("p", load_adapter(tiny["peft"], "a")))]
    np.testing.assert_allclose(out[0], out[1], atol=1e-5, rtol=0)
    only_v = tiny["convert"]("v_only", drop=tuple(f"blk.{i}.attn_{x}.weight.lora_{h}" for i in range(2)
                                                   for x in "qk" for h in "ab"))
    assert load_adapter(only_v).pair("model.layers.0.self_attn.v_proj") is not None  # nothing to un-permute


NAN = np.full((4, 32), np.nan, np.float32)
REFUSALS = [
    ({"kv": {"general.type": "model"}}, "general.type is 'model', not 'adapter'"),
    ({"kv": {"adapter.lora.alpha": None}}, "adapter.lora.alpha is missing"),
    ({"kv": {"adapter.type": "control_vector"}}, "adapter.type is 'control_vector'"),
    ({"extra": {"blk.0.attn_qkv.weight.lora_a": np.zeros((4, 32), np.float32),
                "blk.0.attn_qkv.weight.lora_b": np.zeros((96, 4), np.float32)}},
     "tensor blk.0.attn_qkv.weight.lora_a/b: no module of a llama base"),
    ({"extra": {"rope_freqs.weight.lora_a": np.zeros((4, 32), np.float32)}},
     "tensor rope_freqs.weight.lora_a/b: no module"),
    ({"extra": {"blk.0.attn_norm.weight": np.ones((1, 32), np.float32)}}, "'blk.0.attn_norm.weight': a norm weight"),
    ({"extra": {"token_embd.weight.lora_a": np.zeros((4, 50), np.float32),
                "token_embd.weight.lora_b": np.zeros((32, 4), np.float32)}}, "embedding LoRA"),
    ({"extra": {"blk.1.attn_v.weight.lora_b": np.zeros((16, 3), np.float32)}},
     r"blk.1.attn_v.weight.lora_a (4, 32) and .lora_b (16, 3) disagree on the rank"),
    ({"drop": ("blk.1.ffn_down.weight.lora_b",)}, "tensor blk.1.ffn_down.weight.lora_b is missing"),
    ({"extra": {"blk.0.attn_q.weight.lora_b": np.zeros((30, 4), np.float32)}},
     "'blk.0.attn_q.weight.lora_b' has 30 rows, not a whole number of heads of the base's head size 8"),
    ({"extra": {"blk.0.attn_v.weight.lora_a": NAN}}, "'blk.0.attn_v.weight.lora_a' holds NaN"),
    ({"extra": {"blk.0.attn_v.weight.lora_a": (gguf.quants.quantize(np.ones((4, 32), np.float32), Q.Q4_0), Q.Q4_0)}},
     "'blk.0.attn_v.weight.lora_a' has type Q4_0"),
]


@pytest.mark.parametrize(("change", "message"), REFUSALS)
def test_refusals_are_one_line_errors_naming_the_file_and_tensor(tiny, tmp_path, capsys, change, message):
    bad = tmp_path / "bad.gguf"
    peft_to_gguf(tiny["peft"], bad, n_head=SHAPE.n_heads, n_kv_head=SHAPE.n_kv_heads, n_layers=SHAPE.n_layers,
                 **change)
    with pytest.raises(AdapterError) as e:
        load_adapter(bad, base=tiny["base"])
    assert str(e.value).startswith(f"{bad}: ") and message in str(e.value)
    out = tmp_path / "b"
    assert main(["compile", "--base", str(tiny["base"]), "--adapter", f"x={bad}", "--generation", "v3", "-o",
                 str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_an_adapter_for_another_base_is_a_one_line_error(tiny, tmp_path, capsys):
    bad = tmp_path / "wide.gguf"
    peft_to_gguf(tiny["peft"], bad, n_head=SHAPE.n_heads, n_kv_head=SHAPE.n_kv_heads, n_layers=SHAPE.n_layers,
                 extra={"blk.0.attn_v.weight.lora_a": np.zeros((4, 48), np.float32)})
    assert main(["compile", "--base", str(tiny["base"]), "--adapter", f"w={bad}", "--generation", "v1", "-o",
                 str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "adapter 'w'" in err and "model.layers.0.self_attn.v_proj" in err and "in=32" in err
    assert err.count("\n") == 1 and not (tmp_path / "b").exists()


def test_other_architectures_and_files_are_refused(tiny, tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "qwen2")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    w.add_tensor("blk.0.attn_v.weight.lora_a", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(AdapterError, match="general.architecture is 'qwen2'; only llama"):
        load_adapter(tmp_path / "q.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF not really")
    with pytest.raises(AdapterError, match="junk.gguf: not a readable GGUF file"):
        load_adapter(tmp_path / "junk.gguf")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(AdapterError, match="neither a PEFT adapter folder nor a GGUF"):
        load_adapter(tmp_path / "notes.txt")
    with pytest.raises(BaseModelError, match="base model not found"):
        compile_bundle(tmp_path / "missing.onnx", {"a": tiny["gguf"]}, tmp_path / "x", generation="v3")


def test_alpha_zero_is_scale_one_as_llama_cpp(tiny, tmp_path):
    """llama_adapter_lora_weight::get_scale: alpha 0 means scale 1, whatever the rank."""
    path = tmp_path / "z.gguf"
    peft_to_gguf(tiny["peft"], path, n_head=SHAPE.n_heads, n_kv_head=SHAPE.n_kv_heads, n_layers=SHAPE.n_layers,
                 kv={"adapter.lora.alpha": 0.0})
    got = load_adapter(path, base=tiny["base"])
    assert {p.scaling for p in got.pairs} == {1.0} and {p.rank for p in got.pairs} == {2, 4}


@pytest.fixture(scope="module")
def smollm2(smollm2_model):
    from lora_runtime.llm import find_smollm2
    from lora_runtime.models.gguf import open_gguf

    return smollm2_model, open_gguf(find_smollm2()).shape


@pytest.mark.parametrize("generation", ["v1", "v2", "v3"])
def test_real_model_shipped_adapter_as_gguf(smollm2, tmp_path, generation):
    """SmolLM2-135M from its GGUF with the shipped listify (r8 q/v, all 30 layers) converted to GGUF."""
    from lora_runtime.demo_llm import shipped_adapters

    model, shape = smollm2
    folder = shipped_adapters()["listify"]
    path = tmp_path / "listify.gguf"
    peft_to_gguf(folder, path, n_head=shape.n_heads, n_kv_head=shape.n_kv_heads, n_layers=shape.n_layers)
    ids = np.array([[1, 9690, 198, 2683, 359, 253, 5356, 314, 4235]], np.int64)
    out = {}
    for kind, src in (("peft", folder), ("gguf", path)):
        b = compile_bundle(model / "base.onnx", {"listify": src}, tmp_path / kind, generation=generation,
                           use_cases=["listify=listify"])
        out[kind] = _logits(b.path, ids, shape.n_kv_heads, shape.d_model // shape.n_heads, "listify")
    np.testing.assert_allclose(out["gguf"], out["peft"], atol=1e-5, rtol=0)
