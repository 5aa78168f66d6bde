"""Bases with external data: compiled without rewriting or duplicating the weights, then run and switched."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from reference import merged_outputs

from lora_runtime import BaseModelError, Runtime, compile_bundle, run_use_case
from lora_runtime.bundle import sha256_file
from lora_runtime.compiler.options import CompileOptions
from lora_runtime.models.default import PRESETS, build_default


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    """The tiny default model written the way exporters write big ones: weights in base.onnx.data."""
    r = dataclasses.replace(PRESETS["tiny"], name="tiny-external", external_data=True)
    return build_default(r, tmp_path_factory.mktemp("ext"))


def _data(model) -> Path:
    return model.base.parent / "base.onnx.data"


def test_generated_model_streams_weights_to_aligned_external_data(external):
    m = onnx.load(str(external.base), load_external_data=False)
    ext = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(ext) >= 7 * PRESETS["tiny"].n_layers  # every linear weight at least
    for t in ext:
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == "base.onnx.data"
        assert int(info["offset"]) % (65536 if int(info["length"]) >= 65536 else 64) == 0
    assert external.base.stat().st_size < 64 * 1024  # the graph holds structure only


@pytest.mark.parametrize("generation", ["v1", "v2", "v3"])
def test_compile_run_switch_without_touching_or_copying_weights(external, tmp_path, generation):
    data = _data(external)
    before = (sha256_file(data), data.stat().st_mtime_ns, data.stat().st_size)
    b = compile_bundle(external.base, external.adapters, tmp_path / "b", generation=generation)
    linked = b.path / "base.onnx.data"
    assert os.path.samefile(linked, data)  # a hard link: the same bytes on disk, not a copy
    assert b.manifest.base.data_files == ("base.onnx.data",)
    assert b.manifest.files["base.onnx.data"].sha256 == before[0]
    own = sum(f.nbytes for k, f in b.manifest.files.items() if k != "base.onnx.data")
    assert own < data.stat().st_size  # the bundle adds patches and graph, not the base weights
    g = onnx.load(str(b.file("model.onnx")), load_external_data=False)
    weights = {p.weight for p in b.manifest.points}
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in g.graph.initializer if t.name in weights)

    feeds = external.inputs(seed=2)
    rt = Runtime.open(b.path)
    for u in [*rt.use_cases, *rt.use_cases]:
        rt.switch(u)
        want = merged_outputs(external.base, b.manifest.use_case(u).strengths, external.adapters, feeds)["logits"]
        np.testing.assert_allclose(rt.run(feeds)["logits"], want, atol=1e-4, rtol=0)
        np.testing.assert_allclose(run_use_case(b, u, feeds)["logits"], want, atol=1e-4, rtol=0)
    assert (sha256_file(data), data.stat().st_mtime_ns, data.stat().st_size) == before


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a second filesystem (tmpfs at /dev/shm)")
def test_another_filesystem_needs_copy_on_request(external):
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        out = Path(shm) / "b"
        if os.stat(shm).st_dev == os.stat(_data(external)).st_dev:
            pytest.skip("/dev/shm is on the same filesystem here")
        with pytest.raises(BaseModelError, match="--copy-base-data"):
            compile_bundle(external.base, external.adapters, out, generation="v3")
        assert not out.exists() and list(Path(shm).iterdir()) == []
        b = compile_bundle(external.base, external.adapters, out, CompileOptions("v3", copy_base_data=True))
        assert not os.path.samefile(b.path / "base.onnx.data", _data(external))
        assert sha256_file(b.path / "base.onnx.data") == sha256_file(_data(external))
