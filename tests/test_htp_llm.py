"""An LLM on the HTP the way it deploys: a static KV cache, a prefill graph (8 tokens) and a decode graph
(1 token) compiled from one calibration, sharing weights and encodings; run through the runtime on the QNN HTP
simulator and compared step by step with the same bundle on ONNX Runtime's CPU provider.

The tiny default model's weights in the static-cache graph (``build_model(static_cache=...)``); no tokenizer
is needed: the cache is driven with token ids.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from lora_runtime import CompileOptions, QuantOptions, Runtime, compile_bundle
from lora_runtime.compiler.options import HtpOptions
from lora_runtime.demo import demo_use_cases
from lora_runtime.errors import InputError
from lora_runtime.llm.cache import StaticCache, make_cache
from lora_runtime.metrics import sqnr_db
from lora_runtime.models.default import build_model, recipe, write_adapter
from lora_runtime.models.llama import MASK
from lora_runtime.names import DECODE_GRAPH, GROUP_PATCH, QDQ_DATA, QDQ_DECODE_DATA

pytest.importorskip("onnxruntime_qnn", reason="the QNN execution provider (pip install 'lora_runtime[qnn]') has "
                                              "wheels for Linux x86-64 and Windows, Python >= 3.11 only")

SLOTS, PREFILL = 24, 8


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    r = recipe("tiny")
    root = tmp_path_factory.mktemp("static")
    onnx.save(build_model(r, static_cache=SLOTS), str(root / "base.onnx"))
    adapters = {a.name: root / "adapters" / a.name for a in r.adapters}
    for a in r.adapters:
        write_adapter(a, r, adapters[a.name])
    rng = np.random.default_rng(7)
    n, kv, hd = 24, r.n_kv_heads, r.d_model // r.n_heads
    cache = np.zeros((n, 1, kv, SLOTS, hd), np.float32)
    calib = {"input_ids": rng.integers(0, r.vocab, (n, 1, PREFILL)),
             "position_ids": np.broadcast_to(np.arange(PREFILL), (n, 1, PREFILL)).copy(),
             "past_bias": np.full((n, 1, 1, 1, SLOTS), MASK, np.float32)}
    calib |= {f"past_{k}.{i}": cache for i in range(r.n_layers) for k in ("key", "value")}
    np.savez(root / "calib.npz", **calib)
    return compile_bundle(root / "base.onnx", adapters, root / "b", CompileOptions(
        "v3", target="htp", static_shapes={"sequence": PREFILL}, decode_shapes={"sequence": 1},
        htp=HtpOptions(context=True),
        quant=QuantOptions("non-updatable", root / "calib.npz", preset="w8a16", ort_reference=False)),
        use_cases=demo_use_cases("v3", list(adapters)))


def test_both_graphs_on_qnn_with_shared_weights(bundle):
    t = bundle.manifest.target
    for placement in (t.placement, t.decode.placement):
        assert placement.endswith("nodes on QNNExecutionProvider") and "," not in placement
    assert t.decode.static_shapes == {"sequence": 1} and t.decode.context
    ops = t.decode.qnn_ops
    assert sum(n for op, n in ops.items() if op.startswith("FullyConnected ufixed16 x sfixed8")) == 15
    assert sum(n for op, n in ops.items() if op.startswith("RmsNorm ufixed16")) == 5  # 2 per layer + final
    # every weight of the decode graph is read from the prefill graph's data file (the LoRA group: the patch)
    decode = onnx.load(str(bundle.file(DECODE_GRAPH)), load_external_data=False)
    external = [{e.key: e.value for e in i.external_data}["location"] for i in decode.graph.initializer
                if i.external_data]
    assert set(external) == {QDQ_DATA, GROUP_PATCH} and QDQ_DECODE_DATA not in bundle.manifest.files
    acc = bundle.manifest.accuracy_of("htp_vs_cpu_decode")
    assert min(acc.sqnr_db.values()) > 30.0


def _teacher_forced(rt: Runtime, tokens: list[int], prompt: int) -> list[np.ndarray]:
    """The last logits of the prompt (in chunks of 8, the last one padded), then of each next token."""
    cache = make_cache(rt.input_shapes)
    assert isinstance(cache, StaticCache)
    out = [cache.step(rt.run, chunk)[-1] for chunk in cache.chunks(tokens[:prompt])][-1:]
    for t in tokens[prompt:]:
        out.append(cache.step(rt.run, [t])[-1])
    return out


def test_prefill_and_decode_on_the_htp_agree_with_the_cpu_through_switches(bundle):
    on_htp = Runtime.open(bundle.path, device="htp")
    on_cpu = Runtime.open(bundle.path)
    tokens = np.random.default_rng(3).integers(0, 256, 17).tolist()
    for use_case in ["mix", "base", bundle.manifest.use_case_names[1]]:  # hot switches on both
        on_htp.switch(use_case)
        on_cpu.switch(use_case)
        h, c = _teacher_forced(on_htp, tokens, 11), _teacher_forced(on_cpu, tokens, 11)
        assert len(h) == 7
        for step, (a, b) in enumerate(zip(c, h)):
            assert sqnr_db(a, b) > 30.0, (use_case, step, sqnr_db(a, b))
    with pytest.raises(InputError, match=r"\(prefill graph\).*\(decode graph\)"):
        on_htp.run({"input_ids": np.zeros((1, 3), np.int64)})


def test_bench_device_htp_reports_the_rows_as_ratios(tmp_path):
    from lora_runtime.bench.htp import run_bench_htp

    report = run_bench_htp("tiny", tmp_path, quick=True)
    rows = {r["name"] for r in report["results"]}
    assert {"run_htp_v1", "run_htp_v2", "run_htp_v3", "run_cpu_v3", "hot_switch_htp", "cold_switch_htp_v1",
            "cold_switch_htp_v2", "open_htp_context", "open_htp_jit"} <= rows
    assert {"hot_switch_htp / run_htp_v3", "open_htp_context / open_htp_jit"} <= set(report["ratios"])
    for gen in ("v1", "v2", "v3"):  # accuracy, not speed: every use-case within a few 16-bit steps of the CPU
        sqnr = report["accuracy"][f"{gen}: HTP vs the same bundle on the CPU, logit SQNR dB"]
        assert sqnr and min(sqnr.values()) > 40.0
        assert report["accuracy_text"]["placement"][gen].endswith("nodes on QNNExecutionProvider")
