"""Graph edits through a few verbs, applied at once.

An ONNX graph keeps its nodes, initializers and inputs in protobuf lists. Passes never patch those lists
themselves: they say what to do with :class:`GraphEdit` (``replace`` a node, ``insert_after`` one,
``prepend`` nodes, ``remove`` one; ``add_initializers``, ``drop_initializers``, ``add_inputs``,
``drop_inputs``) and :meth:`GraphEdit.apply` rebuilds the lists once, keeping graph order::

    edit = GraphEdit(model.graph)
    for i, node in edit.nodes():               # (index, node), in graph order, as the graph was
        if is_candidate(node):
            edit.replace(i, [q_node, node])      # the node itself may stay, among new ones
    edit.add_initializers(consts)
    edit.apply()

Nodes are addressed by their index in the graph as it was when the edit began, so nothing is found by
name. :func:`node_keys` gives every node a unique key (ONNX does not require names to exist or be unique).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import onnx


def node_keys(graph: onnx.GraphProto) -> list[str]:
    """One unique key per node, in graph order: its name, or ``<op_type>_<index>`` when it has none.

    A key already in use (an unnamed node beside a node literally named ``MatMul_3``, or a repeated name)
    gets ``_`` appended until it is unique.
    """
    named = {n.name for n in graph.node if n.name}
    keys: list[str] = []
    used: set[str] = set()
    for i, node in enumerate(graph.node):
        key = node.name or f"{node.op_type}_{i}"
        while key in used or (not node.name and key in named):
            key += "_"
        used.add(key)
        keys.append(key)
    return keys


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor -> its ONNX element type, for every tensor shape inference can type (inputs, outputs,
    intermediates, initializers)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    out = {v.name: v.type.tensor_type.elem_type
           for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    out.update({t.name: t.data_type for t in model.graph.initializer})
    return out


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it."""
    return {out: n for n in graph.node for out in n.output}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it, in graph order."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            if i:
                out.setdefault(i, []).append(n)
    return out


class GraphEdit:
    """Edits of one graph, collected and then applied in one pass (see the module docstring)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self._nodes = list(graph.node)
        self._replace: dict[int, list[onnx.NodeProto]] = {}
        self._after: dict[int, list[onnx.NodeProto]] = {}
        self._top: list[onnx.NodeProto] = []
        self._new_inits: list[onnx.TensorProto] = []
        self._dropped_inits: set[str] = set()
        self._new_inputs: list[onnx.ValueInfoProto] = []
        self._dropped_inputs: set[str] = set()

    def nodes(self) -> Iterator[tuple[int, onnx.NodeProto]]:
        """(index, node) in graph order, as the graph was when the edit began."""
        return iter(enumerate(self._nodes))

    def keyed(self) -> Iterator[tuple[int, str, onnx.NodeProto]]:
        """(index, unique key, node) in graph order."""
        return ((i, k, n) for (i, n), k in zip(enumerate(self._nodes), node_keys(self.graph)))

    def replace(self, index: int, nodes: Iterable[onnx.NodeProto]) -> None:
        """Put ``nodes`` where node ``index`` stands (it stays only if it is among them)."""
        self._replace[index] = list(nodes)

    def remove(self, index: int) -> None:
        self._replace[index] = []

    def insert_after(self, index: int, nodes: Iterable[onnx.NodeProto]) -> None:
        """Nodes after node ``index`` (after its replacement, and after nodes inserted there before)."""
        self._after.setdefault(index, []).extend(nodes)

    def prepend(self, nodes: Iterable[onnx.NodeProto]) -> None:
        """Nodes that go before every other (they read graph inputs and constants only)."""
        self._top.extend(nodes)

    def add_initializers(self, tensors: Iterable[onnx.TensorProto]) -> None:
        self._new_inits.extend(tensors)

    def drop_initializers(self, names: Iterable[str]) -> None:
        self._dropped_inits.update(names)

    def add_inputs(self, inputs: Iterable[onnx.ValueInfoProto]) -> None:
        self._new_inputs.extend(inputs)

    def drop_inputs(self, names: Iterable[str]) -> None:
        self._dropped_inputs.update(names)

    def pending(self) -> list[onnx.NodeProto]:
        """The node list as :meth:`apply` will write it (the same node objects: edits to them take effect)."""
        nodes = list(self._top)
        for i, n in enumerate(self._nodes):
            nodes += self._replace.get(i, [n])
            nodes += self._after.get(i, [])
        return nodes

    def producers(self) -> dict[str, tuple[int, onnx.NodeProto]]:
        """Tensor -> (index to insert after, the node that will write it), as the edit stands."""
        out = {}
        for i, n in enumerate(self._nodes):
            for m in [*self._replace.get(i, [n]), *self._after.get(i, [])]:
                out.update({o: (i, m) for o in m.output})
        return out

    def apply(self) -> None:
        """Rebuild the graph's lists once: nodes in order with replacements and insertions, then
        initializers and inputs with the dropped ones left out and the new ones appended."""
        g = self.graph
        nodes = self.pending()
        inits = [t for t in g.initializer if t.name not in self._dropped_inits] + self._new_inits
        inputs = [v for v in g.input if v.name not in self._dropped_inputs] + self._new_inputs
        del g.node[:]
        g.node.extend(nodes)
        del g.initializer[:]
        g.initializer.extend(inits)
        del g.input[:]
        g.input.extend(inputs)

