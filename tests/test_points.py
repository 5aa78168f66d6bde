"""Attachment points: small hand-built graphs in each exporter's naming style, the real fixture exports,
and resolve()'s refusals.

Every hand-built graph first runs in ONNX Runtime against numpy, so the shapes the tests claim are real."""

from __future__ import annotations

import logging
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import safetensors.numpy
from conftest import FIXTURES
from onnx import TensorProto, helper, numpy_helper

from lora_runtime.compiler.points import Candidate, find_candidates, resolve
from lora_runtime.errors import AttachmentError

Q0 = "model.layers.0.self_attn.q_proj"
SCOPES_Q0 = "['', 'model', 'model.layers.0', 'model.layers.0.self_attn', 'model.layers.0.self_attn.q_proj', 'linear']"
SCOPES_WRAPPED = ("['', 'm', 'm.model', 'm.model.layers.0', 'm.model.layers.0.self_attn', "
                  "'m.model.layers.0.self_attn.q_proj', 'linear']")
RNG = np.random.default_rng(7)


def _w(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _model(nodes, inits: dict[str, np.ndarray], x_shape, y_shape, extra_inputs=()) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape), *extra_inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], feeds)[0]


def _matmul(node_name: str, weight: str, w: np.ndarray, scopes: str | None = None):
    """y = x @ W, W stored (in, out); x is (1, 3, in)."""
    node = helper.make_node("MatMul", ["x", weight], ["y"], name=node_name)
    if scopes is not None:
        node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=scopes)
    d_in, d_out = w.shape
    x = _w(1, 3, d_in)
    return _model([node], {weight: w}, [1, 3, d_in], [1, 3, d_out]), {"x": x}, x @ w


def _gemm(trans_b: int, w: np.ndarray, weight: str = "fc.weight", bias: bool = True):
    """y = x @ op(W) + C with x (3, in); transB=1 stores W (out, in), transB=0 stores (in, out)."""
    d_out, d_in = w.shape if trans_b else w.shape[::-1]
    inits = {weight: w}
    inputs = ["x", weight]
    if bias:
        inits["fc.bias"] = _w(d_out)
        inputs.append("fc.bias")
    node = helper.make_node("Gemm", inputs, ["y"], name="/fc/Gemm", transB=trans_b)
    x = _w(3, d_in)
    want = x @ (w.T if trans_b else w) + (inits["fc.bias"] if bias else 0)
    return _model([node], inits, [3, d_in], [3, d_out]), {"x": x}, want


def _matmul_transposed(w: np.ndarray):
    """y = x @ Transpose(W), W stored (out, in) as torch keeps it (dynamo export with optimize=False)."""
    d_out, d_in = w.shape
    nodes = [helper.make_node("Transpose", [f"{Q0}.weight"], ["w_t"], name="node_Transpose_1", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "w_t"], ["y"], name="node_linear")]
    x = _w(1, 3, d_in)
    return _model(nodes, {f"{Q0}.weight": w}, [1, 3, d_in], [1, 3, d_out]), {"x": x}, x @ w.T


# (id, builder) -> expected (op_type, weight initializer, in_features, out_features, aliases)
STYLES = [
    ("hand-built weight name", lambda: _matmul("mm", f"{Q0}.weight", _w(6, 4)),
     ("MatMul", f"{Q0}.weight", 6, 4, (Q0,), False)),
    ("legacy node name", lambda: _matmul("/model/layers.0/self_attn/q_proj/MatMul", "onnx::MatMul_12", _w(6, 4)),
     ("MatMul", "onnx::MatMul_12", 6, 4, (Q0,), False)),
    ("dynamo name_scopes", lambda: _matmul("node_linear_3", "val_105", _w(6, 4), SCOPES_Q0),
     ("MatMul", "val_105", 6, 4, (Q0,), False)),
    ("dynamo wrapper prefix", lambda: _matmul("node_linear_3", "val_105", _w(6, 4), SCOPES_WRAPPED),
     ("MatMul", "val_105", 6, 4, ("m." + Q0,), False)),
    ("dynamo unparsable scopes", lambda: _matmul("node_linear_3", "val_105", _w(6, 4), "['', 'model'"),
     ("MatMul", "val_105", 6, 4, (), False)),
    ("Gemm transB=1 non-square", lambda: _gemm(1, _w(4, 6)), ("Gemm", "fc.weight", 6, 4, ("fc",), True)),
    ("Gemm transB=0 non-square", lambda: _gemm(0, _w(6, 4)), ("Gemm", "fc.weight", 6, 4, ("fc",), False)),
    ("Gemm transB=1 square", lambda: _gemm(1, _w(5, 5)), ("Gemm", "fc.weight", 5, 5, ("fc",), True)),
    ("Gemm transB=0 square", lambda: _gemm(0, _w(5, 5)), ("Gemm", "fc.weight", 5, 5, ("fc",), False)),
    ("Gemm without bias", lambda: _gemm(1, _w(4, 6), bias=False), ("Gemm", "fc.weight", 6, 4, ("fc",), True)),
    ("Gemm named weight + legacy node name", lambda: _gemm(0, _w(6, 4), weight="h.0.attn.c_attn.weight"),
     ("Gemm", "h.0.attn.c_attn.weight", 6, 4, ("h.0.attn.c_attn", "fc"), False)),
    ("MatMul on Transpose(W) non-square", lambda: _matmul_transposed(_w(4, 6)),
     ("MatMul", f"{Q0}.weight", 6, 4, (Q0,), True)),
    ("MatMul on Transpose(W) square", lambda: _matmul_transposed(_w(5, 5)),
     ("MatMul", f"{Q0}.weight", 5, 5, (Q0,), True)),
]


@pytest.mark.parametrize(("build", "expected"), [s[1:] for s in STYLES], ids=[s[0] for s in STYLES])
def test_candidate_per_naming_style(build, expected):
    model, feeds, want = build()
    np.testing.assert_allclose(_run(model, feeds), want, rtol=1e-5, atol=1e-5)  # the graph is real
    (c,) = find_candidates(model.graph)
    assert (c.op_type, c.weight, c.in_features, c.out_features, c.aliases, c.transposed) == expected
    matmul = next(n for n in model.graph.node if n.op_type == c.op_type)
    assert (c.node, c.x, c.y) == (matmul.name, "x", "y")


def test_unnamed_node_gets_a_positional_name():
    model, _, _ = _matmul("", f"{Q0}.weight", _w(6, 4))
    (c,) = find_candidates(model.graph)
    assert c.node == "MatMul_0"


def _chain(names: list[str]) -> onnx.ModelProto:
    """x @ W0 @ W1 @ ..., one MatMul per name (ONNX allows empty and repeated node names)."""
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"l{i}.weight"],
                              ["y" if i == len(names) - 1 else f"h{i + 1}"], name=name)
             for i, name in enumerate(names)]
    return _model(nodes, {f"l{i}.weight": _w(4, 4) for i in range(len(names))}, [2, 4], [2, 4])


@pytest.mark.parametrize(("names", "keys"), [
    (["", "MatMul_0"], ["MatMul_0_", "MatMul_0"]),  # the unnamed node must not take a real node's name
    (["mm", "mm"], ["mm", "mm_"]),
    (["", ""], ["MatMul_0", "MatMul_1"]),
    (["", "MatMul_0", "MatMul_0_"], ["MatMul_0__", "MatMul_0", "MatMul_0_"]),
])
def test_candidate_keys_are_unique(names, keys):
    model = _chain(names)
    cands = find_candidates(model.graph)
    assert [c.node for c in cands] == keys
    assert [c.weight for c in cands] == [f"l{i}.weight" for i in range(len(names))]
    points = resolve(cands, [f"l{i}" for i in range(len(names))], "m.onnx")
    assert [p.candidate.node for p in points.values()] == keys


@pytest.mark.parametrize(("scopes", "module"), [
    (SCOPES_Q0, Q0),
    (SCOPES_WRAPPED, Q0),
    (SCOPES_WRAPPED, "m." + Q0),
    (SCOPES_Q0, "self_attn.q_proj"),
])
def test_dynamo_scopes_resolve_peft_paths(scopes, module):
    model, _, _ = _matmul("node_linear_3", "val_105", _w(6, 4), scopes)
    points = resolve(find_candidates(model.graph), [module], "m.onnx")
    assert points[module].candidate.node == "node_linear_3"
    assert points[module].module == module


# --- rejected candidates ------------------------------------------------------------------------------------------

def _weight_left():
    w = _w(4, 6)  # y = W @ x, x (6, 3): the constant is the left operand
    node = helper.make_node("MatMul", [f"{Q0}.weight", "x"], ["y"], name="mm")
    return _model([node], {f"{Q0}.weight": w}, [6, 3], [4, 3]), {"x": _w(6, 3)}


def _weight_input():
    node = helper.make_node("MatMul", ["x", f"{Q0}.weight"], ["y"], name="mm")
    w_in = helper.make_tensor_value_info(f"{Q0}.weight", TensorProto.FLOAT, [6, 4])
    return _model([node], {}, [1, 3, 6], [1, 3, 4], [w_in]), {"x": _w(1, 3, 6), f"{Q0}.weight": _w(6, 4)}


def _weight_computed():
    nodes = [helper.make_node("Relu", [f"{Q0}.weight"], ["w_r"], name="relu"),
             helper.make_node("MatMul", ["x", "w_r"], ["y"], name="mm")]
    return _model(nodes, {f"{Q0}.weight": _w(6, 4)}, [1, 3, 6], [1, 3, 4]), {"x": _w(1, 3, 6)}


def _gemm_trans_a():
    node = helper.make_node("Gemm", ["x", "fc.weight"], ["y"], name="/fc/Gemm", transA=1, transB=1)
    return _model([node], {"fc.weight": _w(4, 6)}, [6, 3], [3, 4]), {"x": _w(6, 3)}


def _weight_3d():
    node = helper.make_node("MatMul", ["x", "fc.weight"], ["y"], name="/fc/MatMul")
    return _model([node], {"fc.weight": _w(2, 6, 4)}, [2, 3, 6], [2, 3, 4]), {"x": _w(2, 3, 6)}


def _transpose_3d():
    nodes = [helper.make_node("Transpose", ["fc.weight"], ["w_t"], name="t", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["x", "w_t"], ["y"], name="/fc/MatMul")]
    return _model(nodes, {"fc.weight": _w(2, 4, 6)}, [2, 3, 6], [2, 3, 4]), {"x": _w(2, 3, 6)}


def _not_matmul():
    node = helper.make_node("Add", ["x", "fc.weight"], ["y"], name="/fc/Add")
    return _model([node], {"fc.weight": _w(6)}, [1, 3, 6], [1, 3, 6]), {"x": _w(1, 3, 6)}


REJECTED = [
    ("weight on the left", _weight_left, "the constant is the left operand"),
    ("weight is a graph input", _weight_input, "second input is not a constant initializer"),
    ("weight computed at run time", _weight_computed, "second input is not a constant initializer"),
    ("Gemm transA=1", _gemm_trans_a, "Gemm with transA=1"),
    ("3-D weight", _weight_3d, "weight 'fc.weight' is 3-D"),
    ("3-D transpose", _transpose_3d, "weight goes through Transpose with perm [0, 2, 1]"),
    ("not a MatMul or Gemm", _not_matmul, None),
]


@pytest.mark.parametrize(("build", "reason"), [r[1:] for r in REJECTED], ids=[r[0] for r in REJECTED])
def test_rejected_candidates_say_why(build, reason, caplog):
    model, feeds = build()
    assert _run(model, feeds).size > 0  # the graph is valid: the refusal is about its structure
    with caplog.at_level(logging.DEBUG, logger="lora_runtime.compiler.points"):
        assert find_candidates(model.graph) == []
    if reason is not None:
        assert reason in caplog.text


# --- resolve ------------------------------------------------------------------------------------------------------

def _cand(node: str, *aliases: str) -> Candidate:
    return Candidate(node, "MatMul", "x", f"{node}_out", f"{node}_w", 6, 4, aliases)


def _legacy_two_layers() -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "onnx::MatMul_1"], ["h"], name="/model/layers.0/self_attn/q_proj/MatMul"),
             helper.make_node("MatMul", ["h", "onnx::MatMul_2"], ["y"], name="/model/layers.1/self_attn/q_proj/MatMul")]
    return _model(nodes, {"onnx::MatMul_1": _w(6, 6), "onnx::MatMul_2": _w(6, 4)}, [1, 3, 6], [1, 3, 4])


def test_two_layer_graph_runs_and_has_two_candidates():
    model = _legacy_two_layers()
    x = _w(1, 3, 6)
    w1, w2 = (numpy_helper.to_array(t) for t in model.graph.initializer)
    np.testing.assert_allclose(_run(model, {"x": x}), x @ w1 @ w2, rtol=1e-5, atol=1e-5)
    cands = find_candidates(model.graph)
    assert [(c.aliases, c.x, c.y, c.in_features, c.out_features) for c in cands] == [
        ((Q0,), "x", "h", 6, 6), (("model.layers.1.self_attn.q_proj",), "h", "y", 6, 4)]


def test_plain_name_matching_two_layers_is_ambiguous():
    cands = find_candidates(_legacy_two_layers().graph)
    with pytest.raises(AttachmentError, match=re.escape(
            "base.onnx: module 'q_proj' matches 2 ops ('/model/layers.0/self_attn/q_proj/MatMul', "
            "'/model/layers.1/self_attn/q_proj/MatMul'); give the full module path")):
        resolve(cands, ["q_proj"], "base.onnx")


def test_full_paths_resolve_each_layer():
    cands = find_candidates(_legacy_two_layers().graph)
    points = resolve(cands, ["model.layers.1.self_attn.q_proj", Q0], "base.onnx")
    assert {m: p.candidate.node for m, p in points.items()} == {
        Q0: "/model/layers.0/self_attn/q_proj/MatMul",
        "model.layers.1.self_attn.q_proj": "/model/layers.1/self_attn/q_proj/MatMul"}


# (id, candidates, modules) -> module -> node
RESOLVED = [
    ("exact match", [_cand("n0", Q0)], [Q0], {Q0: "n0"}),
    ("exact wins over a wrapper suffix", [_cand("wrapped", "m." + Q0), _cand("exact", Q0)], [Q0], {Q0: "exact"}),
    ("exact wins over a shorter alias", [_cand("short", "self_attn.q_proj"), _cand("exact", Q0)], [Q0],
     {Q0: "exact"}),
    ("module is a dotted suffix of the alias", [_cand("n0", "m." + Q0)], [Q0], {Q0: "n0"}),
    ("alias is a dotted suffix of the module", [_cand("n0", "layers.0.self_attn.q_proj")], [Q0], {Q0: "n0"}),
    ("second alias matches", [_cand("n0", "fc", Q0)], [Q0], {Q0: "n0"}),
    ("one module per op", [_cand("n0", Q0), _cand("n1", "model.layers.0.self_attn.k_proj")],
     ["model.layers.0.self_attn.k_proj", Q0], {Q0: "n0", "model.layers.0.self_attn.k_proj": "n1"}),
]


@pytest.mark.parametrize(("cands", "modules", "want"), [r[1:] for r in RESOLVED], ids=[r[0] for r in RESOLVED])
def test_resolve(cands, modules, want):
    points = resolve(cands, modules, "base.onnx")
    assert {m: p.candidate.node for m, p in points.items()} == want
    assert list(points) == modules


# (id, candidates, modules, message)
UNRESOLVED = [
    ("no match", [_cand("n0", Q0)], ["model.layers.0.mlp.up_proj"],
     r"base\.onnx: module 'model\.layers\.0\.mlp\.up_proj' matches no MatMul/Gemm with a constant weight "
     r"\(1 candidates, e\.g\. 'model\.layers\.0\.self_attn\.q_proj'\)"),
    ("no candidates at all", [], [Q0], r"module 'model\.layers\.0\.self_attn\.q_proj' matches no .*\(0 candidates, "
                                       r"e\.g\. none\)"),
    ("suffix not on a dot", [_cand("n0", Q0)], ["attn.q_proj"], r"module 'attn\.q_proj' matches no"),
    ("name is only a tail", [_cand("n0", Q0)], ["proj"], r"module 'proj' matches no"),
    ("two exact matches", [_cand("n0", Q0), _cand("n1", Q0)], [Q0], r"matches 2 ops \('n0', 'n1'\)"),
    ("two wrapper suffixes", [_cand("n0", "a." + Q0), _cand("n1", "b." + Q0)], [Q0], r"matches 2 ops"),
    ("two modules on one op", [_cand("n0", Q0)], [Q0, "self_attn.q_proj"],
     r"modules 'model\.layers\.0\.self_attn\.q_proj' and 'self_attn\.q_proj' both resolve to op 'n0'"),
]


@pytest.mark.parametrize(("cands", "modules", "message"), [r[1:] for r in UNRESOLVED],
                         ids=[r[0] for r in UNRESOLVED])
def test_resolve_refuses(cands, modules, message):
    with pytest.raises(AttachmentError, match=message):
        resolve(cands, modules, "base.onnx")


# --- the real exports ---------------------------------------------------------------------------------------------

EXPORTS = [(family, onnx_file, adapter)
           for family, adapters in (("llama", ("a", "b", "bf16", "c", "h16")), ("gpt2", ("p", "q")))
           for onnx_file in ("dynamo.onnx", "torchscript.onnx") for adapter in adapters]
_GRAPHS: dict[str, onnx.GraphProto] = {}


def _fixture_graph(family: str, onnx_file: str) -> onnx.GraphProto:
    key = f"{family}/{onnx_file}"
    if key not in _GRAPHS:
        _GRAPHS[key] = onnx.load(str(FIXTURES / key)).graph
    return _GRAPHS[key]


def _ab_shapes(path) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """module -> (A shape, B shape), read with the safetensors package (BF16 is read as raw slices)."""
    with safetensors.safe_open(str(path), framework="np") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    out: dict[str, tuple] = {}
    for key, shape in shapes.items():
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        a, b = out.get(module, (None, None))
        out[module] = (shape, b) if ".lora_A." in key else (a, shape)
    return out


@pytest.mark.parametrize(("family", "onnx_file", "adapter"), EXPORTS,
                         ids=[f"{f}/{o}/{a}" for f, o, a in EXPORTS])
def test_fixture_modules_resolve_to_distinct_ops_of_the_right_shape(family, onnx_file, adapter):
    graph = _fixture_graph(family, onnx_file)
    shapes = _ab_shapes(FIXTURES / family / "adapters" / adapter / "adapter_model.safetensors")
    points = resolve(find_candidates(graph), sorted(shapes), f"{family}/{onnx_file}")
    assert set(points) == set(shapes)
    assert len({p.candidate.node for p in points.values()}) == len(points)
    for module, point in points.items():
        (r, d_in), (d_out, r_b) = shapes[module]
        assert r == r_b
        c = point.candidate
        assert (c.in_features, c.out_features) == (d_in, d_out), module
        node = next(n for n in graph.node if n.name == c.node)
        assert (node.op_type, node.input[0], node.output[0]) == (c.op_type, c.x, c.y)
        assert c.op_type == ("MatMul" if family == "llama" else "Gemm")
        assert not c.transposed  # both exporters store these weights (in, out) (tools/README.md)


def test_gpt2_mlp_c_proj_is_not_attn_c_proj():
    """The q adapter targets mlp.c_proj only; its op must be the 128 -> 32 one, never attn's 32 -> 32."""
    for onnx_file in ("dynamo.onnx", "torchscript.onnx"):
        points = resolve(find_candidates(_fixture_graph("gpt2", onnx_file)), ["transformer.h.0.mlp.c_proj"], "")
        c = points["transformer.h.0.mlp.c_proj"].candidate
        assert (c.in_features, c.out_features) == (128, 32)
