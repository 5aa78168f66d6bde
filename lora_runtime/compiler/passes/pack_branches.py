"""The packed-branch pass (v3 on the CPU): one LoRA branch on a packed op's output instead of one per module slice.

The ort flavour computes q/k/v (and gate/up) with one packed op whose ``Split`` gives each module its slice, and the
branch pass adds a branch to each slice: per layer with LoRA on q and v, the Split and eight small kernels that
cost ONNX Runtime a few microseconds each per token whatever their size. ONNX Runtime GenAI attaches one branch to
the packed output instead. This pass does the same with the slots as they are (PEFT's per-module A and B; the
group patch unchanged)::

    x ─► Op(W0 packed) ─► y ───────────────────────────────────────────────────────────► Add ─► Split ─► q, k, v
    └─► MatMul(Transpose(Concat(A_q, A_v))) ─► Mul(Concat(g_q, g_v)) ─► MatMul(Transpose(B_cat)) ─┘

``B_cat`` (out_packed, R_q + R_v) stacks each module's B, padded to its own columns, and zeros where a module has no
branch (k). The slots it reads stop being graph inputs (a v3 group on the CPU is never bound: the graph's
initializers hold it), so ONNX Runtime folds the Concat, Pad and Transpose of the weights once at session creation:
per token a layer runs two MatMuls, one Mul and one Add, and attention then reads the packed tensor whole
(``pack_qkv``). The arithmetic is the per-slice branches' (the zero blocks add exact zeros).

Only where every branch on the Split computes in float32 on float32 slots (no Casts) and nothing else reads the
slots; the others keep their branches.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lora_runtime.compiler.passes import PassResult
from lora_runtime.compiler.passes.branch import BranchResult, BranchTensors
from lora_runtime.compiler.passes.pack_qkv import pack_attention
from lora_runtime.models.llama_graph import PACKED


@dataclass(frozen=True)
class PackBranchesResult(PassResult):
    sums: Mapping[str, str]  # each branch's output -> the base output it sums (the base path's aliases)
    packed: int  # how many packed ops got one branch


def pack_graph(model: onnx.ModelProto, made: BranchResult, v3: bool) -> Mapping[str, str]:
    """A CPU bundle's graph: (v3) one branch per packed op, then every attention whose q/k/v no branch touches
    reads them packed. Returns each branch's output -> the base output it sums (for the base path)."""
    sums = pack_branches(model, made).sums if v3 else {t.out: t.base_out for t in made.points.values()}
    pack_attention(model)
    return sums


def pack_branches(model: onnx.ModelProto, made: BranchResult) -> PackBranchesResult:
    """Rewrite ``model`` in place (see the module docstring)."""
    g = model.graph
    nodes = list(g.node)
    producer = {o: n for n in nodes for o in n.output if o}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    by_base = {t.base_out: t for t in made.points.values()}
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in g.input}
    elem = {v.name: v.type.tensor_type.elem_type for v in g.input}
    sums = {t.out: t.base_out for t in made.points.values()}
    drop: set[int] = set()
    before: dict[int, list[onnx.NodeProto]] = {}  # id(Split) -> the nodes to insert before it
    freed: set[str] = set()  # slots that stop being graph inputs
    consts: list[TensorProto] = []
    gains: dict[tuple[str, ...], str] = {}
    done = 0
    for split in nodes:
        if split.op_type != "Split" or not split.doc_string.startswith(PACKED):
            continue
        parts = [by_base.get(o) for o in split.output]
        branched = [t for t in parts if t is not None]
        if not branched:
            continue
        found = [_branch_nodes(t, producer, readers, dims, elem) for t in branched]
        if any(f is None for f in found) or len({t.x for t in branched}) != 1:
            continue
        sizes = _split_sizes(split, g)
        if sizes is None:
            continue
        y = split.input[0]
        key = y
        ranks = [dims[t.a_slot][0] for t in branched]
        total = sum(ranks)
        gain_key = tuple(f[1] for f in found)
        new: list[onnx.NodeProto] = []
        if gain_key not in gains:  # one Concat per distinct pair of column layouts, shared by every layer
            gains[gain_key] = f"{key}.lora/gain"
            new.append(helper.make_node("Concat", list(gain_key), [gains[gain_key]], name=f"{key}.lora/ConcatGain",
                                        axis=0))
        b_parts, col = [], 0
        for j, t in enumerate(parts):
            if t is None:  # a module without a branch: zero rows
                z = f"{key}.lora/zeros.{j}"
                consts.append(numpy_helper.from_array(np.zeros((sizes[j], total), np.float32), z))
                b_parts.append(z)
                continue
            r = dims[t.a_slot][0]
            pads = f"{key}.lora/pads.{j}"
            consts.append(numpy_helper.from_array(np.array([0, col, 0, total - col - r], np.int64), pads))
            b_parts.append(f"{key}.lora/B.{j}")
            new.append(helper.make_node("Pad", [t.b_slot, pads], [b_parts[-1]], name=f"{key}.lora/PadB.{j}"))
            col += r
        p = f"{key}.lora"
        new += [
            helper.make_node("Concat", [t.a_slot for t in branched], [f"{p}/A"], name=f"{p}/ConcatA", axis=0),
            helper.make_node("Transpose", [f"{p}/A"], [f"{p}/A_t"], name=f"{p}/TransposeA", perm=[1, 0]),
            helper.make_node("MatMul", [branched[0].x, f"{p}/A_t"], [f"{p}/u"], name=f"{p}/MatMulA"),
            helper.make_node("Mul", [f"{p}/u", gains[gain_key]], [f"{p}/scaled"], name=f"{p}/Scale"),
            helper.make_node("Concat", b_parts, [f"{p}/B"], name=f"{p}/ConcatB", axis=0),
            helper.make_node("Transpose", [f"{p}/B"], [f"{p}/B_t"], name=f"{p}/TransposeB", perm=[1, 0]),
            helper.make_node("MatMul", [f"{p}/scaled", f"{p}/B_t"], [f"{p}/delta"], name=f"{p}/MatMulB"),
            helper.make_node("Add", [y, f"{p}/delta"], [f"{p}/sum"], name=f"{p}/Add"),
        ]
        for f in found:
            drop.update(id(n) for n in f[0])
        for t in branched:
            sums.pop(t.out)
            freed.update((t.a_slot, t.b_slot))
        split.input[0] = f"{p}/sum"
        split.output[:] = [t.out if t is not None else o for t, o in zip(parts, split.output)]
        sums[f"{p}/sum"] = y
        before[id(split)] = new
        done += 1
    if not done:
        return PackBranchesResult(model, sums, 0)
    out: list[onnx.NodeProto] = []
    for n in nodes:
        if id(n) in drop:
            continue
        out += before.get(id(n), [])
        out.append(n)
    del g.node[:]
    g.node.extend(out)
    g.initializer.extend(consts)
    kept = [i for i in g.input if i.name not in freed]
    del g.input[:]
    g.input.extend(kept)
    return PackBranchesResult(model, sums, done)


def _branch_nodes(t: BranchTensors, producer: Mapping[str, onnx.NodeProto],
                  readers: Mapping[str, list[onnx.NodeProto]], dims: Mapping[str, list[int]],
                  elem: Mapping[str, int]) -> tuple[list[onnx.NodeProto], str] | None:
    """The branch's own nodes (Transposes, MatMuls, the gain's Mul, the Add) and the gain tensor it reads; None
    where the branch is not the plain float32 one or something else reads its slots or values."""
    if t.base_type != TensorProto.FLOAT or any(elem.get(s) != TensorProto.FLOAT for s in (t.a_slot, t.b_slot)):
        return None
    if len(dims.get(t.a_slot, [])) != 2 or len(dims.get(t.b_slot, [])) != 2:
        return None
    mm_a, mm_b, add = producer.get(_out(producer, t, "a")), producer.get(_out(producer, t, "b")), producer.get(t.out)
    scale = producer.get(t.scaled)
    if None in (mm_a, mm_b, add, scale) or add.op_type != "Add" or scale.op_type != "Mul":
        return None
    ta, tb = producer.get(mm_a.input[1]), producer.get(mm_b.input[1])
    if ta is None or tb is None or list(ta.input) != [t.a_slot] or list(tb.input) != [t.b_slot]:
        return None
    own = [ta, mm_a, scale, tb, mm_b, add]
    for n in own[:-1]:  # every value a branch node makes is read by the next one only
        if any(len(readers.get(o, [])) != 1 for o in n.output):
            return None
    if len(readers.get(t.a_slot, [])) != 1 or len(readers.get(t.b_slot, [])) != 1:
        return None
    return own, scale.input[1]


def _out(producer: Mapping[str, onnx.NodeProto], t: BranchTensors, which: str) -> str:
    """The output of the branch's first (``a``) or second (``b``) MatMul."""
    scale = producer.get(t.scaled)
    if which == "a":
        return scale.input[0] if scale is not None else ""
    add = producer.get(t.out)
    return next((i for i in add.input if i != t.base_out), "") if add is not None else ""


def _split_sizes(split: onnx.NodeProto, g: onnx.GraphProto) -> list[int] | None:
    t = next((x for x in g.initializer if len(split.input) > 1 and x.name == split.input[1]), None)
    if t is None or t.data_location == TensorProto.EXTERNAL:
        return None
    info = json.loads(split.doc_string[len(PACKED):])
    sizes = [int(s) for s in numpy_helper.to_array(t)]
    return sizes if len(sizes) == len(info.get("modules", ())) else None
