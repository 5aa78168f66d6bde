"""The branch rewrite on one-op graphs: ops added, outputs kept, and ONNX Runtime numerics against numpy

    y = x @ W + sum_i s_i * scaling_i * (x @ A_i.T) @ B_i.T

Each test first shows the LoRA term moves the output, so the comparison cannot pass with the branch ignored."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lora_runtime.compiler.passes.branch import Branch, BranchOptions
from lora_runtime.compiler.passes.branch import add_branches as branch_pass
from lora_runtime.compiler.points import find_candidates
from lora_runtime.names import SCALING, STRENGTH
from lora_runtime.names import lora_a as lora_a_name
from lora_runtime.names import lora_b as lora_b_name

D_IN, D_OUT, T = 6, 4, 5
Q0 = "model.layers.0.self_attn.q_proj"
K0 = "model.layers.0.self_attn.k_proj"
RNG = np.random.default_rng(3)


def _r(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


W = _r(D_IN, D_OUT)
X = _r(1, T, D_IN)
# adapter 0 has rank 2, adapter 1 rank 3
A0, B0, SC0 = _r(2, D_IN), _r(D_OUT, 2), 2.0
A1, B1, SC1 = _r(3, D_IN), _r(D_OUT, 3), 0.75


def add_branches(model: onnx.ModelProto, branches: list[Branch], generation: str, n_adapters: int,
                 params: dict | None = None) -> onnx.ModelProto:
    """The branch pass with its options spelled out (the pass edits and returns ``model``)."""
    return branch_pass(model, BranchOptions(tuple(branches), generation, n_adapters, params or {})).model


def _one_matmul() -> onnx.ModelProto:
    """x (1, T, in) @ W (in, out) -> y; W named after the module, as a hand-built graph would."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", f"{Q0}.weight"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", D_IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", D_OUT])],
        [numpy_helper.from_array(W, f"{Q0}.weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], feeds)[0]


def _lora(x: np.ndarray, terms) -> np.ndarray:
    """sum of s * scaling * x @ A.T @ B.T, in float64."""
    x = x.astype(np.float64)
    return sum(s * sc * (x @ a.T.astype(np.float64)) @ b.T.astype(np.float64) for s, sc, a, b in terms)


def _branch(model: onnx.ModelProto, module: str, rank: int, index: int = 0, **v3) -> Branch:
    (c,) = [c for c in find_candidates(model.graph) if module in c.aliases]
    return Branch(index, module, c, rank, **v3)


def _pad(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """v1/v2 slots hold the max rank; a smaller adapter is zero-filled (PEFT hotswap does the same)."""
    pa = np.zeros((rank, a.shape[1]), np.float32)
    pb = np.zeros((b.shape[0], rank), np.float32)
    pa[: a.shape[0]], pb[:, : b.shape[1]] = a, b
    return pa, pb


V1_V2_OPS = ["Mul", "MatMul", "Gather", "Transpose", "MatMul", "Mul", "Transpose", "MatMul", "Add"]
V3_OPS = ["Gather", "Mul", "MatMul", "Transpose", "MatMul", "Mul", "Transpose", "MatMul", "Add"]  # shared gain first


@pytest.mark.parametrize("strength", [1.0, 0.5, -1.5])
def test_v1_matches_numpy(strength):
    model = add_branches(_one_matmul(), [_branch(_one_matmul(), Q0, 3)], "v1", 1)
    assert [n.op_type for n in model.graph.node] == V1_V2_OPS
    assert [o.name for o in model.graph.output] == ["y"]
    assert [i.name for i in model.graph.input] == ["x", STRENGTH, SCALING, lora_a_name(Q0), lora_b_name(Q0)]
    a, b = _pad(A0, B0, 3)  # rank-2 adapter in a rank-3 slot
    feeds = {"x": X, STRENGTH: np.array(strength, np.float32), SCALING: np.array([SC0], np.float32),
             lora_a_name(Q0): a, lora_b_name(Q0): b}
    base = X @ W
    want = base + _lora(X, [(strength, SC0, A0, B0)])
    assert np.abs(want - base).max() > 1e-2
    np.testing.assert_allclose(_run(model, feeds), want, atol=1e-5, rtol=0)
    # strength 0 gives the base back
    np.testing.assert_allclose(_run(model, {**feeds, STRENGTH: np.array(0.0, np.float32)}), base, atol=1e-5, rtol=0)


def test_v1_branch_names_and_declared_shapes():
    model = add_branches(_one_matmul(), [_branch(_one_matmul(), Q0, 3)], "v1", 1)
    mm = model.graph.node[1]
    assert (mm.name, list(mm.output)) == ("mm", ["y.base"])
    add = model.graph.node[-1]
    assert list(add.input) == ["y.base", f"{Q0}.lora/delta"] and list(add.output) == ["y"]
    dims = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims[lora_a_name(Q0)] == [3, D_IN] and dims[lora_b_name(Q0)] == [D_OUT, 3]
    assert dims[STRENGTH] == [] and dims[SCALING] == [1]
    (index,) = [t for t in model.graph.initializer if t.name == f"{Q0}.lora_point_index"]
    assert numpy_helper.to_array(index).tolist() == 0


def test_v2_parameters_are_overridable_defaults():
    a, b = _pad(A1, B1, 3)
    params = {lora_a_name(Q0): numpy_helper.from_array(a, lora_a_name(Q0)),
              lora_b_name(Q0): numpy_helper.from_array(b, lora_b_name(Q0)),
              SCALING: numpy_helper.from_array(np.array([SC1], np.float32), SCALING)}
    model = add_branches(_one_matmul(), [_branch(_one_matmul(), Q0, 3)], "v2", 1, params)
    assert [n.op_type for n in model.graph.node] == V1_V2_OPS
    assert [o.name for o in model.graph.output] == ["y"]
    inits = {t.name for t in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}
    assert {lora_a_name(Q0), lora_b_name(Q0), SCALING} <= inits & inputs
    assert STRENGTH in inputs and STRENGTH not in inits
    base = X @ W
    want = base + _lora(X, [(0.8, SC1, A1, B1)])
    assert np.abs(want - base).max() > 1e-2
    feeds = {"x": X, STRENGTH: np.array(0.8, np.float32)}
    np.testing.assert_allclose(_run(model, feeds), want, atol=1e-5, rtol=0)
    # feeding other A/B/scaling replaces the stored defaults (this is how a v2 switch works)
    a0, b0 = _pad(A0, B0, 3)
    other = {**feeds, lora_a_name(Q0): a0, lora_b_name(Q0): b0, SCALING: np.array([SC0], np.float32)}
    np.testing.assert_allclose(_run(model, other), base + _lora(X, [(0.8, SC0, A0, B0)]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("strengths", [(1.0, 0.0), (0.0, 1.0), (0.7, -0.3), (1.0, 1.0)])
def test_v3_concatenated_adapters_match_numpy(strengths):
    a_cat, b_cat = np.concatenate([A0, A1]), np.concatenate([B0, B1], axis=1)  # (5, in), (out, 5)
    params = {lora_a_name(Q0): numpy_helper.from_array(a_cat, lora_a_name(Q0)),
              lora_b_name(Q0): numpy_helper.from_array(b_cat, lora_b_name(Q0))}
    branch = _branch(_one_matmul(), Q0, 5, column_adapter=(0, 0, 1, 1, 1), column_scaling=(SC0,) * 2 + (SC1,) * 3)
    model = add_branches(_one_matmul(), [branch], "v3", 2, params)
    assert [n.op_type for n in model.graph.node] == V3_OPS
    assert [o.name for o in model.graph.output] == ["y"]
    inputs = {i.name: i for i in model.graph.input}
    assert SCALING not in inputs
    assert [d.dim_value for d in inputs[STRENGTH].type.tensor_type.shape.dim] == [2]
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert consts["lora_strength_index.0"].tolist() == [0, 0, 1, 1, 1]
    np.testing.assert_array_equal(consts["lora_column_scaling.0"], [2.0, 2.0, 0.75, 0.75, 0.75])
    base = X @ W
    want = base + _lora(X, [(strengths[0], SC0, A0, B0), (strengths[1], SC1, A1, B1)])
    assert np.abs(want - base).max() > 1e-2
    got = _run(model, {"x": X, STRENGTH: np.array(strengths, np.float32)})
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def _two_points() -> onnx.ModelProto:
    """x @ Wq -> h, h @ Wk -> y: two points, so the point index p must pick the right scaling."""
    wk = _r(D_OUT, D_OUT)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", f"{Q0}.weight"], ["h"], name="q"),
         helper.make_node("MatMul", ["h", f"{K0}.weight"], ["y"], name="k")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, D_IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, T, D_OUT])],
        [numpy_helper.from_array(W, f"{Q0}.weight"), numpy_helper.from_array(wk, f"{K0}.weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_v1_two_points_use_their_own_scaling():
    model = _two_points()
    wk = numpy_helper.to_array(model.graph.initializer[1])
    branches = [_branch(model, Q0, 2, index=0), _branch(model, K0, 3, index=1)]
    ak, bk = _r(3, D_OUT), _r(D_OUT, 3)
    add_branches(model, branches, "v1", 1)
    assert [n.op_type for n in model.graph.node] == ["Mul"] + V1_V2_OPS[1:] * 2
    assert [o.name for o in model.graph.output] == ["y"]
    scaling = np.array([SC0, 3.0], np.float32)
    feeds = {"x": X, STRENGTH: np.array(0.5, np.float32), SCALING: scaling,
             lora_a_name(Q0): A0, lora_b_name(Q0): B0, lora_a_name(K0): ak, lora_b_name(K0): bk}
    h = X @ W + _lora(X, [(0.5, SC0, A0, B0)])
    want = h @ wk + _lora(h, [(0.5, 3.0, ak, bk)])
    swapped = h @ wk + _lora(h, [(0.5, SC0, ak, bk)])  # what a wrong index would give
    assert np.abs(want - swapped).max() > 1e-2
    np.testing.assert_allclose(_run(model, feeds), want, atol=1e-5, rtol=0)


def _gemm_bias() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """Gemm(x (T, in), W (out, in), C (out,), transB=1): torch Linear as the TorchScript exporter writes it."""
    w, bias = _r(D_OUT, D_IN), _r(D_OUT)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "fc.weight", "fc.bias"], ["y"], name="/fc/Gemm", transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", D_IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", D_OUT])],
        [numpy_helper.from_array(w, "fc.weight"), numpy_helper.from_array(bias, "fc.bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, w, bias


@pytest.mark.parametrize("generation", ["v1", "v3"])
def test_gemm_with_bias_and_trans_b(generation):
    model, w, bias = _gemm_bias()
    x = X[0]  # (T, in)
    base = x @ w.T + bias
    np.testing.assert_allclose(_run(model, {"x": x}), base, atol=1e-5, rtol=0)
    (c,) = find_candidates(model.graph)
    assert (c.in_features, c.out_features) == (D_IN, D_OUT)
    if generation == "v1":
        add_branches(model, [Branch(0, "fc", c, 2)], "v1", 1)
        feeds = {"x": x, STRENGTH: np.array(1.0, np.float32), SCALING: np.array([SC0], np.float32),
                 "fc.lora_A.weight": A0, "fc.lora_B.weight": B0}
        want = base + _lora(x, [(1.0, SC0, A0, B0)])
        ops = ["Mul", "Gemm", *V1_V2_OPS[2:]]
    else:
        params = {"fc.lora_A.weight": numpy_helper.from_array(np.concatenate([A0, A1]), "fc.lora_A.weight"),
                  "fc.lora_B.weight": numpy_helper.from_array(np.concatenate([B0, B1], axis=1), "fc.lora_B.weight")}
        add_branches(model, [Branch(0, "fc", c, 5, (0, 0, 1, 1, 1), (SC0,) * 2 + (SC1,) * 3)], "v3", 2, params)
        feeds = {"x": x, STRENGTH: np.array([0.6, 1.2], np.float32)}
        want = base + _lora(x, [(0.6, SC0, A0, B0), (1.2, SC1, A1, B1)])
        ops = [*V3_OPS[:2], "Gemm", *V3_OPS[3:]]
    assert [n.op_type for n in model.graph.node] == ops
    assert [o.name for o in model.graph.output] == ["y"]
    assert np.abs(want - base).max() > 1e-2
    np.testing.assert_allclose(_run(model, feeds), want, atol=1e-5, rtol=0)


def _three_matmuls() -> onnx.ModelProto:
    """x @ W -> a, x @ W2 -> b, x @ W3 -> c: three points reading one input, as q/k/v do."""
    w2, w3 = W * 0.5, W[:, ::-1].copy()
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", f"m{i}.weight"], [o], name=f"mm{i}") for i, o in enumerate("abc")]
        + [helper.make_node("Sum", ["a", "b", "c"], ["y"], name="sum")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", D_IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", D_OUT])],
        [numpy_helper.from_array(w, f"m{i}.weight") for i, w in enumerate((W, w2, w3))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, (W, w2, w3)


def test_v3_points_with_one_column_layout_share_one_gain():
    """m0 and m2 carry adapters 0 and 1 with the same ranks and scalings: one Gather/Mul for both; m1 carries
    adapter 1 alone: a gain of its own. Outputs as numpy's per-point sums."""
    model, ws = _three_matmuls()
    cands = {c.node: c for c in find_candidates(model.graph)}
    two, one = ((0, 0, 1, 1, 1), (SC0,) * 2 + (SC1,) * 3), ((1, 1, 1), (SC1,) * 3)
    layout = {"m0": two, "m1": one, "m2": two}
    a_cat, b_cat = np.concatenate([A0, A1]), np.concatenate([B0, B1], axis=1)
    weights = {"m0": (a_cat, b_cat), "m1": (A1, B1), "m2": (a_cat * 0.5, b_cat)}
    params = {f"{m}.{ab}.weight": numpy_helper.from_array(t, f"{m}.{ab}.weight")
              for m, (a, b) in weights.items() for ab, t in (("lora_A", a), ("lora_B", b))}
    branches = [Branch(i, m, cands[f"mm{i}"], len(layout[m][0]), *layout[m]) for i, m in enumerate(("m0", "m1", "m2"))]
    add_branches(model, branches, "v3", 2, params)
    assert [n.op_type for n in model.graph.node].count("Gather") == 2
    assert [n.op_type for n in model.graph.node].count("Mul") == 2 + 3  # two gains, one Scale per point
    s = np.array([0.6, -1.2], np.float32)
    x = X
    want = sum(x @ w for w in ws) + _lora(x, [(s[0], SC0, A0, B0), (s[1], SC1, A1, B1)]) \
        + _lora(x, [(s[1], SC1, A1, B1)]) + _lora(x, [(s[0], SC0, A0 * 0.5, B0), (s[1], SC1, A1 * 0.5, B1)])
    np.testing.assert_allclose(_run(model, {"x": x, STRENGTH: s}), want, atol=1e-4, rtol=0)


def test_unknown_generation_is_refused():
    with pytest.raises(ValueError, match=r"generation must be one of \('v1', 'v2', 'v3'\), got 'v4'"):
        add_branches(_one_matmul(), [], "v4", 1)


def test_branch_for_a_node_not_in_the_graph_is_refused():
    branch = _branch(_one_matmul(), Q0, 2)
    other = _one_matmul()
    other.graph.node[0].name = "renamed"
    with pytest.raises(ValueError, match=r"attachment points not found in the graph: \['mm'\]"):
        add_branches(other, [branch], "v1", 1)


def test_unnamed_op_beside_a_node_named_like_its_positional_name():
    """An unnamed MatMul at index 0 and a node literally named 'MatMul_0': only the chosen one gets the branch."""
    wk = _r(D_OUT, D_OUT)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", f"{Q0}.weight"], ["h"]),
         helper.make_node("MatMul", ["h", f"{K0}.weight"], ["y"], name="MatMul_0")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, T, D_IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, T, D_OUT])],
        [numpy_helper.from_array(W, f"{Q0}.weight"), numpy_helper.from_array(wk, f"{K0}.weight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    add_branches(model, [_branch(model, K0, 2)], "v1", 1)
    assert [n.op_type for n in model.graph.node] == ["Mul", "MatMul"] + V1_V2_OPS[1:]
    assert list(model.graph.node[1].output) == ["h"]  # the unnamed op is untouched
    feeds = {"x": X, STRENGTH: np.array(1.0, np.float32), SCALING: np.array([SC0], np.float32),
             lora_a_name(K0): A0[:, :D_OUT], lora_b_name(K0): B0}
    h = X @ W
    want = h @ wk + _lora(h, [(1.0, SC0, A0[:, :D_OUT], B0)])
    assert np.abs(want - h @ wk).max() > 1e-2
    np.testing.assert_allclose(_run(model, feeds), want, atol=1e-5, rtol=0)
