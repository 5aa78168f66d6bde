"""v1/v2/v3 bundles of the default model against merged weights (independent numpy + plain ORT)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from reference import merged_outputs

from lora_runtime import compile_bundle, open_bundle, run_use_case
from lora_runtime.demo import demo_use_cases
from lora_runtime.export import flatten

GENERATIONS = ["v1", "v2", "v3"]


@pytest.fixture(scope="module", params=GENERATIONS)
def bundle(request, tiny, tmp_path_factory):
    gen = request.param
    names = list(tiny.adapters)
    return compile_bundle(tiny.base, tiny.adapters, tmp_path_factory.mktemp(gen) / "b", generation=gen,
                          use_cases=demo_use_cases(gen, names))


def test_every_use_case_matches_merged_weights(bundle, tiny):
    feeds = tiny.inputs(seed=3)
    base = merged_outputs(tiny.base, {}, tiny.adapters, feeds)["logits"]
    for u in bundle.manifest.use_cases:
        got = run_use_case(bundle, u.name, feeds)["logits"]
        want = merged_outputs(tiny.base, u.strengths, tiny.adapters, feeds)["logits"]
        if u.strengths:  # the adapter must change the output, or the comparison proves nothing
            assert np.abs(want - base).max() > 1e-2, u.name
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=u.name)


def test_graph_keeps_base_io_and_opset(bundle, tiny):
    base = onnx.load(str(tiny.base), load_external_data=False)
    g = onnx.load(str(bundle.file(bundle.manifest.graph)), load_external_data=False)
    onnx.checker.check_model(str(bundle.file(bundle.manifest.graph)))
    assert [o.name for o in g.graph.output] == [o.name for o in base.graph.output]
    assert [i.name for i in g.graph.input][: len(base.graph.input)] == [i.name for i in base.graph.input]
    assert [(o.domain, o.version) for o in g.opset_import] == [(o.domain, o.version) for o in base.opset_import]


def test_ops_added_per_point(bundle, tiny):
    """Each point adds Transpose x2, MatMul x2, Mul, Add and (v1/v2) a Gather of its gain; v3 adds one gain
    (Gather + Mul) per column layout, shared by the points that have it."""
    base = onnx.load(str(tiny.base), load_external_data=False)
    g = flatten(onnx.load(str(bundle.file(bundle.manifest.graph)), load_external_data=False))
    count = lambda m, op: sum(n.op_type == op for n in m.graph.node)  # noqa: E731
    p = len(bundle.manifest.points)
    v3 = bundle.manifest.generation == "v3"
    assert count(g, "Transpose") - count(base, "Transpose") == 2 * p
    assert count(g, "MatMul") - count(base, "MatMul") == 2 * p
    layouts = len({pt.columns for pt in bundle.manifest.points})  # v3: one shared gain per column layout
    assert count(g, "Gather") - count(base, "Gather") == (layouts if v3 else p)
    assert count(g, "Add") - count(base, "Add") == p
    assert count(g, "Mul") - count(base, "Mul") == (p + layouts if v3 else p + 1)


def test_lora_tensors_use_peft_names_and_generation_roles(bundle):
    m = bundle.manifest
    g = onnx.load(str(bundle.file(m.graph)), load_external_data=False)
    inputs = {i.name for i in g.graph.input}
    inits = {t.name for t in g.graph.initializer}
    for p in m.points:
        for name in (f"{p.module}.lora_A.weight", f"{p.module}.lora_B.weight"):
            assert name in inputs
            assert (name in inits) == (m.generation != "v1")  # v1: inputs only; v2/v3: parameters too
    assert "lora_alpha" in inputs and "lora_alpha" not in inits


def test_v3_concatenates_ranks_and_v1_v2_pad_to_max(bundle, tiny):
    m = bundle.manifest
    q0 = next(p for p in m.points if p.module == "model.layers.0.self_attn.q_proj")
    # summarize r=8 and translate r=16 both attach to q_proj
    assert q0.rank == (24 if m.generation == "v3" else 16)
    assert [c.adapter for c in q0.columns] == ["summarize", "translate"]


def test_manifest_hashes_cover_every_file(bundle):
    m = bundle.manifest
    files = {str(p.relative_to(bundle.path)) for p in bundle.path.rglob("*") if p.is_file()}
    assert files == set(m.files) | {"manifest.json"}
    open_bundle(bundle.path)  # validates again from disk


def test_v3_strengths_mix_linearly(tiny, tmp_path):
    """A v3 bundle at strengths s equals the sum of single-adapter deltas scaled by s (PEFT 'cat')."""
    b = compile_bundle(tiny.base, tiny.adapters, tmp_path / "v3", generation="v3", use_cases=["base="])
    feeds = tiny.inputs(seed=5)
    for mix in ({"summarize": 0.3, "tone": -1.0}, {"translate": 2.0, "summarize": 1.0, "tone": 0.25}):
        got = run_use_case(b, None, feeds, strengths=mix)["logits"]
        want = merged_outputs(tiny.base, mix, tiny.adapters, feeds)["logits"]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
