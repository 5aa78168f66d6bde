"""The QDQ rewrite: execute encodings on ONNX Runtime.

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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lora_runtime.compiler.points import Candidate, find_candidates, node_keys
from lora_runtime.compiler.quantize_base import DataWriter, matmul_nbits, own_what_is_left, read_tensor
from lora_runtime.errors import BaseModelError
from lora_runtime.quant.encodings import Encoding, EncodingsError, symmetric_per_block, symmetric_per_channel, to_qdq
from lora_runtime.quant.gptq import gptq_codes

MIN_OPSET = 13  # per-axis DequantizeLinear


@dataclass(frozen=True)
class QdqPlan:
    """What to quantize and how; names in ``updatable`` become graph inputs (slots), the rest constants."""

    activations: Mapping[str, Encoding]  # tensor -> asymmetric per-tensor encoding (or FLOAT 16: float16)
    lora_weights: Mapping[str, Encoding]  # LoRA slot name (A or B) -> per-row symmetric encoding
    weight_bw: int = 8
    updatable: frozenset[str] = frozenset()
    weight_overrides: Mapping[str, Encoding] = field(default_factory=dict)  # base weight -> user's encoding
    gram: Mapping[str, np.ndarray] = field(default_factory=dict)  # linear input -> X^T X: GPTQ rounding
    weight_block: int | None = None  # PER_BLOCK base weights (int4): input features per block


def activation_tensors(model: onnx.ModelProto, lora_slots: frozenset[str], modules: list[str]) -> list[str]:
    """Tensors that get an activation encoding: inputs of base linear ops, and each branch's ``scaled``."""
    seen: list[str] = []
    for c in find_candidates(model.graph):
        if c.weight not in lora_slots and c.x not in seen:
            seen.append(c.x)
    return seen + [f"{m}.lora/scaled" for m in modules]


def scale_input_names(tensor: str) -> tuple[str, str]:
    return f"{tensor}.scale", f"{tensor}.zero_point"


def lora_scale_name(slot: str) -> str:
    return f"{slot}.scale"


def apply_qdq(model: onnx.ModelProto, base_dir: Path, out: Path, data_name: str, plan: QdqPlan,
              lora_slots: frozenset[str], say: Callable[[str], None] = lambda _m: None) -> list[Encoding]:
    """Rewrite ``model`` in place (see the module docstring); return the base weights' encodings."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise BaseModelError(f"INT8 execution needs opset {MIN_OPSET} or later; the base model has opset {opset}")
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    candidates = {c.node: c for c in find_candidates(g) if c.weight not in lora_slots}
    new_inits: list[TensorProto] = []
    new_inputs: list[onnx.ValueInfoProto] = []
    weight_encodings: list[Encoding] = []
    qdq_consumers: set[str] = set()  # node names whose activation inputs read the dequantized tensor
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        new_inits.append(numpy_helper.from_array(value, name))
        return name

    with open(out / data_name, "wb") as f:
        writer = DataWriter(f, data_name)
        for node, key in zip(g.node, node_keys(g)):
            c = candidates.get(key)
            if c is None or (node.op_type == "Gemm" and _gemm_scaled(node)):
                nodes.append(node)
                continue
            w = read_tensor(inits[c.weight], base_dir).astype(np.float32)
            w = w.T if c.transposed else w  # (in, out)
            enc = plan.weight_overrides.get(c.weight) or (
                symmetric_per_block(c.weight, w, plan.weight_block, plan.weight_bw) if plan.weight_block else
                symmetric_per_channel(c.weight, w, axis=1, bw=plan.weight_bw))
            bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
            out_name = node.output[0]
            mm_out = f"{out_name}/matmul" if bias else out_name
            name = node.name or c.node
            weight_encodings.append(enc)
            qdq_consumers.add(name)
            if enc.enc_type == "PER_BLOCK":
                nodes.append(_matmul_nbits(c, w, enc, plan.gram.get(c.x), writer, new_inits, name, mm_out, say))
                if bias:
                    nodes.append(helper.make_node("Add", [mm_out, bias], [out_name], name=f"{name}/bias"))
                continue
            scale, zp, _ = to_qdq(enc, axis=1)
            info = np.iinfo(zp.dtype)
            if c.x in plan.gram:
                say(f"GPTQ rounding {c.weight}")
                codes = gptq_codes(w, plan.gram[c.x], scale, zp, info.min, info.max)
            else:
                codes = np.clip(np.rint(w / scale) + zp.astype(np.float64), info.min, info.max)
            q_name = f"{c.weight}.int{enc.bw}"
            new_inits.append(writer.tensor(q_name, codes.astype(zp.dtype), _onnx_type(zp.dtype), list(w.shape)))
            s_name = const(f"{c.weight}.scale", scale)
            dq = f"{c.weight}/dq"
            if _wide(plan.activations.get(c.x)):
                # (q - zp) * s as Cast/Sub/Mul: ONNX Runtime folds these constants into the float weight at load,
                # while DequantizeLinear would be fused into MatMulNBits, whose int8 compute requantizes x to 8 bits
                zf = const(f"{c.weight}.zero_point", zp.astype(np.float32))
                p = f"{c.weight}/dequantize"
                nodes += [helper.make_node("Cast", [q_name], [f"{p}/cast"], name=f"{p}/Cast", to=TensorProto.FLOAT),
                          helper.make_node("Sub", [f"{p}/cast", zf], [f"{p}/sub"], name=f"{p}/Sub"),
                          helper.make_node("Mul", [f"{p}/sub", s_name], [dq], name=f"{p}/Mul")]
            else:
                z_name = const(f"{c.weight}.zero_point", zp)
                nodes.append(helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dq],
                                              name=f"{c.weight}/DQ", axis=1))
            nodes.append(helper.make_node("MatMul", [c.x, dq], [mm_out], name=name))
            if bias:
                nodes.append(helper.make_node("Add", [mm_out, bias], [out_name], name=f"{name}/bias"))
        nodes, kept = own_what_is_left(g, nodes, writer, base_dir)

    # LoRA branch: its first MatMul reads the quantized x; its weights are fake-quantized per row.
    for n in nodes:
        if n.name.endswith(("/MatMulA", "/MatMulB")) and ".lora/" in n.name:
            qdq_consumers.add(n.name)
    out_nodes: list[onnx.NodeProto] = []
    lora_done: set[str] = set()
    for n in nodes:
        if n.op_type == "Transpose" and n.name.endswith(("/TransposeA", "/TransposeB")) and ".lora/" in n.name:
            slot = _lora_slot_of(n, nodes)
            enc = plan.lora_weights.get(slot)
            if enc is not None and slot not in lora_done:
                fq = _fake_quant(n.input[0], slot, enc, plan, const, new_inputs, out_nodes)
                n.input[0] = fq
                lora_done.add(slot)
        out_nodes.append(n)
    nodes = out_nodes

    # Activations: Q/DQ right after each producer (or at the top for graph inputs).
    act = dict(plan.activations)
    head: list[onnx.NodeProto] = []
    final: list[onnx.NodeProto] = []

    def qdq(tensor: str, into: list[onnx.NodeProto]) -> None:
        enc = act[tensor]
        if enc.dtype == "FLOAT":  # mixed precision kept it floating point: float16, rounded exactly by a Cast pair
            into.append(helper.make_node("Cast", [tensor], [f"{tensor}/f16"], name=f"{tensor}/ToFloat16",
                                         to=TensorProto.FLOAT16))
            into.append(helper.make_node("Cast", [f"{tensor}/f16"], [f"{tensor}/dq"], name=f"{tensor}/ToFloat32",
                                         to=TensorProto.FLOAT))
            return
        s_name, z_name = scale_input_names(tensor)
        scale, zp, _ = to_qdq(enc)
        if tensor in plan.updatable:
            new_inputs.append(helper.make_tensor_value_info(s_name, TensorProto.FLOAT, []))
            new_inputs.append(helper.make_tensor_value_info(z_name, _onnx_type(zp.dtype), []))
        else:
            const(s_name, scale)
            const(z_name, zp)
        # 16-bit Q/DQ is standard ONNX only from opset 21; ONNX Runtime's contrib Q/DQ take it at any opset
        domain = "com.microsoft" if zp.dtype.itemsize == 2 and opset < 21 else ""
        into.append(helper.make_node("QuantizeLinear", [tensor, s_name, z_name], [f"{tensor}/q"], name=f"{tensor}/Q",
                                     domain=domain))
        into.append(helper.make_node("DequantizeLinear", [f"{tensor}/q", s_name, z_name], [f"{tensor}/dq"],
                                     name=f"{tensor}/DQ", domain=domain))
        if domain and not any(o.domain == domain for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(domain, 1))

    graph_inputs = {i.name for i in g.input}
    for t in act:
        if t in graph_inputs:
            qdq(t, head)
    for n in nodes:
        final.append(n)
        for o in n.output:
            if o in act:
                qdq(o, final)
    for n in final:
        if n.name in qdq_consumers:
            for i, name in enumerate(n.input):
                if name in act:
                    n.input[i] = f"{name}/dq"
    if any(n.op_type == "MatMulNBits" for n in final) and not any(o.domain == "com.microsoft"
                                                                  for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    del g.node[:]
    g.node.extend(head + final)
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    g.input.extend(new_inputs)
    return weight_encodings


def _wide(enc: Encoding | None) -> bool:
    """An activation kept wider than 8 bits (16-bit integer or float16), or not quantized at all."""
    return enc is None or enc.dtype == "FLOAT" or enc.bw > 8


def _matmul_nbits(c: Candidate, w: np.ndarray, enc: Encoding, gram: np.ndarray | None, writer: DataWriter,
                  new_inits: list[TensorProto], name: str, out: str, say: Callable[[str], None]) -> onnx.NodeProto:
    """A PER_BLOCK weight (int4 or int8, symmetric) as ONNX Runtime's ``MatMulNBits``, in float32 compute
    (``accuracy_level`` 1: its int8 compute would requantize the 16-bit activation). Standard ONNX has blocked
    DequantizeLinear only from opset 21, and ONNX Runtime would fuse it into the same kernel."""
    k, n = w.shape
    bits, block = enc.bw, enc.block_size or 0
    shift = 2 ** (bits - 1)
    if bits not in (4, 8) or not enc.is_sym or any(o != -shift for o in enc.offset):
        raise EncodingsError(f"tensor {c.weight!r}: block-wise weights run as MatMulNBits, which takes symmetric "
                             f"4- or 8-bit codes (offset {-shift}); got bw {bits}, is_sym {enc.is_sym}")
    if block < 16 or block & (block - 1) or k % block:
        raise EncodingsError(f"tensor {c.weight!r}: block size {block} must be a power of two >= 16 dividing its "
                             f"{k} input features")
    blocks = k // block
    scales = np.asarray(enc.scale, np.float32).reshape(n, blocks)  # (out, block): the file's order
    grid = np.repeat(scales.T.astype(np.float64), block, axis=0)  # (in, out)
    if gram is not None:
        say(f"GPTQ rounding {c.weight}")
        codes = gptq_codes(w, gram, grid, 0.0, -shift, shift - 1)
    else:
        codes = np.clip(np.rint(w / grid), -shift, shift - 1)
    u = (codes.astype(np.int64) + shift).astype(np.uint8).T.reshape(n, blocks, block)  # MatMulNBits: zero point 2^(b-1)
    node, inits = matmul_nbits(writer, c.weight, c.x, [out], name, u, scales, k, bits, accuracy_level=1)
    new_inits += inits
    return node


def _fake_quant(src: str, slot: str, enc: Encoding, plan: QdqPlan, const, new_inputs: list,
                out_nodes: list[onnx.NodeProto]) -> str:
    """``Mul(Clip(Round(W / s), lo, hi), s)`` with one scale per row of the LoRA weight."""
    s_name = lora_scale_name(slot)
    scale = np.asarray(enc.scale, np.float32).reshape(-1, 1)
    if slot in plan.updatable:
        new_inputs.append(helper.make_tensor_value_info(s_name, TensorProto.FLOAT, list(scale.shape)))
    else:
        const(s_name, scale)
    lo = const(f"{slot}.qmin", np.array(-(2 ** (enc.bw - 1)), np.float32))
    hi = const(f"{slot}.qmax", np.array(2 ** (enc.bw - 1) - 1, np.float32))
    p = f"{slot}/fq"
    out_nodes += [helper.make_node("Div", [src, s_name], [f"{p}/div"], name=f"{p}/Div"),
                  helper.make_node("Round", [f"{p}/div"], [f"{p}/round"], name=f"{p}/Round"),
                  helper.make_node("Clip", [f"{p}/round", lo, hi], [f"{p}/clip"], name=f"{p}/Clip"),
                  helper.make_node("Mul", [f"{p}/clip", s_name], [p], name=f"{p}/Mul")]
    return p


def _lora_slot_of(transpose: onnx.NodeProto, nodes: list[onnx.NodeProto]) -> str:
    """The slot behind a branch Transpose: its input, or the input of the Cast that widened it."""
    src = transpose.input[0]
    cast = next((n for n in nodes if n.op_type == "Cast" and n.output[0] == src), None)
    return cast.input[0] if cast is not None else src


def _gemm_scaled(node: onnx.NodeProto) -> bool:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or bool(attrs.get("transA", 0))


def _onnx_type(dtype: np.dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
