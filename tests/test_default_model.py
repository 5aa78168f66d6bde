"""The embedded default model: recipes in graphs/ match the code, the graph is valid and seeded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lora_runtime.models.default import PRESETS, build_model

GRAPHS = Path(__file__).parent.parent / "graphs"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_recipe_file_matches_code(preset):
    assert json.loads((GRAPHS / f"default-{preset}.json").read_text()) == json.loads(
        json.dumps(PRESETS[preset].to_json()))


def test_tiny_is_valid_seeded_and_causal(tiny):
    model = onnx.load(str(tiny.base))
    onnx.checker.check_model(model)
    again = build_model(PRESETS["tiny"])
    assert [t.SerializeToString() for t in again.graph.initializer] == \
           [t.SerializeToString() for t in model.graph.initializer]
    sess = ort.InferenceSession(str(tiny.base), providers=["CPUExecutionProvider"])
    ids = tiny.inputs(seed=1)["input_ids"]
    full = sess.run(None, {"input_ids": ids})[0]
    prefix = sess.run(None, {"input_ids": ids[:, :5]})[0]
    assert full.shape == (1, ids.shape[1], PRESETS["tiny"].vocab)
    # causal: a prefix's logits do not depend on later tokens
    np.testing.assert_allclose(full[:, :5], prefix, atol=1e-5)
    assert np.isfinite(full).all() and full.std() > 0.1
