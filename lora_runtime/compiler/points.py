"""Attachment points: which base-graph op each PEFT module path attaches to.

A candidate is a top-level MatMul or Gemm whose weight is a constant 2-D initializer::

    MatMul(x, W)                         W stored (in, out)
    MatMul(x, Transpose(W, perm=[1,0]))  W stored (out, in)
    Gemm(x, W, [C], transB=1)            W stored (out, in)    (torch Linear, TorchScript export)
    Gemm(x, W, [C], transB=0)            W stored (in, out)    (GPT-2 Conv1D)

Orientation comes from the op, never from the shape: square weights are common.
Every candidate gets module-path aliases from the three ways exporters keep them:

1. the weight's name, ``model.layers.0.self_attn.q_proj.weight`` (hand-built graphs, Gemm exports);
2. the legacy exporter's node name, ``/model/layers.0/self_attn/q_proj/MatMul``;
3. dynamo's node metadata ``pkg.torch.onnx.name_scopes`` (weights there are ``val_N``, stored (in, out)).

A PEFT module matches a candidate when an alias equals it or one is a whole dotted suffix of the
other (a wrapper module may prefix ``m.``). Exact matches win; otherwise the match must be unique.

A module an adapter saves whole (``modules_to_save``) resolves the same way (:func:`attach_saved`); its bias is
the Gemm's ``C`` or, after a MatMul, the constant (out,) operand of the one ``Add`` reading its output.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from lora_runtime.compiler.adapter import Adapter
from lora_runtime.errors import AttachmentError, BaseModelError
from lora_runtime.graph import consumers, node_keys
from lora_runtime.models.blocks import MS_DOMAIN
from lora_runtime.models.llama_graph import PACKED
from lora_runtime.names import BLOCK_OFFSETS, PACKED_SLICE, lora_a, lora_b

log = logging.getLogger(__name__)

NAME_SCOPES = "pkg.torch.onnx.name_scopes"


@dataclass(frozen=True)
class Candidate:
    """A MatMul/Gemm with a constant weight, and the module paths it may be known by."""

    node: str  # graph.node_keys(): the node name, made unique if the graph left it empty or repeated it
    op_type: str
    x: str  # activation input
    y: str  # output
    weight: str  # initializer name
    in_features: int
    out_features: int
    aliases: tuple[str, ...]
    transposed: bool = False  # the weight is stored (out, in) (Gemm transB=1, MatMul via Transpose)
    elem_type: int = onnx.TensorProto.FLOAT  # the weight's ONNX element type: what the op computes in


@dataclass(frozen=True)
class AttachmentPoint:
    """A PEFT module path resolved to one candidate op."""

    module: str
    candidate: Candidate


@dataclass(frozen=True)
class SavedPoint:
    """A module some adapters save whole, resolved to its op: the weight and bias its slots replace."""

    module: str
    candidate: Candidate
    bias: str | None  # the base's bias initializer (Gemm C, or the Add's constant after a MatMul); None: none
    bias_node: str | None  # node key of that Add (None for a Gemm's C, or no bias)
    adapters: tuple[str, ...]  # the adapters that save it, in the order given
    has_bias: bool  # the saved module has a bias (a slot; holding zeros for the base when the op had none)


def find_candidates(graph: onnx.GraphProto, blocks: bool = False) -> list[Candidate]:
    """Every MatMul/Gemm in the top-level graph whose weight is a constant 2-D initializer, in graph order.

    ``blocks``: also every ``MatMulNBits`` over constant blocks (a base that keeps a GGUF's quantized weights,
    ``models.blocks``) and every module's slice of a packed linear op (the ort flavour's q/k/v and gate/up, split
    back per module: the ``Split`` output is the module's output): LoRA attaches to those as to a float op, but
    passes that read or rewrite float weights (saved modules, QDQ, weight-only quantization, merging) must not
    see them."""
    inits = {t.name: t for t in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}
    keys = node_keys(graph)
    out = []
    for i, node in enumerate(graph.node):
        if blocks and node.op_type == "Split" and node.doc_string.startswith(PACKED):
            out += packed_slices(node, keys[i], inits, producers)
            continue
        if blocks and node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN and node.input[1] in inits:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            out.append(Candidate(keys[i], node.op_type, node.input[0], node.output[0], node.input[1],
                                 int(attrs["K"]), int(attrs["N"]), _block_aliases(node), False,
                                 inits[node.input[2]].data_type))
            continue
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        name = keys[i]
        found = _weight_of(node, inits, producers)
        if isinstance(found, str):
            log.debug("not an attachment point: %s %s: %s", node.op_type, name, found)
            continue
        weight, transposed = found  # transposed: stored (out, in)
        if weight.endswith(BLOCK_OFFSETS):  # kept Q4_1 blocks' exact correction: part of that op, not a layer
            continue
        dims = tuple(inits[weight].dims)
        d_in, d_out = (dims[1], dims[0]) if transposed else dims
        out.append(Candidate(name, node.op_type, node.input[0], node.output[0], weight, int(d_in), int(d_out),
                             _aliases(node, weight), transposed, inits[weight].data_type))
    return out


def attach(graph: onnx.GraphProto, adapters: Sequence[Adapter], base: Path) -> list[AttachmentPoint]:
    """Every module any adapter names, resolved to its op and checked against it, in graph order.

    ``base`` (the model's path) is named in messages. Each pair's A/B must fit the op's in/out features, and no
    two module paths (of different adapters) may reach one op.
    """
    candidates = find_candidates(graph, blocks=True)
    if not candidates:
        raise BaseModelError(f"{base}: no MatMul/Gemm with a constant 2-D weight: nothing to attach LoRA to")
    by_module: dict[str, AttachmentPoint] = {}
    for a in adapters:
        found = resolve(candidates, [p.module for p in a.pairs], f"adapter {a.name!r} on {base.name}")
        for pair in a.pairs:
            c = found[pair.module].candidate
            if (pair.in_features, pair.out_features) != (c.in_features, c.out_features):
                raise AttachmentError(
                    f"adapter {a.name!r}: {lora_a(pair.module)} {pair.a.shape} / {lora_b(pair.module)} "
                    f"{pair.b.shape} do not fit {c.op_type} {c.node!r} with in={c.in_features}, "
                    f"out={c.out_features} (A must be (r, in), B (out, r))")
        for module, point in found.items():
            other = next((p for p in by_module.values() if p.candidate.node == point.candidate.node
                          and p.module != module), None)
            if other is not None:
                raise AttachmentError(f"adapter {a.name!r}: module {module!r} resolves to op {point.candidate.node!r}, "
                                      f"which another adapter reaches as {other.module!r}; use one module path")
            by_module.setdefault(module, point)
    order = {c.node: i for i, c in enumerate(candidates)}
    return sorted(by_module.values(), key=lambda p: order[p.candidate.node])


def attach_saved(graph: onnx.GraphProto, adapters: Sequence[Adapter], base: Path,
                 points: Sequence[AttachmentPoint]) -> list[SavedPoint]:
    """Every module an adapter saves whole (``modules_to_save``), resolved to its MatMul/Gemm, in graph order.

    Only a Linear can be swapped: the module must resolve to one op with a constant weight used by nothing else
    (a tied embedding table is not a head of its own), fit each adapter's weight (out, in) and bias, and carry no
    LoRA branch of any adapter."""
    saving: dict[str, list[Adapter]] = {}
    for a in adapters:
        for s in a.saved:
            saving.setdefault(s.module, []).append(a)
    if not saving:
        return []
    candidates = find_candidates(graph)
    inits = {t.name: t for t in graph.initializer}
    readers = consumers(graph)
    keys = dict(zip(node_keys(graph), graph.node))
    lora = {p.candidate.node: p for p in points}
    out = []
    for module, owners in saving.items():
        source = f"adapter {owners[0].name!r} on {base.name} (modules_to_save)"
        try:
            c = resolve(candidates, [module], source)[module].candidate
        except AttachmentError as e:
            raise AttachmentError(f"{e}; a saved module must be a Linear: embeddings, norms and convolutions in "
                                  "modules_to_save cannot be swapped") from None
        if c.node in lora:
            raise AttachmentError(f"{source}: module {module!r} is saved whole, and adapter(s) put LoRA on the same op "
                                  f"{c.node!r} as {lora[c.node].module!r}; PEFT does one or the other")
        node = keys[c.node]
        users = [n for n in readers.get(c.weight, []) if n is not node and n.output[0] not in node.input]
        if users:
            raise AttachmentError(f"{source}: module {module!r}: its weight {c.weight!r} is also read by "
                                  f"{users[0].op_type} {users[0].name!r} (tied weights); only a Linear of its own "
                                  "can be saved whole")
        bias, bias_node = _bias_of(node, c, inits, readers, keys, module, source)
        has_bias = {a.saved_module(module).bias is not None for a in owners}
        for a in owners:
            s = a.saved_module(module)
            if (s.out_features, s.in_features) != (c.out_features, c.in_features):
                raise AttachmentError(f"adapter {a.name!r}: saved module {module!r} has weight {s.weight.shape}, which "
                                      f"does not fit {c.op_type} {c.node!r} (out={c.out_features}, "
                                      f"in={c.in_features}; a Linear weight is (out, in))")
            if s.bias is None and bias is not None:
                raise AttachmentError(f"adapter {a.name!r}: saved module {module!r} has no bias, but the base op "
                                      f"{c.node!r} adds {bias!r}")
        if len(has_bias) > 1:
            raise AttachmentError(f"adapters {', '.join(repr(a.name) for a in owners)} save module {module!r} with "
                                  "and without a bias; one module has one shape")
        out.append(SavedPoint(module, c, bias, bias_node, tuple(a.name for a in owners), has_bias.pop()))
    order = {c.node: i for i, c in enumerate(candidates)}
    return sorted(out, key=lambda p: order[p.candidate.node])


def _bias_of(node: onnx.NodeProto, c: Candidate, inits: dict[str, onnx.TensorProto],
             readers: dict[str, list[onnx.NodeProto]], keys: dict[str, onnx.NodeProto], module: str,
             source: str) -> tuple[str | None, str | None]:
    """The base op's bias initializer and, after a MatMul, the key of the Add that adds it."""
    def is_bias(name: str) -> bool:
        t = inits.get(name)
        return t is not None and list(t.dims) in ([c.out_features], [1, c.out_features])

    if c.op_type == "Gemm":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            raise AttachmentError(f"{source}: module {module!r}: Gemm {c.node!r} has alpha {attrs.get('alpha', 1.0)} "
                                  f"and beta {attrs.get('beta', 1.0)}; a saved Linear needs alpha = beta = 1")
        if len(node.input) > 2 and node.input[2]:
            if not is_bias(node.input[2]):
                raise AttachmentError(f"{source}: module {module!r}: the bias {node.input[2]!r} of Gemm {c.node!r} is "
                                      f"not a constant ({c.out_features},)")
            return node.input[2], None
        return None, None
    after = readers.get(c.y, [])
    if len(after) == 1 and after[0].op_type == "Add":
        other = [i for i in after[0].input if i != c.y]
        if len(other) == 1 and is_bias(other[0]):
            return other[0], next(k for k, n in keys.items() if n is after[0])
    return None, None


def resolve(candidates: list[Candidate], modules: list[str], source: str) -> dict[str, AttachmentPoint]:
    """Map each PEFT module path to exactly one candidate; fail clearly on none, several, or sharing."""
    points: dict[str, AttachmentPoint] = {}
    taken: dict[str, str] = {}
    for module in modules:
        exact = [c for c in candidates if module in c.aliases]
        hits = exact or [c for c in candidates if any(_suffix(a, module) for a in c.aliases)]
        if not hits:
            sample = ", ".join(repr(a) for c in candidates[:3] for a in c.aliases[:1]) or "none"
            raise AttachmentError(f"{source}: module {module!r} matches no MatMul/Gemm with a constant weight "
                                  f"({len(candidates)} candidates, e.g. {sample})")
        if len(hits) > 1:
            nodes = ", ".join(repr(c.node) for c in hits[:4])
            raise AttachmentError(f"{source}: module {module!r} matches {len(hits)} ops ({nodes}); "
                                  "give the full module path")
        c = hits[0]
        if c.node in taken:
            raise AttachmentError(f"{source}: modules {taken[c.node]!r} and {module!r} both resolve to op {c.node!r}")
        taken[c.node] = module
        points[module] = AttachmentPoint(module, c)
    return points


def _suffix(alias: str, module: str) -> bool:
    return alias.endswith("." + module) or module.endswith("." + alias)


def _weight_of(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto],
               producers: dict[str, onnx.NodeProto]) -> tuple[str, bool] | str:
    """(initializer name, stored transposed) or the reason this op is not a candidate."""
    if len(node.input) < 2:
        return "fewer than two inputs"
    w = node.input[1]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gemm":
        if attrs.get("transA", 0):
            return "Gemm with transA=1"
        transposed = bool(attrs.get("transB", 0))
    else:
        transposed = False
        p = producers.get(w)
        if w not in inits and p is not None and p.op_type == "Transpose" and p.input[0] in inits:
            perm = [a.ints for a in p.attribute if a.name == "perm"]
            if perm and list(perm[0]) != [1, 0]:
                return f"weight goes through Transpose with perm {list(perm[0])}"
            w, transposed = p.input[0], True
    if w not in inits:
        if node.input[0] in inits:
            return "the constant is the left operand"
        return "second input is not a constant initializer"
    if len(inits[w].dims) != 2:
        return f"weight {w!r} is {len(inits[w].dims)}-D"
    return w, transposed


def packed_slices(node: onnx.NodeProto, key: str, inits: dict, producers: dict) -> list[Candidate]:
    """A packed linear op's ``Split`` (its doc_string: ``PACKED`` + {"x", "in", "modules"}): one candidate per
    module, its output the module's slice; the weight named by the module (it is a slice of the packed one)."""
    info = json.loads(node.doc_string[len(PACKED):])
    sizes = inits.get(node.input[1]) if len(node.input) > 1 else None
    if sizes is None or len(info["modules"]) != len(node.output):
        raise BaseModelError(f"packed op {node.name!r}: its Split does not name one module per output")
    widths = [int(n) for n in onnx.numpy_helper.to_array(sizes)]
    src = producers.get(node.input[0])
    elem = onnx.TensorProto.FLOAT
    if src is not None and src.op_type == "MatMulNBits" and src.input[2] in inits:
        elem = inits[src.input[2]].data_type
    return [Candidate(f"{key}/{j}", PACKED_SLICE, info["x"], y, f"{m}.weight", int(info["in"]), widths[j], (m,),
                      False, elem)
            for j, (m, y) in enumerate(zip(info["modules"], node.output))]


def _block_aliases(node: onnx.NodeProto) -> tuple[str, ...]:
    """A kept-blocks op's module path: from its codes ``<module>.weight.q4`` and its name ``<module>.MatMulNBits``."""
    names = [re.sub(r"\.weight\.q\d+$", "", node.input[1]), node.name.removesuffix(".MatMulNBits")]
    return tuple(dict.fromkeys(n for n in names if n and n != node.input[1]))


def blocks_summary(graph: onnx.GraphProto) -> str:
    """The base's ops over quantized blocks, e.g. ``"210 MatMulNBits 4-bit, 1 GatherBlockQuantized 8-bit"``; ""
    for a base without any."""
    found: dict[str, int] = {}
    for n in graph.node:
        if n.domain == MS_DOMAIN and n.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            bits = next((a.i for a in n.attribute if a.name == "bits"), 0)
            found[f"{n.op_type} {bits}-bit"] = found.get(f"{n.op_type} {bits}-bit", 0) + 1
    return ", ".join(f"{v} {k}" for k, v in sorted(found.items(), key=lambda kv: (-kv[1], kv[0])))


def _aliases(node: onnx.NodeProto, weight: str) -> tuple[str, ...]:
    names: list[str] = []
    if weight.endswith(".weight"):
        names.append(weight[: -len(".weight")])
    if "/" in node.name:
        parts = [p for p in node.name.strip("/").split("/")[:-1] if p]
        if parts:
            names.append(".".join(parts))
    scopes = next((p.value for p in node.metadata_props if p.key == NAME_SCOPES), None)
    if scopes:
        path = _scope_path(scopes)
        if path:
            names.append(path)
    return tuple(dict.fromkeys(names))


def _scope_path(text: str) -> str:
    """Module path from dynamo's ``name_scopes``, a Python-literal list of cumulative scopes ending in the op::

        "['', 'model', 'model.layers.0', 'model.layers.0.self_attn', 'model.layers.0.self_attn.q_proj', 'linear']"
                                                                      ^ the module path: the chain's last link
    """
    try:
        scopes = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return ""
    if not isinstance(scopes, (list, tuple)):
        return ""
    parts = [str(s) for s in scopes if s]
    if not parts:
        return ""
    chain = parts[0]
    for s in parts[1:]:
        if s.startswith(chain + "."):
            chain = s
    return chain
