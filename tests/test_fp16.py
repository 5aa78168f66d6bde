"""Float16 bases: real ``model.half()`` exports of both exporters against real PEFT on the half model
(tests/fixtures/llama_fp16, made by tools/make_fp16_fixtures.py), and what a float16 base is refused.

PEFT keeps a loaded adapter's weights in float32 on a half model (``autocast_adapter_dtype``) and computes the
branch in float32, adding into the float16 base output and rounding the sum to float16 once: the branch pass
does the same with Casts at its edges. The tolerance is the fixture's: 4x the float16 noise of the base alone
(max |ONNX Runtime - torch| of the float16 base logits, measured by the fixture script; ONNX Runtime and torch
round differently in float16). The adapters move the logits far more than that, so a match is not vacuous.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import FIXTURES
from onnx import TensorProto, helper, numpy_helper

from lora_runtime import BaseModelError, CompileOptions, QuantOptions, Runtime, compile_bundle
from lora_runtime.cli import main
from lora_runtime.compiler.options import WeightOnlyOptions
from lora_runtime.compiler.points import find_candidates
from lora_runtime.describe import describe
from lora_runtime.export import flatten
from lora_runtime.manifest import Manifest
from lora_runtime.metrics import sqnr_db

ROOT = FIXTURES / "llama_fp16"
ADAPTERS = FIXTURES / "llama" / "adapters"
CASES = json.loads((ROOT / "cases.json").read_text())
EXPECTED = np.load(ROOT / "expected.npz")
TOL = CASES["tolerance"]  # noise_factor (4) x the measured float16 noise of the base alone
EXPORTS = ["dynamo.onnx", "torchscript.onnx"]
EDGE_CASTS = ("CastX", "CastBase", "CastOut")


def _inputs(rt_or_names) -> dict[str, np.ndarray]:
    names = rt_or_names.input_names if hasattr(rt_or_names, "input_names") else rt_or_names
    with np.load(FIXTURES / "llama" / "inputs.npz") as z:
        return {k: z[k] for k in z.files if k in names}


def _compile(export: str, generation: str, out, **options):
    uc = CASES["use_cases"]
    names = [n for n in uc if generation == "v3" or len(uc[n]) <= 1]
    adapters = sorted({a for n in names for a in uc[n]})
    specs = [f"{n}=" + ",".join(f"{a}:{s}" for a, s in uc[n].items()) for n in names]
    return compile_bundle(ROOT / export, {a: ADAPTERS / a for a in adapters}, out,
                          CompileOptions(generation, **options), use_cases=specs)


def test_the_fixture_is_what_it_claims():
    assert 0 < TOL < 2e-3 and CASES["noise_factor"] == 4.0
    assert TOL == pytest.approx(4 * max(CASES["float16_noise"].values()))
    base = EXPECTED["base"]
    for export in EXPORTS:  # the plain float16 base runs on ONNX Runtime, within the measured noise of torch
        s = ort.InferenceSession(str(ROOT / export), providers=["CPUExecutionProvider"])
        got = s.run(["logits"], _inputs([i.name for i in s.get_inputs()]))[0]
        assert got.dtype == np.float16
        assert np.abs(got.astype(np.float32) - base).max() <= CASES["float16_noise"][export]
    for name in CASES["use_cases"]:
        if name != "base":
            assert np.abs(EXPECTED[name] - base).max() > 10 * TOL, name  # the adapters move the logits


@pytest.mark.parametrize("lora_dtype", ["float32", "float16"])
@pytest.mark.parametrize("generation", ["v1", "v2", "v3"])
@pytest.mark.parametrize("export", EXPORTS)
def test_matches_peft_on_the_half_model(export, generation, lora_dtype, tmp_path):
    b = _compile(export, generation, tmp_path / "b", lora_dtype=lora_dtype)
    assert b.manifest.base.dtype == ("float16" if export == "dynamo.onnx" else "float16+float32")
    assert {s.dtype for s in b.manifest.slots if s.kind in ("lora_A", "lora_B")} == {lora_dtype}
    graph = flatten(onnx.load(str(b.path / b.manifest.graph), load_external_data=False)).graph
    slot_types = {v.type.tensor_type.elem_type for v in graph.input if v.name.endswith((".lora_A.weight",
                                                                                           ".lora_B.weight"))}
    assert slot_types == {TensorProto.FLOAT16 if lora_dtype == "float16" else TensorProto.FLOAT}
    rt = Runtime.open(b.path)
    feeds = _inputs(rt)
    for name in b.manifest.use_case_names:
        rt.switch(name)
        got = rt.run(feeds)["logits"]
        assert got.dtype == np.float16  # the graph's own output: the base's dtype
        np.testing.assert_allclose(got.astype(np.float32), EXPECTED[name], atol=TOL, rtol=0,
                                   err_msg=f"{export} {generation} {lora_dtype} {name}")
    if lora_dtype == "float16":  # measured against the float32-slot twin, as for a float32 base
        assert all(v > 40.0 for v in b.manifest.accuracy_of("float32_bundle").sqnr_db.values())


def test_edge_casts_only_where_the_base_op_is_not_float32(tmp_path):
    """TorchScript's half export keeps o_proj in float32 (adapter b sits there): those points get no Cast;
    a float32 base gets none at all, so its graph is the one it always was."""
    b = _compile("torchscript.onnx", "v3", tmp_path / "ts")
    names = {n.name for n in flatten(onnx.load(str(b.path / b.manifest.graph), load_external_data=False)).graph.node}
    for p in b.manifest.points:
        has = {c for c in EDGE_CASTS if f"{p.module}.lora/{c}" in names}
        assert has == (set() if p.module.endswith("o_proj") else set(EDGE_CASTS)), p.module
    f32 = compile_bundle(FIXTURES / "llama" / "dynamo.onnx", {"a": ADAPTERS / "a"}, tmp_path / "f32", generation="v1")
    assert f32.manifest.base.dtype == "float32"
    nodes = flatten(onnx.load(str(f32.path / f32.manifest.graph), load_external_data=False)).graph.node
    assert not [n.name for n in nodes if n.name.endswith(EDGE_CASTS)]


def test_a_float16_island_in_a_float32_graph(tmp_path):
    """layer 0's q_proj of the float32 export made a float16 island (Cast in, float16 weight, Cast out): adapter a
    attaches there too and matches float32 PEFT within 4x what the island alone costs."""
    model = onnx.load(str(FIXTURES / "llama" / "dynamo.onnx"))
    g = model.graph
    c = next(c for c in find_candidates(g) if "model.layers.0.self_attn.q_proj" in c.aliases)
    w = next(t for t in g.initializer if t.name == c.weight)
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w).astype(np.float16), w.name))
    i, node = next((i, n) for i, n in enumerate(g.node) if n.output[0] == c.y)
    node.input[0], node.output[0] = "island/x16", "island/y16"
    g.node.insert(i + 1, helper.make_node("Cast", ["island/y16"], [c.y], name="island/out", to=TensorProto.FLOAT))
    g.node.insert(i, helper.make_node("Cast", [c.x], ["island/x16"], name="island/in", to=TensorProto.FLOAT16))
    del g.value_info[:]
    onnx.save(model, str(tmp_path / "island.onnx"))
    expected = np.load(FIXTURES / "llama" / "expected.npz")
    s = ort.InferenceSession(str(tmp_path / "island.onnx"), providers=["CPUExecutionProvider"])
    feeds = _inputs([x.name for x in s.get_inputs()])
    noise = np.abs(s.run(["logits"], feeds)[0] - expected["base"]).max()
    assert 0 < noise < 1e-3
    b = compile_bundle(tmp_path / "island.onnx", {"a": ADAPTERS / "a"}, tmp_path / "b", generation="v1")
    assert b.manifest.base.dtype == "float32+float16"
    names = {n.name for n in flatten(onnx.load(str(b.path / b.manifest.graph), load_external_data=False)).graph.node}
    assert sum(n.endswith("lora/CastX") for n in names) == 1
    rt = Runtime.open(b.path)
    rt.switch("a")
    got = rt.run(feeds)["logits"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected["a"], atol=4 * noise, rtol=0)


@pytest.mark.parametrize(("bits", "min_db"), [("int8", 35.0), ("int4", 15.0)])
def test_quantized_base_weights_of_a_float16_base(bits, min_db, tmp_path):
    """MatMulNBits takes float16 activations with float16 scales: the codes are chosen for the float16 scales.
    Measured against PEFT's half model: int8 ~39 dB, int4 ~18 dB (the float32 base: the same)."""
    b = _compile("dynamo.onnx", "v3", tmp_path / "b", weight_only=WeightOnlyOptions.of(bits))
    assert not b.manifest.target.base_path  # float16 ops: kept flat (inside an If: 22 dB at int8, not 39)
    graph = flatten(onnx.load(str(b.path / b.manifest.graph), load_external_data=False)).graph
    inits = {t.name: t for t in graph.initializer}
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 15 and {inits[n.input[2]].data_type for n in nbits} == {TensorProto.FLOAT16}
    rt = Runtime.open(b.path)
    for name in ("base", "a", "ab"):
        rt.switch(name)
        got = rt.run(_inputs(rt))["logits"]
        assert got.dtype == np.float16
        assert sqnr_db(EXPECTED[name], got) > min_db, name
    assert f"base weights {bits} (float16 activations)" in describe(b)


def test_inspect_reports_the_base_dtype(tmp_path, capsys):
    b = _compile("dynamo.onnx", "v1", tmp_path / "b")
    assert main(["inspect", str(b.path)]) == 0
    text = capsys.readouterr().out
    assert "base weights float16" in text and "(float16, sha256" in text and "float32" not in text.split("adapters")[0]
    assert main(["inspect", str(b.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["manifest"]["base"]["dtype"] == "float16"


def test_manifests_without_a_base_dtype_load_as_float32(tmp_path):
    b = _compile("dynamo.onnx", "v1", tmp_path / "b")
    d = json.loads((b.path / "manifest.json").read_text())
    del d["base"]["dtype"]  # a bundle compiled before the field existed
    assert Manifest.from_json(d, "old manifest").base.dtype == "float32"


def _bfloat16(src, dst) -> None:
    """The float16 export with every float16 tensor, Cast and output made bfloat16 (bits truncated)."""
    model = onnx.load(str(src))
    g = model.graph
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT16:
            bits = (numpy_helper.to_array(t).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
            t.CopyFrom(helper.make_tensor(t.name, TensorProto.BFLOAT16, list(t.dims), bits.tobytes(), raw=True))
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT16:
                a.i = TensorProto.BFLOAT16
    for v in g.output:
        v.type.tensor_type.elem_type = TensorProto.BFLOAT16
    del g.value_info[:]
    onnx.save(model, str(dst))


def _double(dst) -> None:
    """A hand-built base whose one linear layer is float64."""
    w = numpy_helper.from_array(np.zeros((4, 4)), "model.proj.weight")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "model.proj.weight"], ["y"], name="proj")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [1, 4])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(dst))


def test_onnx_runtime_cannot_run_a_bfloat16_base(tmp_path):
    """Why bfloat16 is refused: the CPU provider has no bfloat16 kernels for the base's own ops."""
    _bfloat16(ROOT / "dynamo.onnx", tmp_path / "bf16.onnx")
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        ort.InferenceSession(str(tmp_path / "bf16.onnx"), providers=["CPUExecutionProvider"])


REFUSED = [
    ("bfloat16", {}, "base is bfloat16 .*: ONNX Runtime's CPU provider cannot run it .*convert the base to float16 "
                     "or float32"),
    ("float64", {}, "linear weight 'model.proj.weight' of 'proj' is double: lora_runtime compiles float32 and "
                    "float16 bases"),
    ("float16", {"encodings": True}, "base is float16: --encodings builds its QDQ graph for float32 bases"),
    ("float16", {"encodings": True, "target": "htp", "static_shapes": {"seq": 7}},
     "base is float16: --encodings builds its QDQ graph for float32 bases"),
]


@pytest.mark.parametrize(("base", "change", "message"), REFUSED)
def test_what_a_16_bit_base_cannot_take_is_refused(base, change, message, tmp_path):
    path = ROOT / "dynamo.onnx"
    if base == "bfloat16":
        path = tmp_path / "bf16.onnx"
        _bfloat16(ROOT / "dynamo.onnx", path)
    elif base == "float64":
        path = tmp_path / "double.onnx"
        _double(path)
    quant = None
    if change.pop("encodings", False):
        np.savez(tmp_path / "calib.npz", input_ids=np.random.default_rng(0).integers(0, 64, (8, 1, 7)))
        quant = QuantOptions("non-updatable", tmp_path / "calib.npz", ort_reference=False)
    with pytest.raises(BaseModelError, match=message):
        compile_bundle(path, {"a": ADAPTERS / "a"}, tmp_path / "b", CompileOptions("v3", quant=quant, **change))
    assert not (tmp_path / "b").exists()


def test_cli_refuses_encodings_on_a_float16_base(tmp_path, capsys):
    np.savez(tmp_path / "calib.npz", input_ids=np.random.default_rng(0).integers(0, 64, (8, 1, 7)))
    args = ["compile", "--base", str(ROOT / "torchscript.onnx"), "--adapter", f"a={ADAPTERS / 'a'}", "--generation",
            "v3", "--encodings", "non-updatable", "--calibration", str(tmp_path / "calib.npz"),
            "-o", str(tmp_path / "b")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "base is float16+float32: --encodings" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_the_htp_runs_a_float16_base(tmp_path):
    """Float on the HTP (no encodings): every node on QNN, against PEFT on the half model."""
    pytest.importorskip("onnxruntime_qnn", reason="the QNN execution provider (pip install 'lora_runtime[qnn]')")
    b = compile_bundle(ROOT / "dynamo.onnx", {"a": ADAPTERS / "a", "b": ADAPTERS / "b"}, tmp_path / "b",
                       CompileOptions("v3", target="htp", static_shapes={"seq": 7}),
                       use_cases=["a=a", "ab=a:1,b:0.5", "base="])
    assert b.manifest.target.placement.endswith("nodes on QNNExecutionProvider")
    rt = Runtime.open(b.path, device="htp")
    for name in ("base", "a", "ab"):
        rt.switch(name)
        got = rt.run(_inputs(rt))["logits"]
        assert got.dtype == np.float16
        assert sqnr_db(EXPECTED[name], got) > 50.0, name  # measured ~57 dB: the HTP's own float16 arithmetic


def test_merge_of_a_float16_bundle_leaves_no_branch_node(tmp_path):
    """The merged model of a float16 use-case: PEFT's logits, and not one node of the branch left (its Casts too)."""
    from lora_runtime.export import merge_use_case

    b = _compile("torchscript.onnx", "v3", tmp_path / "b")
    path = merge_use_case(b, tmp_path / "ab.onnx", use_case="ab")
    model = onnx.load(str(path))
    assert not [n.name for n in model.graph.node if ".lora/" in n.name]
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = s.run(["logits"], _inputs([i.name for i in s.get_inputs()]))[0]
    np.testing.assert_allclose(got.astype(np.float32), EXPECTED["ab"], atol=TOL, rtol=0)


def test_float16_graph_inputs_are_synthesized_for_the_accuracy_measurement():
    """A half model's own float16 inputs (a ViT's pixel values) get float16 samples, int32 ids int32 ones."""
    from lora_runtime.eval.accuracy import synthesize_inputs

    g = helper.make_graph([helper.make_node("Cast", ["px"], ["y"], to=TensorProto.FLOAT),
                           helper.make_node("Cast", ["ids"], ["z"], to=TensorProto.FLOAT)], "g",
                          [helper.make_tensor_value_info("px", TensorProto.FLOAT16, [1, 3, "h", "w"]),
                           helper.make_tensor_value_info("ids", TensorProto.INT32, [1, "seq"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    feeds = synthesize_inputs(ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]), set())
    assert feeds["px"].dtype == np.float16 and feeds["px"].shape == (1, 3, 16, 16)
    assert feeds["ids"].dtype == np.int32
