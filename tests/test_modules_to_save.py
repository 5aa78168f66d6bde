"""modules_to_save: classifier heads (and any Linear an adapter saves whole) as slots of the use-case.

Real exports (both exporters) and real PEFT adapters from ``tests/fixtures/cls`` (tools/make_cls_fixtures.py): a BERT
``SEQ_CLS`` set (``cls_a``/``cls_b`` save the classifier, ``cls_b`` and ``pool`` the pooler's dense layer, ``plain``
nothing) and a ViT set (the classifier, and ``vit_b`` a MatMul + Add layer, ``vit.layers.1.mlp.fc2``). The expected
logits are PEFT's; these tests need neither torch nor PEFT.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import safetensors.numpy
from conftest import FIXTURES, switch_while_running

from lora_runtime import (
    AdapterError,
    AttachmentError,
    BundleError,
    Runtime,
    UseCaseError,
    compile_bundle,
    run_use_case,
)
from lora_runtime.cli import main
from lora_runtime.compiler.adapter import load_adapter
from lora_runtime.export import export_ort_adapter, merge_use_case

CLS = FIXTURES / "cls"
TOL = 1e-5
MODELS = [(f, e) for f in ("bert", "vit") for e in ("dynamo.onnx", "torchscript.onnx")]


def _cases(family: str) -> dict:
    return json.loads((CLS / family / "cases.json").read_text())


def _inputs(family: str) -> dict[str, np.ndarray]:
    with np.load(CLS / family / "inputs.npz") as z:
        return {k: z[k] for k in z.files}


def _expected(family: str) -> dict[str, np.ndarray]:
    with np.load(CLS / family / "expected.npz") as z:
        return {k: z[k] for k in z.files}


def _adapters(family: str) -> dict:
    return {p.name: p for p in sorted((CLS / family / "adapters").iterdir())}


def _specs(mixes: dict, generation: str) -> list[str]:
    return [f"{n}=" + ",".join(f"{a}:{s}" for a, s in mix.items()) for n, mix in mixes.items()
            if generation == "v3" or len(mix) <= 1]


_BUILT: dict[tuple[str, str, str], object] = {}


def _bundle(family: str, onnx_file: str, generation: str, root):
    key = (family, onnx_file, generation)
    if key not in _BUILT:
        _BUILT[key] = compile_bundle(CLS / family / onnx_file, _adapters(family),
                                     root / f"{family}-{onnx_file}-{generation}", generation=generation,
                                     use_cases=_specs(_cases(family)["use_cases"], generation))
    return _BUILT[key]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    _BUILT.clear()
    return tmp_path_factory.mktemp("cls")


# ---- the adapters as PEFT saved them -----------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "name"), [(f, n) for f in ("bert", "vit") for n in _cases(f)["adapters"]])
def test_saved_modules_load_from_peft_keys(family, name):
    info = _cases(family)["adapters"][name]
    folder = CLS / family / "adapters" / name
    a = load_adapter(folder)
    tensors = safetensors.numpy.load_file(str(folder / "adapter_model.safetensors"))
    assert [s.module for s in a.saved] == sorted(info["saved_modules"])
    assert [p.module for p in a.pairs] == info["modules"]
    for s in a.saved:  # PEFT's keys: base_model.model.<module>.weight / .bias (no modules_to_save infix)
        assert sorted(info["saved_modules"][s.module]) == [f"base_model.model.{s.module}.bias",
                                                           f"base_model.model.{s.module}.weight"]
        np.testing.assert_array_equal(s.weight, tensors[f"base_model.model.{s.module}.weight"])
        np.testing.assert_array_equal(s.bias, tensors[f"base_model.model.{s.module}.bias"])


# ---- every use-case against PEFT, every generation, both exporters ------------------------------------------------


@pytest.mark.parametrize("generation", ["v1", "v2", "v3"])
@pytest.mark.parametrize(("family", "onnx_file"), MODELS)
def test_switches_match_peft_and_restore_the_base(family, onnx_file, generation, root):
    bundle = _bundle(family, onnx_file, generation, root)
    expected, feeds = _expected(family), _inputs(family)
    names = bundle.manifest.use_case_names
    assert set(names) == {n for n, m in _cases(family)["use_cases"].items() if generation == "v3" or len(m) <= 1}
    rt = Runtime.open(bundle.path)
    order = [*names, "base", *reversed(names), "base"]  # back and forth; the base's head comes back each time
    for u in order:
        report = rt.switch(u)
        assert (report.kind == "hot") == (report.bytes_moved == 0)
        got = rt.run(feeds)["logits"]
        np.testing.assert_allclose(got, expected[u], atol=TOL, rtol=0, err_msg=f"{family}/{onnx_file} {u}")
        if u != "base":  # the saved module moved the output: matching proves something
            assert np.abs(expected[u] - expected["base"]).max() > 1e-2
    np.testing.assert_array_equal(rt.run(feeds)["logits"], run_use_case(bundle, "base", feeds)["logits"])
    for u in names:  # the reference path (a fresh session fed the slots) agrees
        np.testing.assert_allclose(run_use_case(bundle, u, feeds)["logits"], expected[u], atol=TOL, rtol=0)


def test_v3_switch_is_hot_for_strengths_and_cold_for_the_modules_that_change(root):
    bundle = _bundle("bert", "dynamo.onnx", "v3", root)
    m = bundle.manifest
    saved = {s.module: s for s in m.saved_modules}
    assert list(saved) == ["bert.pooler.dense", "classifier"] and saved["classifier"].op_type == "Gemm"
    slot = {s.name: s.nbytes for s in m.saved_slots}
    head = {k: slot[s.weight_slot] + slot[s.bias_slot] for k, s in saved.items()}
    rt = Runtime.open(bundle.path)
    assert rt.current == "base"
    assert rt.switch("cls_a").kind == "cold"  # the second scratch set held nothing yet: every module copied
    assert rt.last_switch.bytes_moved == sum(head.values()) and rt.last_switch.source == "rom"
    for u in ("cls_a_half", "a_plain"):  # same classifier, only strengths change
        r = rt.switch(u)
        assert (r.kind, r.bytes_moved, r.source) == ("hot", 0, "resident")
    assert rt.switch("base").kind == "hot" and rt.switch("cls_a").kind == "hot"  # both scratch sets still hold them
    r = rt.switch("pool")  # pooler from 'pool', classifier from the base: only the pooler's bytes move
    assert (r.kind, r.bytes_moved) == ("cold", head["bert.pooler.dense"])
    r = rt.switch("a_pool")  # the set that held cls_a's classifier gets pool's pooler: again one module
    assert (r.kind, r.bytes_moved) == ("cold", head["bert.pooler.dense"])
    mem = rt.memory()
    assert mem["saved_bytes"] == 2 * sum(head.values())

    warm = Runtime.open(bundle.path, preload="all")  # every combination resident: every switch hot
    for u in [*m.use_case_names, *reversed(m.use_case_names)]:
        assert warm.switch(u).kind == "hot"
    combos = {tuple(m.saved_sources(u.strengths)) for u in m.use_cases}
    assert warm.memory()["saved_bytes"] == (2 + len(combos)) * sum(head.values())


def test_v1_v2_report_lora_and_module_bytes_together(root):
    for generation in ("v1", "v2"):
        bundle = _bundle("vit", "torchscript.onnx", generation, root)
        rt = Runtime.open(bundle.path)
        saved = sum(s.nbytes for s in bundle.manifest.saved_slots)
        r = rt.switch("vit_b")  # the second scratch sets: the LoRA patch and every saved module
        assert (r.kind, r.bytes_moved) == ("cold", rt.layout.nbytes + saved)
        assert rt.switch("base").kind == "hot"  # base: strength 0 on any LoRA set, the base's head still resident
        assert rt.switch("vit_b").kind == "hot"


# ---- v3 mixes: PEFT's rule --------------------------------------------------------------------------------------


def test_v3_refuses_two_adapters_saving_one_module_in_one_line(tmp_path, capsys):
    cases = _cases("bert")
    base = CLS / "bert" / "dynamo.onnx"
    for name, info in cases["refused"].items():
        spec = _specs({name: info["adapters"]}, "v3")
        with pytest.raises(UseCaseError) as e:
            compile_bundle(base, _adapters("bert"), tmp_path / name, generation="v3", use_cases=spec)
        text = str(e.value)
        assert "\n" not in text and f"use-case {name!r}" in text and "both save module" in text, text
        module = "classifier" if name == "a_b" else "bert.pooler.dense"
        assert f"module {module!r}" in text and all(repr(a) in text for a in info["adapters"])
        assert "Only one adapter can be set at a time" in info["peft_error"]  # PEFT refuses the same mix
        assert not (tmp_path / name).exists()
    args = ["compile", "--base", str(base), "--generation", "v3", "-o", str(tmp_path / "cli"),
            *[a for n, p in _adapters("bert").items() for a in ("--adapter", f"{n}={p}")],
            "--use-case", "x=cls_a,cls_b"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "both save module 'classifier'" in err and not (tmp_path / "cli").exists()


def test_v3_ad_hoc_mixes_follow_the_same_rule(root):
    bundle = _bundle("bert", "torchscript.onnx", "v3", root)
    feeds, expected = _inputs("bert"), _expected("bert")
    rt = Runtime.open(bundle.path)
    rt.switch("a_pool")
    before = rt.run(feeds)["logits"]
    with pytest.raises(UseCaseError, match="both save module 'classifier'"):
        rt.set_strengths({"cls_a": 1.0, "cls_b": 0.5})
    assert rt.current == "a_pool"
    np.testing.assert_array_equal(rt.run(feeds)["logits"], before)
    rt.set_strengths({"plain": 0.5, "cls_a": 1.0})  # a_plain, named ad hoc
    np.testing.assert_allclose(rt.run(feeds)["logits"], expected["a_plain"], atol=TOL, rtol=0)
    mix = {"cls_b": 0.3, "plain": -0.5}
    rt.set_strengths(mix)
    np.testing.assert_allclose(rt.run(feeds)["logits"], run_use_case(bundle, None, feeds, strengths=mix)["logits"],
                               atol=1e-6, rtol=0)


# ---- atomic under threads and faults ----------------------------------------------------------------------------


@pytest.mark.parametrize("generation", ["v1", "v3"])
def test_threads_never_see_a_torn_head(root, generation):
    bundle = _bundle("bert", "dynamo.onnx", generation, root)
    feeds = _inputs("bert")
    refs = {u: run_use_case(bundle, u, feeds)["logits"] for u in bundle.manifest.use_case_names}
    for i, a in enumerate(refs):
        for b in list(refs)[i + 1:]:
            assert np.abs(refs[a] - refs[b]).max() > 1e-3, (a, b)
    rt = Runtime.open(bundle.path)
    switch_while_running(rt, feeds, refs, threads=3, switches=1000, seed=3)


@pytest.mark.parametrize("step", ["read_header", "read", "filled"])
def test_a_failed_module_copy_keeps_the_previous_use_case(root, step):
    bundle = _bundle("bert", "torchscript.onnx", "v3", root)
    feeds, expected = _inputs("bert"), _expected("bert")
    rt = Runtime.open(bundle.path)
    rt.switch("cls_a")
    rt.switch("a_pool")  # both scratch sets in use: 'cls_b' needs a copy
    before = rt.run(feeds)["logits"]

    def hook(s: str) -> None:
        if s == step:
            raise OSError(f"injected at {s}")

    rt.fault_hook = hook
    with pytest.raises((BundleError, OSError)):  # the slot copy reports an I/O error as a BundleError
        rt.switch("cls_b")
    assert rt.current == "a_pool"
    np.testing.assert_array_equal(rt.run(feeds)["logits"], before)
    rt.fault_hook = None
    for u in ("cls_b", "cls_a", "base", "a_pool"):  # the half-written set is not trusted
        rt.switch(u)
        np.testing.assert_allclose(rt.run(feeds)["logits"], expected[u], atol=TOL, rtol=0)


# ---- the bundle: graph, merge, CLI ----------------------------------------------------------------------------------


def test_graph_slots_and_defaults(root):
    for generation in ("v1", "v2", "v3"):
        bundle = _bundle("vit", "dynamo.onnx", generation, root)
        m = bundle.manifest
        sess = ort.InferenceSession(str(bundle.file(m.graph)), providers=["CPUExecutionProvider"])
        inputs = {i.name for i in sess.get_inputs()}
        overridable = {i.name for i in sess.get_overridable_initializers()}
        names = {s.name for s in m.saved_slots}
        assert names == {"classifier.modules_to_save.weight", "classifier.modules_to_save.bias",
                         "vit.layers.1.mlp.fc2.modules_to_save.weight", "vit.layers.1.mlp.fc2.modules_to_save.bias"}
        # v1: graph inputs without default; v2/v3: parameters holding the base's values
        assert names <= (inputs if generation == "v1" else overridable)
        assert not names & (overridable if generation == "v1" else inputs)
        fc2 = next(s for s in m.saved_modules if s.module == "vit.layers.1.mlp.fc2")
        assert (fc2.op_type, fc2.in_features, fc2.out_features) == ("MatMul", 64, 32)
        assert [a.saved for a in m.adapters] == [("classifier",), ("classifier", "vit.layers.1.mlp.fc2")]


def test_merge_bakes_the_use_cases_head(root, tmp_path):
    bundle = _bundle("bert", "dynamo.onnx", "v3", root)
    feeds, expected = _inputs("bert"), _expected("bert")
    for u in ("a_pool", "base"):
        out = merge_use_case(bundle, tmp_path / f"{u}.onnx", u)
        got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
        np.testing.assert_allclose(got, expected[u], atol=TOL, rtol=0)


def test_ort_adapters_carry_the_saved_modules(root, tmp_path):
    bundle = _bundle("vit", "dynamo.onnx", "v2", root)
    feeds, expected = _inputs("vit"), _expected("vit")
    sess = ort.InferenceSession(str(bundle.file(bundle.manifest.graph)), providers=["CPUExecutionProvider"])
    base = sess.run(None, feeds | {"lora_alpha": np.array(0.0, np.float32)})[0]  # the parameters: the base's head
    np.testing.assert_allclose(base, expected["base"], atol=TOL, rtol=0)
    for name in ("vit_a", "vit_b"):
        adapter = ort.LoraAdapter()
        adapter.Load(str(export_ort_adapter(bundle, name, tmp_path / f"{name}.onnx_adapter")))
        ro = ort.RunOptions()
        ro.add_active_adapter(adapter)
        got = sess.run(None, feeds | {"lora_alpha": np.array(1.0, np.float32)}, ro)[0]
        np.testing.assert_allclose(got, expected[name], atol=TOL, rtol=0)


def test_cli_compiles_and_inspect_lists_saved_modules_per_use_case(tmp_path, capsys):
    out = tmp_path / "b"
    args = ["compile", "--base", str(CLS / "bert" / "torchscript.onnx"), "--generation", "v3", "-o", str(out),
            *[a for n, p in _adapters("bert").items() for a in ("--adapter", f"{n}={p}")],
            *[a for s in _specs(_cases("bert")["use_cases"], "v3") for a in ("--use-case", s)]]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "saves classifier" in text and "saved modules (modules_to_save" in text
    line = next(t for t in text.splitlines() if t.strip().startswith("a_pool "))
    assert "saved: bert.pooler.dense<-pool, classifier<-cls_a" in line
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["saved_by_use_case"]["b_plain"] == {"bert.pooler.dense": "cls_b", "classifier": "cls_b"}
    assert info["saved_by_use_case"]["plain"] == {"bert.pooler.dense": "base", "classifier": "base"}


# ---- what is refused, in one line ---------------------------------------------------------------------------------


def _copy(tmp_path, name="cls_a"):
    folder = tmp_path / name
    shutil.copytree(CLS / "bert" / "adapters" / name, folder)
    return folder


def _edit(folder, config=None, tensors=None):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(cfg | (config or {})))
    path = folder / "adapter_model.safetensors"
    t = safetensors.numpy.load_file(str(path))
    for k, v in (tensors or {}).items():
        if v is None:
            t.pop(k)
        else:
            t[k] = v
    safetensors.numpy.save_file(t, str(path))


P = "base_model.model."


@pytest.mark.parametrize(("config", "tensors", "message"), [
    ({"modules_to_save": ["classifier", "LayerNorm"]},
     {f"{P}bert.embeddings.LayerNorm.weight": np.ones(32, np.float32)},
     r"has shape \(32,\), a norm layer's weight: module 'bert.embeddings.LayerNorm' in modules_to_save is not a "
     r"Linear"),
    ({}, {f"{P}classifier.running_mean": np.ones(3, np.float32)}, r"has tensor .*running_mean.*only a Linear's weight"),
    ({}, {f"{P}classifier.weight": np.ones((3, 32, 1, 1), np.float32)}, r"a convolution's weight"),
    ({}, {f"{P}classifier.bias": np.ones(4, np.float32)}, r"the bias of a Linear with weight \(3, 32\) is \(3,\)"),
    ({"modules_to_save": "classifier"}, {}, r"modules_to_save must be a list of module names"),
    ({"modules_to_save": ["classifier", "query"]},
     {f"{P}bert.encoder.layer.0.attention.self.query.weight": np.ones((32, 32), np.float32)},
     r"has LoRA tensors and is saved whole"),
    ({"modules_to_save": ["score"]}, {}, r"'base_model.model.classifier.bias' is not a LoRA A/B weight \(not selected "
                                         r"by modules_to_save \['score'\]\)"),
])
def test_loader_refuses_what_is_not_a_linear_head(tmp_path, config, tensors, message):
    folder = _copy(tmp_path)
    _edit(folder, config, tensors)
    with pytest.raises(AdapterError, match=message) as e:
        load_adapter(folder)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("config", "tensors", "error", "message"), [
    ({"modules_to_save": ["classifier", "word_embeddings"]},
     {f"{P}bert.embeddings.word_embeddings.weight": np.ones((64, 32), np.float32)}, AttachmentError,
     r"module 'bert.embeddings.word_embeddings' matches no MatMul/Gemm.*a saved module must be a Linear: embeddings"),
    ({}, {f"{P}classifier.weight": np.ones((3, 16), np.float32)}, AttachmentError,
     r"adapter 'cls_a': saved module 'classifier' has weight \(3, 16\), which does not fit Gemm"),
    ({"modules_to_save": ["classifier", "key"]},
     {f"{P}bert.encoder.layer.0.attention.self.key.weight": np.ones((32, 32), np.float32),
      f"{P}bert.encoder.layer.0.attention.self.key.bias": np.ones(32, np.float32)}, AttachmentError,
     r"module 'bert.encoder.layer.0.attention.self.key' is saved whole, and adapter\(s\) put LoRA on the same op"),
])
def test_compile_refuses_saved_modules_it_cannot_swap(tmp_path, config, tensors, error, message):
    folder = _copy(tmp_path)
    _edit(folder, config, tensors)
    adapters = {"cls_a": folder, "plain": CLS / "bert" / "adapters" / "plain"}
    with pytest.raises(error, match=message) as e:
        compile_bundle(CLS / "bert" / "dynamo.onnx", adapters, tmp_path / "b", generation="v3")
    assert "\n" not in str(e.value) and not (tmp_path / "b").exists()


def test_encodings_with_saved_modules_are_refused_before_anything_is_written(tmp_path):
    from lora_runtime import CompileOptions, QuantOptions

    np.savez(tmp_path / "c.npz", **{k: v[None] for k, v in _inputs("bert").items()})
    options = CompileOptions("v3", quant=QuantOptions("full", str(tmp_path / "c.npz")))
    with pytest.raises(AdapterError, match=r"adapter 'cls_a' saves 'classifier' whole .*--encodings does not take"):
        compile_bundle(CLS / "bert" / "dynamo.onnx", _adapters("bert"), tmp_path / "b", options)
    assert not (tmp_path / "b").exists()
