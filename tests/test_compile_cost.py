"""The INT8 compile's cost (issue 20): progress with real totals and an ETA, GPTQ's shared factors and freed
statistics, calibration's batched Gram products and parked rows, the folded INT8 session measured on."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from lora_runtime import compile_bundle
from lora_runtime.arrays import Spill, blas_threads
from lora_runtime.compiler.options import CompileOptions, QuantOptions
from lora_runtime.eval.accuracy import LogitsScore
from lora_runtime.metrics import argmax_agreement, sqnr_db
from lora_runtime.progress import Progress, Stage, eta_text
from lora_runtime.quant.gptq import Hessians, gptq_codes, gptq_round, inverse_factor


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_stage_reports_its_real_total_and_an_eta():
    said, clock = [], Clock()
    stage = Stage(said.append, "GPTQ", 211, "layers", clock=clock)
    clock.now += 3.0  # before the first step: a session loading, not the stage's pace
    stage.step("model.layers.0.self_attn.q_proj.weight")
    assert said == ["GPTQ 1/211 layers, 3 s, ETA ?: model.layers.0.self_attn.q_proj.weight"]
    clock.now += 12.0
    stage.step("model.layers.9.mlp.up_proj.weight", n=56)
    assert said[-1] == "GPTQ 57/211 layers, 15 s, ETA 33 s: model.layers.9.mlp.up_proj.weight"  # 12 s / 56 * 154
    clock.now += 188.0
    stage.step()
    assert said[-1] == "GPTQ 58/211 layers, 203 s, ETA 8 min 57 s"  # 200 s / 57 * 153: minutes from two on
    stage.step(n=153)
    assert said[-1] == "GPTQ 211/211 layers, 203 s, ETA 0 s" and stage.share == 1.0


def test_the_eta_follows_the_work_when_units_differ_in_size():
    said, clock = [], Clock()
    stage = Stage(said.append, "converting", 273, "tensors", work=1000.0, clock=clock)
    clock.now += 2.0
    stage.step("model.embed_tokens.weight", work=250.0)  # a quarter of the weights in the first tensor
    clock.now += 1.0
    stage.step("model.layers.0.input_layernorm.weight", work=0.0)
    clock.now += 1.0
    stage.step("model.layers.0.self_attn.q_proj.weight", work=75.0)  # 10% of the rest in 2 s
    assert said[-1] == "converting 3/273 tensors, 4 s, ETA 18 s: model.layers.0.self_attn.q_proj.weight"


def test_eta_text():
    assert eta_text(0.0, 5.0) == "ETA ?"
    assert eta_text(0.5, 10.0) == "ETA 10 s"
    assert eta_text(1.0, 10.0) == "ETA 0 s"
    assert eta_text(0.1, 30.0) == "ETA 4 min 30 s"


class Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [False, True])
def test_open_ended_progress_shows_what_the_stages_say(tty):
    out = Stream(tty)
    with Progress("compile", total=None, stream=out, delay_s=0.0) as bar:
        Stage(bar.step, "calibration", 48, "runs").step("caps")
    text = out.getvalue()
    assert "compile" in text and "calibration 1/48 runs, 0 s, ETA ?: caps" in text
    assert "[" not in text  # no bar: the stage's count is the real one
    assert text.startswith("\r") == tty and text.endswith("\n")


def test_quick_progress_stays_quiet():
    out = Stream(False)
    with Progress("compile", total=None, stream=out) as bar:
        bar.step("fast")
    assert out.getvalue() == ""


def _gram(seed: int, k: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4 * k, k)) * np.where(rng.random(k) < 0.05, 30.0, 1.0)  # outlier channels
    return (x.T @ x).astype(np.float32)


@pytest.mark.parametrize("k", [40, 200, 300])
def test_the_inverse_factor_is_gptqs(k):
    """One Cholesky of the reversed H and a triangular inverse: the upper factor of H^-1 GPTQ's reference takes
    by inverting H and factoring the inverse (the same damping)."""
    h = _gram(k, k).astype(np.float64)
    h[np.diag_indices(k)] += 0.01 * np.mean(np.diag(h))
    expected = np.linalg.cholesky(np.linalg.inv(h)).T
    got = inverse_factor(_gram(k, k))
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())
    assert np.allclose(np.tril(got, -1), 0.0)
    assert inverse_factor(-np.eye(3)) is None  # not positive definite: nearest rounding


def test_rounding_a_slice_of_columns_at_a_time_changes_no_code(monkeypatch):
    import lora_runtime.quant.gptq as gptq

    rng = np.random.default_rng(3)
    k, n = 96, 70
    w = rng.standard_normal((k, n)) * 0.05
    scale, h = np.abs(w).max(0) / 127, _gram(4, k)
    whole = gptq_codes(w, h, scale, np.zeros(n), -128, 127)
    monkeypatch.setattr(gptq, "COLUMNS", 16)
    sliced = gptq_round(w, inverse_factor(h), scale, np.zeros(n), -128, 127, np.int8)
    assert sliced.dtype == np.int8
    np.testing.assert_array_equal(sliced, whole)


def test_hessians_share_a_factor_and_free_the_statistics_after_the_last_reader():
    rng = np.random.default_rng(5)
    said = []
    grams = {"x": _gram(1, 32), "y": _gram(2, 48)}
    hs = Hessians(grams, {"x": 2, "y": 1}, said.append, work=2 * 32 * 8 + 48 * 8)
    assert hs.stage.total == 3 and "x" in hs and len(hs) == 2
    w = {n: rng.standard_normal((k, 8)) * 0.1 for n, k in (("q", 32), ("k", 32), ("o", 48))}
    s = {n: np.abs(v).max(0) / 127 for n, v in w.items()}
    q = hs.round("x", "q", w["q"], s["q"], np.zeros(8), -128, 127)
    assert "x" in hs  # one reader left
    hs.round("x", "k", w["k"], s["k"], np.zeros(8), -128, 127)
    assert "x" not in hs and "y" in hs
    hs.round("y", "o", w["o"], s["o"], np.zeros(8), -128, 127)
    assert len(hs) == 0 and grams == {}
    np.testing.assert_array_equal(q, gptq_codes(w["q"], _gram(1, 32), s["q"], np.zeros(8), -128, 127))
    assert [m.split(",")[0] for m in said] == ["GPTQ 1/3 layers", "GPTQ 2/3 layers", "GPTQ 3/3 layers"]
    assert said[-1].endswith("ETA 0 s: o")


def test_gram_products_by_gathered_rows_equal_the_sum_of_the_runs():
    from lora_runtime.quant.calibrate import GRAM_ROWS, _Grams

    rng = np.random.default_rng(6)
    runs = [rng.standard_normal((n, 24)).astype(np.float32) for n in (64, 64, 100, GRAM_ROWS + 3, 64, 7)]
    gram = {"t": np.zeros(())}  # a placeholder, as the compile starts
    g = _Grams(gram)
    for x in runs:
        g.add("t", x)
    g.flush()
    expected = sum(x.astype(np.float64).T @ x.astype(np.float64) for x in runs)
    assert gram["t"].dtype == np.float32 and g.rows == {}
    np.testing.assert_allclose(gram["t"], expected, rtol=1e-5, atol=1e-3)


def test_spilled_arrays_come_back_as_added(tmp_path):
    with Spill(tmp_path / "s") as spill:
        a, b = np.arange(12, dtype=np.float32).reshape(3, 4), np.array([[1, 2]], np.int64)
        spill.add("t", a[::2])  # a strided view is written as its values
        spill.add("u", b)
        spill.add("t", a)
        got = spill["t"]
        assert list(spill) == ["t", "u"] and len(spill) == 2
        np.testing.assert_array_equal(got[0], a[::2])
        np.testing.assert_array_equal(got[1], a)
        assert spill["u"][0].dtype == np.int64
    assert not (tmp_path / "s").exists()


def test_logits_score_is_the_whole_lists_sqnr_and_agreement():
    rng = np.random.default_rng(7)
    ref = [rng.standard_normal((1, 5, 11)).astype(np.float32) for _ in range(4)]
    test = [r + rng.standard_normal(r.shape).astype(np.float32) * 0.3 for r in ref]
    score = LogitsScore()
    for r, t in zip(ref, test):
        score.add(r, t)
    assert score.sqnr_db == pytest.approx(sqnr_db(np.concatenate([r.ravel() for r in ref]),
                                                  np.concatenate([t.ravel() for t in test])), abs=1e-9)
    assert score.agreement == argmax_agreement(ref, test)


def test_blas_threads_are_restored():
    from lora_runtime.arrays import _openblas_threads

    calls = _openblas_threads()
    if calls is None:
        pytest.skip("numpy's BLAS is not OpenBLAS")
    before = calls[0]()
    with blas_threads(1):
        assert calls[0]() == 1
    assert calls[0]() == before


def test_import_reports_each_tensor_with_the_total(tmp_path):
    from lora_runtime.models.default import recipe, shape_of
    from lora_runtime.models.llama import build_llama, tensor_names

    r = recipe("tiny")
    said = []
    rng = np.random.default_rng(0)
    build_llama(shape_of(r), lambda name, shape: rng.standard_normal(shape).astype(np.float32), report=said.append)
    total = len(tensor_names(shape_of(r)))
    assert len(said) == total
    assert said[0].startswith(f"converting 1/{total} tensors, ") and said[0].endswith(": model.embed_tokens.weight")
    assert said[-1].startswith(f"converting {total}/{total} tensors, ") and "ETA 0 s: lm_head.weight" in said[-1]


@pytest.fixture(scope="module")
def w8a16(tiny, tmp_path_factory):
    """A tiny bundle whose base layers have 16-bit inputs: weights dequantized by Cast/Sub/Mul constants."""
    root = tmp_path_factory.mktemp("w8a16")
    calib = root / "calib.npz"
    np.savez(calib, input_ids=np.random.default_rng(0).integers(0, 256, (12, 1, 8), dtype=np.int64))
    quant = QuantOptions("full", calib, preset="w8a16", weight_rounding="gptq", ort_reference=False)
    return compile_bundle(tiny.base, tiny.adapters, root / "b", CompileOptions("v3", quant=quant))


def test_the_folded_session_runs_the_bundle_bit_for_bit(w8a16):
    import onnx

    from lora_runtime.eval.twin import FOLDED, folded_session
    from lora_runtime.runtime.session import make_session, run_use_case

    ops = {n.op_type for n in onnx.load(str(w8a16.path / "model.onnx"), load_external_data=False).graph.node}
    assert {"Cast", "Sub", "Mul"} <= ops
    feeds = {"input_ids": np.random.default_rng(1).integers(0, 256, (1, 8), dtype=np.int64)}
    plain = make_session(w8a16)
    with folded_session(w8a16) as folded:
        assert all((w8a16.path / f).exists() for f in FOLDED)
        for u in w8a16.manifest.use_case_names:
            a, b = run_use_case(w8a16, u, feeds, session=plain), run_use_case(w8a16, u, feeds, session=folded)
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    assert not any((w8a16.path / f).exists() for f in FOLDED)


def test_the_compile_leaves_no_scratch_file(w8a16):
    names = {p.name for p in w8a16.path.rglob("*")}
    assert not {n for n in names if n.startswith(".")}, names
    acc = w8a16.manifest.accuracy_of("fp32")
    assert set(acc.sqnr_db) == set(w8a16.manifest.use_case_names)
    assert all(np.isfinite(v) and v > 10 for v in acc.sqnr_db.values())


def test_compile_cost_rows_measure_the_child_alone(monkeypatch, tmp_path):
    """The peak RSS row is the child's own, not the bench's (which Linux's ru_maxrss of a child would include)."""

    from lora_runtime.bench import compile_cost

    if not Path("/proc/self/status").is_file():
        pytest.skip("no /proc here")
    big = np.ones(300 << 20, np.uint8)  # the bench's own memory: must not show
    child = "import numpy as np; a = np.ones(120 << 20, np.uint8); print('done'); sys.exit(0)"
    monkeypatch.setattr(compile_cost, "CHILD", compile_cost.CHILD.replace(
        "from lora_runtime.cli import main\nsys.exit(main(sys.argv[1:]))", "exec(sys.argv[1])"))
    monkeypatch.setattr(compile_cost, "compile_argv", lambda *_a: [child])
    rows = {r.name: r for r in compile_cost.compile_cost_rows(tmp_path, tmp_path / "c.npz", tmp_path / "b")}
    assert 120 << 20 < rows[compile_cost.PEAK].bytes < 250 << 20 and big[0] == 1
    assert rows[compile_cost.WALL].p50_us > 0 and (tmp_path / "b.log").read_text().strip() == "done"
    ratios = compile_cost.compile_cost_ratios(rows)
    assert ratios["compile_int8_w8a16_gptq (s)"]["met"] and ratios["compile_int8_w8a16_gptq_peak_rss (GB)"]["met"]
    monkeypatch.setattr(compile_cost, "compile_argv", lambda *_a: ["raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match="exited 3"):
        compile_cost.compile_cost_rows(tmp_path, tmp_path / "c.npz", tmp_path / "b")
