"""Packed linear ops as attachment points: the ort flavour computes q/k/v (and gate/up) with one op and splits its
output per module (``models.llama_graph``'s ``packed_linear``; the ``Split``'s doc_string names each output's
module). :func:`packed_modules` says which modules an op's output holds (for passes over whole weights);
:func:`packed_ops` gives each op as one candidate with its modules' rows, for a v3 branch on its whole output
(``compiler.patches.plan_branches``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from lora_runtime.compiler.points import Candidate, packed_slices
from lora_runtime.graph import node_keys
from lora_runtime.models.llama_graph import PACKED


@dataclass(frozen=True)
class PackedOp:
    """A packed linear op as one attachment point: the op writing the output its ``Split`` reads (the
    ``MatMulNBits``/``MatMul``, or its bias ``Add``), and the rows [start, stop) of that output each module is."""

    name: str  # the packed op's path, e.g. ``model.layers.0.self_attn.qkv_packed``: its branch's name
    candidate: Candidate
    rows: Mapping[str, tuple[int, int]]  # module -> its slice of the packed output


def packed_ops(graph: onnx.GraphProto) -> dict[str, PackedOp]:
    """Every packed linear op of an ort-flavour graph, by the key of its ``Split`` (the owner of its modules'
    slices, :func:`~lora_runtime.compiler.points.packed_slices`)."""
    inits = {t.name: t for t in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}
    keys = node_keys(graph)
    key_of = {id(n): k for k, n in zip(keys, graph.node)}
    out = {}
    for key, node in zip(keys, graph.node):
        if node.op_type != "Split" or not node.doc_string.startswith(PACKED) or node.input[0] not in producers:
            continue
        slices = packed_slices(node, key, inits, producers)
        stops = np.cumsum([c.out_features for c in slices])
        name = node.name.removesuffix(".Split") if node.name.endswith(".Split") else key
        src = producers[node.input[0]]
        c = Candidate(key_of[id(src)], src.op_type, slices[0].x, node.input[0], f"{name}.weight",
                      slices[0].in_features, int(stops[-1]), (name,), False, slices[0].elem_type)
        out[key] = PackedOp(name, c, {s.aliases[0]: (int(b - s.out_features), int(b)) for s, b in zip(slices, stops)})
    return out


def packed_modules(graph: onnx.GraphProto) -> dict[str, tuple[str, ...]]:
    """The modules a packed linear op computes (the ort flavour's q/k/v, gate/up), by the op's output tensor: what
    its ``Split`` names, read through the bias ``Add`` when the op has one."""
    producers = {out: n for n in graph.node for out in n.output}
    found = {}
    for node in graph.node:
        if node.op_type == "Split" and node.doc_string.startswith(PACKED):
            y = node.input[0]
            add = producers.get(y)
            if add is not None and add.op_type == "Add":
                y = add.input[0]
            found[y] = tuple(json.loads(node.doc_string[len(PACKED):])["modules"])
    return found
