"""GPTQ rounding (lora_runtime.quant.gptq) against nearest rounding, and in a compiled bundle."""

from __future__ import annotations

import numpy as np
import pytest

from lora_runtime import UseCaseError, compile_bundle
from lora_runtime.compiler.options import CompileOptions, QuantOptions
from lora_runtime.quant.gptq import gptq_codes
from lora_runtime.quant.reader import read_encodings


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


def test_gptq_on_a_block_grid():
    """int4 in blocks of 32 input rows: each row's grid is its block's scale."""
    x, w, _ = _problem(4, k=128)
    block = 32
    scale = np.repeat(np.abs(w.reshape(-1, block, w.shape[1])).max(1) / 7, block, axis=0)  # (in, out)
    nearest = np.clip(np.rint(w / scale), -8, 7)
    q = gptq_codes(w, x.T @ x, scale, 0.0, -8, 7)
    assert q.min() >= -8 and q.max() <= 7
    assert np.sum((x @ (w - q * scale)) ** 2) < 0.7 * np.sum((x @ (w - nearest * scale)) ** 2)


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

    from lora_runtime.external_data import read_tensor

    bundles = {r: compile_bundle(tiny.base, tiny.adapters, tmp_path / r,
                                 CompileOptions("v3",
                                                quant=QuantOptions("full", calibration, ort_reference=False,
                                                                   weight_rounding=r)))
               for r in ("nearest", "gptq")}
    files = {r: read_encodings(b.path / "encodings/use-cases/tone.encodings") for r, b in bundles.items()}
    assert files["nearest"].param_encodings == files["gptq"].param_encodings  # the same grid
    assert bundles["gptq"].manifest.quantization.weight_rounding == "gptq"

    def codes(b):
        g = onnx.load(str(b.path / "model.onnx"), load_external_data=False).graph
        return {t.name: read_tensor(t, b.path) for t in g.initializer if t.name.endswith(".int8")}

    a, g = codes(bundles["nearest"]), codes(bundles["gptq"])
    assert a.keys() == g.keys() and a
    changed = sum(int(np.sum(a[k] != g[k])) for k in a)
    assert 0 < changed < 0.5 * sum(v.size for v in a.values())
    sq = {r: b.manifest.accuracy_of("fp32").sqnr_db for r, b in bundles.items()}
    assert np.mean(list(sq["gptq"].values())) > np.mean(list(sq["nearest"].values())) - 1.0


def test_unknown_weight_rounding_is_refused(tiny, calibration, tmp_path):
    with pytest.raises(UseCaseError, match="weight rounding must be one of nearest, gptq"):
        compile_bundle(tiny.base, tiny.adapters, tmp_path / "b",
                       CompileOptions("v3", quant=QuantOptions("full", calibration, weight_rounding="adaround")))
    assert not (tmp_path / "b").exists()



def test_block_weights_run_as_matmulnbits_exactly():
    """The int4 layout written for MatMulNBits, against numpy: x @ ((codes) * scale per block)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from lora_runtime.compiler.passes.qdq_plan import Constants
    from lora_runtime.compiler.passes.qdq_weights import _matmul_nbits
    from lora_runtime.compiler.points import Candidate
    from lora_runtime.external_data import DataWriter
    from lora_runtime.quant.rules import symmetric_per_block

    rng = np.random.default_rng(5)
    k, n, block = 96, 24, 32
    w = rng.standard_normal((k, n)).astype(np.float32)
    enc = symmetric_per_block("w", w, block, 4)
    scales = np.asarray(enc.scale).reshape(n, k // block)  # (out, block) order
    ref_codes = np.clip(np.rint(w / np.repeat(scales.T, block, axis=0)), -8, 7)
    c = Candidate("mm", "MatMul", "x", "y", "w", k, n, ("w",))
    import io

    buf = io.BytesIO()
    consts = Constants()
    node = _matmul_nbits(c, "x", w, enc, None, DataWriter(buf, "d"), consts, "mm", "y")
    inits = consts.tensors
    for t in inits:  # back to inline data for a one-file model
        info = {e.key: e.value for e in t.external_data}
        raw = buf.getvalue()[int(info["offset"]):int(info["offset"]) + int(info["length"])]
        t.ClearField("external_data")
        t.data_location = TensorProto.DEFAULT
        t.raw_data = raw
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((3, k)).astype(np.float32)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    expected = x.astype(np.float64) @ (ref_codes * np.repeat(scales.T, block, axis=0))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-4)


def test_w4a16_bundle(tiny, calibration, tmp_path):
    import onnx

    bundles = {r: compile_bundle(tiny.base, tiny.adapters, tmp_path / r,
                                 CompileOptions("v3",
                                                quant=QuantOptions("full", calibration, preset="w4a16",
                                                                   ort_reference=False, weight_rounding=r)))
               for r in ("nearest", "gptq")}
    b = bundles["gptq"]
    weights = read_encodings(b.path / "encodings/use-cases/tone.encodings").param_encodings
    base = [e for e in weights if e.name.endswith(".weight") and ".lora_" not in e.name]
    assert base and all(e.enc_type == "PER_BLOCK" and e.bw == 4 and e.block_size == 32 for e in base)
    g = onnx.load(str(b.path / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in g.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(base)
    assert all({a.name: a.i for a in n.attribute}["accuracy_level"] == 1 for n in nbits)
    assert b.manifest.quantization.execution == (f"{len(base)} base linear layers: {len(base)} MatMulNBits "
                                                          "with float32 compute (block-wise weights)")
    sq = {r: np.mean(list(x.manifest.accuracy_of("fp32").sqnr_db.values())) for r, x in bundles.items()}
    # random tiny model, 144 calibration rows: GPTQ is not expected to win here (see the block-grid unit test)
    assert sq["gptq"] > sq["nearest"] - 1.0
    assert sq["nearest"] > 5.0  # lossy (int4), not broken
