"""v1/v2/v3 bundles of real exports against real PEFT outputs (tests/fixtures, made by tools/make_fixtures.py).

The expected logits come from PEFT in torch; these tests need neither torch nor PEFT.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FIXTURES

from lora_runtime import compile_bundle, run_use_case
from lora_runtime.runtime.session import make_session

MODELS = [("llama", "dynamo.onnx"), ("llama", "torchscript.onnx"), ("gpt2", "dynamo.onnx"),
          ("gpt2", "torchscript.onnx")]


def _cases(family: str) -> dict:
    return json.loads((FIXTURES / family / "cases.json").read_text())


def _bundle_and_cases(family: str, onnx_file: str, generation: str, tmp_path):
    root = FIXTURES / family
    cases = _cases(family)
    adapters = {p.name: p for p in sorted((root / "adapters").iterdir())}
    use_cases = [f"{name}=" + ",".join(f"{a}:{s}" for a, s in mix.items())
                 for name, mix in cases["use_cases"].items() if generation == "v3" or len(mix) <= 1]
    bundle = compile_bundle(root / onnx_file, adapters, tmp_path / generation, generation=generation,
                            use_cases=use_cases)
    return bundle, cases


@pytest.mark.parametrize("generation", ["v1", "v2", "v3"])
@pytest.mark.parametrize(("family", "onnx_file"), MODELS)
def test_matches_peft(family, onnx_file, generation, tmp_path):
    bundle, cases = _bundle_and_cases(family, onnx_file, generation, tmp_path)
    root = FIXTURES / family
    expected = np.load(root / "expected.npz")
    with np.load(root / "inputs.npz") as z:
        inputs = {k: z[k] for k in z.files}
    session = make_session(bundle)
    declared = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in inputs.items() if k in declared}
    base = expected["base"]
    checked = 0
    for u in bundle.manifest.use_cases:
        want = expected[u.name]
        if u.strengths:  # the adapter must move the output, or matching proves nothing
            assert np.abs(want - base).max() > 1e-2
        got = run_use_case(bundle, u.name, feeds, session=session)[cases["output"]]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=f"{family}/{onnx_file} {u.name}")
        checked += 1
    assert checked == (len(cases["use_cases"]) if generation == "v3"
                       else sum(len(m) <= 1 for m in cases["use_cases"].values()))


@pytest.mark.parametrize(("family", "onnx_file"), MODELS)
def test_every_adapter_module_resolves_to_its_own_op(family, onnx_file, tmp_path):
    bundle, _ = _bundle_and_cases(family, onnx_file, "v3", tmp_path)
    nodes = [p.node for p in bundle.manifest.points]
    assert len(nodes) == len(set(nodes))
    modules = {p.module for p in bundle.manifest.points}
    cases = _cases(family)
    for info in cases["adapters"].values():
        assert set(info["modules"]) <= modules


def test_multi_adapter_use_case_in_v2_suggests_v3(tmp_path):
    from lora_runtime import UseCaseError

    root = FIXTURES / "llama"
    with pytest.raises(UseCaseError, match="--generation v3"):
        compile_bundle(root / "dynamo.onnx", {"a": root / "adapters/a", "b": root / "adapters/b"}, tmp_path / "x",
                       generation="v2", use_cases=["ab=a:1,b:0.5"])
    assert not (tmp_path / "x").exists()
