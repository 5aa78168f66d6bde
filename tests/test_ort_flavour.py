"""The ort graph flavour (``import-model --graph ort``): ONNX Runtime's GroupQueryAttention in place of the standard
attention, against the numpy forward of the same weights; its KV cache updated in place through the runtime
(buffers bound once) against the standard graph's growing cache; what it does not take, refused."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_llama_graph import SHAPE, _numpy_forward, _weights

from lora_runtime import Runtime, compile_bundle
from lora_runtime.compiler.options import CompileOptions
from lora_runtime.errors import BaseModelError
from lora_runtime.llm.cache import GrowingCache, InPlaceCache, make_cache
from lora_runtime.models.llama import FLAVOUR, build_llama
from lora_runtime.tensorfile import save_tensors

S16 = dataclasses.replace(SHAPE, d_model=64)  # head size 16: GroupQueryAttention's CPU kernel needs a multiple of 16


def _lengths(held: int, t: int) -> dict[str, np.ndarray]:
    return {"seqlens_k": np.array([held + t - 1], np.int32), "total_sequence_length": np.array(held + t, np.int32)}


def test_ort_flavour_matches_numpy_in_chunks_and_steps():
    """A 5-token prefill, a 4-token continuation (a chat's next turn) and 3 one-token steps: the logits of the
    numpy forward of the whole sequence."""
    weights, w = _weights()
    model = build_llama(S16, weights, kv_cache=True, flavour="ort")
    assert sum(n.op_type == "GroupQueryAttention" for n in model.graph.node) == S16.n_layers
    assert {p.key: p.value for p in model.metadata_props}[FLAVOUR] == "ort"
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(4).integers(0, S16.vocab, (1, 12), dtype=np.int64)
    names = [o.name for o in sess.get_outputs()]
    past = {i.name: np.zeros((1, S16.n_kv_heads, 0, S16.head_dim), np.float32)
            for i in sess.get_inputs() if i.name.startswith("past_")}
    got, held = [], 0
    for t in (5, 4, 1, 1, 1):
        out = dict(zip(names, sess.run(None, {"input_ids": ids[:, held:held + t]} | past | _lengths(held, t))))
        got.append(out["logits"])
        past = {n.replace("present_", "past_"): v for n, v in out.items() if n.startswith("present_")}
        held += t
    np.testing.assert_allclose(np.concatenate(got, 1), _numpy_forward(ids, w, S16), atol=2e-4, rtol=1e-4)


def test_ort_flavour_refuses_what_it_cannot_build_and_auto_falls_back():
    weights, _ = _weights()
    with pytest.raises(BaseModelError, match="multiple of 16.*this one is 8"):
        build_llama(SHAPE, weights, kv_cache=True, flavour="ort")
    with pytest.raises(BaseModelError, match="static cache"):
        build_llama(S16, weights, kv_cache=True, static_cache=8, flavour="ort")
    auto = build_llama(SHAPE, weights, kv_cache=True, flavour="auto")  # head size 8: the standard graph
    assert {p.key: p.value for p in auto.metadata_props}[FLAVOUR] == "standard"
    assert not any(n.op_type == "GroupQueryAttention" for n in auto.graph.node)


def _base(tmp_path, flavour):
    weights, w = _weights()
    path = tmp_path / flavour / "base.onnx"
    path.parent.mkdir()
    onnx.save(build_llama(S16, weights, kv_cache=True, flavour=flavour), str(path))
    return path, w


def _adapter(tmp_path, w, modules=("q_proj", "v_proj"), rank=4, seed=9):
    """A PEFT folder: rank ``rank`` on ``modules`` (attention's or the MLP's) of both layers."""
    rng = np.random.default_rng(seed)
    folder = tmp_path / "_".join(modules)
    folder.mkdir()
    tensors = {}
    for i in range(S16.n_layers):
        for m in modules:
            sub = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            d_in, d_out = w[f"model.layers.{i}.{sub}.{m}.weight"].shape
            key = f"base_model.model.model.layers.{i}.{sub}.{m}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, d_in)) * 0.3).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((d_out, rank)) * 0.3).astype(np.float32)
    save_tensors(folder / "adapter_model.safetensors", tensors)
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(modules)}))
    return folder


def test_in_place_cache_through_the_runtime_equals_the_standard_graph(tmp_path):
    """v3 bundles of both flavours with one adapter: prefill, a truncated cache continued (a chat turn kept by
    PromptCache), one-token steps, a chunk again after them; the in-place cache's buffers are the ones the graph
    wrote into."""
    ort_base, w = _base(tmp_path, "ort")
    std_base, _ = _base(tmp_path, "standard")
    qv = _adapter(tmp_path, w)
    rts = {k: Runtime.open(compile_bundle(b, {"qv": qv}, tmp_path / f"b-{k}", generation="v3",
                                          use_cases=["qv=qv"]).path) for k, b in (("ort", ort_base), ("std", std_base))}
    ids = [int(x) for x in np.random.default_rng(5).integers(0, S16.vocab, 14)]
    caches = {"ort": make_cache(rts["ort"].input_shapes, S16.max_seq), "std": make_cache(rts["std"].input_shapes)}
    assert isinstance(caches["ort"], InPlaceCache) and isinstance(caches["std"], GrowingCache)
    logits = {}
    for k, kv in caches.items():
        run = rts[k].run
        got = [kv.step(run, ids[:6])]
        kv.truncate(4)  # the next turn keeps a prefix, then runs what follows it
        got += [kv.step(run, ids[4:9])] + [kv.step(run, [t]) for t in ids[9:14]]
        kv.truncate(11)  # from one-token steps back to a chunk (its output shapes held apart), then a step
        got += [kv.step(run, ids[11:13]), kv.step(run, ids[13:14])]
        logits[k] = np.concatenate(got)
    np.testing.assert_allclose(logits["ort"], logits["std"], atol=2e-4, rtol=1e-4)
    # the graph wrote the keys into the bound buffer itself: equal to the growing cache's (rows 0..13)
    buf = caches["ort"]._buffers["past_key.0"].numpy()
    np.testing.assert_allclose(buf[:, :, :14], caches["std"]._past["past_key.0"], atol=1e-5)
    assert buf.shape[2] == S16.max_seq



def test_the_base_path_writes_the_in_place_cache_like_the_flat_graph(tmp_path):
    """A v3 bundle's base path (every strength 0) and its branches run inside an If: both must write the bound
    KV buffers in place, as the flat graph does, and the base path must give the plain base graph's logits."""
    ort_base, w = _base(tmp_path, "ort")
    qv = _adapter(tmp_path, w)
    rts = {k: Runtime.open(compile_bundle(ort_base, {"qv": qv}, tmp_path / f"b-{k}", CompileOptions(
        "v3", base_path=k == "gated"), use_cases=["qv=qv", "base="]).path) for k in ("gated", "flat")}
    assert rts["gated"].manifest.target.base_path and not rts["flat"].manifest.target.base_path
    g = onnx.load(str(rts["gated"].bundle.file("model.onnx")), load_external_data=False).graph
    base_path = next(a.g for a in g.node[-1].attribute if a.name == "else_branch")
    attention = [n for n in base_path.node if n.op_type == "GroupQueryAttention"]
    assert attention and all(n.input[1:3] == ["", ""] for n in attention)  # the base path feeds q/k/v packed
    ids = [int(x) for x in np.random.default_rng(6).integers(0, S16.vocab, 9)]
    plain = ort.InferenceSession(str(ort_base), providers=["CPUExecutionProvider"])
    names = [o.name for o in plain.get_outputs()]
    for u in ("base", "qv"):
        logits, buffers = {}, {}
        for k, rt in rts.items():
            rt.switch(u)
            kv = make_cache(rt.input_shapes, S16.max_seq)
            logits[k] = np.concatenate([kv.step(rt.run, ids[:5])] + [kv.step(rt.run, [t]) for t in ids[5:]])
            buffers[k] = kv._buffers["past_key.1"].numpy()[:, :, :len(ids)].copy()
        np.testing.assert_allclose(logits["gated"], logits["flat"], atol=1e-5, rtol=0, err_msg=u)
        np.testing.assert_allclose(buffers["gated"], buffers["flat"], atol=1e-6, rtol=0, err_msg=u)
        assert np.abs(buffers["gated"]).max() > 0  # the graph wrote the keys there
    # the base path against the plain base graph, fed its own growing cache (one prefill of all the ids)
    feeds = {"input_ids": np.array([ids], np.int64), **_lengths(0, len(ids))}
    for i in plain.get_inputs():
        if i.name.startswith("past_"):
            feeds[i.name] = np.zeros((1, S16.n_kv_heads, 0, S16.head_dim), np.float32)
    rts["gated"].switch("base")
    kv = make_cache(rts["gated"].input_shapes, S16.max_seq)
    np.testing.assert_allclose(kv.step(rts["gated"].run, ids), dict(zip(names, plain.run(names, feeds)))["logits"][0],
                               atol=1e-5, rtol=0)


def test_attention_reads_q_k_v_packed_where_no_branch_sits_between(tmp_path):
    """An adapter on o_proj only: no branch on q/k/v, so the bundle feeds attention the packed q/k/v (no Split);
    its logits equal the standard graph's bundle of the same adapter (plain attention ops, a growing cache)."""
    ort_base, w = _base(tmp_path, "ort")
    std_base, _ = _base(tmp_path, "standard")
    o = _adapter(tmp_path, w, ("o_proj",))
    rts = {k: Runtime.open(compile_bundle(b, {"o": o}, tmp_path / f"b-{k}", CompileOptions("v3", base_path=False),
                                          use_cases=["o=o"]).path) for k, b in (("ort", ort_base), ("std", std_base))}
    g = onnx.load(str(rts["ort"].bundle.file("model.onnx")), load_external_data=False).graph
    attention = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == S16.n_layers and all(n.input[1:3] == ["", ""] for n in attention)
    assert not [n for n in g.node if n.op_type == "Split" and "qkv" in n.name]
    ids = [int(x) for x in np.random.default_rng(8).integers(0, S16.vocab, 10)]
    logits = {}
    for k, rt in rts.items():
        kv = make_cache(rt.input_shapes, S16.max_seq)
        logits[k] = np.concatenate([kv.step(rt.run, ids[:6])] + [kv.step(rt.run, [t]) for t in ids[6:]])
    np.testing.assert_allclose(logits["ort"], logits["std"], atol=2e-4, rtol=1e-4)

def test_an_ort_flavour_base_refuses_static_shapes(tmp_path):
    ort_base, w = _base(tmp_path, "ort")
    with pytest.raises(BaseModelError, match="fused graph .* --graph standard"):
        compile_bundle(ort_base, {"qv": _adapter(tmp_path, w)}, tmp_path / "b",
                       CompileOptions("v3", static_shapes={"sequence": 4}))
    assert not (tmp_path / "b").exists()


def test_an_ort_flavour_base_packs_qkv_and_gate_up_and_merge_refuses_their_slices(tmp_path):
    """One MatMul per packed group (q/k/v, gate/up), split back per module; LoRA on q/v attaches to the slices
    (equal to the standard graph: the test above); merge, which rewrites whole weights, refuses them in one line."""
    from lora_runtime.errors import UseCaseError
    from lora_runtime.export import merge_use_case
    from lora_runtime.models.packing import unpack_qkv

    ort_base, w = _base(tmp_path, "ort")
    g = onnx.load(str(ort_base)).graph
    attention = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == S16.n_layers and all(list(n.input[1:3]) == ["", ""] for n in attention)  # read packed
    assert [n.op_type for n in g.node if n.output[0] in {a.input[0] for a in attention}] == ["MatMul"] * S16.n_layers
    assert sum(n.op_type == "Split" for n in g.node) == S16.n_layers  # gate/up only
    assert {t.name for t in g.initializer} <= {i for n in g.node for i in n.input}  # no q/k/v sizes left unread
    assert sum(n.op_type == "MatMul" for n in g.node) == 4 * S16.n_layers + 1  # qkv, o, gate_up, down; lm_head
    assert unpack_qkv(g) == S16.n_layers  # what a compile does first: every module's slice a tensor again
    splits = [n for n in g.node if n.op_type == "Split"]
    assert len(splits) == 2 * S16.n_layers and all(n.doc_string.startswith("lora_runtime.packed ") for n in splits)
    assert all(list(n.input[:3]) == list(s.output) for n, s in zip(
        [n for n in g.node if n.op_type == "GroupQueryAttention"], [s for s in splits if "qkv" in s.input[0]]))
    b = compile_bundle(ort_base, {"qv": _adapter(tmp_path, w)}, tmp_path / "b", generation="v2", use_cases=["qv=qv"])
    assert {p.op_type for p in b.manifest.points} == {"packed slice"}
    with pytest.raises(UseCaseError, match=r"slices of packed ops .* --graph standard"):
        merge_use_case(b, tmp_path / "merged.onnx", use_case="qv")
    assert not (tmp_path / "merged.onnx").exists()


def test_v3_puts_one_branch_on_each_packed_op_equal_to_the_standard_graph_s_per_module_branches(tmp_path):
    """v3 on the ort flavour: the modules of a packed op (q/v of q/k/v, gate/up) share one branch on its whole
    output, B holding each module's B in its own rows (the Split before attention then dropped). Logits of every
    use-case, mixes included, equal the standard graph's bundle (one branch per module); the manifest still names
    each PEFT module, and the deltas read back from the packed slots are PEFT's ``scaling * B @ A``."""
    from safetensors.numpy import load_file

    from lora_runtime.describe import describe
    from lora_runtime.export import use_case_deltas

    ort_base, w = _base(tmp_path, "ort")
    std_base, _ = _base(tmp_path, "standard")
    adapters = {"qv": _adapter(tmp_path, w), "mlp": _adapter(tmp_path, w, ("gate_proj", "up_proj", "o_proj"), 2, 3),
                "q": _adapter(tmp_path, w, ("q_proj",), 6, 5)}
    cases = ["qv=qv", "mlp=mlp", "mix=qv:0.7,mlp:1.2,q:-0.5", "base="]
    rts = {k: Runtime.open(compile_bundle(b, adapters, tmp_path / f"b-{k}", CompileOptions("v3", base_path=False),
                                          use_cases=cases).path) for k, b in (("ort", ort_base), ("std", std_base))}
    m = rts["ort"].manifest
    q_out, k_out, v_out = (w[f"model.layers.0.self_attn.{x}_proj.weight"].shape[1] for x in "qkv")
    qkv = {p.module.rsplit(".", 1)[1]: p for p in m.points if p.module.startswith("model.layers.0.self_attn")}
    assert qkv["q_proj"].packed == qkv["v_proj"].packed == "model.layers.0.self_attn.qkv_packed"
    assert (qkv["q_proj"].rows, qkv["v_proj"].rows) == ((0, q_out), (q_out + k_out, q_out + k_out + v_out))
    assert [(c.adapter, c.start, c.stop) for c in qkv["q_proj"].columns] == [("qv", 0, 4), ("q", 4, 10)]
    assert [(c.adapter, c.start, c.stop) for c in qkv["v_proj"].columns] == [("qv", 10, 14)]
    assert qkv["o_proj"].packed is None  # a module of its own: its own branch
    slots = {s.name: s.shape for s in m.slots}
    assert slots["model.layers.0.self_attn.qkv_packed.lora_B.weight"] == (q_out + k_out + v_out, 14)
    assert slots["model.layers.0.mlp.gate_up_packed.lora_A.weight"] == (4, S16.d_model)
    assert not any("q_proj.lora" in n or "gate_proj.lora" in n for n in slots)
    g = onnx.load(str(rts["ort"].bundle.file("model.onnx")), load_external_data=False).graph
    attention = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == S16.n_layers and all(n.input[1:3] == ["", ""] for n in attention)  # fed packed
    assert sum(n.op_type == "Split" for n in g.node) == S16.n_layers  # gate/up's, after its branch
    assert sum(n.op_type == "Add" and n.name.endswith("lora/Add") for n in g.node) == 3 * S16.n_layers
    ids = [int(x) for x in np.random.default_rng(8).integers(0, S16.vocab, 10)]
    for u in ("qv", "mlp", "mix", "base"):
        logits = {}
        for k, rt in rts.items():
            rt.switch(u)
            kv = make_cache(rt.input_shapes, S16.max_seq)
            logits[k] = np.concatenate([kv.step(rt.run, ids[:6])] + [kv.step(rt.run, [t]) for t in ids[6:]])
        np.testing.assert_allclose(logits["ort"], logits["std"], atol=2e-4, rtol=1e-4, err_msg=u)
    strengths = m.use_case("mix").strengths
    deltas = use_case_deltas(rts["ort"].bundle, strengths)
    peft = {k: load_file(str(v / "adapter_model.safetensors")) for k, v in adapters.items()}
    for module in ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.up_proj"):
        want = sum(s * 2.0 * (t[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
                              @ t[f"base_model.model.{module}.lora_A.weight"])
                   for name, s in strengths.items() if f"base_model.model.{module}.lora_A.weight" in (t := peft[name]))
        np.testing.assert_allclose(deltas[module], want, atol=1e-5, err_msg=module)
    assert f"rows {q_out + k_out}:{q_out + k_out + v_out} of model.layers.0.self_attn.qkv_packed's branch" in describe(
        rts["ort"].bundle)
