"""The static-shape pass: bake every free dimension, then fold what became constant.

Accelerators compile a graph for fixed shapes (QNN's HTP refuses a free dimension: "Cannot get shape";
``Range`` needs constant inputs). The pass::

    input_ids (1, "sequence")          ──►  input_ids (1, 8)                          (--static-shape sequence=8)
    Shape(x) ─► Gather ─► Range ─► ...  ──►  constants                                   (folded)
    mask = Where(visible, 0, -1e9)     ──►  a constant; with a mask floor, -1e9 -> -50   (quantizable)

Folding evaluates a node whose inputs are all constants (and ``Shape`` of a tensor whose shape inference made
static) with ONNX's reference evaluator, one node at a time, and replaces its outputs with initializers;
LoRA slots and every graph input are never constants. A constant larger than ``max_fold_bytes`` is left
to its node.

HTP forms (HTP only): equivalent spellings of what QNN's HTP gets wrong, measured on the simulator::

    Mul(weight, x)  ──►  Mul(x, weight)   (Add too) a broadcast with the static operand first fails to finalize
                                          (QNN_COMMON_ERROR_MEM_ALLOC, a dynamo export's RMSNorm)
    Reciprocal(x)   ──►  Div(1, x)        a quantized Reciprocal of a small-scale input is 40x off (0.2 dB vs
                                          the CPU); the quantized Div is exact (76 dB)
    GatherND(x, I)  ──►  Gather(Reshape(x, [-1]), J)   with constant indices I (J: their flat offsets); QNN has
                                          no GatherND (a dynamo export expands its attention mask with one)
    Pow ─► ReduceMean ─► Add ─► Sqrt ─► Div ─► Mul(gamma)  ──►  SimplifiedLayerNormalization(x, gamma)
                                          an RMSNorm as QNN's RmsNorm kernel: x² of an LLM's massive activations
                                          has no useful 16-bit encoding (``passes.rms_norm``)

The mask floor (HTP only): a quantized graph cannot hold ``-1e9`` (or ``finfo.min``) next to attention scores
of about ±30: the Add's encoding would spend its whole range on the mask. Constants at or below ``-1e4`` are
raised to the floor (-50, the value Qualcomm's own LLM exports use): masked scores stay far below the real
ones, softmax still gives them ~e^-50.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from lora_runtime.compiler.passes import PassResult
from lora_runtime.compiler.passes.rms_norm import fuse_rms_norms
from lora_runtime.errors import TargetError
from lora_runtime.external_data import read_tensor, tensor_nbytes
from lora_runtime.graph import GraphEdit, consumers

MASK_THRESHOLD = -1e4
_NOT_FOLDED = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


@dataclass(frozen=True)
class StaticShapeOptions:
    dims: Mapping[str, int]  # the graph's dim_param names -> their values
    base_dir: Path  # where external constants are (folding reads small ones)
    mask_floor: float | None = None  # raise constants at or below MASK_THRESHOLD to this (HTP)
    htp_forms: bool = False  # rewrite what the HTP gets wrong into equivalent forms it runs (see above)
    max_fold_bytes: int = 1 << 24


@dataclass(frozen=True)
class StaticShapeResult(PassResult):
    folded: int  # nodes replaced by constants
    floored: tuple[str, ...]  # constants whose mask values were raised to the floor
    rewritten: int  # nodes put into their HTP forms


def make_static(model: onnx.ModelProto, options: StaticShapeOptions) -> StaticShapeResult:
    """Rewrite ``model`` in place (see the module docstring)."""
    g = model.graph
    _bake_dims(g, options.dims)
    folded = 0
    while True:  # folding makes shapes known that make more nodes foldable (a Reshape's target, a Shape's input)
        del g.value_info[:]  # stale: inferred again, static this time
        shapes = _static_shapes(model)
        step = _fold(g, shapes, options)
        folded += step
        if not step:
            break
    _bake_outputs(g, shapes)
    floored = _floor_masks(g, options.mask_floor) if options.mask_floor is not None else ()
    rewritten = _htp_forms(g, shapes, options.base_dir) if options.htp_forms else 0
    return StaticShapeResult(model, folded, floored, rewritten)


def free_dims(graph: onnx.GraphProto) -> dict[str, str]:
    """dim_param -> the first graph input that has it (outputs follow from the inputs)."""
    out: dict[str, str] = {}
    for v in graph.input:
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param:
                out.setdefault(d.dim_param, v.name)
    return out


def _bake_dims(g: onnx.GraphProto, dims: Mapping[str, int]) -> None:
    free = free_dims(g)
    unknown = sorted(set(dims) - set(free))
    if unknown:
        raise TargetError(f"--static-shape {unknown[0]}=...: the graph has no free dimension {unknown[0]!r} "
                          f"(its free dimensions: {', '.join(sorted(free)) or 'none'})")
    for name, value in dims.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TargetError(f"--static-shape {name}={value!r}: a dimension is a positive integer")
    left = sorted(set(free) - set(dims))
    if left:
        raise TargetError(f"free dimension {left[0]!r} of {free[left[0]]!r} has no value: pass --static-shape "
                          f"{left[0]}=N (every free dimension: {', '.join(sorted(free))})")
    for v in g.input:
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_value = dims[d.dim_param]  # clears dim_param (a oneof)


def _bake_outputs(g: onnx.GraphProto, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Graph outputs take the shapes inference gave them; one it could not make static is an error."""
    for v in g.output:
        if v.name not in shapes:
            raise TargetError(f"output {v.name!r} has no static shape once the inputs are fixed (shape inference "
                              "could not follow the graph)")
        del v.type.tensor_type.shape.dim[:]
        for d in shapes[v.name]:
            v.type.tensor_type.shape.dim.add().dim_value = d


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Tensor -> its shape where shape inference knows every dimension."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    out = {}
    for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = v.type.tensor_type.shape.dim
        if v.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            out[v.name] = tuple(int(d.dim_value) for d in dims)
    for t in model.graph.initializer:
        out[t.name] = tuple(t.dims)
    return out


def _fold(g: onnx.GraphProto, shapes: Mapping[str, tuple[int, ...]], o: StaticShapeOptions) -> int:
    inputs = {v.name for v in g.input}
    inits = {t.name: t for t in g.initializer if t.name not in inputs}  # initializer-inputs are slots
    values: dict[str, np.ndarray] = {}
    outputs = {v.name for v in g.output}

    def value(name: str) -> np.ndarray | None:
        if name in values:
            return values[name]
        t = inits.get(name)
        if t is None or tensor_nbytes(t) > o.max_fold_bytes:
            return None
        values[name] = read_tensor(t, o.base_dir)
        return values[name]

    edit = GraphEdit(g)
    made: dict[str, np.ndarray] = {}
    removed: set[int] = set()
    for i, node in edit.nodes():
        if node.domain not in ("", "ai.onnx") or node.op_type in _NOT_FOLDED or any(x in outputs for x in node.output):
            continue
        if node.op_type == "Shape" and node.input[0] in shapes:
            result = [_shape_of(node, shapes[node.input[0]])]
        else:
            args = [value(x) if x else None for x in node.input]
            if any(a is None for x, a in zip(node.input, args) if x):
                continue
            result = _evaluate(node, args)
        if result is None or sum(r.nbytes for r in result) > o.max_fold_bytes:
            continue
        for name, r in zip(node.output, result):
            values[name] = made[name] = r
        edit.remove(i)
        removed.add(i)
    remaining = {x for i, n in edit.nodes() if i not in removed for x in n.input}
    edit.add_initializers(numpy_helper.from_array(np.asarray(v), k) for k, v in made.items() if k in remaining)
    edit.drop_initializers(t for t in inits if t not in remaining and t not in outputs)
    edit.apply()
    return len(removed)


def _shape_of(node: onnx.NodeProto, shape: tuple[int, ...]) -> np.ndarray:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return np.asarray(shape[attrs.get("start", 0):attrs.get("end", len(shape))], np.int64)


def _evaluate(node: onnx.NodeProto, args: list[np.ndarray | None]) -> list[np.ndarray] | None:
    """One node on constant inputs, by ONNX's reference implementation (None: it cannot be evaluated)."""
    names = [f"in{i}" if x else "" for i, x in enumerate(node.input)]
    copy = helper.make_node(node.op_type, names, [f"out{i}" for i in range(len(node.output))],
                            domain=node.domain)
    copy.attribute.extend(node.attribute)
    feeds = {n: a for n, a in zip(names, args) if n}
    try:
        ev = ReferenceEvaluator(copy)
        return [np.asarray(r) for r in ev.run(None, feeds)]
    except Exception:  # noqa: BLE001  (an op the reference cannot run: the node simply stays)
        return None


def _htp_forms(g: onnx.GraphProto, shapes: dict[str, tuple[int, ...]], base_dir: Path) -> int:
    count = fuse_rms_norms(g, base_dir, shapes)
    inits = {t.name: t for t in g.initializer if t.name not in {v.name for v in g.input}}
    edit = GraphEdit(g)
    one = "htp_form.one"
    for i, n in edit.nodes():
        standard = n.domain in ("", "ai.onnx")
        if standard and n.op_type in ("Mul", "Add") and n.input[0] in inits and n.input[1] not in inits:
            n.input[:] = [n.input[1], n.input[0]]
        elif standard and n.op_type == "Reciprocal":
            edit.replace(i, [helper.make_node("Div", [one, n.input[0]], list(n.output), name=n.name or None)])
        elif standard and n.op_type == "GatherND" and n.input[1] in inits and n.input[0] in shapes \
                and not any(a.name == "batch_dims" and a.i for a in n.attribute):
            edit.replace(i, _gather_nd(n, numpy_helper.to_array(inits[n.input[1]]), shapes[n.input[0]], edit))
        else:
            continue
        count += 1
    if any(n.op_type == "Reciprocal" for n in g.node):
        edit.add_initializers([numpy_helper.from_array(np.array([1.0], np.float32), one)])
    edit.apply()
    return count


def _gather_nd(n: onnx.NodeProto, indices: np.ndarray, shape: tuple[int, ...], edit: GraphEdit) -> list[onnx.NodeProto]:
    """GatherND (batch_dims 0) with constant indices as a Gather from the flattened data."""
    k = indices.shape[-1]
    strides = np.array([int(np.prod(shape[j + 1:k])) for j in range(k)], np.int64)
    inner = int(np.prod(shape[k:]))
    flat = np.where(indices < 0, indices + np.array(shape[:k]), indices).astype(np.int64) @ strides
    name = n.name or n.output[0]
    edit.add_initializers([numpy_helper.from_array(np.array([-1, inner], np.int64), f"{name}/flat_shape"),
                           numpy_helper.from_array(flat, f"{name}/flat_index"),
                           numpy_helper.from_array(np.array([*indices.shape[:-1], *shape[k:]], np.int64),
                                                   f"{name}/out_shape")])
    return [helper.make_node("Reshape", [n.input[0], f"{name}/flat_shape"], [f"{name}/flat"], name=f"{name}/Reshape"),
            helper.make_node("Gather", [f"{name}/flat", f"{name}/flat_index"], [f"{name}/gathered"],
                             name=f"{name}/Gather", axis=0),
            helper.make_node("Reshape", [f"{name}/gathered", f"{name}/out_shape"], list(n.output), name=name)]


def _floor_masks(g: onnx.GraphProto, floor: float) -> tuple[str, ...]:
    """Raise float constants at or below MASK_THRESHOLD to ``floor`` (inline constants only: masks are small)."""
    done = []
    used = consumers(g)
    for t in g.initializer:
        if t.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16) or t.data_location == TensorProto.EXTERNAL:
            continue
        a = numpy_helper.to_array(t)
        low = a <= MASK_THRESHOLD
        if a.size and np.any(low) and t.name in used:
            t.CopyFrom(numpy_helper.from_array(np.where(low, np.asarray(floor, a.dtype), a).astype(a.dtype), t.name))
            done.append(t.name)
    return tuple(done)
