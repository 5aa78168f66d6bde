"""INT8 bundles: the three encodings modes, QDQ execution on ONNX Runtime, switching with encodings."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import FIXTURES

from lora_runtime import InputError, Runtime, UseCaseError, compile_bundle, run_use_case
from lora_runtime.compiler.options import CompileOptions, QuantOptions
from lora_runtime.metrics import sqnr_db
from lora_runtime.quant.encodings import EncodingsError, dumps_encodings, write_encodings
from lora_runtime.quant.reader import read_encodings
from lora_runtime.runtime.session import make_session

USE_CASES = ["base=", "summarize=summarize", "translate=translate:0.8", "tone=tone"]
COMBOS = [("v1", "non-updatable"), ("v2", "full"), ("v3", "non-updatable"), ("v3", "adapter-only"), ("v3", "full")]


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, input_ids=np.random.default_rng(0).integers(0, 256, (24, 1, 8), dtype=np.int64))
    return path


@pytest.fixture(scope="module", params=COMBOS, ids=[f"{g}-{m}" for g, m in COMBOS])
def int8(request, tiny, calibration, tmp_path_factory):
    gen, mode = request.param
    cases = USE_CASES + (["mix=summarize:1,tone:0.5"] if gen == "v3" else [])
    b = compile_bundle(tiny.base, tiny.adapters, tmp_path_factory.mktemp(gen) / "b",
                       CompileOptions(gen, quant=QuantOptions(mode, calibration, ort_reference=False)), use_cases=cases)
    return b, mode


def test_base_linear_ops_run_as_integer_kernels(int8, tmp_path):
    b, _ = int8
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(b.path / ".." / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(b.file("model.onnx")), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath,
                                                             load_external_data=False).graph.node)
    assert ops["MatMulIntegerToFloat"] == 7 * 2 + 1  # every base linear layer, lm_head included
    g = onnx.load(str(b.file("model.onnx")), load_external_data=False)
    assert sum(n.op_type == "QuantizeLinear" for n in g.graph.node) > 0
    assert b.manifest.base.data_files == ()  # the int8 weights live in the bundle


def test_encodings_files_of_the_mode(int8):
    b, mode = int8
    files = sorted(p.relative_to(b.path).as_posix() for p in (b.path / "encodings").rglob("*.encodings"))
    names = [u.name for u in b.manifest.use_cases]
    expected = {"non-updatable": ["encodings/all.encodings"],
                "adapter-only": ["encodings/base.encodings"] + [f"encodings/use-cases/{u}.encodings" for u in names],
                "full": [f"encodings/use-cases/{u}.encodings" for u in names]}[mode]
    assert files == sorted(expected)
    g = onnx.load(str(b.file("model.onnx")), load_external_data=False)
    produced = {o for n in g.graph.node for o in n.output} | {i.name for i in g.graph.input}
    for rel in files:
        f = read_encodings(b.path / rel)
        assert (b.path / rel).read_text() == dumps_encodings(f)  # byte-stable round trip
        for e in f.activation_encodings:
            assert e.name in produced and e.bw == 8 and not e.is_sym
        for e in f.param_encodings:
            assert e.is_sym


def test_switching_with_encodings_matches_the_reference_path(int8, tiny):
    b, mode = int8
    feeds = tiny.inputs(seed=21)
    rt = Runtime.open(b.path)
    enc_slots = [s for s in b.manifest.slots if s.kind == "encoding"]
    assert bool(enc_slots) == (mode != "non-updatable")
    for u in rt.use_cases * 2:
        report = rt.switch(u)
        if b.manifest.generation == "v3":
            assert report.kind == "hot"  # the group is resident; encodings sets are resident too
        np.testing.assert_allclose(rt.run(feeds)["logits"], run_use_case(b, u, feeds)["logits"], atol=1e-6, rtol=0)
    if b.manifest.generation == "v3":
        mix = {"summarize": 0.3, "tone": 0.7}
        rt.set_strengths(mix)
        np.testing.assert_allclose(rt.run(feeds)["logits"], run_use_case(b, None, feeds, strengths=mix)["logits"],
                                   atol=1e-6, rtol=0)


def test_accuracy_is_recorded_and_reasonable(int8, tiny):
    b, _ = int8
    sqnr = b.manifest.accuracy_of("fp32").sqnr_db
    assert set(sqnr) == set(b.manifest.use_case_names)
    assert all(15.0 < v < 60.0 for v in sqnr.values())  # quantized: lossy, and not broken


@pytest.mark.parametrize(("gen", "mode"), [("v1", "full"), ("v1", "adapter-only"), ("v2", "non-updatable"),
                                           ("v2", "adapter-only")])
def test_qairt_table_is_enforced(tiny, calibration, tmp_path, gen, mode):
    with pytest.raises(UseCaseError, match="QAIRT"):
        compile_bundle(tiny.base, tiny.adapters, tmp_path / "b",
                       CompileOptions(gen, quant=QuantOptions(mode, calibration)))
    assert not (tmp_path / "b").exists()


def test_bad_calibration_inputs(tiny, tmp_path):
    cases = {
        "missing": (None, UseCaseError, "need calibration data"),
        "not-npz": (b"not an npz", InputError, "cannot read calibration data"),
        "ragged": ({"input_ids": np.zeros((3, 1, 8), np.int64), "x": np.zeros((2, 1), np.float32)}, InputError,
                   "same leading sample axis"),
        "unknown-key": ({"ids": np.zeros((3, 1, 8), np.int64)}, InputError, "unknown ['ids']"),
        "wrong-dtype": ({"input_ids": np.zeros((3, 1, 8), np.float32)}, InputError, "dtype float32"),
    }
    for name, (content, exc, message) in cases.items():
        path = None
        if content is not None:
            path = tmp_path / f"{name}.npz"
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                np.savez(path, **content)
        with pytest.raises(exc) as info:
            compile_bundle(tiny.base, tiny.adapters, tmp_path / "b",
                           CompileOptions("v3", quant=QuantOptions("full", path)))
        assert message in str(info.value), name
        assert not (tmp_path / "b").exists()


def test_user_encodings_override_and_misfit(tiny, calibration, tmp_path):
    b = compile_bundle(tiny.base, tiny.adapters, tmp_path / "b",
                       CompileOptions("v3", quant=QuantOptions("non-updatable", calibration, ort_reference=False)))
    f = read_encodings(b.path / "encodings/all.encodings")
    act = f.activation_encodings[0]
    mine = type(f)(f.version, (type(act)(act.name, "INT", "PER_TENSOR", 8, False, (0.125,), (-100,)),), ())
    write_encodings(tmp_path / "mine.encodings", mine)
    b2 = compile_bundle(tiny.base, tiny.adapters, tmp_path / "b2",
                        CompileOptions("v3",
                                       quant=QuantOptions("non-updatable", calibration, ort_reference=False,
                                                          encodings_file=tmp_path / "mine.encodings")))
    assert read_encodings(b2.path / "encodings/all.encodings")[act.name].scale == (0.125,)

    bad = type(f)(f.version, (type(act)("no.such.tensor", "INT", "PER_TENSOR", 8, False, (0.1,), (0,)),), ())
    write_encodings(tmp_path / "bad.encodings", bad)
    with pytest.raises(EncodingsError, match="no.such.tensor"):
        compile_bundle(tiny.base, tiny.adapters, tmp_path / "b3",
                       CompileOptions("v3",
                                      quant=QuantOptions("non-updatable", calibration,
                                                         encodings_file=tmp_path / "bad.encodings")))
    lora = next(e for e in f.param_encodings if "lora_A" in e.name)
    wrong = type(f)(f.version, (), (type(lora)(lora.name, "INT", "PER_CHANNEL", 8, True, (0.1,) * 3,
                                                (-128,) * 3),))
    write_encodings(tmp_path / "wrong.encodings", wrong)
    with pytest.raises(EncodingsError, match=lora.name.replace(".", r"\.")):
        compile_bundle(tiny.base, tiny.adapters, tmp_path / "b4",
                       CompileOptions("v3",
                                      quant=QuantOptions("non-updatable", calibration,
                                                         encodings_file=tmp_path / "wrong.encodings")))
    assert not (tmp_path / "b3").exists() and not (tmp_path / "b4").exists()


def test_qairt_artefacts(int8):
    b, mode = int8
    names = (b.path / "lora_weight_list.txt").read_text().split()
    assert sorted(names) == sorted(s.name for s in b.manifest.slots if s.kind in ("lora_A", "lora_B"))
    assert names.index("model.layers.1.self_attn.q_proj.lora_A.weight") < len(names)
    text = (b.path / "lora_config.yaml").read_text()
    with_adapters = [u for u in b.manifest.use_cases if u.strengths]
    assert text.startswith("use_case:\n") and text.count("  - name: ") == len(with_adapters)
    for u in with_adapters:
        block = text.split(f'  - name: "{u.name}"\n', 1)[1].split("  - name:", 1)[0]
        for key in ("model_name", "lora_weights", "quant_overrides"):
            rel = block.split(f'{key}: "', 1)[1].split('"', 1)[0]
            assert (b.path / rel).is_file(), (u.name, key, rel)


def test_peft_fixture_full_updatable_meets_the_accuracy_goal(tmp_path):
    """Real PEFT adapters on the dynamo export: INT8 full-updatable vs PEFT's FP32 logits, and vs ORT's
    own quantize_static of each merged use-case (measured at compile)."""
    root = FIXTURES / "llama"
    cases = json.loads((root / "cases.json").read_text())["use_cases"]
    use_cases = [f"{n}=" + ",".join(f"{a}:{s}" for a, s in mix.items()) for n, mix in cases.items()]
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=np.random.default_rng(1).integers(0, 64, (64, 1, 7), dtype=np.int64))
    b = compile_bundle(root / "dynamo.onnx", {a: root / "adapters" / a for a in ("a", "b", "c", "h16", "bf16")},
                       tmp_path / "b", CompileOptions("v3", quant=QuantOptions("full", calib)), use_cases=use_cases)
    expected = np.load(root / "expected.npz")
    feeds = {"input_ids": np.load(root / "inputs.npz")["input_ids"]}
    mine, ort = b.manifest.accuracy_of("fp32").sqnr_db, b.manifest.accuracy_of("ort_quantize_static").sqnr_db
    for u in cases:
        assert sqnr_db(expected[u], run_use_case(b, u, feeds)["logits"]) >= 28.0, u
        assert mine[u] >= 28.0, u
        assert mine[u] >= ort[u] - 1.0, u


def _token_sqnr_reference(rows, lo, hi, bw):
    """Independent: quantize each row with the asymmetric grid over [lo, hi], average the per-row noise ratio."""
    scale = (hi - lo) / (2**bw - 1)
    zero = round(-lo / scale)
    ratios = []
    for r in np.atleast_2d(rows).astype(np.float64):
        q = (np.clip(np.round(r / scale) + zero, 0, 2**bw - 1) - zero) * scale
        ratios.append(np.sum((r - q) ** 2) / np.sum(r**2))
    return -10 * np.log10(np.mean(ratios))


def test_token_sqnr_weights_every_token_equally():
    """One token with a massive activation sets the range: a global SQNR hides that every other token is
    quantized coarsely; the per-token measure shows it."""
    from lora_runtime.quant.precision import token_sqnr_db

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((64, 128))
    rows[0, 3] = 3000.0
    lo, hi = float(rows.min()), float(rows.max())
    got = token_sqnr_db(rows, lo, hi, 16)
    assert got == pytest.approx(_token_sqnr_reference(rows, lo, hi, 16), abs=1e-6)
    scale = (hi - lo) / 65535
    q = (np.clip(np.round(rows / scale) + round(-lo / scale), 0, 65535) - round(-lo / scale)) * scale
    global_db = 10 * np.log10(np.sum(rows**2) / np.sum((rows - q) ** 2))
    assert global_db > got + 20  # the massive token dominates the global figure


def test_choose_precision_widens_to_16_bits_then_float16():
    from lora_runtime.quant.calibrate import TensorRange
    from lora_runtime.quant.precision import choose_precision

    rng = np.random.default_rng(1)
    smooth = rng.uniform(-1, 1, (32, 64))
    spiky = smooth.copy()
    spiky[0, 0] = 400.0  # bad at 8 bits, fine at 16
    massive = smooth.copy()
    massive[0, 0] = 3e5  # bad even at 16 bits
    values = {"smooth": [smooth], "spiky": [spiky], "massive": [massive]}
    ranges = {k: TensorRange(float(v[0].min()), float(v[0].max())) for k, v in values.items()}
    got = choose_precision(values, ranges, 30.0, {k: 8 for k in values})
    assert set(got) == {"spiky", "massive"}
    assert got["spiky"][0] == 16 and got["massive"][0] == "float16"
    for k in got:
        assert got[k][1] == pytest.approx(_token_sqnr_reference(values[k][0], ranges[k].min, ranges[k].max, 8))
    assert choose_precision(values, ranges, 30.0, {k: 16 for k in values}).keys() == {"massive"}


def test_mixed_precision_in_a_bundle(tiny, calibration, tmp_path):
    """Threshold 0: nothing changes. Threshold 200: every activation fails at 8 and at 16 bits, so every one is
    float16: FLOAT entries in the file, a Cast pair in the graph, no scale inputs, exact-execution session."""
    for threshold in (0.0, 200.0):
        b = compile_bundle(tiny.base, tiny.adapters, tmp_path / f"b{threshold}",
                           CompileOptions("v3",
                                          quant=QuantOptions("full", calibration, ort_reference=False,
                                                             sensitive_db=threshold)),
                           use_cases=USE_CASES)
        q = b.manifest.quantization
        acts = read_encodings(b.path / "encodings/use-cases/tone.encodings").activation_encodings
        graph = onnx.load(str(b.path / "model.onnx"), load_external_data=False).graph
        casts = sum(n.op_type == "Cast" and n.name.endswith("/ToFloat16") for n in graph.node)
        if threshold == 0.0:
            assert {e.bw for e in acts} == {8} and casts == 0
            assert q.mixed_precision.float16 == 0
            n = q.base_weights
            assert q.execution == f"{n} base linear layers: {n} int8 GEMM (MatMulIntegerToFloat)"
        else:
            assert {(e.dtype, e.bw) for e in acts} == {("FLOAT", 16)} and casts == len(acts)
            assert q.mixed_precision.float16 == len(acts)
            assert not [i for i in graph.input if i.name.startswith("act") and i.name.endswith(".scale")]
            assert "float MatMul" in q.execution  # float16 inputs: exact dequantized weights
        assert all(0.0 <= v <= 1.0 for v in b.manifest.accuracy_of("fp32").argmax_agreement.values())
        # switching still works and matches the reference path
        rt = Runtime.open(b.path)
        feeds = {"input_ids": np.arange(8, dtype=np.int64)[None]}
        rt.switch("tone")
        np.testing.assert_allclose(rt.run(feeds)["logits"], run_use_case(b, "tone", feeds)["logits"], atol=1e-5)


def test_wide_activations_run_exactly_as_encoded(tiny, calibration, tmp_path):
    """With 16-bit activations, DQ(int8 W) + MatMul would be fused by ONNX Runtime into MatMulNBits, which
    requantizes the activation to int8 inside. The graph dequantizes such weights with Cast/Sub/Mul, which
    ONNX Runtime folds at load: no MatMulNBits, and the outputs equal the graph with every constant folded
    (the QDQ fusions off), which is the encodings' arithmetic."""
    b = compile_bundle(tiny.base, tiny.adapters, tmp_path / "b",
                       CompileOptions("v3",
                                      quant=QuantOptions("full", calibration, preset="w8a16", ort_reference=False)),
                       use_cases=USE_CASES)
    feeds = {"input_ids": np.random.default_rng(3).integers(0, 256, (1, 8))}

    def run(value=None, save=None):
        so = ort.SessionOptions()
        if value is not None:
            so.add_session_config_entry("session.disable_quant_qdq", value)
        if save:
            so.optimized_model_filepath = str(save)
        return run_use_case(b, "tone", feeds, session=make_session(b, session_options=so))["logits"]

    default = run(save=tmp_path / "opt.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False)
                              .graph.node)
    assert ops["MatMulNBits"] == 0 and ops["MatMulIntegerToFloat"] == 0
    np.testing.assert_allclose(default, run("1"), rtol=1e-5, atol=1e-5)
    rt = Runtime.open(b.path)
    rt.switch("tone")
    np.testing.assert_allclose(rt.run(feeds)["logits"], default, atol=1e-6)
    assert "float MatMul" in b.manifest.quantization.execution


def test_user_overrides_mix_precisions_per_tensor(tiny, calibration, tmp_path):
    """A w8a8 bundle where the user's file keeps one base-layer input float16 and one weight int4 per block:
    that layer runs MatMulNBits, the float16 input's layers run float, every other layer keeps int8 GEMM, in
    all three modes (the overrides land in every file of the mode)."""
    from lora_runtime.quant.encodings import EncodingsFile
    from lora_runtime.quant.rules import float16 as FLOAT16
    from lora_runtime.quant.rules import symmetric_per_block

    ref = compile_bundle(tiny.base, tiny.adapters, tmp_path / "ref",
                         CompileOptions("v3", quant=QuantOptions("non-updatable", calibration, ort_reference=False)))
    f = read_encodings(ref.path / "encodings/all.encodings")
    act = f.activation_encodings[0].name  # the first base-layer input
    weight = next(e.name for e in f.param_encodings if e.name.endswith("mlp.down_proj.weight"))
    from lora_runtime.compiler.points import find_candidates

    g = onnx.load(str(tiny.base)).graph
    c = next(c for c in find_candidates(g) if c.weight == weight)
    w = next(onnx.numpy_helper.to_array(t) for t in g.initializer if t.name == weight)
    mine = EncodingsFile(f.version, (FLOAT16(act),), (symmetric_per_block(weight, w.T if c.transposed else w, 32, 4),))
    write_encodings(tmp_path / "mine.encodings", mine)
    for mode in ("non-updatable", "adapter-only", "full"):
        b = compile_bundle(tiny.base, tiny.adapters, tmp_path / mode,
                           CompileOptions("v3",
                                          quant=QuantOptions(mode, calibration, ort_reference=False,
                                                             encodings_file=tmp_path / "mine.encodings")))
        files = [read_encodings(b.path / rel) for rel in b.manifest.quantization.files]
        got_act = [e for x in files for e in x.activation_encodings if e.name == act]
        got_w = [e for x in files for e in x.param_encodings if e.name == weight]
        assert got_act and all(e.dtype == "FLOAT" and e.bw == 16 for e in got_act), mode
        assert got_w and all(e.enc_type == "PER_BLOCK" and e.bw == 4 for e in got_w), mode
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"{mode}.opt.onnx")
        out = run_use_case(b, "tone", {"input_ids": np.arange(8, dtype=np.int64)[None]},
                           session=make_session(b, session_options=so))["logits"]
        ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath,
                                                               load_external_data=False).graph.node)
        execution = b.manifest.quantization.execution
        assert ops["MatMulNBits"] == 1 and "1 MatMulNBits" in execution, mode
        assert ops["MatMulIntegerToFloat"] >= 1 and "int8 GEMM" in execution and "float MatMul" in execution, mode
        assert np.all(np.isfinite(out))
