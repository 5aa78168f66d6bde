"""Packed attention: ``GroupQueryAttention`` reads the packed q/k/v where no LoRA branch sits between, and back.

The ort flavour computes q, k and v with one packed linear op and splits its output per module (``llama_graph``'s
``packed_linear``: the ``Split`` names each output's module, where LoRA attaches to a module's slice). ONNX
Runtime's ``GroupQueryAttention`` also takes the packed tensor whole (``query`` packed, ``key`` and ``value``
empty), which is what ONNX Runtime GenAI's graphs feed it: measured on SmolLM2 Q4_0, one token 8.38 -> 7.74 ms
(x0.92, alone, 4 rounds) with the 30 Splits gone.

:func:`pack_qkv` feeds an attention the packed tensor where its q, k and v go from the Split straight into it (an
import, a v3 bundle's base path, a layer no adapter touches there) and drops the Split, keeping it on the attention
(``UNPACK`` + JSON in its doc_string); :func:`unpack_qkv` puts the Splits back, so that a compile finds every
module's slice of an import that runs packed.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

UNPACK = "lora_runtime.unpack "  # an attention's doc_string: the Split it reads packed past (JSON follows)


def pack_qkv(nodes: Sequence[onnx.NodeProto], constants: Mapping[str, onnx.TensorProto]) -> list[onnx.NodeProto]:
    """``nodes`` with each ``Split -> GroupQueryAttention(q, k, v)`` whose three outputs nothing else reads made
    ``GroupQueryAttention(packed, "", "")`` (the Split dropped, recorded on the attention for :func:`unpack_qkv`);
    ``constants``: the graph's initializers, where the Split's sizes are (checked against the attention's heads).
    The attentions are edited in place."""
    producer = {o: n for n in nodes for o in n.output if o}
    readers = Counter(i for n in nodes for i in n.input)
    dropped: set[int] = set()
    for n in nodes:
        if n.op_type != "GroupQueryAttention" or len(n.input) < 3 or not all(n.input[:3]):
            continue
        split = producer.get(n.input[0])
        if split is None or split.op_type != "Split" or list(split.output) != list(n.input[:3]):
            continue
        sizes = _sizes(split, n, constants)
        if any(readers[o] != 1 for o in split.output) or sizes is None:
            continue
        n.doc_string = UNPACK + json.dumps({"name": split.name, "sizes_name": split.input[1], "sizes": sizes,
                                            "outputs": list(split.output), "doc": split.doc_string})
        n.input[0], n.input[1], n.input[2] = split.input[0], "", ""
        dropped.add(id(split))
    return [n for n in nodes if id(n) not in dropped]


def unpack_qkv(graph: onnx.GraphProto) -> int:
    """Put back, in place, the Split of every attention :func:`pack_qkv` packed (and its sizes, if no node reads them
    any more): the graph computes the same, each module's slice is a tensor again. Returns how many."""
    inits = {t.name for t in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    count = 0
    for n in graph.node:
        if n.op_type == "GroupQueryAttention" and n.doc_string.startswith(UNPACK) and not any(n.input[1:3]):
            info = json.loads(n.doc_string[len(UNPACK):])
            if info["sizes_name"] not in inits:
                graph.initializer.append(numpy_helper.from_array(np.array(info["sizes"], np.int64),
                                                                 info["sizes_name"]))
                inits.add(info["sizes_name"])
            split = helper.make_node("Split", [n.input[0], info["sizes_name"]], info["outputs"], name=info["name"],
                                     axis=-1)
            split.doc_string = info["doc"]
            nodes.append(split)
            n.input[0], n.input[1], n.input[2] = info["outputs"]
            n.doc_string = ""
            count += 1
        nodes.append(n)
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
    return count


def _sizes(split: onnx.NodeProto, attention: onnx.NodeProto, constants: Mapping[str, onnx.TensorProto]
           ) -> list[int] | None:
    """The Split's sizes if it cuts the last axis into the query's heads, then the key's and the value's, as the
    packed input of ``GroupQueryAttention`` is laid out (else None)."""
    axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
    t = constants.get(split.input[1]) if len(split.input) > 1 else None
    if axis != -1 or t is None or t.data_location == onnx.TensorProto.EXTERNAL:
        return None
    sizes = [int(s) for s in numpy_helper.to_array(t)]
    attrs = {a.name: a.i for a in attention.attribute if a.type == onnx.AttributeProto.INT}
    heads, kv_heads = attrs.get("num_heads", 0), attrs.get("kv_num_heads", 0)
    if len(sizes) != 3 or not heads or sizes[0] % heads:
        return None
    head = sizes[0] // heads
    return sizes if sizes == [heads * head, kv_heads * head, kv_heads * head] else None
