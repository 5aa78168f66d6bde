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
from onnx import helper

from lora_runtime.external_data import DataWriter, in_patch, location, read_tensor
from lora_runtime.graph import GraphEdit
from lora_runtime.models.blocks import MS_DOMAIN, matmul_nbits

__all__ = ["MS_DOMAIN", "consumed", "matmul_nbits", "onnx_type", "own_base_tensors", "use_ms_domain"]


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
