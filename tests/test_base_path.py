"""The base path of v3 CPU bundles: with every strength 0 the graph skips its LoRA branches (one ``If``).

References: the base model run alone by ONNX Runtime (strength 0) and merged weights (numpy + plain ORT) for the
use-cases; the same bundle compiled flat (``base_path=False``) must give the same outputs on both paths.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from reference import merged_outputs

from lora_runtime import Runtime, compile_bundle, open_bundle
from lora_runtime.cli import main
from lora_runtime.compiler.options import CompileOptions, QuantOptions
from lora_runtime.compiler.passes.base_path import why_not
from lora_runtime.export import flatten
from lora_runtime.names import BASE_PATH, STRENGTH

USE_CASES = ["summarize=summarize", "mix=summarize:1,tone:0.5", "base="]


@pytest.fixture(scope="module")
def bundles(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("base_path")
    return {k: compile_bundle(tiny.base, tiny.adapters, root / k, CompileOptions("v3", base_path=k == "gated"),
                              use_cases=USE_CASES) for k in ("gated", "flat")}


def _graph(bundle) -> onnx.GraphProto:
    return onnx.load(str(bundle.file(bundle.manifest.graph)), load_external_data=False).graph


def _branches(graph: onnx.GraphProto) -> dict[str, onnx.GraphProto]:
    wrapper = next(n for n in graph.node if n.op_type == "If")
    return {a.name: a.g for a in wrapper.attribute}


def test_the_base_path_is_the_base_graph_and_reads_no_lora_slot(bundles, tiny):
    gated, flat = bundles["gated"], bundles["flat"]
    assert gated.manifest.target.base_path and not flat.manifest.target.base_path
    g = _graph(gated)
    assert [n.op_type for n in g.node] == ["Abs", "ReduceMax", "Greater", "If"]
    base_path = _branches(g)["else_branch"]
    base = onnx.load(str(tiny.base), load_external_data=False).graph
    assert Counter(n.op_type for n in base_path.node) == Counter(n.op_type for n in base.node)
    slots = {s.name for s in gated.manifest.slots}
    assert not slots & {i for n in base_path.node for i in n.input}
    # the then-branch is the flat graph, node for node, once its names are its own again
    flat_nodes = [(n.op_type, list(n.input), list(n.output)) for n in _graph(flat).node]
    assert [(n.op_type, list(n.input), list(n.output)) for n in flatten(onnx.ModelProto(graph=g)).graph.node] == \
        flat_nodes


def test_both_paths_give_the_flat_bundles_outputs(bundles, tiny):
    feeds = tiny.inputs(seed=4)
    plain = ort.InferenceSession(str(tiny.base), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    rts = {k: Runtime.open(b.path) for k, b in bundles.items()}
    for u in rts["gated"].use_cases:
        for rt in rts.values():
            rt.switch(u)
        got = {k: rt.run(feeds)["logits"] for k, rt in rts.items()}
        np.testing.assert_allclose(got["gated"], got["flat"], atol=1e-6, rtol=0, err_msg=u)
        strengths = bundles["gated"].manifest.use_case(u).strengths
        want = merged_outputs(tiny.base, strengths, tiny.adapters, feeds)["logits"]
        np.testing.assert_allclose(got["gated"], want, atol=1e-4, rtol=0, err_msg=u)
        if not strengths:  # the base path: exactly the base model's outputs
            np.testing.assert_array_equal(got["gated"], plain)
    for mix in ({"tone": 1e-3}, {"summarize": -1.0}):  # any strength not 0, either sign, takes the branches
        for rt in rts.values():
            rt.set_strengths(mix)
        got = {k: rt.run(feeds)["logits"] for k, rt in rts.items()}
        np.testing.assert_allclose(got["gated"], got["flat"], atol=1e-6, rtol=0)
        assert np.abs(got["gated"] - plain).max() > 0, mix
        np.testing.assert_allclose(got["gated"], merged_outputs(tiny.base, mix, tiny.adapters, feeds)["logits"],
                                   atol=1e-4, rtol=0)


def test_a_v3_cpu_runtime_keeps_no_copy_of_the_group(bundles, tiny, tmp_path):
    """The graph's initializers hold a v3 group on the CPU: the runtime makes no arena and no OrtValue for it (none
    is bound), still counts its bytes as resident, and refuses to fill it; a v1 runtime fills a real set."""
    for b in bundles.values():
        rt = Runtime.open(b.path, preload="all")
        group = rt._state.slots
        assert group.in_graph and group.arena.nbytes == 0 and not group.values
        assert rt.memory()["preloaded_bytes"] == {"group": rt.layout.nbytes} and rt.layout.nbytes > 0
        rt.switch("mix")
        assert rt._state.slots is group and rt.last_switch.kind == "hot"
        with pytest.raises(ValueError, match="never filled"):
            group.fill_from(rt._sources["group"])
    v1 = Runtime.open(compile_bundle(tiny.base, tiny.adapters, tmp_path / "v1", generation="v1",
                                     use_cases=["summarize=summarize"]).path)
    assert not v1._state.slots.in_graph and v1._state.slots.arena.nbytes == v1.layout.nbytes
    assert set(v1._state.slots.values) == {s.name for s in v1.layout.slots}


def test_only_v3_cpu_bundles_without_encodings_get_it(tiny, tmp_path):
    for gen in ("v1", "v2"):
        b = compile_bundle(tiny.base, tiny.adapters, tmp_path / gen, generation=gen)
        assert not b.manifest.target.base_path and "If" not in {n.op_type for n in _graph(b).node}
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=np.random.default_rng(0).integers(0, 256, (8, 1, 8), dtype=np.int64))
    b = compile_bundle(tiny.base, tiny.adapters, tmp_path / "qdq",
                       CompileOptions("v3", quant=QuantOptions("adapter-only", calib, ort_reference=False)))
    assert not b.manifest.target.base_path and "If" not in {n.op_type for n in _graph(b).node}


def test_cli_no_base_path_keeps_the_graph_flat(tiny, tmp_path):
    for flag, want in (([], True), (["--no-base-path"], False)):
        out = tmp_path / f"b{len(flag)}"
        assert main(["compile", "--base", str(tiny.base), "--generation", "v3", "-o", str(out),
                     "--adapter", f"tone={tiny.adapters['tone']}", *flag]) == 0
        assert open_bundle(out).manifest.target.base_path is want


def test_a_graph_with_a_subgraph_is_left_flat_and_says_why():
    body = helper.make_graph([helper.make_node("Identity", ["x"], ["y_then"])], "b", [],
                             [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [1])])
    g = helper.make_graph([helper.make_node("If", ["c"], ["y"], name="mine", then_branch=body, else_branch=body)],
                          "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                helper.make_tensor_value_info(STRENGTH, TensorProto.FLOAT, [2]),
                                helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    assert why_not(helper.make_model(g)) == "the graph already has a subgraph (If 'mine')"
    assert BASE_PATH.node != "mine"


def test_a_base_with_many_megabytes_per_point_is_left_flat_and_says_why(tiny, tmp_path, monkeypatch):
    """Where each branch point's module reads BYTES_PER_POINT of weights or more, the base path would prepack every
    weight twice for nothing: the compiler keeps the graph flat and says so with the figure. The tiny model's weights
    against a lowered threshold stand in for the 1B's 38 MB per point."""
    from lora_runtime.compiler.passes import base_path

    said: list[str] = []
    weights = base_path.weight_bytes(onnx.load(str(tiny.base), load_external_data=False))
    assert weights > 0
    monkeypatch.setattr(base_path, "BYTES_PER_POINT", 1)
    b = compile_bundle(tiny.base, tiny.adapters, tmp_path / "big", CompileOptions("v3"), report=said.append)
    assert not b.manifest.target.base_path and "If" not in {n.op_type for n in _graph(b).node}
    assert any(m.startswith("no base path: ") and "MB of base weights per branch point" in m for m in said), said
    monkeypatch.setattr(base_path, "BYTES_PER_POINT", 2 * weights)  # above the whole graph's (+ the group): again
    assert compile_bundle(tiny.base, tiny.adapters, tmp_path / "small", CompileOptions("v3")).manifest.target.base_path
