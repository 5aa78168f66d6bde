"""What both base-weight passes (``weight_only`` and ``qdq``) emit: MatMulNBits nodes, and the base tensors
the rewritten graph still needs, copied into the bundle's own data file.

A bundle whose base weights were quantized owns every base tensor it reads, so it does not link (or need)
the float32 data at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from lora_runtime.external_data import DataWriter, in_patch, location, read_tensor
from lora_runtime.graph import GraphEdit
from lora_runtime.names import block_scales, packed_weight

MS_DOMAIN = "com.microsoft"


def matmul_nbits(writer: DataWriter, weight: str, x: str, outputs: list[str], name: str, codes: np.ndarray,
                 scales: np.ndarray, k: int, bits: int, accuracy_level: int, bias: str | None = None,
                 scale_type: int = TensorProto.FLOAT) -> tuple[onnx.NodeProto, list[TensorProto]]:
    """ONNX Runtime's ``MatMulNBits`` over unsigned ``codes`` (N, blocks, block_size) uint8, dequantized as
    ``(code - 2^(bits-1)) * scale`` with ``scales`` (N, blocks); 4-bit codes are packed two per byte, low
    nibble first. ``scale_type`` is the type of ``x`` (float32, or float16 for a float16 layer). Returns the node
    and its two initializers (written to ``writer``)."""
    n, _, block_size = codes.shape
    packed = codes if bits == 8 else (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    b_name, s_name = packed_weight(weight, bits), block_scales(weight)
    scales = scales.reshape(-1).astype(helper.tensor_dtype_to_np_dtype(scale_type))
    inits = [writer.tensor(b_name, packed, TensorProto.UINT8, list(packed.shape)),
             writer.tensor(s_name, scales, scale_type, [scales.size])]
    node = helper.make_node("MatMulNBits", [x, b_name, s_name] + (["", "", bias] if bias else []), outputs,
                            name=name, domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=block_size,
                            accuracy_level=accuracy_level)
    return node, inits


def own_base_tensors(graph: onnx.GraphProto, writer: DataWriter, base_dir: Path) -> None:
    """After weights were replaced: drop the Transposes that only fed them and the float weights themselves,
    and copy every other external base tensor into the bundle's own data file (one tensor at a time)."""
    inits = {t.name for t in graph.initializer}
    used = consumed(graph.node)
    edit = GraphEdit(graph)
    dead = {i for i, n in edit.nodes()
            if n.op_type == "Transpose" and n.input[0] in inits and not any(o in used for o in n.output)}
    for i in dead:
        edit.remove(i)
    used = consumed(n for i, n in edit.nodes() if i not in dead) | {v.name for v in graph.input}
    for t in graph.initializer:
        if t.name not in used:
            edit.drop_initializers([t.name])
        elif location(t) not in (None, writer.location) and not in_patch(t):  # still in the base model's files
            edit.drop_initializers([t.name])
            edit.add_initializers([writer.tensor(t.name, read_tensor(t, base_dir).tobytes(), t.data_type,
                                                 list(t.dims))])
    edit.apply()


def consumed(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    return {i for n in nodes for i in n.input if i}


def onnx_type(dtype: np.dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def use_ms_domain(model: onnx.ModelProto) -> None:
    """Declare ONNX Runtime's contrib domain once (MatMulNBits, 16-bit Q/DQ below opset 21)."""
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
