"""``lora-runtime bench --device htp``: the same bundles on the QNN HTP simulator and on ONNX Runtime's CPU.

The simulator runs the HTP's integer kernels on this machine's CPU, far slower than a phone's HTP: absolute
times mean nothing, so every row is read as a ratio to a row of the same run (a switch against one run on the
same device, the context load against the JIT compile). Rows, default model (w8a16, ``non-updatable``):

=======================  ==============================================================================
run_htp_v1/_v2/_v3       one run of the bundle through the runtime on the HTP (a use-case with adapters)
run_cpu_v3               the same v3 bundle on ONNX Runtime's CPU provider (its QDQ reference)
hot_switch_htp           v3 on the HTP: between use-cases (the strength vector only)
cold_switch_htp_v1/_v2   v1/v2 on the HTP: between adapters (a patch copied into the bound slots)
open_htp_jit             ``Runtime.open`` on the HTP, QNN compiling the graph
open_htp_context         ``Runtime.open`` on the HTP from the bundle's EPContext (``--htp-context``)
=======================  ==============================================================================

``--model smollm2``: SmolLM2 with a static KV cache (a 16-token prefill graph, a 1-token decode graph, one
adapter, w8a16 with GPTQ weight rounding, 32 calibration prompts): a decode step and a prefill chunk on the HTP
and on the CPU, a hot switch on the HTP, and the greedy tokens of held-out prompts on the HTP against the CPU
execution of the same bundle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lora_runtime.bench.report import machine, versions, with_ratios
from lora_runtime.bench.timing import Row, alternate, measure
from lora_runtime.bundle import Bundle
from lora_runtime.compiler.compile import compile_bundle
from lora_runtime.compiler.options import CompileOptions, HtpOptions, QuantOptions
from lora_runtime.demo import demo_use_cases
from lora_runtime.demo_llm import shipped_adapters
from lora_runtime.errors import TargetError
from lora_runtime.llm import GREEDY_PROMPTS, Chat, calibration_data, find_smollm2, import_gguf
from lora_runtime.llm.cache import make_cache
from lora_runtime.models.default import build_default
from lora_runtime.progress import Progress
from lora_runtime.runtime import htp
from lora_runtime.runtime.switcher import Runtime
from lora_runtime.version import __version__

GOALS = {"hot_switch_htp": ("hot_switch_htp", "run_htp_v3", 0.01, "<="),
         "open_context": ("open_htp_context", "open_htp_jit", None, "<="),
         "htp_vs_cpu": ("run_htp_v3", "run_cpu_v3", None, "<=")}
SLOTS, PREFILL = 64, 16  # SmolLM2: static KV cache, prefill graph length
GREEDY_TOKENS = 8


def _require_htp() -> None:
    reason = htp.missing()
    if reason is not None:
        raise TargetError(f"bench --device htp: {reason}")


def run_bench_htp(size: str = "tiny", work: Path | None = None, quick: bool = False) -> dict:
    """The default model's v1/v2/v3 w8a16 bundles on the HTP simulator, next to the CPU (module docstring)."""
    _require_htp()
    work = Path(work or f"graphs/built/bench-htp-{size}")
    n = {"run": 5 if quick else 20, "switch": 200 if quick else 1000, "cold": 20 if quick else 100,
         "open": 2 if quick else 5}
    m = build_default(size, work / "model")
    seq = m.recipe.seq_len
    calib = work / "calibration.npz"
    np.savez(calib, input_ids=np.stack([m.inputs(seed=100 + i, seq_len=seq)["input_ids"] for i in range(24)]))
    feeds = m.inputs(seed=1, seq_len=seq)
    rows: list[Row] = []
    accuracy: dict[str, dict[str, float]] = {}
    with Progress("bench", total=8, delay_s=0.0) as bar:
        bundles: dict[str, Bundle] = {}
        for gen in ("v1", "v2", "v3"):
            bundles[gen] = compile_bundle(m.base, m.adapters, work / f"b-{gen}", CompileOptions(
                gen, target="htp", static_shapes={"sequence": seq}, htp=HtpOptions(context=gen == "v3"),
                quant=QuantOptions("non-updatable", calib, preset="w8a16", ort_reference=False)),
                use_cases=demo_use_cases(gen, list(m.adapters)), force=True)
            acc = bundles[gen].manifest.accuracy_of("htp_vs_cpu")
            accuracy[f"{gen}: HTP vs the same bundle on the CPU, logit SQNR dB"] = dict(acc.sqnr_db) if acc else {}
            bar.step(f"compiled {gen}")
        runtimes = {gen: Runtime.open(b.path, device="htp") for gen, b in bundles.items()}
        for gen, rt in runtimes.items():
            named = [u.name for u in bundles[gen].manifest.use_cases if u.strengths]
            rt.switch(named[0])
            rows.append(measure(f"run_htp_{gen}", lambda rt=rt: rt.run(feeds), n["run"], warmup=1))
        cpu = Runtime.open(bundles["v3"].path)
        cpu.switch(runtimes["v3"].current or "")
        rows.append(measure("run_cpu_v3", lambda: cpu.run(feeds), n["run"], warmup=1))
        bar.step("runs")
        v3 = runtimes["v3"]
        rows.append(measure("hot_switch_htp", alternate(v3, v3.use_cases), n["switch"]))
        for gen in ("v1", "v2"):
            rt = runtimes[gen]
            adapters = list(m.adapters)
            firsts = [next(u.name for u in bundles[gen].manifest.use_cases if list(u.strengths) == [a])
                      for a in adapters]
            rows.append(measure(f"cold_switch_htp_{gen}", alternate(rt, firsts, expect="cold"), n["cold"],
                                nbytes=rt.layout.nbytes))
        bar.step("switches")
        b3 = bundles["v3"]
        rows.append(measure("open_htp_context", lambda: Runtime.open(b3.path, device="htp"), n["open"], warmup=1))
        t = b3.manifest.target
        rows.append(measure("open_htp_jit", lambda: Runtime(b3, htp.session(b3.file(b3.manifest.graph),
                                                                            t.soc_model, t.htp_arch)),
                            n["open"], warmup=1))
        bar.step("open")
    placement = {gen: b.manifest.target.placement for gen, b in bundles.items()}
    return with_ratios(rows, {"lora_runtime": __version__, "size": f"{size}, HTP simulator", "quick": quick,
                              "accuracy": accuracy, "accuracy_text": {"placement": placement},
                              "machine": machine(), "versions": versions() | _qnn_version(),
                              "model": {"recipe": size, "device": "htp (QNN simulator, soc_model 60)"}}, GOALS)


def run_bench_htp_smollm2(work: Path | None = None, quick: bool = False) -> dict:
    """SmolLM2 with a static KV cache on the HTP simulator (module docstring)."""
    _require_htp()
    work = Path(work or "graphs/built/bench-htp-smollm2")
    rows: list[Row] = []
    with Progress("bench", total=5, delay_s=0.0) as bar:
        model_dir = work / f"model-static{SLOTS}"
        if not (model_dir / "base.onnx").is_file():
            import_gguf(find_smollm2(), model_dir, static_cache=SLOTS, weights="float32")
        calib = calibration_data(model_dir, work / "calibration.npz", samples=16 if quick else 32, seq_len=PREFILL,
                                 force=True)
        bar.step("model")
        b = compile_bundle(model_dir / "base.onnx", {"caps": shipped_adapters()["caps"]}, work / "b-v3", CompileOptions(
            "v3", target="htp", static_shapes={"sequence": PREFILL}, decode_shapes={"sequence": 1},
            htp=HtpOptions(context=True), quant=QuantOptions("non-updatable", calib, preset="w8a16",
                                                             weight_rounding="gptq", ort_reference=False)),
            use_cases=["caps=caps", "base="], force=True)
        bar.step("compiled (prefill + decode graphs, on the HTP)")
        chat = Chat.load(b.path)
        on = {"htp": Runtime.open(b.path, device="htp"), "cpu": Runtime.open(b.path)}
        greedy: dict[str, str] = {}
        for p in GREEDY_PROMPTS[: 1 if quick else 2]:
            ids = chat.encode(chat.prompt([{"role": "user", "content": p}]))
            tokens = {dev: _greedy(rt, ids, GREEDY_TOKENS) for dev, rt in on.items()}
            same = sum(a == c for a, c in zip(tokens["htp"], tokens["cpu"]))
            greedy[p] = f"{same}/{GREEDY_TOKENS} tokens equal ({chat.decode(tokens['htp'])!r} on the HTP)"
        bar.step("greedy tokens")
        ids = chat.encode(chat.prompt([{"role": "user", "content": GREEDY_PROMPTS[0]}]))
        for dev, rt in on.items():  # one decode step at the prompt's context; one prefill chunk from empty
            cache = make_cache(rt.input_shapes)
            for chunk in cache.chunks(ids):
                cache.step(rt.run, chunk)
            decode, prefill = cache.feeds([ids[-1]]), make_cache(rt.input_shapes).feeds(ids[:PREFILL])
            rows.append(measure(f"decode_{dev}", lambda rt=rt, f=decode: rt.run(f), 3 if dev == "htp" else 10,
                                warmup=1))
            rows.append(measure(f"prefill_chunk_{dev}", lambda rt=rt, f=prefill: rt.run(f),
                                2 if dev == "htp" else 5, warmup=1))
        rows.append(measure("hot_switch_htp", alternate(on["htp"], ["caps", "base"]), 1000))
        bar.step("timings")
    m = b.manifest
    dec = m.accuracy_of("htp_vs_cpu_decode")
    accuracy = {"greedy tokens, HTP vs the same bundle on the CPU": greedy,
                "placement": {"prefill": m.target.placement, "decode": m.target.decode.placement
                              if m.target.decode else ""}}
    report = with_ratios(rows, {"lora_runtime": __version__, "size": "smollm2, HTP simulator", "quick": quick,
                                "accuracy_text": accuracy, "accuracy": {
                                    "decode step, HTP vs CPU (logit SQNR dB)": dict(dec.sqnr_db) if dec else {}},
                                "machine": machine(), "versions": versions() | _qnn_version(),
                                "model": {"recipe": f"SmolLM2-135M-Instruct, static KV cache {SLOTS}, prefill "
                                                    f"{PREFILL}, w8a16"}},
                         {"hot": ("hot_switch_htp", "decode_htp", 0.01, "<="),
                          "sim": ("decode_htp", "decode_cpu", None, "<=")})
    return report


def _greedy(rt: Runtime, ids: list[int], tokens: int) -> list[int]:
    cache = make_cache(rt.input_shapes)
    for chunk in cache.chunks(ids):
        logits = cache.step(rt.run, chunk)
    out = []
    for _ in range(tokens):
        out.append(int(np.argmax(logits[-1])))
        logits = cache.step(rt.run, [out[-1]])
    return out


def _qnn_version() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return {"onnxruntime-qnn": version("onnxruntime-qnn")}
    except PackageNotFoundError:
        return {}

