"""The static-shape pass on real exports: the outputs stay what they were (ONNX Runtime on the CPU), every free
dimension is baked or named, and each HTP form is the same function as the op it replaces."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import FIXTURES
from onnx import TensorProto, helper, numpy_helper

from lora_runtime.compiler.passes.static_shape import StaticShapeOptions, make_static
from lora_runtime.errors import TargetError

EXPORTS = [("llama", "dynamo"), ("llama", "torchscript"), ("gpt2", "dynamo"), ("gpt2", "torchscript")]


def _feeds(model: onnx.ModelProto, seq: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(7).integers(0, 64, (1, seq), dtype=np.int64)
    names = [i.name for i in model.graph.input]
    return {"input_ids": ids} | ({"attention_mask": np.ones((1, seq), np.int64)} if "attention_mask" in names else {})


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize(("family", "exporter"), EXPORTS)
@pytest.mark.parametrize("htp", [False, True])
def test_static_graph_computes_what_the_export_did(family, exporter, htp):
    path = FIXTURES / family / f"{exporter}.onnx"
    original = onnx.load(str(path))
    model = onnx.load(str(path), load_external_data=False)
    result = make_static(model, StaticShapeOptions({"seq": 7}, path.parent, mask_floor=-50.0 if htp else None,
                                                   htp_forms=htp))
    assert result.folded > 0
    assert not any(n.op_type in ("Shape", "Range", "ConstantOfShape") for n in model.graph.node)
    for v in [*model.graph.input, *model.graph.output]:
        assert all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim), v.name
    if htp:  # the masks' -inf-like constants are floored, and nothing QNN mishandles is left
        assert result.floored
        assert not any(n.op_type in ("Reciprocal", "GatherND") for n in model.graph.node)
    if htp and family == "llama":  # every RMSNorm (one ReduceMean each in the export) is one fused op
        means = sum(n.op_type == "ReduceMean" for n in original.graph.node)
        fused = [n for n in model.graph.node if n.op_type == "SimplifiedLayerNormalization"]
        assert means == 5 and len(fused) == means  # 2 layers x 2 norms + the final norm
        assert not any(n.op_type in ("ReduceMean", "Sqrt", "Pow") for n in model.graph.node)
    feeds = _feeds(model, 7)
    want = _run(original, feeds)
    np.testing.assert_allclose(_run(model, feeds), want, atol=1e-5, rtol=0)


def test_every_free_dimension_needs_a_value():
    path = FIXTURES / "llama" / "dynamo.onnx"
    with pytest.raises(TargetError, match=r"free dimension 'seq' of 'input_ids' has no value: pass --static-shape "
                                          r"seq=N"):
        make_static(onnx.load(str(path), load_external_data=False), StaticShapeOptions({}, path.parent))
    with pytest.raises(TargetError, match=r"--static-shape batch=\.\.\.: the graph has no free dimension 'batch' "
                                          r"\(its free dimensions: seq\)"):
        make_static(onnx.load(str(path), load_external_data=False),
                    StaticShapeOptions({"seq": 7, "batch": 1}, path.parent))
    with pytest.raises(TargetError, match="a dimension is a positive integer"):
        make_static(onnx.load(str(path), load_external_data=False), StaticShapeOptions({"seq": 0}, path.parent))


def _one_op(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], x_shape: list[int]) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *x_shape[1:]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


FORMS = {
    "constant first": ([helper.make_node("Mul", ["w", "x"], ["y"])], [numpy_helper.from_array(
        np.array([1.5, -2.0, 0.25], np.float32), "w")], "Mul"),
    "reciprocal": ([helper.make_node("Reciprocal", ["x"], ["y"])], [], "Div"),
    "gather_nd": ([helper.make_node("GatherND", ["x", "idx"], ["y"])], [numpy_helper.from_array(
        np.array([[[0, 2], [1, 0]], [[0, 0], [1, 2]]], np.int64), "idx")], "Gather"),
}


def _c(name: str, value) -> onnx.TensorProto:  # noqa: ANN001
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


RMS_NORMS = {  # the ways exporters spell x / sqrt(mean(x^2) + eps) [* gamma]
    "pow, div, gamma (lora_runtime's builder)": [
        helper.make_node("Pow", ["x", "two"], ["sq"]), helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1]),
        helper.make_node("Add", ["ms", "eps"], ["mse"]), helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Div", ["x", "rms"], ["n"]), helper.make_node("Mul", ["n", "gamma"], ["y"])],
    "mul, reciprocal, gamma first (dynamo)": [
        helper.make_node("Mul", ["x", "x"], ["sq"]), helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1]),
        helper.make_node("Add", ["eps", "ms"], ["mse"]), helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Reciprocal", ["rms"], ["r"]), helper.make_node("Mul", ["x", "r"], ["n"]),
        helper.make_node("Mul", ["gamma", "n"], ["y"])],
    "div(1, s), no gamma": [
        helper.make_node("Pow", ["x", "two"], ["sq"]), helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1]),
        helper.make_node("Add", ["ms", "eps"], ["mse"]), helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Div", ["one", "rms"], ["r"]), helper.make_node("Mul", ["r", "x"], ["y"])],
}


@pytest.mark.parametrize("spelling", sorted(RMS_NORMS))
def test_rms_norm_becomes_one_op(spelling, tmp_path):
    inits = [_c("two", 2.0), _c("eps", 1e-5), _c("one", 1.0), _c("gamma", [0.5, 2.0, -1.0, 1.5])]
    model = _one_op(RMS_NORMS[spelling], inits, [3, 4])
    x = (np.random.default_rng(2).standard_normal((3, 4)) * [[1.0], [30.0], [3000.0]]).astype(np.float32)
    gamma = [0.5, 2.0, -1.0, 1.5] if "gamma" in spelling and "no gamma" not in spelling else 1.0
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * gamma  # numpy reference
    make_static(model, StaticShapeOptions({"n": 3}, tmp_path, htp_forms=True))
    assert [n.op_type for n in model.graph.node] == ["SimplifiedLayerNormalization"]
    np.testing.assert_allclose(_run(model, {"x": x}), want, rtol=1e-5, atol=1e-6)


def test_rms_norm_with_a_second_reader_stays_unfused(tmp_path):
    nodes = [*RMS_NORMS["pow, div, gamma (lora_runtime's builder)"][:-1], helper.make_node("Mul", ["n", "ms"], ["y"])]
    model = _one_op(nodes, [_c("two", 2.0), _c("eps", 1e-5)], [3, 4])
    make_static(model, StaticShapeOptions({"n": 3}, tmp_path, htp_forms=True))
    assert "SimplifiedLayerNormalization" not in [n.op_type for n in model.graph.node]  # ms is read twice


@pytest.mark.parametrize("form", sorted(FORMS))
def test_htp_forms_are_the_same_function(form, tmp_path):
    nodes, inits, op = FORMS[form]
    model = _one_op(nodes, inits, [2, 3])
    x = np.random.default_rng(1).uniform(0.5, 2.0, (2, 3)).astype(np.float32)
    want = _run(model, {"x": x})
    result = make_static(model, StaticShapeOptions({"n": 2}, tmp_path, htp_forms=True))
    assert result.rewritten == 1
    assert op in [n.op_type for n in model.graph.node]
    if form == "constant first":
        assert list(model.graph.node[0].input) == ["x", "w"]
    np.testing.assert_allclose(_run(model, {"x": x}), want, rtol=1e-6)
