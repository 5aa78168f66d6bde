"""Exports for peers and baselines: a use-case merged into the base weights, and ONNX Runtime adapters.

``merge_use_case`` undoes the branch rewrite and bakes ``W0 + sum_i s_i * scaling_i * B_i A_i`` into
each attachment point's weight: the zero-overhead ideal a switching runtime is measured against, and
what a naive user (or AIMET's ``load_adapter``) rebuilds a session from on every switch.
``export_ort_adapter`` writes one v2 adapter as ONNX Runtime's own ``.onnx_adapter`` (its
parameters are the bundle's v2 slots), for ``LoraAdapter`` + ``RunOptions.add_active_adapter``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from lora_runtime.bundle import Bundle, Manifest, patched_slots
from lora_runtime.compiler.branch import GAIN_NODE
from lora_runtime.compiler.quantize_base import read_tensor
from lora_runtime.errors import UseCaseError
from lora_runtime.tensorfile import read_header


def use_case_deltas(bundle: Bundle, strengths: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Per point module: ``sum_i s_i * scaling_i * B_i @ A_i``, shape (out, in), from the bundle's patches."""
    m = bundle.manifest
    m.strength_value(strengths)  # validates names, values and v1/v2's one adapter
    deltas: dict[str, np.ndarray] = {}
    if m.generation == "v3":
        tf = read_header(bundle.file(m.group_patch or ""))
        for p in m.points:
            a, b = tf.read(f"{p.module}.lora_A.weight"), tf.read(f"{p.module}.lora_B.weight")
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
    scaling = tf.read("lora_scaling")
    for i, p in enumerate(m.points):
        if scaling[i]:
            a, b = tf.read(f"{p.module}.lora_A.weight"), tf.read(f"{p.module}.lora_B.weight")
            deltas[p.module] = (s * float(scaling[i])) * (b.astype(np.float64) @ a)
    return deltas


def strip_branches(model: onnx.ModelProto, manifest: Manifest) -> onnx.ModelProto:
    """Remove every LoRA node, input and tensor: the inverse of ``add_branches``, in place."""
    g = model.graph
    prefixes = tuple(f"{p.module}.lora" for p in manifest.points)
    slots = {s.name for s in manifest.slots}
    outputs = {f"{n.output[0]}" for n in g.node if n.name.endswith("/Add") and n.name.startswith(prefixes)}
    keep = [n for n in g.node if not (n.name == GAIN_NODE or n.name.startswith(prefixes))]
    for n in keep:
        if n.output and n.output[0].endswith(".base") and n.output[0][: -len(".base")] in outputs:
            n.output[0] = n.output[0][: -len(".base")]
    del g.node[:]
    g.node.extend(keep)
    inputs = [i for i in g.input if i.name not in slots]
    del g.input[:]
    g.input.extend(inputs)
    inits = [t for t in g.initializer if t.name not in slots and not t.name.startswith(prefixes)]
    del g.initializer[:]
    g.initializer.extend(inits)
    return model


def merge_use_case(bundle: Bundle, out: str | os.PathLike[str], use_case: str | None = None,
                   strengths: Mapping[str, float] | None = None) -> Path:
    """Write a plain ONNX model with the use-case baked into the base weights (external data if the base had it)."""
    m = bundle.manifest
    if "base_weights" in m.extra:
        raise UseCaseError(f"{bundle.path}: the base weights are {m.extra['base_weights']['dtype']}; merge needs a "
                           "bundle compiled with float32 base weights")
    if strengths is None:
        if use_case is None:
            raise UseCaseError("give a use-case or strengths to merge")
        strengths = m.use_case(use_case).strengths
    deltas = use_case_deltas(bundle, strengths)
    model = onnx.load(str(bundle.file(m.graph)), load_external_data=False)
    strip_branches(model, m)
    _load_external_data(model, bundle)
    inits = {t.name: t for t in model.graph.initializer}
    for p in m.points:
        if p.module not in deltas:
            continue
        t = inits[p.weight]
        w = numpy_helper.to_array(t)
        d = deltas[p.module] if p.weight_transposed else deltas[p.module].T
        t.CopyFrom(numpy_helper.from_array((w + d).astype(w.dtype), t.name))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if m.base.data_files:
        data = out.name + ".data"
        (out.parent / data).unlink(missing_ok=True)
        onnx.save(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=data)
    else:
        onnx.save(model, str(out))
    return out


def _load_external_data(model: onnx.ModelProto, bundle: Bundle) -> None:
    """Read external tensors into the proto ourselves: onnx.load refuses hard-linked data files."""
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            t.raw_data = read_tensor(t, bundle.path).tobytes()
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT


def export_ort_adapter(bundle: Bundle, adapter: str, out: str | os.PathLike[str]) -> Path:
    """One v2 adapter as an ONNX Runtime ``.onnx_adapter``: its patch's slot values as parameters.

    Only v2: ORT adapters override initializers, and onnxruntime's Python ``run`` rejects a feed that
    lacks a required graph input before it applies the active adapters, so v1's inputs cannot come
    from an adapter. v3 holds all adapters at once, which ORT adapters cannot express.
    """
    m = bundle.manifest
    if m.generation != "v2":
        raise UseCaseError(f"ONNX Runtime adapters override initializers; export from a v2 bundle, not {m.generation}")
    tf = read_header(bundle.file(m.adapter(adapter).patch or ""))
    params = {s.name: ort.OrtValue.ortvalue_from_numpy(tf.read(s.name)) for s in patched_slots(m)}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(params)
    fmt.export_adapter(str(out))
    return Path(out)
