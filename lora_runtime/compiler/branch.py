"""The branch rewrite: one pass, three generations.

At every attachment point the op's output gets the LoRA branch added (names are PEFT's, so a PEFT
safetensors file loads without remapping and Netron shows where each adapter sits)::

    before:  x ──► Op(W0) ──► y ──► consumers

    after:   x ──► Op(W0) ──► y.base ──────────────────────────────────► Add ──► y ──► consumers
             └──► MatMul(Transpose(<m>.lora_A.weight)) ─► u (…, R)          ▲
                   u ──► Mul(g) ──► MatMul(Transpose(<m>.lora_B.weight)) ───┘

A is stored (R, in) and B (out, R) exactly as PEFT stores them; ONNX Runtime fuses each
Transpose+MatMul into one FusedMatMul, so nothing is copied per run. ``g`` is the gain on the rank
axis, where it costs R multiplies per token:

* v1/v2: ``g = Gather(lora_alpha * lora_scaling, p)``, a scalar: ``lora_alpha`` is the scalar strength
  input and ``lora_scaling`` (P,) holds the current adapter's PEFT scaling per point (a slot, since
  each adapter has its own). v1 makes A, B and ``lora_scaling`` graph inputs; v2 makes them
  initializers that are also graph inputs (ONNX Runtime never folds those) holding a default adapter.
* v3: ``g = Gather(lora_alpha, <m>.lora_strength_index) * <m>.lora_column_scaling``, shape (R,):
  ``lora_alpha`` (N,) holds one strength per adapter, the constant index map expands it to the
  concatenated rank, and the constant scaling holds each column's PEFT scaling. This is PEFT's
  ``cat`` combination: ``y = W0 x + B_cat ((A_cat x) * s_expanded * scaling_expanded)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lora_runtime.compiler.points import Candidate, node_keys

STRENGTH = "lora_alpha"
SCALING = "lora_scaling"
GAIN = "lora_gain"
GAIN_NODE = "lora/gain"
GENERATIONS = ("v1", "v2", "v3")


def lora_a_name(module: str) -> str:
    return f"{module}.lora_A.weight"


def lora_b_name(module: str) -> str:
    return f"{module}.lora_B.weight"


@dataclass(frozen=True)
class Branch:
    """What the rewrite needs to know about one point: where, how wide, and (v3) each column's owner."""

    index: int  # position p in the bundle's point list
    module: str
    candidate: Candidate
    rank: int  # slot rank R: max over adapters (v1/v2) or sum over adapters (v3)
    column_adapter: tuple[int, ...] = ()  # v3: adapter index of every column
    column_scaling: tuple[float, ...] = ()  # v3: PEFT scaling of every column


def add_branches(model: onnx.ModelProto, branches: list[Branch], generation: str, n_adapters: int,
                 parameters: dict[str, TensorProto] | None = None, lora_dtype: str = "float32") -> onnx.ModelProto:
    """Rewrite ``model`` in place and return it.

    ``parameters`` holds the initializers for the LoRA tensors of v2/v3 (A, B and, for v2,
    ``lora_scaling``), already built by the caller (typically as external data inside a patch file).
    With ``lora_dtype="float16"``, A and B are float16 tensors, each widened by a ``Cast`` to float32
    before its Transpose (R x in elements per point and run: the branch computes in float32).
    """
    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[lora_dtype]
    if generation not in GENERATIONS:
        raise ValueError(f"generation must be one of {GENERATIONS}, got {generation!r}")
    graph = model.graph
    parameters = parameters or {}
    by_node = {b.candidate.node: b for b in branches}
    n_points = len(branches)
    new_inputs: list[onnx.ValueInfoProto] = []
    consts: list[TensorProto] = []
    head: list[onnx.NodeProto] = []

    if generation == "v3":
        new_inputs.append(helper.make_tensor_value_info(STRENGTH, TensorProto.FLOAT, [n_adapters]))
    else:
        new_inputs.append(helper.make_tensor_value_info(STRENGTH, TensorProto.FLOAT, []))
        new_inputs.append(helper.make_tensor_value_info(SCALING, TensorProto.FLOAT, [n_points]))
        head.append(helper.make_node("Mul", [STRENGTH, SCALING], [GAIN], name=GAIN_NODE))

    nodes: list[onnx.NodeProto] = []
    found: set[str] = set()
    for node, key in zip(graph.node, node_keys(graph)):
        nodes.append(node)
        b = by_node.get(key)
        if b is None:
            continue
        found.add(b.candidate.node)
        c = b.candidate
        m = b.module
        a_name, b_name = lora_a_name(m), lora_b_name(m)
        new_inputs.append(helper.make_tensor_value_info(a_name, elem, [b.rank, c.in_features]))
        new_inputs.append(helper.make_tensor_value_info(b_name, elem, [c.out_features, b.rank]))
        base_out = f"{c.y}.base"
        node.output[0] = base_out
        p = f"{m}.lora"
        if generation == "v3":
            idx, scale = f"{m}.lora_strength_index", f"{m}.lora_column_scaling"
            consts.append(numpy_helper.from_array(np.asarray(b.column_adapter, np.int64), idx))
            consts.append(numpy_helper.from_array(np.asarray(b.column_scaling, np.float32), scale))
            gain_nodes = [helper.make_node("Gather", [STRENGTH, idx], [f"{p}/strength"], name=f"{p}/Gather"),
                          helper.make_node("Mul", [f"{p}/strength", scale], [f"{p}/gain"], name=f"{p}/Gain")]
        else:
            idx = f"{m}.lora_point_index"
            consts.append(numpy_helper.from_array(np.asarray(b.index, np.int64), idx))
            gain_nodes = [helper.make_node("Gather", [GAIN, idx], [f"{p}/gain"], name=f"{p}/Gather")]
        widen = []
        if elem != TensorProto.FLOAT:
            widen = [helper.make_node("Cast", [a_name], [f"{p}/A_f32"], name=f"{p}/CastA", to=TensorProto.FLOAT),
                     helper.make_node("Cast", [b_name], [f"{p}/B_f32"], name=f"{p}/CastB", to=TensorProto.FLOAT)]
            a_name, b_name = f"{p}/A_f32", f"{p}/B_f32"
        nodes += gain_nodes + widen + [
            helper.make_node("Transpose", [a_name], [f"{p}/A_t"], name=f"{p}/TransposeA", perm=[1, 0]),
            helper.make_node("MatMul", [c.x, f"{p}/A_t"], [f"{p}/u"], name=f"{p}/MatMulA"),
            helper.make_node("Mul", [f"{p}/u", f"{p}/gain"], [f"{p}/scaled"], name=f"{p}/Scale"),
            helper.make_node("Transpose", [b_name], [f"{p}/B_t"], name=f"{p}/TransposeB", perm=[1, 0]),
            helper.make_node("MatMul", [f"{p}/scaled", f"{p}/B_t"], [f"{p}/delta"], name=f"{p}/MatMulB"),
            helper.make_node("Add", [base_out, f"{p}/delta"], [c.y], name=f"{p}/Add"),
        ]
    missing = set(by_node) - found
    if missing:
        raise ValueError(f"attachment points not found in the graph: {sorted(missing)}")

    del graph.node[:]
    graph.node.extend(head + nodes)
    graph.input.extend(new_inputs)
    graph.initializer.extend(consts)
    graph.initializer.extend(parameters.values())
    return model
