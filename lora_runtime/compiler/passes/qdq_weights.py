"""The weights' half of the QDQ pass: base linear layers on integer weights, and LoRA weights quantized.

A base linear layer (MatMul, or Gemm with alpha = beta = 1) becomes, by its weight's encoding and its input's::

    8-bit input:     x.dq ──► MatMul ◄── DQ(W int8, per-channel scale, axis=1)          (int8 GEMM on ORT CPU)
    wider input:     x.dq ──► MatMul ◄── Mul(Sub(Cast(W int8), zp), s)                  (folded at load: exact)
    PER_BLOCK:       x.dq ──► MatMulNBits(W int4/int8 blocks, float32 compute)
                     (+ Add(bias) after any of them for a Gemm with a bias)

A LoRA weight (a slot: its values change per adapter) is quantized in the graph, before its Transpose::

    <m>.lora_A.weight ──► Mul(Clip(Round(Div(W, s)), lo, hi), s) ──► Transpose ──► ...

exact for any bitwidth and opset, one scale per row (a graph input when the encoding is updatable).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from lora_runtime.compiler.passes.emit import MS_DOMAIN, matmul_nbits, onnx_type
from lora_runtime.compiler.passes.qdq_plan import Constants, QdqPlan
from lora_runtime.compiler.points import Candidate, find_candidates
from lora_runtime.external_data import DataWriter, read_tensor
from lora_runtime.graph import node_keys
from lora_runtime.names import dequantized, integer_weight, scale_of, zero_point_of
from lora_runtime.quant.encodings import Encoding, EncodingsError
from lora_runtime.quant.gptq import Hessians
from lora_runtime.quant.rules import symmetric_per_block, symmetric_per_channel, to_qdq


def quantize_linear(node: onnx.NodeProto, c: Candidate, inits: Mapping[str, TensorProto], plan: QdqPlan,
                    writer: DataWriter, consts: Constants, base_dir: Path
                    ) -> tuple[list[onnx.NodeProto], Encoding] | None:
    """The nodes that replace base linear op ``node`` (see the module docstring) and its weight's encoding;
    None for an op that stays float (a Gemm with transA, or alpha/beta other than 1)."""
    if node.op_type == "Gemm" and _gemm_scaled(node):
        return None
    w = read_tensor(inits[c.weight], base_dir).astype(np.float32)
    w = w.T if c.transposed else w  # (in, out)
    enc = plan.weight_overrides.get(c.weight) or (
        symmetric_per_block(c.weight, w, plan.weight_block, plan.weight_bw) if plan.weight_block else
        symmetric_per_channel(c.weight, w, axis=1, bw=plan.weight_bw))
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
    if plan.full and node.op_type == "Gemm" and enc.enc_type == "PER_CHANNEL":
        b = read_tensor(inits[bias], base_dir).astype(np.float64) if bias else None
        return _gemm(node, c, w, b, enc, plan, writer, consts), enc
    out = node.output[0]
    mm_out = f"{out}/matmul" if bias else out
    name = node.name or c.node
    x = dequantized(c.x) if c.x in plan.activations else c.x
    if enc.enc_type == "PER_BLOCK":
        nodes = [_matmul_nbits(c, x, w, enc, plan.gram if c.x in plan.gram else None, writer, consts, name, mm_out)]
    else:
        scale, zp, codes = _codes(c, w, enc, plan)
        q_name = integer_weight(c.weight, enc.bw)
        consts.tensors.append(writer.tensor(q_name, codes.astype(zp.dtype), onnx_type(zp.dtype), list(w.shape)))
        s_name = consts.add(scale_of(c.weight), scale)
        dq = dequantized(c.weight)
        if _wide(plan.activations.get(c.x)) and not plan.full:
            # (q - zp) * s as Cast/Sub/Mul: ONNX Runtime folds these constants into the float weight at load,
            # while DequantizeLinear would be fused into MatMulNBits, whose int8 compute requantizes x to 8 bits
            zf = consts.add(zero_point_of(c.weight), zp.astype(np.float32))
            p = f"{c.weight}/dequantize"
            nodes = [helper.make_node("Cast", [q_name], [f"{p}/cast"], name=f"{p}/Cast", to=TensorProto.FLOAT),
                     helper.make_node("Sub", [f"{p}/cast", zf], [f"{p}/sub"], name=f"{p}/Sub"),
                     helper.make_node("Mul", [f"{p}/sub", s_name], [dq], name=f"{p}/Mul")]
        else:
            z_name = consts.add(zero_point_of(c.weight), zp)
            nodes = [helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dq], name=f"{c.weight}/DQ",
                                      axis=1)]
        nodes.append(helper.make_node("MatMul", [x, dq], [mm_out], name=name))
    if bias:
        nodes.append(helper.make_node("Add", [mm_out, bias], [out], name=f"{name}/bias"))
    return nodes, enc


def _codes(c: Candidate, w: np.ndarray, enc: Encoding, plan: QdqPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A per-channel weight's scale, zero point and integer codes: GPTQ's when the plan has the layer's input
    statistics, else the nearest."""
    scale, zp, _ = to_qdq(enc, axis=1)
    info = np.iinfo(zp.dtype)
    if c.x in plan.gram:  # (the Hessians report each weight they round)
        return scale, zp, plan.gram.round(c.x, c.weight, w, scale, zp, info.min, info.max, zp.dtype)
    return scale, zp, np.clip(np.rint(w / scale) + zp.astype(np.float64), info.min, info.max)


def _gemm(node: onnx.NodeProto, c: Candidate, w: np.ndarray, b: np.ndarray | None, enc: Encoding, plan: QdqPlan,
          writer: DataWriter, consts: Constants) -> list[onnx.NodeProto]:
    """Full QDQ groups keep a Gemm a Gemm (QNN's FullyConnected with its bias), its weight int8 per output channel
    in its own layout and its bias int32 on the grid ``s_x * s_w`` (zero point 0), as QNN expects::

        x.dq ──► Gemm(transB) ◄── DQ(W int8, axis = 0 if transB else 1), DQ(bias int32, s_x * s_W, axis=0)
    """
    scale, zp, codes = _codes(c, w, enc, plan)
    codes = (codes.T if c.transposed else codes).astype(zp.dtype)  # back to the weight's own layout
    axis = 0 if c.transposed else 1
    q_name = integer_weight(c.weight, enc.bw)
    consts.tensors.append(writer.array(q_name, codes))
    s_name, z_name = consts.add(scale_of(c.weight), scale), consts.add(zero_point_of(c.weight), zp)
    nodes = [helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dequantized(c.weight)],
                              name=f"{c.weight}/DQ", axis=axis)]
    inputs = [dequantized(c.x), dequantized(c.weight)]
    if b is not None:
        nodes.append(quantize_bias(node.input[2], b, plan.activations[c.x].scale[0], scale, consts))
        inputs.append(dequantized(node.input[2]))
    gemm = helper.make_node("Gemm", inputs, list(node.output), name=node.name or c.node)
    gemm.attribute.extend(node.attribute)
    return [*nodes, gemm]


def quantize_bias(bias: str, values: np.ndarray, x_scale: float, w_scale: np.ndarray | float, consts: Constants
                  ) -> onnx.NodeProto:
    """A bias as int32 on the grid ``s_x * s_w`` (per output channel when ``w_scale`` is), zero point 0: what QNN
    takes for a Gemm's or a LayerNormalization's bias."""
    scale = (float(x_scale) * np.asarray(w_scale, np.float64)).astype(np.float32)
    scale = np.broadcast_to(scale, values.reshape(-1).shape).copy() if scale.ndim else scale
    codes = np.clip(np.rint(values.reshape(-1) / scale), -(2**31), 2**31 - 1).astype(np.int32)
    q_name = integer_weight(bias, 32)
    consts.add(q_name, codes.reshape(values.shape))
    s_name, z_name = consts.add(scale_of(bias), scale), consts.add(zero_point_of(bias), np.zeros_like(scale, np.int32))
    return helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dequantized(bias)], name=f"{bias}/DQ",
                            **({"axis": 0} if scale.ndim else {}))


def norm_scales(graph: onnx.GraphProto) -> set[str]:
    """The constant scales (gamma) of LayerNormalization and SimplifiedLayerNormalization (RMSNorm) ops."""
    inits = {t.name for t in graph.initializer}
    return {n.input[1] for n in graph.node
            if n.op_type in ("LayerNormalization", "SimplifiedLayerNormalization") and n.input[1] in inits}


def int32_biases(graph: onnx.GraphProto, linear: Mapping[str, Candidate]) -> dict[str, tuple[str, str]]:
    """Biases that full QDQ groups hold as int32 (a Gemm's among ``linear``, a LayerNormalization's):
    bias -> (the op's input, its weight or scale), whose scales make the bias's."""
    nodes = dict(zip(node_keys(graph), graph.node))
    out = {nodes[c.node].input[2]: (c.x, c.weight) for c in linear.values()
           if c.op_type == "Gemm" and len(nodes[c.node].input) > 2 and nodes[c.node].input[2]}
    inits = {t.name for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "LayerNormalization" and len(n.input) > 2 and n.input[2] in inits and n.input[1] in inits:
            out[n.input[2]] = (n.input[0], n.input[1])
    return out


def linear_weights(graph: onnx.GraphProto, lora_slots: frozenset[str]) -> dict[str, Candidate]:
    """The base linear layers ``quantize_linear`` replaces, by weight (a scaled Gemm stays as it is)."""
    nodes = dict(zip(node_keys(graph), graph.node))
    return {c.weight: c for c in find_candidates(graph)
            if c.weight not in lora_slots and not (c.op_type == "Gemm" and _gemm_scaled(nodes[c.node]))}


def qdq_domain(zp: np.ndarray, opset: int) -> str:
    """16-bit Q/DQ is standard ONNX only from opset 21; ONNX Runtime's contrib Q/DQ take it at any opset."""
    return MS_DOMAIN if zp.dtype.itemsize == 2 and opset < 21 else ""


def integer_slots(graph: onnx.GraphProto, declarations: Mapping[str, TensorProto | onnx.ValueInfoProto],
                  encodings: Mapping[str, Encoding], consts: Constants, opset: int) -> list[onnx.NodeProto]:
    """LoRA slots that hold integer codes (full QDQ groups): each declared as its integer type (a v2/v3
    initializer replaced by ``declarations[slot]``, whose data is the integer patch; the patch's other
    parameters are declared again too), and those with an encoding read through a ``DequantizeLinear``::

        <m>.lora_A.weight (int8) ──► DQ(s_A) ──► <m>.lora_A.weight/dq ──► Transpose ──► ...
    """
    inputs = {v.name: v for v in graph.input}
    inits = {t.name: t for t in graph.initializer}
    nodes = []
    for slot, decl in declarations.items():
        elem = decl.data_type if isinstance(decl, TensorProto) else decl.type.tensor_type.elem_type
        inputs[slot].type.tensor_type.elem_type = elem
        if isinstance(decl, TensorProto):
            inits[slot].CopyFrom(decl)
        if slot not in encodings:
            continue
        scale, zp, _ = to_qdq(encodings[slot])
        s_name, z_name = consts.add(scale_of(slot), scale), consts.add(zero_point_of(slot), zp)
        nodes.append(helper.make_node("DequantizeLinear", [slot, s_name, z_name], [dequantized(slot)],
                                      name=f"{slot}/DQ", domain=qdq_domain(zp, opset)))
    return nodes


def quantize_constants(encodings: Mapping[str, Encoding], inits: Mapping[str, TensorProto], writer: DataWriter,
                       consts: Constants, base_dir: Path, opset: int) -> list[onnx.NodeProto]:
    """Float constants other than linear weights (norm weights, biases, rotary tables, masks, scalars) as integer
    codes with a per-tensor encoding, read through a ``DequantizeLinear``; big ones go to the data file."""
    nodes = []
    for name, enc in encodings.items():
        value = read_tensor(inits[name], base_dir).astype(np.float64)
        scale, zp, _ = to_qdq(enc)
        info = np.iinfo(zp.dtype)
        codes = np.clip(np.rint(value / scale) + float(zp), info.min, info.max).astype(zp.dtype)
        q_name = integer_weight(name, enc.bw)
        if codes.nbytes >= 1024:
            consts.tensors.append(writer.array(q_name, codes))
        else:
            consts.add(q_name, codes)
        s_name, z_name = consts.add(scale_of(name), scale), consts.add(zero_point_of(name), zp)
        nodes.append(helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dequantized(name)],
                                      name=f"{name}/DQ", domain=qdq_domain(zp, opset)))
    return nodes


def quantize_lora_weight(src: str, slot: str, enc: Encoding, updatable: bool, consts: Constants
                         ) -> tuple[list[onnx.NodeProto], str]:
    """``Mul(Clip(Round(W / s)), s)`` with one scale per row of the LoRA weight; returns the nodes and the
    tensor the Transpose reads instead of ``src``."""
    s_name = scale_of(slot)
    scale = np.asarray(enc.scale, np.float32).reshape(-1, 1)
    if updatable:
        consts.input(s_name, TensorProto.FLOAT, list(scale.shape))
    else:
        consts.add(s_name, scale)
    lo = consts.add(f"{slot}.qmin", np.array(-(2 ** (enc.bw - 1)), np.float32))
    hi = consts.add(f"{slot}.qmax", np.array(2 ** (enc.bw - 1) - 1, np.float32))
    p = f"{slot}/fq"
    return [helper.make_node("Div", [src, s_name], [f"{p}/div"], name=f"{p}/Div"),
            helper.make_node("Round", [f"{p}/div"], [f"{p}/round"], name=f"{p}/Round"),
            helper.make_node("Clip", [f"{p}/round", lo, hi], [f"{p}/clip"], name=f"{p}/Clip"),
            helper.make_node("Mul", [f"{p}/clip", s_name], [p], name=f"{p}/Mul")], p


def _wide(enc: Encoding | None) -> bool:
    """An activation kept wider than 8 bits (16-bit integer or float16), or not quantized at all."""
    return enc is None or enc.dtype == "FLOAT" or enc.bw > 8


def _matmul_nbits(c: Candidate, x: str, w: np.ndarray, enc: Encoding, gram: Hessians | None, writer: DataWriter,
                  consts: Constants, name: str, out: str) -> onnx.NodeProto:
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
        codes = gram.round(c.x, c.weight, w, grid, 0.0, -shift, shift - 1)
    else:
        codes = np.clip(np.rint(w / grid), -shift, shift - 1)
    u = (codes.astype(np.int64) + shift).astype(np.uint8).T.reshape(n, blocks, block)  # MatMulNBits: zero point 2^(b-1)
    node, inits = matmul_nbits(writer, c.weight, x, [out], name, u, scales, k, bits, accuracy_level=1)
    consts.tensors.extend(inits)
    return node


def _gemm_scaled(node: onnx.NodeProto) -> bool:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or bool(attrs.get("transA", 0))
