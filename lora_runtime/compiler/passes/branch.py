"""The branch pass: one rewrite, three generations.

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
* v3: ``g = Gather(lora_alpha, lora_strength_index.<k>) * lora_column_scaling.<k>``, shape (R,):
  ``lora_alpha`` (N,) holds one strength per adapter, the constant index map expands it to the
  concatenated rank, and the constant scaling holds each column's PEFT scaling. This is PEFT's
  ``cat`` combination: ``y = W0 x + B_cat ((A_cat x) * s_expanded * scaling_expanded)``. Points whose
  columns have the same layout (the same adapters, ranks and scalings: all the points an adapter set
  targets) share one gain ``k``, computed once at the graph's start (``names.GainNames``): two ops per
  layout instead of two per point, which ONNX Runtime would run every token.

A base op that computes in float16 (a ``model.half()`` export, or a float16 island of a float32 graph) gets
the branch as PEFT computes it on a half model (its LoRA weights autocast to float32): the branch reads ``x``
through a Cast to float32, runs in float32, adds into the base output cast up to float32, and the sum is cast
back to the op's dtype once (PEFT's ``result.to(torch_result_dtype)``)::

    x ──► Op(W0 float16) ──► y.base ──► Cast(f32) ──► Add ──► <m>.lora/sum ──► Cast(f16) ──► y
    └──► Cast(f32) ──► MatMulA ─► … ─► MatMulB (float32) ──────────┘

Float32 ops get no Cast: their graph is exactly the one above.

A packed point (v3 on the ort flavour, ``compiler.patches.plan_branches``) is one branch on a packed linear op's
whole output (q/k/v side by side, or gate/up), before its ``Split``: A holds every module's columns (module by
module, each adapter's within), B is (q + k + v out, R) with each module's B in its own rows and columns and zeros
elsewhere, so ``B (A x * g)`` is each module's delta in its own slice. Four ops per packed op instead of four per
module; and attention, whose q/k/v then go straight from the Split into it, reads them packed (the Split dropped).

Every name comes from :class:`lora_runtime.names.BranchNames`; the pass returns, per point, the tensors and
nodes it made (:class:`BranchTensors`), which the QDQ pass quantizes without looking at a name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lora_runtime.compiler.passes import PassResult
from lora_runtime.compiler.points import Candidate
from lora_runtime.graph import GraphEdit
from lora_runtime.names import (
    GAIN,
    GAIN_NODE,
    PACKED_SLICE,
    SCALING,
    STRENGTH,
    BranchNames,
    GainNames,
    base_output,
    lora_a,
    lora_b,
)

GENERATIONS = ("v1", "v2", "v3")


@dataclass(frozen=True)
class Member:
    """A PEFT module inside a packed point: its own slice's candidate and its rows [start, stop) of the packed
    output."""

    module: str
    candidate: Candidate
    start: int
    stop: int


@dataclass(frozen=True)
class Branch:
    """What the rewrite needs to know about one point: where, how wide, and (v3) each column's owner."""

    index: int  # position p in the bundle's point list
    module: str  # a PEFT module path, or a packed op's (``members`` then names the modules it holds)
    candidate: Candidate
    rank: int  # slot rank R: max over adapters (v1/v2) or sum over adapters (v3)
    column_adapter: tuple[int, ...] = ()  # v3: adapter index of every column
    column_scaling: tuple[float, ...] = ()  # v3: PEFT scaling of every column
    members: tuple[Member, ...] = ()  # a packed point (v3): its modules, each owning a run of columns


@dataclass(frozen=True)
class BranchOptions:
    branches: tuple[Branch, ...]
    generation: str
    n_adapters: int
    # v2/v3: the initializers of the LoRA tensors (A, B and v2's lora_scaling), typically external data inside
    # a patch file; v1 makes them graph inputs only
    parameters: Mapping[str, TensorProto] = field(default_factory=dict)
    lora_dtype: str = "float32"  # float16: A and B widened by a Cast before their Transpose

    def __post_init__(self) -> None:
        if self.generation not in GENERATIONS:
            raise ValueError(f"generation must be one of {GENERATIONS}, got {self.generation!r}")


@dataclass(frozen=True)
class BranchTensors:
    """The names one branch created, for the passes after it."""

    module: str
    x: str  # the base op's activation input, which the branch reads too (through a Cast if not float32)
    a_slot: str  # <module>.lora_A.weight
    b_slot: str
    transpose_a: str  # node names: the Transposes read a_slot / b_slot (or their float32 Casts)
    transpose_b: str
    matmul_a: str  # reads x
    matmul_b: str  # reads scaled
    scaled: str  # the rank-R intermediate after the gain, input of matmul_b
    base_out: str  # the base op's output, now read by the Add (through a Cast if not float32)
    out: str  # the name the base op wrote before: the Add's output (float32 ops) or the Cast's after it
    base_type: int = TensorProto.FLOAT  # the base op's element type; the branch itself computes in float32


@dataclass(frozen=True)
class BranchResult(PassResult):
    points: Mapping[str, BranchTensors]  # by module


def add_branches(model: onnx.ModelProto, options: BranchOptions) -> BranchResult:
    """Rewrite ``model`` in place (see the module docstring)."""
    generation, lora_dtype = options.generation, options.lora_dtype
    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[lora_dtype]
    by_owner = {(_owner(b.candidate), b.candidate.y): b for b in options.branches}  # a packed Split: one per slice
    edit = GraphEdit(model.graph)
    consts: list[TensorProto] = []
    if generation == "v3":
        inputs = [helper.make_tensor_value_info(STRENGTH, TensorProto.FLOAT, [options.n_adapters])]
    else:
        inputs = [helper.make_tensor_value_info(STRENGTH, TensorProto.FLOAT, []),
                  helper.make_tensor_value_info(SCALING, TensorProto.FLOAT, [len(options.branches)])]
        edit.prepend([helper.make_node("Mul", [STRENGTH, SCALING], [GAIN], name=GAIN_NODE)])

    gains: dict[tuple, str] = {}  # v3: column layout -> its shared gain tensor
    if generation == "v3":
        for b in options.branches:
            layout = (b.column_adapter, b.column_scaling)
            if layout not in gains:
                gains[layout] = _shared_gain(edit, GainNames(len(gains)), b, consts)
    made: dict[str, BranchTensors] = {}
    for i, key, node in edit.keyed():
        for j, b in [(j, by_owner[key, y]) for j, y in enumerate(node.output) if (key, y) in by_owner]:
            made[b.module] = _branch(edit, i, node, j, b, gains.get((b.column_adapter, b.column_scaling)), elem,
                                     inputs, consts)  # v1/v2: no shared gain
    missing = {b.candidate.node for b in options.branches if b.module not in made}
    if missing:
        raise ValueError(f"attachment points not found in the graph: {sorted(missing)}")
    edit.add_inputs(inputs)
    edit.add_initializers(consts)
    edit.add_initializers(options.parameters.values())
    edit.apply()
    return BranchResult(model, made)


def _owner(c: Candidate) -> str:
    """The key of the node whose output the point is: the op itself, or for a slice of a packed op
    (``<split key>/<j>``) its Split."""
    return c.node.rsplit("/", 1)[0] if c.op_type == PACKED_SLICE else c.node


def _shared_gain(edit: GraphEdit, g: GainNames, b: Branch, consts: list[TensorProto]) -> str:
    """v3: the gain of ``b``'s column layout, at the graph's start; returns its tensor."""
    consts.append(numpy_helper.from_array(np.asarray(b.column_adapter, np.int64), g.strength_index))
    consts.append(numpy_helper.from_array(np.asarray(b.column_scaling, np.float32), g.column_scaling))
    edit.prepend([helper.make_node("Gather", [STRENGTH, g.strength_index], [g.strength], name=g.gather),
                  helper.make_node("Mul", [g.strength, g.column_scaling], [g.gain], name=g.mul)])
    return g.gain


def _branch(edit: GraphEdit, i: int, node: onnx.NodeProto, j: int, b: Branch, v3_gain: str | None, elem: int,
            inputs: list, consts: list[TensorProto]) -> BranchTensors:
    """One point's branch: node ``i``'s output ``j`` (the module's output) renamed to its base output, the
    branch's nodes after node ``i``, the sum under the output's old name. ``v3_gain``: the shared gain of the
    point's column layout (v3), None for v1/v2 (the point gathers its own from ``lora_gain``)."""
    c, m = b.candidate, b.module
    n = BranchNames(m)
    a_name, b_name = lora_a(m), lora_b(m)
    inputs.append(helper.make_tensor_value_info(a_name, elem, [b.rank, c.in_features]))
    inputs.append(helper.make_tensor_value_info(b_name, elem, [c.out_features, b.rank]))
    node.output[j] = base_output(c.y)
    gain_read, gain = v3_gain, []
    if v3_gain is None:
        gain_read = n.gain
        consts.append(numpy_helper.from_array(np.asarray(b.index, np.int64), n.point_index))
        gain = [helper.make_node("Gather", [GAIN, n.point_index], [n.gain], name=n.node("Gather"))]
    a_read, b_read, widen = a_name, b_name, []
    if elem != TensorProto.FLOAT:
        a_read, b_read = n.tensor("A_f32"), n.tensor("B_f32")
        widen = [helper.make_node("Cast", [a_name], [a_read], name=n.node("CastA"), to=TensorProto.FLOAT),
                 helper.make_node("Cast", [b_name], [b_read], name=n.node("CastB"), to=TensorProto.FLOAT)]
    x_read, enter, add = c.x, [], [helper.make_node("Add", [base_output(c.y), n.delta], [c.y], name=n.node("Add"))]
    if c.elem_type != TensorProto.FLOAT:  # PEFT on a half model: float32 branch, one rounding of the sum
        x_read = n.tensor("x_f32")
        enter = [helper.make_node("Cast", [c.x], [x_read], name=n.node("CastX"), to=TensorProto.FLOAT)]
        add = [helper.make_node("Cast", [base_output(c.y)], [n.tensor("base_f32")], name=n.node("CastBase"),
                                to=TensorProto.FLOAT),
               helper.make_node("Add", [n.tensor("base_f32"), n.delta], [n.tensor("sum")], name=n.node("Add")),
               helper.make_node("Cast", [n.tensor("sum")], [c.y], name=n.node("CastOut"), to=c.elem_type)]
    edit.insert_after(i, gain + widen + enter + [
        helper.make_node("Transpose", [a_read], [n.tensor("A_t")], name=n.node("TransposeA"), perm=[1, 0]),
        helper.make_node("MatMul", [x_read, n.tensor("A_t")], [n.u], name=n.node("MatMulA")),
        helper.make_node("Mul", [n.u, gain_read], [n.scaled], name=n.node("Scale")),
        helper.make_node("Transpose", [b_read], [n.tensor("B_t")], name=n.node("TransposeB"), perm=[1, 0]),
        helper.make_node("MatMul", [n.scaled, n.tensor("B_t")], [n.delta], name=n.node("MatMulB")),
        *add,
    ])
    return BranchTensors(m, c.x, a_name, b_name, n.node("TransposeA"), n.node("TransposeB"),
                         n.node("MatMulA"), n.node("MatMulB"), n.scaled, base_output(c.y), c.y, c.elem_type)
