"""What a graph with full QDQ groups quantizes (the HTP target): every float tensor, every float constant, and
the LoRA slots as integers.

QNN's HTP runs an op as an integer kernel only when every input comes through a ``DequantizeLinear`` and its
output goes into a ``QuantizeLinear`` with constant encodings; a group whose inputs and output differ in
dtype runs in float (measured on the simulator: a u16 x u8 multiply becomes a float ``ElementWiseMultiply``).
So, per preset: every activation at the activation bitwidth, base weights int8 per output channel, other
float constants per tensor at the activation bitwidth, LoRA weights at their bitwidth per tensor.

Ops that only move data (``Reshape``, ``Transpose``, ``Gather``, ``Slice``, ...) keep their input's encoding,
so they never requantize; a ``Gather`` from a constant table (an embedding) takes the table's encoding, which
QNN needs for an integer Gather.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from lora_runtime.compiler.passes.branch import BranchTensors
from lora_runtime.external_data import read_tensor
from lora_runtime.graph import consumers, elem_types
from lora_runtime.names import KV_PAIRS, SCALING, STRENGTH
from lora_runtime.quant.calibrate import TensorRange
from lora_runtime.quant.encodings import Encoding
from lora_runtime.quant.rules import asymmetric_per_tensor

MOVES_DATA = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Slice", "Split", "Identity",
              "Gather", "GatherND", "Tile"}


def float_activations(model: onnx.ModelProto, branches: Mapping[str, BranchTensors]) -> list[str]:
    """Every float tensor a node writes, and the float graph inputs that are not LoRA weight slots."""
    slots = {s for b in branches.values() for s in (b.a_slot, b.b_slot)}
    types = elem_types(model)
    inits = {t.name for t in model.graph.initializer}
    out = [v.name for v in model.graph.input
           if v.name not in slots and v.type.tensor_type.elem_type == TensorProto.FLOAT]
    for n in model.graph.node:
        out += [o for o in n.output if o and types.get(o) == TensorProto.FLOAT and o not in inits]
    return list(dict.fromkeys(out))


def float_constants(model: onnx.ModelProto, linear_weights: Iterable[str], branches: Mapping[str, BranchTensors]
                    ) -> list[str]:
    """Float initializers a node reads, other than linear weights and LoRA slots (and other graph inputs)."""
    skip = set(linear_weights) | {v.name for v in model.graph.input}
    used = consumers(model.graph)
    return [t.name for t in model.graph.initializer
            if t.data_type == TensorProto.FLOAT and t.name in used and t.name not in skip]


def shared_roots(model: onnx.ModelProto, quantized: set[str]) -> dict[str, str]:
    """Output of a data-moving op -> the tensor whose encoding it keeps (followed back through chains)."""
    roots: dict[str, str] = {}
    for n in model.graph.node:
        if n.op_type in MOVES_DATA and n.input and n.input[0] in quantized:
            src = roots.get(n.input[0], n.input[0])
            for o in n.output:
                if o in quantized:
                    roots[o] = src
    return roots


def constant_encodings(model: onnx.ModelProto, names: Sequence[str], base_dir: Path, bw: int) -> dict[str, Encoding]:
    """One asymmetric per-tensor encoding per float constant, over its own values."""
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for name in names:
        v = read_tensor(inits[name], base_dir)
        out[name] = asymmetric_per_tensor(name, float(v.min()), float(v.max()), bw=bw)
    return out


def activation_encodings(tensors: Sequence[str], ranges: Mapping[str, TensorRange], roots: Mapping[str, str],
                         fixed: Mapping[str, Encoding], bw: int) -> dict[str, Encoding]:
    """Every activation's encoding: its root's when it shares one (a constant's or a slot's, from ``fixed``, or
    another activation's), else its own range at ``bw``."""
    own = {t: asymmetric_per_tensor(t, ranges[t].min, ranges[t].max, bw=bw) for t in tensors if t not in roots}
    out = {}
    for t in tensors:
        src = roots.get(t, t)
        enc = fixed.get(src) or own.get(src) or asymmetric_per_tensor(t, ranges[t].min, ranges[t].max, bw=bw)
        out[t] = Encoding(t, enc.dtype, enc.enc_type, enc.bw, enc.is_sym, enc.scale, enc.offset)
    return out


def strength_ranges(ranges: Mapping[str, TensorRange], scalings: Iterable[np.ndarray]) -> dict[str, TensorRange]:
    """The strength input covers at least [0, 1] (ad-hoc strengths switch hot without recalibrating: the
    encoding is a constant of the compiled graph); v1/v2's ``lora_scaling`` covers every adapter's values."""
    out = dict(ranges)
    if STRENGTH in out:
        out[STRENGTH] = out[STRENGTH].union(TensorRange(0.0, 1.0))
    values = [np.asarray(s) for s in scalings]
    if SCALING in out and values:
        out[SCALING] = out[SCALING].union(TensorRange(float(min(v.min() for v in values)),
                                                      float(max(v.max() for v in values))))
    return out



def requantized_operands(model: onnx.ModelProto, acts: Mapping[str, Encoding], bw: int) -> dict[str, Encoding]:
    """The second operand of every MatMul of two activations (attention's K and V) -> a ``bw``-bit encoding of
    the same range, read through one more Q/DQ pair right before the MatMul. QNN's HTP has no 16 x 16-bit MatMul
    of two activations: it converts the second one to 8 bits (measured: ``MatMul ufixed16 x ufixed8``), so the
    CPU graph must round it the same way, or the two disagree by what that conversion rounds away (17 dB on
    SmolLM2). A DequantizeLinear -> QuantizeLinear pair is QNN's ``Convert``: the HTP runs what it ran before.
    (Qualcomm deploys LLMs this way: 16-bit activations, 8-bit K and V.)"""
    out = {}
    for n in model.graph.node:
        t = n.input[1] if n.op_type == "MatMul" and len(n.input) > 1 else None
        if t is None or n.input[0] not in acts or t not in acts or acts[t].dtype != "INT" or acts[t].bw <= bw:
            continue
        e = acts[t]
        lo = e.offset[0] * e.scale[0]
        out[t] = asymmetric_per_tensor(t, lo, lo + ((1 << e.bw) - 1) * e.scale[0], bw=bw)
    return out


def kv_pairs(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """A static KV cache's (past input, present output) pairs, from the model's metadata (``names.KV_PAIRS``):
    the graph reads back what it wrote, so each pair shares one encoding."""
    props = {p.key: p.value for p in model.metadata_props}
    return [(past, present) for past, present in json.loads(props.get(KV_PAIRS, "[]"))]
