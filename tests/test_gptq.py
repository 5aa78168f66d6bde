"""GPTQ rounding (lora_runtime.quant.gptq) against nearest rounding, and in a compiled bundle."""

from __future__ import annotations

import numpy as np
import pytest

from lora_runtime import UseCaseError, compile_bundle
from lora_runtime.quant.encodings import read_encodings
from lora_runtime.quant.gptq import gptq_codes


def _problem(seed: int = 0, k: int = 96, n: int = 40, samples: int = 512):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, k)) @ rng.standard_normal((k, k)) * 0.3  # correlated inputs
    x[:, 5] *= 40.0  # an outlier channel, as LLM activations have
    w = rng.standard_normal((k, n)) * 0.05
    scale = np.abs(w).max(0) / 127
    return x, w, scale


def test_gptq_lowers_the_output_error_on_the_same_grid():
    x, w, scale = _problem()
    zero = np.zeros(w.shape[1])
    nearest = np.clip(np.rint(w / scale), -128, 127)
    q = gptq_codes(w, x.T @ x, scale, zero, -128, 127)
    assert q.dtype == np.int64 and q.min() >= -128 and q.max() <= 127
    err_nearest = np.sum((x @ (w - nearest * scale)) ** 2)
    err_gptq = np.sum((x @ (w - q * scale)) ** 2)
    assert err_gptq < 0.5 * err_nearest
    # nearest rounding minimizes the weight error itself: GPTQ trades it for the output error
    assert np.sum((w - q * scale) ** 2) >= np.sum((w - nearest * scale) ** 2)


def test_gptq_is_nearest_rounding_when_inputs_are_uncorrelated():
    """H diagonal: no error can be compensated by other rows, so GPTQ must pick the nearest codes."""
    _, w, scale = _problem(1)
    h = np.diag(np.random.default_rng(2).uniform(0.5, 2.0, w.shape[0]))
    zero = np.full(w.shape[1], 3.0)  # an offset grid
    nearest = np.clip(np.rint(w / scale) + zero, -128, 127)
    np.testing.assert_array_equal(gptq_codes(w, h, scale, zero, -128, 127), nearest)


def test_dead_inputs_and_a_singular_gram():
    x, w, scale = _problem(3)
    x[:, 7] = 0.0  # an input that is always zero
    q = gptq_codes(w, x.T @ x, scale, np.zeros(w.shape[1]), -128, 127)
    np.testing.assert_array_equal(q[7], np.clip(np.rint(w[7] / scale), -128, 127))  # nearest, not dropped
    q2 = gptq_codes(w, np.zeros((w.shape[0],) * 2), scale, np.zeros(w.shape[1]), -128, 127)
    np.testing.assert_array_equal(q2, np.clip(np.rint(w / scale), -128, 127))  # no information: nearest


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, input_ids=np.random.default_rng(0).integers(0, 256, (24, 1, 8), dtype=np.int64))
    return path


def test_gptq_in_a_bundle_keeps_the_encodings_and_changes_codes(tiny, calibration, tmp_path):
    import onnx

    from lora_runtime.compiler.quantize_base import read_tensor

    bundles = {r: compile_bundle(tiny.base, tiny.adapters, tmp_path / r, generation="v3", encodings="full",
                                 calibration=calibration, ort_reference=False, weight_rounding=r)
               for r in ("nearest", "gptq")}
    files = {r: read_encodings(b.path / "encodings/use-cases/tone.encodings") for r, b in bundles.items()}
    assert files["nearest"].param_encodings == files["gptq"].param_encodings  # the same grid
    assert bundles["gptq"].manifest.extra["encodings"]["weight_rounding"] == "gptq"

    def codes(b):
        g = onnx.load(str(b.path / "model.onnx"), load_external_data=False).graph
        return {t.name: read_tensor(t, b.path) for t in g.initializer if t.name.endswith(".int8")}

    a, g = codes(bundles["nearest"]), codes(bundles["gptq"])
    assert a.keys() == g.keys() and a
    changed = sum(int(np.sum(a[k] != g[k])) for k in a)
    assert 0 < changed < 0.5 * sum(v.size for v in a.values())
    sq = {r: b.manifest.extra["encodings"]["sqnr_db"] for r, b in bundles.items()}
    assert np.mean(list(sq["gptq"].values())) > np.mean(list(sq["nearest"].values())) - 1.0


def test_unknown_weight_rounding_is_refused(tiny, calibration, tmp_path):
    with pytest.raises(UseCaseError, match="weight rounding must be one of nearest, gptq"):
        compile_bundle(tiny.base, tiny.adapters, tmp_path / "b", generation="v3", encodings="full",
                       calibration=calibration, weight_rounding="adaround")
    assert not (tmp_path / "b").exists()

