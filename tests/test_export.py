"""Merged models and ONNX Runtime adapters exported from bundles equal the bundle's own outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import FIXTURES
from onnx import helper, numpy_helper
from reference import merged_outputs

from lora_runtime import UseCaseError, compile_bundle, run_use_case
from lora_runtime.demo import demo_use_cases
from lora_runtime.export import export_ort_adapter, flatten, merge_use_case, strip_branches
from lora_runtime.names import STRENGTH, BranchNames, GainNames


@pytest.mark.parametrize("generation", ["v1", "v2", "v3"])
def test_merged_model_matches_reference_and_has_no_branches(tiny, tmp_path, generation):
    b = compile_bundle(tiny.base, tiny.adapters, tmp_path / "b", generation=generation,
                       use_cases=demo_use_cases(generation, list(tiny.adapters)))
    feeds = tiny.inputs(seed=4)
    for u in b.manifest.use_cases:
        path = merge_use_case(b, tmp_path / f"{u.name}.onnx", use_case=u.name)
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        base = onnx.load(str(tiny.base))
        assert [n.op_type for n in model.graph.node] == [n.op_type for n in base.graph.node]
        assert [i.name for i in model.graph.input] == [i.name for i in base.graph.input]
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(None, feeds)[0]
        want = merged_outputs(tiny.base, u.strengths, tiny.adapters, feeds)["logits"]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=u.name)


def test_branches_of_a_v3_bundle_compiled_before_gains_were_shared_are_stripped(tiny, tmp_path):
    """Such a bundle (same format version) has a Gather, a Gain and two constants per point. Its graph is made here
    from today's by giving every point its own gain again; strip_branches (what merge runs) leaves the base."""
    b = compile_bundle(tiny.base, tiny.adapters, tmp_path / "b", generation="v3",
                       use_cases=demo_use_cases("v3", list(tiny.adapters)))
    g = flatten(onnx.load(str(b.file(b.manifest.graph)), load_external_data=False))
    consts = {t.name: numpy_helper.to_array(t) for t in g.graph.initializer
              if t.data_location != onnx.TensorProto.EXTERNAL}
    shared = {k.gain: k for k in map(GainNames, range(len(b.manifest.points))) if k.strength_index in consts}
    old_nodes, old_consts = [], []
    for p in b.manifest.points:
        nm = BranchNames(p.module)
        (scale,) = [n for n in g.graph.node if n.name == nm.node("Scale")]
        k = shared[scale.input[1]]
        index, scaling = nm.legacy_constants
        old_consts += [numpy_helper.from_array(consts[k.strength_index], index),
                       numpy_helper.from_array(consts[k.column_scaling], scaling)]
        old_nodes += [helper.make_node("Gather", [STRENGTH, index], [nm.tensor("strength")], name=nm.node("Gather")),
                      helper.make_node("Mul", [nm.tensor("strength"), scaling], [nm.gain], name=nm.node("Gain"))]
        scale.input[1] = nm.gain
    gone = {x for k in shared.values() for x in (k.gather, k.mul, k.strength_index, k.column_scaling)}
    nodes = old_nodes + [n for n in g.graph.node if n.name not in gone]
    inits = [t for t in g.graph.initializer if t.name not in gone] + old_consts
    del g.graph.node[:], g.graph.initializer[:]
    g.graph.node.extend(nodes)
    g.graph.initializer.extend(inits)
    assert sum(n.op_type == "Gather" for n in g.graph.node) >= len(b.manifest.points)  # the old form, per point
    strip_branches(g, b.manifest)
    base = onnx.load(str(tiny.base), load_external_data=False)
    assert [n.op_type for n in g.graph.node] == [n.op_type for n in base.graph.node]
    assert {t.name for t in g.graph.initializer} == {t.name for t in base.graph.initializer}
    assert not any(STRENGTH in n.input for n in g.graph.node)


def test_merge_of_gemm_and_transposed_weights(tmp_path):
    """GPT-2 (Gemm, transB=0) through the TorchScript export, against PEFT's own outputs."""
    root = FIXTURES / "gpt2"
    b = compile_bundle(root / "torchscript.onnx", {"p": root / "adapters/p", "q": root / "adapters/q"},
                       tmp_path / "b", generation="v3", use_cases=["pq=p:1,q:0.6"])
    path = merge_use_case(b, tmp_path / "m.onnx", use_case="pq")
    with np.load(root / "inputs.npz") as z:
        feeds = {k: z[k] for k in z.files}
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, np.load(root / "expected.npz")["pq"], atol=1e-4, rtol=0)


def test_ort_adapter_matches_bundle(tiny, tmp_path):
    b = compile_bundle(tiny.base, tiny.adapters, tmp_path / "b", generation="v2")
    sess = ort.InferenceSession(str(b.file(b.manifest.graph)), providers=["CPUExecutionProvider"])
    feeds = tiny.inputs(seed=6)
    for name in b.manifest.adapter_names:
        path = export_ort_adapter(b, name, tmp_path / f"{name}.onnx_adapter")
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        ro = ort.RunOptions()
        ro.add_active_adapter(adapter)
        got = sess.run(None, feeds | {"lora_alpha": np.array(1.0, np.float32)}, ro)[0]
        np.testing.assert_allclose(got, run_use_case(b, name, feeds)["logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("generation", ["v1", "v3"])
def test_ort_adapter_needs_v2(tiny, tmp_path, generation):
    b = compile_bundle(tiny.base, tiny.adapters, tmp_path / "b", generation=generation)
    with pytest.raises(UseCaseError, match="v2 bundle"):
        export_ort_adapter(b, "tone", tmp_path / "t.onnx_adapter")
    assert not (tmp_path / "t.onnx_adapter").exists()
