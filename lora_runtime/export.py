"""Exports of a finished bundle, for peers and baselines: a use-case merged into the base weights, and
ONNX Runtime's own adapters.

``merge_use_case`` undoes the branch rewrite and bakes ``W0 + sum_i s_i * scaling_i * B_i A_i`` into
each attachment point's weight: the zero-overhead ideal a switching runtime is measured against, and
what a naive user (or AIMET's ``load_adapter``) rebuilds a session from on every switch. Saved modules
(``modules_to_save``) become constants holding the use-case's copies.
``export_ort_adapter`` writes one v2 adapter as ONNX Runtime's own ``.onnx_adapter`` (its
parameters are the bundle's v2 slots), for ``LoraAdapter`` + ``RunOptions.add_active_adapter``.

Both read only the bundle (its manifest, patches and graph) and the naming contract: they sit below
the compiler, so the compiler can measure what it builds against them.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from lora_runtime.bundle import Bundle
from lora_runtime.errors import UseCaseError
from lora_runtime.external_data import inline
from lora_runtime.graph import GraphEdit
from lora_runtime.manifest import Manifest
from lora_runtime.names import (
    BASE_PATH,
    GAIN_NODE,
    PACKED_SLICE,
    SCALING,
    BranchNames,
    GainNames,
    base_output,
    lora_a,
    lora_b,
)
from lora_runtime.runtime.session import saved_feeds
from lora_runtime.staging import check_new_file, new_file, publish_file
from lora_runtime.tensorfile import read_header


def use_case_deltas(bundle: Bundle, strengths: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Per point module: ``sum_i s_i * scaling_i * B_i @ A_i``, shape (out, in), from the bundle's patches."""
    m = bundle.manifest
    m.strength_value(strengths)  # validates names, values and v1/v2's one adapter
    deltas: dict[str, np.ndarray] = {}
    if m.generation == "v3":
        tf = read_header(bundle.file(m.group_patch or ""))
        for p in m.points:  # a module of a packed point: its columns and rows of the packed slots
            a, b = tf.read(lora_a(p.branch), float32=True), tf.read(lora_b(p.branch), float32=True)
            b = b[p.rows[0]:p.rows[1]] if p.rows else b
            for c in p.columns:
                s = strengths.get(c.adapter, 0.0)
                if s:
                    d = (s * c.scaling) * (b[:, c.start:c.stop].astype(np.float64) @ a[c.start:c.stop])
                    deltas[p.module] = deltas.get(p.module, 0) + d
        return deltas
    if not strengths:
        return deltas
    (adapter, s), = strengths.items()
    tf = read_header(bundle.file(m.adapter(adapter).patch or ""))
    scaling = tf.read(SCALING)
    for i, p in enumerate(m.points):
        if scaling[i]:
            a, b = tf.read(lora_a(p.module), float32=True), tf.read(lora_b(p.module), float32=True)
            deltas[p.module] = (s * float(scaling[i])) * (b.astype(np.float64) @ a)
    return deltas


def flatten(model: onnx.ModelProto) -> onnx.ModelProto:
    """Undo the base-path pass (``compiler.passes.base_path``) in place: the graph with its branches, flat, under
    its own names again (a graph without it is returned as it is)."""
    g = model.graph
    wrapper = next((x for x in g.node if x.op_type == "If" and x.name == BASE_PATH.node), None)
    if wrapper is None:
        return model
    then = next(a.g for a in wrapper.attribute if a.name == "then_branch")
    cut = len(BASE_PATH.branched)

    def plain(v: str) -> str:  # the then-branch's outputs are the graph's own names under the prefix
        return v[cut:] if v.startswith(BASE_PATH.branched) else v

    nodes = []
    for x in then.node:
        c = onnx.NodeProto()
        c.CopyFrom(x)
        c.input[:] = [plain(i) for i in c.input]
        c.output[:] = [plain(o) for o in c.output]
        c.name = plain(c.name)
        nodes.append(c)
    value_info = []
    for v in then.value_info:
        c = onnx.ValueInfoProto()
        c.CopyFrom(v)
        c.name = plain(v.name)
        value_info.append(c)
    del g.node[:]
    g.node.extend(nodes)
    g.value_info.extend(value_info)
    kept = [t for t in g.initializer if t.name != BASE_PATH.zero]
    del g.initializer[:]
    g.initializer.extend(kept)
    return model


def strip_branches(model: onnx.ModelProto, manifest: Manifest) -> onnx.ModelProto:
    """Remove every LoRA node, input and tensor: the inverse of the branch pass, in place.

    Each branch ends in ``Add(y.base, delta) -> y``; the base op that writes ``y.base`` writes ``y`` again::

        x ──► Op(W0) ──► y.base ──► Add ──► y        becomes        x ──► Op(W0) ──► y
    """
    g = model.graph
    by_name = {n.name: n for n in g.node}
    gains = list(itertools.takewhile(lambda k: k.gather in by_name, map(GainNames, itertools.count())))  # v3
    branch_nodes = {GAIN_NODE}.union(*(BranchNames(p.branch).nodes for p in manifest.points),
                                     *((k.gather, k.mul) for k in gains))
    restore = {}  # y.base -> y: y is the output of the branch's last node (its Add, or the CastOut of a float16 op)
    for p in manifest.points:
        last = by_name.get(BranchNames(p.branch).node("CastOut")) or by_name.get(BranchNames(p.branch).node("Add"))
        if last is not None:
            restore[base_output(last.output[0])] = last.output[0]
    edit = GraphEdit(g)
    for i, n in edit.nodes():
        if n.name in branch_nodes:
            edit.remove(i)
        elif n.output and n.output[0] in restore:
            n.output[0] = restore[n.output[0]]
    constants = {BranchNames(p.branch).point_index for p in manifest.points}.union(
        *((k.strength_index, k.column_scaling) for k in gains),
        *(BranchNames(p.branch).legacy_constants for p in manifest.points))
    slots = {s.name for s in manifest.slots}
    edit.drop_inputs(slots)
    edit.drop_initializers(slots | constants)
    edit.apply()
    return model


def merge_use_case(bundle: Bundle, out: str | os.PathLike[str], use_case: str | None = None,
                   strengths: Mapping[str, float] | None = None, force: bool = False) -> Path:
    """Write a plain ONNX model with the use-case baked into the base weights (external data, ``<out>.data``,
    if the base had it). Existing files are replaced only with ``force``; never inside a bundle."""
    m = bundle.manifest
    quantized = m.weight_only.dtype if m.weight_only else ("QDQ" if m.quantization else None)
    if quantized:
        raise UseCaseError(f"{bundle.path}: the base weights are {quantized}; merge needs a bundle compiled with "
                           "float32 base weights")
    if m.base.blocks:
        raise UseCaseError(f"{bundle.path}: the base keeps the GGUF's quantized blocks ({m.base.blocks}); merge needs "
                           "float32 base weights (import the GGUF with --weights float32)")
    sliced = [p.module for p in m.points if p.op_type == PACKED_SLICE]
    if sliced:
        raise UseCaseError(f"{bundle.path}: {len(sliced)} points are slices of packed ops (the ort graph's q/k/v and "
                           f"gate/up), e.g. {sliced[0]}; merge needs the standard graph (import with --graph standard)")
    if strengths is None:
        if use_case is None:
            raise UseCaseError("give a use-case or strengths to merge")
        strengths = m.use_case(use_case).strengths
    deltas = use_case_deltas(bundle, strengths)
    model = onnx.load(str(bundle.file(m.graph)), load_external_data=False)
    strip_branches(flatten(model), m)  # (a v3 bundle's base path undone first: the graph with its branches)
    for t in model.graph.initializer:  # read by offset: onnx.load refuses hard-linked data files
        inline(t, bundle.path)
    inits = {t.name: t for t in model.graph.initializer}
    for p in m.points:
        if p.module not in deltas:
            continue
        t = inits[p.weight]
        w = numpy_helper.to_array(t)
        d = deltas[p.module] if p.weight_transposed else deltas[p.module].T
        t.CopyFrom(numpy_helper.from_array((w + d).astype(w.dtype), t.name))
    saved = saved_feeds(bundle, strengths)  # modules_to_save: the use-case's copies, as constants
    model.graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in saved.items())
    out = check_new_file(out, force=force)
    data = out.name + ".data" if m.base.data_files else None
    if data is not None:
        check_new_file(out.parent / data, force=force)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        if data is not None:
            onnx.save(model, str(Path(tmp) / out.name), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=data)
            publish_file(Path(tmp) / data, out.parent / data, force=force)
        else:
            onnx.save(model, str(Path(tmp) / out.name))
        publish_file(Path(tmp) / out.name, out, force=force)
    return out


def export_ort_adapter(bundle: Bundle, adapter: str, out: str | os.PathLike[str], force: bool = False) -> Path:
    """One v2 adapter as an ONNX Runtime ``.onnx_adapter``: its patch's slot values as parameters.

    Only v2: ORT adapters override initializers, and onnxruntime's Python ``run`` rejects a feed that
    lacks a required graph input before it applies the active adapters, so v1's inputs cannot come
    from an adapter. v3 holds all adapters at once, which ORT adapters cannot express.
    """
    m = bundle.manifest
    if m.generation != "v2":
        raise UseCaseError(f"ONNX Runtime adapters override initializers; export from a v2 bundle, not {m.generation}")
    tf = read_header(bundle.file(m.adapter(adapter).patch or ""))
    params = {s.name: ort.OrtValue.ortvalue_from_numpy(tf.read(s.name)) for s in m.patched_slots}
    params |= {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in saved_feeds(bundle, [adapter]).items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(params)
    with new_file(out, force=force) as tmp:
        fmt.export_adapter(str(tmp))
    return Path(out).absolute()
