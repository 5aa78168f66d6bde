"""The packed-attention pass: ``GroupQueryAttention`` reads the packed q/k/v where no LoRA branch sits between
(``models.packing.pack_qkv``, which an import applies to every layer and ``compiler.base.load_base`` undoes, so that
branches find each module's slice). It works on a node list, so the base-path pass runs it on its subgraph too.
"""

from __future__ import annotations

import onnx

from lora_runtime.compiler.passes.emit import consumed
from lora_runtime.models.packing import pack_qkv

__all__ = ["drop_unread", "pack_attention", "pack_qkv"]


def pack_attention(model: onnx.ModelProto) -> int:
    """:func:`pack_qkv` on ``model``'s graph, in place; the Splits' size constants nothing reads any more dropped.
    Returns how many attentions read their packed q/k/v."""
    g = model.graph
    before = len(g.node)
    nodes = pack_qkv(list(g.node), {t.name: t for t in g.initializer})
    if len(nodes) == before:
        return 0
    del g.node[:]
    g.node.extend(nodes)
    drop_unread(g)
    return before - len(nodes)


def drop_unread(g: onnx.GraphProto) -> None:
    """Drop the initializers no node reads (in ``g`` or its subgraphs) that are not graph inputs."""
    read = consumed(g.node).union(*(consumed(a.g.node) for n in g.node for a in n.attribute
                                     if a.type == onnx.AttributeProto.GRAPH))
    inputs = {i.name for i in g.input}
    kept = [t for t in g.initializer if t.name in read or t.name in inputs]
    if len(kept) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(kept)
