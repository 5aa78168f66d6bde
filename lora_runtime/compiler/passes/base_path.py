"""The base-path pass (v3 on the CPU): with every strength 0, the graph runs without its LoRA branches.

ONNX Runtime runs every node of a graph on every run. A v3 branch is four kernels per point (two FusedMatMul, the
gain's Mul, the Add) whatever the strengths, ~5 us each on a 2-core CPU: SmolLM2 with three adapters on q/v/o and
the MLP (180 points) decodes 1.25x (float32) to 1.66x (Q4_0) slower than its plain graph with no adapter active.
This pass wraps the whole graph in one ``If`` on the strength vector::

    lora_alpha ─► Abs ─► ReduceMax ─► Greater(0) ─► If ─► the graph's outputs
                                                     ├─ then: the graph as the branch pass left it
                                                     └─ else: the base path: every branch's sum replaced by its
                                                        base output, and the nodes no output needs then dropped

Both subgraphs read the graph's inputs and initializers from the outer scope: one copy of every weight, and a
bound output (a KV cache shared between ``past_*`` and ``present_*``) is written in place by either. At strength 0
the branches add exact zeros, so both compute the same outputs. The subgraphs' own values are renamed with
``BASE_PATH.branched`` / ``BASE_PATH.base`` (ONNX names are unique across nested graphs); node names likewise.

Not for bases whose weights are large per branch point (``BYTES_PER_POINT``): both subgraphs' kernels prepack the
base weights, so the open pays that twice, and where each point's module reads megabytes per run its four branch
kernels are noise. The 1B default model with three adapters (4.4 GB, 112 points; 2-core Zen 4 VM): open 5.6-6.5 s
flat, 7.9-10.8 s with the base path, one 32-token run 0.95-1.0 of the flat graph's with no adapter active; SmolLM2
(0.5-3 MB per point) decodes x1.35 faster with it. Not for graphs that already hold subgraphs (their outer-scope
reads would need renaming too), for QDQ bundles
(the base path would skip the sums' requantization: not the same outputs), for points on float16 ops (ONNX Runtime
rounds a float16 graph differently inside an If: a float16 llama's base path measured 22 dB against PEFT where its
flat graph has 39 dB) or the HTP (QNN has no ``If``): the compiler leaves those flat. ``lora_runtime.export.flatten``
undoes the pass (``merge`` reads the graph with its branches).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from lora_runtime.compiler.passes import PassResult
from lora_runtime.compiler.passes.branch import BranchResult
from lora_runtime.compiler.passes.pack_qkv import drop_unread, pack_qkv
from lora_runtime.external_data import tensor_nbytes
from lora_runtime.names import BASE_PATH, STRENGTH

BYTES_PER_POINT = 16 * 2**20  # base weights per branch point from which the base path does not pay (see above)


@dataclass(frozen=True)
class BasePathOptions:
    sums: Mapping[str, str]  # each branch's output (what the module wrote before) -> the base output it sums


@dataclass(frozen=True)
class BasePathResult(PassResult):
    nodes: int  # the base path's node count (the then-branch has the graph's)


def why_not(model: onnx.ModelProto) -> str | None:
    """Why the pass cannot wrap ``model`` (None: it can)."""
    nested = next((n for n in model.graph.node for a in n.attribute
                   if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)), None)
    if nested is not None:
        return f"the graph already has a subgraph ({nested.op_type} {nested.name!r})"
    if STRENGTH not in {i.name for i in model.graph.input}:
        return f"no {STRENGTH} input"
    return None


def add_base_path(model: onnx.ModelProto, options: BasePathOptions) -> BasePathResult:
    """Wrap ``model``'s graph in place (see the module docstring)."""
    reason = why_not(model)
    if reason is not None:
        raise ValueError(f"cannot add the base path: {reason}")
    g = model.graph
    outer = {i.name for i in g.input} | {t.name for t in g.initializer}
    nodes = list(g.node)
    branched = _subgraph(g, nodes, {}, BASE_PATH.branched, outer, "branched")
    base = _subgraph(g, nodes, dict(options.sums), BASE_PATH.base, outer, "base_path")
    n = BASE_PATH
    gate = [helper.make_node("Abs", [STRENGTH], [n.step("abs")], name=n.step("Abs")),
            helper.make_node("ReduceMax", [n.step("abs")], [n.step("max")], name=n.step("ReduceMax"), keepdims=0),
            helper.make_node("Greater", [n.step("max"), n.zero], [n.any_active], name=n.step("Greater")),
            helper.make_node("If", [n.any_active], [o.name for o in g.output], name=n.node,
                             then_branch=branched, else_branch=base)]
    del g.node[:]
    g.node.extend(gate)
    del g.value_info[:]  # moved into the subgraphs, renamed
    g.initializer.append(helper.make_tensor(n.zero, TensorProto.FLOAT, [], [0.0]))
    drop_unread(g)  # (a packed Split's sizes)
    return BasePathResult(model, len(base.node))


def add_base_paths(models: Sequence[onnx.ModelProto], made: BranchResult, say: Callable[[str], None]) -> bool:
    """The pass on a bundle's graphs (its main graph, and a decode graph), the branches ``made`` by the branch pass;
    False, with the reason said, when one of them cannot take it (then none does) or the main graph's weights are
    ``BYTES_PER_POINT`` or more per point."""
    reason = next((r for r in map(why_not, models) if r), None)
    per_point = weight_bytes(models[0]) / max(len(made.points), 1)
    if reason is None and per_point >= BYTES_PER_POINT:
        reason = (f"{per_point / 2**20:.0f} MB of base weights per branch point: the branches cost a run next to "
                  "nothing, and the base path would prepack every weight a second time at open")
    half = next((t.module for t in made.points.values() if t.base_type != TensorProto.FLOAT), None)
    if half is not None:  # measured: a float16 llama's base path 22 dB against PEFT, its flat graph 39 dB
        reason = (f"{half} computes in float16 (ONNX Runtime's CPU provider runs a float16 graph inside an If with "
                  "other roundings)")
    if reason is not None:
        say(f"no base path: {reason}")
        return False
    sums = BasePathOptions({t.out: t.base_out for t in made.points.values()})
    total = len(models[0].graph.node)
    done = [add_base_path(m, sums) for m in models]
    say(f"base path: {done[0].nodes} of {total} nodes run while every strength is 0")
    return True


def weight_bytes(model: onnx.ModelProto) -> int:
    """The bytes of a graph's initializers (inline or in external data)."""
    return sum(map(tensor_nbytes, model.graph.initializer))


def _subgraph(g: onnx.GraphProto, nodes: list[onnx.NodeProto], alias: dict[str, str], prefix: str,
              outer: set[str], name: str) -> onnx.GraphProto:
    """``nodes`` with every read of an ``alias`` key redirected to its value, those no output needs dropped, the
    attentions whose q/k/v then come straight from their Split fed the packed tensor (``pack_qkv``), and every value
    not in ``outer`` renamed with ``prefix``."""
    constants = {t.name: t for t in g.initializer}

    def resolve(v: str) -> str:
        while v in alias:
            v = alias[v]
        return v

    wanted = [resolve(o.name) for o in g.output]
    live = _live(nodes, wanted, resolve)

    def ren(v: str) -> str:
        return v if not v or v in outer else prefix + v

    out_nodes = []
    for x in nodes:
        if id(x) not in live:
            continue
        c = onnx.NodeProto()
        c.CopyFrom(x)
        c.input[:] = [resolve(i) for i in c.input]
        out_nodes.append(c)
    out_nodes = pack_qkv(out_nodes, constants)  # (the base path's q/k/v reach attention unbranched)
    for c in out_nodes:
        _rename(c, ren)
        c.name = prefix + c.name if c.name else ""
    outputs = []
    for o, w in zip(g.output, wanted):
        if w in outer:  # an input or initializer passed straight out: a subgraph output must be its own value
            out_nodes.append(helper.make_node("Identity", [w], [prefix + o.name], name=f"{prefix}{o.name}/Identity"))
            w = o.name
        v = onnx.ValueInfoProto()
        v.CopyFrom(o)
        v.name = prefix + w
        outputs.append(v)
    produced = {o for x in out_nodes for o in x.output}
    value_info = []
    for vi in g.value_info:
        if ren(vi.name) in produced:
            c = onnx.ValueInfoProto()
            c.CopyFrom(vi)
            c.name = ren(vi.name)
            value_info.append(c)
    return helper.make_graph(out_nodes, name, [], outputs, value_info=value_info)


def _live(nodes: list[onnx.NodeProto], wanted: Iterable[str], resolve: Callable[[str], str]) -> set[int]:
    """The ids of the nodes the ``wanted`` values need (reads resolved through ``resolve``)."""
    producer = {o: x for x in nodes for o in x.output if o}
    live: set[int] = set()
    seen: set[str] = set()
    stack = list(wanted)
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        x = producer.get(v)
        if x is None or id(x) in live:
            continue
        live.add(id(x))
        stack.extend(resolve(i) for i in x.input if i)
    return live


def _rename(node: onnx.NodeProto, ren: Callable[[str], str]) -> None:
    node.input[:] = [ren(i) if i else i for i in node.input]
    node.output[:] = [ren(o) if o else o for o in node.output]
