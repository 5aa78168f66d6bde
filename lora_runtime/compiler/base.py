"""The base model as the compiler meets it: the graph without its weights, and the data files it names.

Base models are used where they lie: the graph is read with ``load_external_data=False`` (attachment checks
need only the initializers' shapes), external data files are hard-linked into the bundle, never rewritten
(``copy_base_data`` copies them where links are impossible), and the rewritten graph is checked by
``onnx.checker`` on its structure alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import onnx
from onnx import TensorProto

from lora_runtime.compiler.adapter import Adapter
from lora_runtime.compiler.points import find_candidates
from lora_runtime.errors import BaseMismatchWarning, BaseModelError
from lora_runtime.external_data import location
from lora_runtime.models.packing import unpack_qkv
from lora_runtime.names import MANIFEST

ORT_DEFAULT_DOMAIN_OPS = {"SimplifiedLayerNormalization"}
FLOAT_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}  # what a base's linear layers may be


def load_base(path: Path) -> tuple[onnx.ModelProto, list[str]]:
    """The graph (weights left where they are) and its external data files, relative to its folder."""
    if not path.is_file():
        raise BaseModelError(f"{path}: base model not found")
    if (path.parent / MANIFEST).is_file():
        raise BaseModelError(f"{path}: a file of the bundle {path.parent}, not a base model: compile from the base "
                             "model the bundle was compiled from (inspect shows its name)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends; all mean the same to the user
        raise BaseModelError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from e
    if not model.graph.node:
        raise BaseModelError(f"{path}: the graph has no nodes (truncated or not an ONNX model)")
    unpack_qkv(model.graph)  # an import's attentions read q/k/v packed: each module's slice a tensor again
    data_files: list[str] = []
    for t in model.graph.initializer:
        rel = location(t)
        if rel is None:
            continue
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise BaseModelError(f"{path}: initializer {t.name!r} has external data outside the model folder")
        if not (path.parent / rel).is_file():
            raise BaseModelError(f"{path}: external data file {rel!r} of initializer {t.name!r} is missing")
        if rel not in data_files:
            data_files.append(rel)
    return model, data_files


def base_float_type(model: onnx.ModelProto, path: Path) -> str:
    """The float type the base's linear layers compute in, from their weights: ``float32``, ``float16``, or both
    (``float32+float16``: a float32 graph with float16 linear layers, the more common first).

    bfloat16 anywhere is refused: ONNX Runtime's CPU provider has no bfloat16 MatMul, Gemm, Add or Mul, so neither
    the base nor a bundle of it runs. Linear weights of other types (float64) are refused too."""
    g = model.graph
    bf16 = [f"initializer {t.name!r}" for t in g.initializer if t.data_type == TensorProto.BFLOAT16]
    bf16 += [f"Cast {n.output[0]!r}" for n in g.node if n.op_type == "Cast"
             and any(a.name == "to" and a.i == TensorProto.BFLOAT16 for a in n.attribute)]
    bf16 += [f"graph input/output {v.name!r}" for v in [*g.input, *g.output]
             if v.type.tensor_type.elem_type == TensorProto.BFLOAT16]
    if bf16:
        raise BaseModelError(f"{path}: base is bfloat16 ({bf16[0]}): ONNX Runtime's CPU provider cannot run it (no "
                             "bfloat16 MatMul, Add or Mul kernels); convert the base to float16 or float32")
    counts: Counter[int] = Counter()
    for c in find_candidates(g):
        if c.elem_type not in FLOAT_TYPES:
            raise BaseModelError(f"{path}: linear weight {c.weight!r} of {c.node!r} is "
                                 f"{TensorProto.DataType.Name(c.elem_type).lower()}: lora_runtime compiles float32 "
                                 "and float16 bases; convert the base to one of them")
        counts[c.elem_type] += 1
    return "+".join(FLOAT_TYPES[t] for t, _ in counts.most_common()) or "float32"


def check_structure(model: onnx.ModelProto, base: Path) -> None:
    """onnx.checker on the rewritten graph's structure, with every initializer's data left out.

    ONNX Runtime's own ops in the default domain (the HTP's fused RMSNorm) are unknown to onnx: the checker
    sees an ``Identity`` of their first input in their place.

    Not on the path: onnx refuses external data files that have several hard links ("potential
    hardlink attack"), and a hard link is how a bundle shares the base weights. Not on the proto
    as is: the checker then looks for external data relative to the current directory.
    """
    g = model.graph
    nodes = [onnx.helper.make_node("Identity", n.input[:1], n.output[:1], name=n.name)
             if n.op_type in ORT_DEFAULT_DOMAIN_OPS and n.domain in ("", "ai.onnx") else n for n in g.node]
    stub = onnx.GraphProto(name=g.name, node=nodes, input=g.input, output=g.output, value_info=g.value_info,
                           initializer=[TensorProto(name=t.name, data_type=t.data_type, dims=[0])
                                        for t in g.initializer])
    m = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, graph=stub,
                        functions=model.functions)
    try:
        onnx.checker.check_model(m)
    except onnx.checker.ValidationError as e:  # a bug of ours, or a base model onnx itself rejects
        raise BaseModelError(f"{base}: the rewritten graph fails onnx.checker: {str(e).splitlines()[0]}") from e


def link_data(src: Path, dst: Path, copy: bool) -> None:
    """Base weights are referenced, not rewritten: a hard link, or a copy only when asked for."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError as e:
        if not copy:
            raise BaseModelError(f"{src}: cannot hard-link the base weights into the bundle ({e.strerror or e}; "
                                 f"another filesystem?); pass --copy-base-data to copy "
                                 f"{src.stat().st_size / 1e9:.2f} GB") from e
        shutil.copyfile(src, dst)


_GENERIC = {"main", "graph", "torch", "jit", "model", "onnx", "base"}


def check_adapter_bases(model: onnx.ModelProto, base: Path, adapters: Sequence[Adapter]) -> None:
    """Warn (:class:`BaseMismatchWarning`) when an adapter names a base model (``base_model_name_or_path``) that
    shares no word with the base's own name (its graph's name, its file, an import's source), where the base has
    one: an adapter trained on another model compiles and runs, silently wrong."""
    identity = _words(model.graph.name) | _words(base.stem) | _words(base.parent.name)
    chat = base.parent / "chat.json"
    if chat.is_file():
        try:
            identity |= _words(str(json.loads(chat.read_text()).get("source", "")))
        except (OSError, ValueError):
            pass
    identity -= _GENERIC
    if not identity:
        return  # an export's generic graph name ("main_graph", "torch_jit"): nothing to compare with
    for a in adapters:
        named = a.config.extra.get("base_model_name_or_path")
        if isinstance(named, str) and named and not (_words(named) - _GENERIC) & identity:
            warnings.warn(f"adapter {a.name!r} was trained on {named!r} (its base_model_name_or_path), which does "
                          f"not look like the base model {base.name} ({model.graph.name!r}): check it is the same "
                          "model", BaseMismatchWarning, stacklevel=2)


def _words(text: str) -> set[str]:
    return {w for w in re.split(r"[^a-z0-9]+", text.lower()) if len(w) >= 3 or any(c.isdigit() for c in w)}
