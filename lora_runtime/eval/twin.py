"""A bundle's graph as ONNX Runtime runs it, with its constant weight dequantizations folded here, one at a time.

A QDQ bundle's base layers with inputs wider than 8 bits read their int8 weights through ``Mul(Sub(Cast(W), zp),
s)`` (``compiler.passes.qdq_weights``): constants that ONNX Runtime folds into float weights when a session loads.
Its constant folding keeps every intermediate (the Cast's float copy, the Sub's, the Mul's) until the whole graph
is folded: about three float copies of the weights at once (SmolLM2-135M w8a16: 1.7 GB peak RSS for a session
that then holds 0.6 GB of weights). To measure a bundle while compiling it, :func:`folded_session` computes the
same float weights here, chain by chain, into a scratch data file beside the graph and opens that: the same values
(int8 to float32 and the zero point's subtraction are exact, the scale's product one IEEE float32 rounding in
both), so the same outputs, bit for bit (tested), at the memory of one copy.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from lora_runtime.bundle import Bundle
from lora_runtime.external_data import DataWriter, read_tensor
from lora_runtime.runtime.session import make_session

FOLDED = (".measure.onnx", ".measure.data")  # scratch files beside the bundle's graph, removed after use
_OPS = ("Cast", "Sub", "Mul")


@contextmanager
def folded_session(bundle: Bundle, session_options: ort.SessionOptions | None = None
                   ) -> Iterator[ort.InferenceSession]:
    """A session on ``bundle``'s main graph (as :func:`make_session` makes it) whose constant ``Cast``, ``Sub``
    and ``Mul`` chains are folded ahead of time; a plain session when the graph has none."""
    m = bundle.manifest
    graph_path = bundle.file(m.graph)
    model = onnx.load(str(graph_path), load_external_data=False)
    root = graph_path.parent
    scratch = [root / name for name in FOLDED]
    try:
        if _fold(model, root, scratch[1]):
            scratch[0].write_bytes(model.SerializeToString())
            del model
            twin = Bundle(bundle.path, dataclasses.replace(m, graph=scratch[0].relative_to(bundle.path).as_posix()))
            yield make_session(twin, session_options=session_options)
        else:
            del model
            yield make_session(bundle, session_options=session_options)
    finally:
        for path in scratch:
            path.unlink(missing_ok=True)


def _fold(model: onnx.ModelProto, root: Path, data: Path) -> int:
    """Fold ``model``'s constant Cast/Sub/Mul nodes in place (their results written to ``data``, beside the
    graph); returns how many nodes were folded."""
    g = model.graph
    graph_inputs = {i.name for i in g.input}
    inits = {t.name: t for t in g.initializer if t.name not in graph_inputs}  # an input-initializer can be fed
    constant = set(inits)
    folded: list[int] = []
    for i, n in enumerate(g.node):
        if n.op_type in _OPS and n.domain in ("", "ai.onnx") and len(n.output) == 1 and n.input and \
                all(x in constant for x in n.input):
            folded.append(i)
            constant.add(n.output[0])
    if not folded:
        return 0
    skip = set(folded)
    kept_reads = Counter(x for i, n in enumerate(g.node) if i not in skip for x in n.input)
    outputs = {o.name for o in g.output}
    fold_reads = Counter(x for i in folded for x in g.node[i].input)
    values: dict[str, np.ndarray] = {}
    made = []
    with open(data, "wb") as f:
        writer = DataWriter(f, data.name)
        for i in folded:
            n = g.node[i]
            args = [values[x] if x in values else read_tensor(inits[x], root) for x in n.input]
            out = _evaluate(n, args)
            for x in n.input:
                fold_reads[x] -= 1
                if x in values and fold_reads[x] == 0:
                    del values[x]  # no more folded readers: a chain's intermediates go as soon as it moves on
            name = n.output[0]
            if kept_reads[name] or name in outputs:
                made.append(writer.array(name, out) if out.nbytes >= 1024 else numpy_helper.from_array(out, name))
            if fold_reads[name]:
                values[name] = out
    nodes = [n for i, n in enumerate(g.node) if i not in skip]
    read = {x for n in nodes for x in n.input} | outputs
    keep = [t for t in g.initializer if t.name in read or t.name in graph_inputs]
    g.ClearField("node")
    g.node.extend(nodes)
    g.ClearField("initializer")
    g.initializer.extend([*keep, *made])
    return len(folded)


def _evaluate(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray:
    """One Cast, Sub or Mul as ONNX (and ONNX Runtime's CPU kernels) define it, on constants."""
    if node.op_type == "Cast":
        to = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "to")
        return np.asarray(args[0]).astype(helper.tensor_dtype_to_np_dtype(to))
    a, b = (np.asarray(x) for x in args)
    if a.dtype != b.dtype:
        raise ValueError(f"{node.op_type} {node.name!r}: operands of types {a.dtype} and {b.dtype}")
    return np.subtract(a, b) if node.op_type == "Sub" else np.multiply(a, b)
