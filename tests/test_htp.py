"""Bundles for Qualcomm's HTP, run on the QNN HTP simulator (``onnxruntime-qnn``; skipped where it cannot install).

Each bundle is checked where it runs: every node on QNN, base linear layers and LoRA MatMuls as integer kernels
(QNN's own graph dump), the HTP's outputs against the same bundle on ONNX Runtime's CPU provider, against the FP32
graph and, for a real export, against PEFT's logits; switches through the runtime on the HTP equal fresh runs.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES

from lora_runtime import CompileOptions, InputError, QuantOptions, Runtime, TargetError, compile_bundle
from lora_runtime.cli import main
from lora_runtime.compiler.options import HtpOptions
from lora_runtime.demo import demo_use_cases
from lora_runtime.metrics import sqnr_db
from lora_runtime.runtime import htp
from lora_runtime.runtime.session import make_session, run_use_case

pytest.importorskip("onnxruntime_qnn", reason="the QNN execution provider (pip install 'lora_runtime[qnn]') has "
                                              "wheels for Linux x86-64 and Windows, Python >= 3.11 only")

SEQ = 8


@pytest.fixture(scope="module")
def calibration(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, input_ids=np.stack([tiny.inputs(seed=100 + i, seq_len=SEQ)["input_ids"] for i in range(24)]))
    return path


def _htp(tiny, calibration, out, generation, preset="w8a16", context=False):
    return compile_bundle(tiny.base, tiny.adapters, out, CompileOptions(
        generation, target="htp", static_shapes={"sequence": SEQ}, htp=HtpOptions(context=context),
        quant=QuantOptions("non-updatable", calibration, preset=preset, ort_reference=False)),
        use_cases=demo_use_cases(generation, list(tiny.adapters)))


@pytest.fixture(scope="module", params=["v1", "v2", "v3"])
def bundle(request, tiny, calibration, tmp_path_factory):
    return _htp(tiny, calibration, tmp_path_factory.mktemp("htp") / request.param, request.param)


def test_every_node_on_qnn_as_integer_kernels(bundle):
    with tempfile.TemporaryDirectory() as dump:
        htp.session(bundle.file(bundle.manifest.graph), "60", dump_dir=Path(dump))  # CPU fallback disabled
        ops = htp.qnn_ops(Path(dump))
    m = bundle.manifest
    assert m.target.placement == f"{m.target.placement.split()[0]} nodes on QNNExecutionProvider"
    linear = sum(n for op, n in ops.items() if op.startswith("FullyConnected ufixed16 x sfixed8"))
    lora = sum(n for op, n in ops.items() if op.startswith("MatMul ufixed16 x sfixed8"))
    assert linear == 15  # every base linear layer of the tiny model: 2 layers x 7, and lm_head
    assert lora == 2 * len(m.points)  # both MatMuls of every branch, on int8 LoRA weights
    assert not [op for op in ops if op.startswith(("FullyConnected", "MatMul")) and "float" in op]
    assert {s.dtype for s in m.slots if s.kind in ("lora_A", "lora_B")} == {"int8"}


def test_htp_agrees_with_the_cpu_execution(bundle, tiny):
    m = bundle.manifest
    on_htp, on_cpu = make_session(bundle, device="htp"), make_session(bundle)
    feeds = tiny.inputs(seed=9, seq_len=SEQ)
    base = run_use_case(bundle, m.use_case_names[0], feeds, session=on_cpu)["logits"]
    for u in m.use_cases:
        cpu = run_use_case(bundle, u.name, feeds, session=on_cpu)["logits"]
        if u.strengths:  # the adapter moves the output, or the comparison proves nothing
            assert sqnr_db(base, cpu) < 30.0, u.name
        assert sqnr_db(cpu, run_use_case(bundle, u.name, feeds, session=on_htp)["logits"]) >= 40.0, u.name
    recorded = m.accuracy_of("htp_vs_cpu").sqnr_db
    assert set(recorded) == set(m.use_case_names) and min(recorded.values()) >= 40.0
    assert min(m.accuracy_of("htp_vs_fp32").sqnr_db.values()) >= 30.0


def test_switches_on_the_htp_equal_fresh_runs(bundle, tiny):
    m = bundle.manifest
    rt = Runtime.open(bundle.path, device="htp")
    session = make_session(bundle, device="htp")
    feeds = tiny.inputs(seed=11, seq_len=SEQ)
    kinds = set()
    for name in [*m.use_case_names, *reversed(m.use_case_names)]:
        kinds.add(rt.switch(name).kind)
        got = rt.run(feeds)["logits"]
        want = run_use_case(bundle, name, feeds, session=session)["logits"]
        if m.use_case(name).strengths:
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:  # strength 0 with resident weights vs zero weights: the HTP's arithmetic differs in the last bits
            assert sqnr_db(want, got) >= 50.0
    assert kinds == ({"hot"} if m.generation == "v3" else {"hot", "cold"})


def test_strengths_outside_the_encoded_range_are_refused(bundle, tiny):
    m = bundle.manifest
    lo, hi = m.target.strength_range
    assert lo <= 0.0 and 1.0 <= hi
    rt = Runtime.open(bundle.path)
    rt.switch(m.use_case_names[1])
    feeds = tiny.inputs(seed=1, seq_len=SEQ)
    before = rt.run(feeds)["logits"]
    adapter = m.adapter_names[0]
    with pytest.raises(InputError, match=rf"strength 1.5 of adapter '{adapter}' is outside \[.*\], the range this "
                                         "bundle's lora_alpha encoding covers"):
        rt.set_strengths({adapter: 1.5})
    np.testing.assert_array_equal(rt.run(feeds)["logits"], before)


def test_ahead_of_time_context(tiny, calibration, tmp_path):
    b = _htp(tiny, calibration, tmp_path / "ctx", "v3", context=True)
    t = b.manifest.target
    assert t.context == "model_ctx.onnx" and {"model_ctx.onnx", "model_ctx_qnn.bin"} <= set(b.manifest.files)
    rt = Runtime.open(b.path, device="htp")
    jit = htp.session(b.file(b.manifest.graph), "60")
    feeds = tiny.inputs(seed=3, seq_len=SEQ)
    for name in b.manifest.use_case_names:
        rt.switch(name)
        np.testing.assert_array_equal(rt.run(feeds)["logits"], run_use_case(b, name, feeds, session=jit)["logits"])


def test_peft_export_on_the_htp_against_peft(tmp_path):
    """A real dynamo export with real PEFT adapters, w8a16: against PEFT's own logits (an independent reference)."""
    root = FIXTURES / "llama"
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=np.random.default_rng(1).integers(0, 64, (32, 1, 7), dtype=np.int64))
    cases = ["a=a", "b=b", "ab=a:1,b:0.5", "base="]
    b = compile_bundle(root / "dynamo.onnx", {a: root / "adapters" / a for a in ("a", "b")}, tmp_path / "b",
                       CompileOptions("v3", target="htp", static_shapes={"seq": 7},
                                      quant=QuantOptions("non-updatable", calib, preset="w8a16",
                                                         ort_reference=False)), use_cases=cases)
    assert b.manifest.target.placement.endswith("nodes on QNNExecutionProvider")
    expected = np.load(root / "expected.npz")
    with np.load(root / "inputs.npz") as z:
        feeds = {"input_ids": z["input_ids"]}
    rt = Runtime.open(b.path, device="htp")
    for case in ("a", "b", "ab"):
        assert sqnr_db(expected["base"], expected[case]) < 30.0  # the adapters move the logits
        rt.switch(case)
        assert sqnr_db(expected[case], rt.run(feeds)["logits"]) >= 30.0, case


REFUSED = [
    ({"quant_mode": "full"}, "encodings 'full' on the HTP"),
    ({"sensitive_db": 30.0}, "--sensitive-db mixes activation bitwidths"),
    ({"static_shapes": {}}, "free dimension 'sequence' of 'input_ids' has no value: pass --static-shape"),
]


@pytest.mark.parametrize(("change", "message"), REFUSED)
def test_what_the_htp_cannot_take_is_refused(tiny, calibration, tmp_path, change, message):
    quant = QuantOptions(change.get("quant_mode", "non-updatable"), calibration,
                         sensitive_db=change.get("sensitive_db"), ort_reference=False)
    with pytest.raises(TargetError, match=message):
        compile_bundle(tiny.base, tiny.adapters, tmp_path / "b", CompileOptions(
            "v3", target="htp", static_shapes=change.get("static_shapes", {"sequence": SEQ}), quant=quant))
    assert not (tmp_path / "b").exists()


def test_a_cpu_bundle_does_not_open_on_the_htp(tiny, tmp_path):
    b = compile_bundle(tiny.base, tiny.adapters, tmp_path / "cpu", generation="v3")
    with pytest.raises(TargetError, match="compiled for the CPU, not the HTP: compile with --target htp"):
        Runtime.open(b.path, device="htp")


def test_cli_compile_run_and_inspect_on_the_htp(tiny, calibration, tmp_path, capsys):
    out = tmp_path / "b"
    args = ["compile", "--base", str(tiny.base), "--generation", "v3", "-o", str(out), "--target", "htp",
            "--static-shape", f"sequence={SEQ}", "--encodings", "non-updatable", "--calibration", str(calibration),
            "--preset", "w8a16", "--no-ort-reference", "--htp-context"]
    args += [a for n, p in tiny.adapters.items() for a in ("--adapter", f"{n}={p}")]
    assert main(args) == 0
    assert "target HTP" in capsys.readouterr().out
    np.savez(tmp_path / "in.npz", **tiny.inputs(seed=2, seq_len=SEQ))
    assert main(["run", str(out), "--device", "htp", "--use-case", "summarize", "--inputs", str(tmp_path / "in.npz"),
                 "--outputs", str(tmp_path / "out.npz")]) == 0
    assert np.load(tmp_path / "out.npz")["logits"].shape == (1, SEQ, 256)
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    target = json.loads(capsys.readouterr().out)["manifest"]["target"]
    assert target["name"] == "htp" and target["context"] == "model_ctx.onnx"
    assert main(["compile", "--base", str(tiny.base), "--generation", "v3", "-o", str(tmp_path / "c"),
                 "--htp-context", "--adapter", f"tone={tiny.adapters['tone']}"]) == 2
    assert "go with --target htp" in capsys.readouterr().err
