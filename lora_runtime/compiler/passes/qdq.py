"""The QDQ pass: execute encodings on ONNX Runtime.

Base linear ops (every MatMul/Gemm with a constant weight that is not a LoRA slot)::

    x ──► Q(s_x, z_x) ──► DQ ──┐
    W_int8 (in, out) ──► DQ(s_W per output channel, axis=1) ──► MatMul ──► y.base   [+ Add(bias) for Gemm]

ONNX Runtime fuses ``DQ(x) + DQ(W) + MatMul`` into ``MatMulIntegerToFloat`` (int8 GEMM), also when the
activation's scale and zero point are graph inputs (measured: ORT 1.32). Base weights are constant int8
with constant scales: they always fuse. The LoRA branch reuses the quantized ``x``; its weights are
quantized in the graph (``Mul(Clip(Round(W / s)), s)``, exact for any bitwidth and opset, one scale per
row), its MatMuls stay float (rank-r work), and the input of its second MatMul (``<m>.lora/scaled``)
gets an activation encoding of its own::

    x.dq ──► MatMul(Transpose(fq(A, s_A))) ──► Mul(gain) ──► Q/DQ(s, z) ──► MatMul(Transpose(fq(B, s_B)))

A base linear layer whose input is wider than 8 bits (16-bit, float16) dequantizes its weight with
``Mul(Sub(Cast(W_int8), zp), s)`` instead: ONNX Runtime would fuse ``DQ(W) + MatMul`` into ``MatMulNBits``,
whose default int8 compute requantizes the input to 8 bits per block (measured on SmolLM2 W8A16: 32 -> 27.6 dB
logit SQNR), while these constants fold into the float weight when the session loads: the layer runs exactly
as encoded, at float32 speed, and the file keeps int8. 8-bit layers in the same graph keep their int8 GEMM.
Block-wise weights (int4) become ``MatMulNBits`` with float32 compute.

Encodings that are updatable per use-case become graph inputs (slots) instead of constants. Base weight
codes are the nearest ones, or GPTQ's (``plan.gram``: see lora_runtime.quant.gptq) on the same grid.
The weights' part of the rewrite is in ``qdq_weights``; this module places the activations' Q/DQ pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from lora_runtime.compiler.passes import PassResult
from lora_runtime.compiler.passes.branch import BranchTensors
from lora_runtime.compiler.passes.emit import onnx_type, own_base_tensors, use_ms_domain
from lora_runtime.compiler.passes.qdq_plan import Constants, QdqPlan
from lora_runtime.compiler.passes.qdq_weights import (
    integer_slots,
    qdq_domain,
    quantize_bias,
    quantize_constants,
    quantize_linear,
    quantize_lora_weight,
)
from lora_runtime.compiler.points import find_candidates
from lora_runtime.errors import BaseModelError
from lora_runtime.external_data import DataWriter, read_tensor
from lora_runtime.graph import GraphEdit
from lora_runtime.names import dequantized, quantized, scale_of, zero_point_of
from lora_runtime.quant.encodings import Encoding
from lora_runtime.quant.rules import to_qdq

MIN_OPSET = 13  # per-axis DequantizeLinear


@dataclass(frozen=True)
class QdqOptions:
    plan: QdqPlan
    branches: Mapping[str, BranchTensors]  # what the branch pass made, by module
    base_dir: Path  # where the base model's external data is
    out: Path  # the bundle being written
    data_name: str  # its own data file, relative to ``out``
    say: Callable[[str], None] = lambda _m: None

    @property
    def lora_slots(self) -> frozenset[str]:
        return frozenset(s for b in self.branches.values() for s in (b.a_slot, b.b_slot))


@dataclass(frozen=True)
class QdqResult(PassResult):
    weight_encodings: tuple[Encoding, ...]  # of the base weights, in graph order


def activation_tensors(model: onnx.ModelProto, branches: Mapping[str, BranchTensors]) -> list[str]:
    """Tensors that get an activation encoding: inputs of base linear ops, and each branch's ``scaled``."""
    lora = {s for b in branches.values() for s in (b.a_slot, b.b_slot)}
    seen: list[str] = []
    for c in find_candidates(model.graph):
        if c.weight not in lora and c.x not in seen:
            seen.append(c.x)
    return seen + [b.scaled for b in branches.values()]


def apply_qdq(model: onnx.ModelProto, options: QdqOptions) -> QdqResult:
    """Rewrite ``model`` in place (see the module docstring); return the base weights' encodings."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise BaseModelError(f"INT8 execution needs opset {MIN_OPSET} or later; the base model has opset {opset}")
    plan, g = options.plan, model.graph
    acts = plan.activations
    consts = Constants()
    edit = GraphEdit(g)
    candidates = {c.node: c for c in find_candidates(g) if c.weight not in options.lora_slots}
    inits = {t.name: t for t in g.initializer}
    weights: list[Encoding] = []
    with open(options.out / options.data_name, "wb") as f:
        writer = DataWriter(f, options.data_name)
        # base linear layers: int8 weights, reading the dequantized activation
        for i, key, node in edit.keyed():
            c = candidates.get(key)
            done = None if c is None else quantize_linear(node, c, inits, plan, writer, consts, options.base_dir)
            if done is not None:
                edit.replace(i, done[0])
                weights.append(done[1])
        # the LoRA branch: its MatMuls read quantized inputs; its weights are quantized before their Transpose
        # (in the graph, as float slots), or are integer slots read through a DequantizeLinear (full groups)
        matmuls = {b.matmul_a for b in options.branches.values()} | {b.matmul_b for b in options.branches.values()}
        readers: list[onnx.NodeProto] = []
        transposes = {b.transpose_a: b.a_slot for b in options.branches.values()} | {
            b.transpose_b: b.b_slot for b in options.branches.values()}
        for i, node in edit.nodes():
            if node.name in matmuls:
                readers.append(node)
            elif node.name in transposes and not plan.full:
                slot = transposes[node.name]
                enc = plan.lora_weights.get(slot)
                if enc is not None:
                    fq, read = quantize_lora_weight(node.input[0], slot, enc, slot in plan.updatable, consts)
                    node.input[0] = read
                    edit.replace(i, [*fq, node])
        keep: set[int] = set()  # nodes that read the original tensor: the Q of an activation, the DQ of a slot
        if plan.full:
            slot_dqs = integer_slots(g, plan.integer_slots, plan.lora_weights, consts, opset)
            keep |= {id(n) for n in slot_dqs}
            edit.prepend(slot_dqs)
            edit.prepend(quantize_constants(plan.constants, inits, writer, consts, options.base_dir, opset))
            edit.prepend(quantize_bias(b, read_tensor(inits[b], options.base_dir).astype(np.float64),
                                       acts[x].scale[0], plan.constants[w].scale[0], consts)
                         for b, (x, w) in plan.norm_biases.items())
        # activations: Q/DQ right after each producer (or first, for graph inputs)
        made = edit.producers()
        outputs = {v.name for v in g.output}
        for t, enc in acts.items():
            read = t
            if t in outputs:  # the graph's output becomes the DequantizeLinear's: its producer writes <t>/float
                read = f"{t}/float"
                producer = made[t][1]
                producer.output[:] = [read if o == t else o for o in producer.output]
            pair = _qdq(t, enc, t in plan.updatable, opset, consts, read)
            keep.add(id(pair[0]))
            if t in made:
                edit.insert_after(made[t][0], pair)
            else:  # a graph input
                edit.prepend(pair)
        # who reads the dequantized tensors: full groups, every node (constants and slots too); else the branch's
        # MatMuls (the base linear layers were made reading them)
        rewire = {t: dequantized(t) for t in [*acts, *plan.constants, *plan.norm_biases,
                                              *(plan.lora_weights if plan.full else ())] if t not in outputs}
        for node in (edit.pending() if plan.full else readers):
            if id(node) not in keep:
                node.input[:] = [rewire.get(x, x) for x in node.input]
        _requantize(edit, plan.requantize, opset, consts)
        if opset < 21 and any(e.dtype == "INT" and e.bw == 16 for e in [*acts.values(), *plan.constants.values(),
                                                                        *plan.lora_weights.values()]):
            use_ms_domain(model)
        edit.add_initializers(consts.tensors)
        edit.add_inputs(consts.inputs)
        edit.apply()
        own_base_tensors(g, writer, options.base_dir)
    if any(n.op_type == "MatMulNBits" for n in g.node):
        use_ms_domain(model)
    return QdqResult(model, tuple(weights))


def _requantize(edit: GraphEdit, narrower: Mapping[str, Encoding], opset: int, consts: Constants) -> None:
    """MatMuls whose second operand is in ``narrower`` read it through one more Q/DQ pair at that encoding."""
    made: set[str] = set()
    reads = {dequantized(t): t for t in narrower}  # what a MatMul reads after the rewire: <t>/dq
    for i, node in edit.nodes():
        t = reads.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if t is None:
            continue
        narrow = f"{t}/{narrower[t].bw}bit"
        pair = [] if narrow in made else _qdq(narrow, narrower[t], False, opset, consts, dequantized(t))
        made.add(narrow)
        node.input[1] = narrow  # the pair reads <t>/dq and its DequantizeLinear writes <t>/<bw>bit
        edit.replace(i, [*pair, node])


def _qdq(tensor: str, enc: Encoding, updatable: bool, opset: int, consts: Constants, read: str
         ) -> list[onnx.NodeProto]:
    """``read -> Q -> DQ -> <tensor>/dq`` (``read`` is ``tensor``, or for a graph output its producer's renamed
    output, and the DQ then writes ``tensor`` itself); a FLOAT (float16) encoding is a Cast pair that rounds
    exactly as float16 storage would."""
    out = tensor if read != tensor else dequantized(tensor)
    if enc.dtype == "FLOAT":  # mixed precision kept it floating point
        return [helper.make_node("Cast", [read], [f"{tensor}/f16"], name=f"{tensor}/ToFloat16",
                                 to=TensorProto.FLOAT16),
                helper.make_node("Cast", [f"{tensor}/f16"], [out], name=f"{tensor}/ToFloat32", to=TensorProto.FLOAT)]
    scale, zp, _ = to_qdq(enc)
    s_name, z_name = scale_of(tensor), zero_point_of(tensor)
    if updatable:
        consts.input(s_name, TensorProto.FLOAT, [])
        consts.input(z_name, onnx_type(zp.dtype), [])
    else:
        consts.add(s_name, scale)
        consts.add(z_name, zp)
    domain = qdq_domain(zp, opset)
    return [helper.make_node("QuantizeLinear", [read, s_name, z_name], [quantized(tensor)], name=f"{tensor}/Q",
                             domain=domain),
            helper.make_node("DequantizeLinear", [quantized(tensor), s_name, z_name], [out], name=f"{tensor}/DQ",
                             domain=domain)]
