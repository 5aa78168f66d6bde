"""The packed-attention pass: ``GroupQueryAttention`` reads the packed q/k/v where no LoRA branch sits between.

The ort flavour computes q, k and v with one packed linear op and splits its output per module (``models.llama``),
so that LoRA attaches to each module's slice. ONNX Runtime's ``GroupQueryAttention`` also takes the packed tensor
whole (``query`` packed, ``key`` and ``value`` empty), which is what ONNX Runtime GenAI's graphs feed it: measured
on SmolLM2 Q4_0, one token 8.38 -> 7.74 ms (x0.92, alone, 4 rounds) with the 30 Splits gone. Where a layer's q, k
and v go from the Split straight into its attention (no branch on any of them: a v3 bundle's base path, or a layer
no adapter touches there), this pass feeds the attention the packed tensor and drops the Split. It works on a node
list, so the base-path pass runs it on its subgraph too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import onnx
from onnx import numpy_helper

from lora_runtime.compiler.passes.emit import consumed


def pack_qkv(nodes: Sequence[onnx.NodeProto], constants: Mapping[str, onnx.TensorProto]) -> list[onnx.NodeProto]:
    """``nodes`` with each ``Split -> GroupQueryAttention(q, k, v)`` whose three outputs nothing else reads made
    ``GroupQueryAttention(packed, "", "")`` (the Split dropped); ``constants``: the graph's initializers, where the
    Split's sizes are (checked against the attention's heads). The packing nodes are edited in place."""
    producer = {o: n for n in nodes for o in n.output if o}
    readers = Counter(i for n in nodes for i in n.input)
    dropped: set[int] = set()
    for n in nodes:
        if n.op_type != "GroupQueryAttention" or len(n.input) < 3 or not all(n.input[:3]):
            continue
        split = producer.get(n.input[0])
        if split is None or split.op_type != "Split" or list(split.output) != list(n.input[:3]):
            continue
        if any(readers[o] != 1 for o in split.output) or not _sizes_fit(split, n, constants):
            continue
        n.input[0], n.input[1], n.input[2] = split.input[0], "", ""
        dropped.add(id(split))
    return [n for n in nodes if id(n) not in dropped]


def _sizes_fit(split: onnx.NodeProto, attention: onnx.NodeProto, constants: Mapping[str, onnx.TensorProto]) -> bool:
    """The Split cuts the last axis into the query's heads, then the key's and the value's, as the packed input
    of ``GroupQueryAttention`` is laid out."""
    axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
    t = constants.get(split.input[1]) if len(split.input) > 1 else None
    if axis != -1 or t is None or t.data_location == onnx.TensorProto.EXTERNAL:
        return False
    sizes = [int(s) for s in numpy_helper.to_array(t)]
    attrs = {a.name: a.i for a in attention.attribute if a.type == onnx.AttributeProto.INT}
    heads, kv_heads = attrs.get("num_heads", 0), attrs.get("kv_num_heads", 0)
    if len(sizes) != 3 or not heads or sizes[0] % heads:
        return False
    head = sizes[0] // heads
    return sizes == [heads * head, kv_heads * head, kv_heads * head]


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
