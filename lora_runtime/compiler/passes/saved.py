"""The saved-module pass: a module an adapter saves whole (PEFT's ``modules_to_save``) reads its weight and bias
from slots, so a switch swaps the whole module with the LoRA weights.

The op keeps its place; only where it reads its weight and bias changes. Slots hold the weight (out, in) as PEFT
stores it (``<module>.modules_to_save.weight``) and the bias (out,) (``<module>.modules_to_save.bias``)::

    Gemm(x, W0, b0, transB=1)        ->  Gemm(x, <m>.modules_to_save.weight, <m>.modules_to_save.bias, transB=1)
    Gemm(x, W0, b0, transB=0)        ->  the same, transB=1 (the slot is (out, in))
    MatMul(x, W0 (in, out)) + b0     ->  MatMul(x, Transpose(<m>.modules_to_save.weight)) + <m>.modules_to_save.bias
    MatMul(x, Transpose(W0 (out, in)))  the same: the base's Transpose goes, the pass's own reads the slot

A module saved with a bias at an op that has none (an exporter drops an all-zero bias) gets one: the Gemm's
``C``, or an ``Add`` after the MatMul (``<m>.modules_to_save/Add``; names from ``names.saved_name``). ONNX
Runtime fuses a Transpose into its MatMul at load, as for the LoRA branches. v1 makes the slots graph inputs;
v2/v3 initializers that are also graph inputs, holding the base's own values (``options.parameters``). The
base's weight and bias initializers are dropped when nothing else reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import onnx
from onnx import TensorProto, helper

from lora_runtime.compiler.passes import PassResult
from lora_runtime.compiler.points import SavedPoint
from lora_runtime.graph import GraphEdit
from lora_runtime.names import base_output, saved_bias, saved_name, saved_weight


@dataclass(frozen=True)
class SavedOptions:
    points: tuple[SavedPoint, ...]
    slot_types: Mapping[str, int]  # slot -> its ONNX element type (the base op's)
    parameters: Mapping[str, TensorProto] = field(default_factory=dict)  # v2/v3: the slots' initializers


@dataclass(frozen=True)
class SavedResult(PassResult):
    slots: Mapping[str, tuple[str, str | None]]  # module -> (weight slot, bias slot or None)


def swap_saved(model: onnx.ModelProto, options: SavedOptions) -> SavedResult:
    """Rewrite ``model`` in place (see the module docstring)."""
    by_node = {p.candidate.node: p for p in options.points}
    bias_adds = {p.bias_node: p for p in options.points if p.bias_node is not None}
    edit = GraphEdit(model.graph)
    producers = {o: i for i, n in edit.nodes() for o in n.output}
    inputs, made = [], {}
    for i, key, node in edit.keyed():
        p = bias_adds.get(key)
        if p is not None:  # MatMul + Add(b0): the Add reads the bias slot
            node.input[list(node.input).index(p.bias)] = saved_bias(p.module)
            continue
        p = by_node.get(key)
        if p is None:
            continue
        c, m = p.candidate, p.module
        w, b = saved_weight(m), saved_bias(m) if p.has_bias else None
        inputs.append(helper.make_tensor_value_info(w, options.slot_types[w], [c.out_features, c.in_features]))
        if b is not None:
            inputs.append(helper.make_tensor_value_info(b, options.slot_types[b], [c.out_features]))
        if c.op_type == "Gemm":
            _set_trans_b(node)
            node.input[1] = w
            if b is not None:
                if len(node.input) > 2:
                    node.input[2] = b
                else:
                    node.input.append(b)
        else:
            if c.transposed:  # MatMul(x, Transpose(W0)): that Transpose goes, ours reads the slot
                edit.remove(producers[node.input[1]])
            edit.replace(i, [helper.make_node("Transpose", [w], [saved_name(m, "weight_t")],
                                              name=saved_name(m, "Transpose"), perm=[1, 0]), node])
            node.input[1] = saved_name(m, "weight_t")
            if b is not None and p.bias_node is None:  # a bias where the base op had none
                node.output[0] = base_output(c.y)
                edit.insert_after(i, [helper.make_node("Add", [base_output(c.y), b], [c.y], name=saved_name(m, "Add"))])
        made[m] = (w, b)
    missing = set(by_node) - {p.candidate.node for p in options.points if p.module in made}
    if missing:
        raise ValueError(f"saved modules' ops not found in the graph: {sorted(missing)}")
    read = {i for n in edit.pending() for i in n.input}
    base = {t for p in options.points for t in (p.candidate.weight, p.bias) if t is not None}
    edit.drop_initializers(base - read)
    edit.add_inputs(inputs)
    edit.add_initializers(options.parameters.values())
    edit.apply()
    return SavedResult(model, made)


def _set_trans_b(node: onnx.NodeProto) -> None:
    """transB=1: the slot holds the weight (out, in) whatever the base stored."""
    for a in node.attribute:
        if a.name == "transB":
            a.i = 1
            return
    node.attribute.append(helper.make_attribute("transB", 1))
