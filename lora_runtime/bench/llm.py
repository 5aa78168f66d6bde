"""``lora-runtime bench --model smollm2``: decode and prefill cost and switch latency on a real LLM.

Rows (same report format as the main bench; every decode row is one token at a context of the prompt):

=======================  ==============================================================================
prefill_base             the chat prompt (about 40 tokens) through the base graph
decode_base              one token through the base graph (ONNX Runtime session, no runtime)
decode_merged            one token with ``caps`` merged into the weights (the zero-overhead ideal)
decode_v1 / decode_v2    one token through the runtime, ``caps`` active (r=16 on o/gate/up/down, 120 points)
decode_v2_qv8            v2, ``listify`` active: r=8 on q/v of every layer (llama.cpp's first peer adapter)
decode_v2_peer16         v2, a seeded F32 adapter shaped like llama.cpp's second one: r=16 on o/gate/up/down
                         of all 30 layers, 14.4 MB
decode_v3_n1 / _n2       v3 groups of ``caps`` / ``caps`` + ``listify``, all active
decode_v3_n2_int4        the same with the base weights in int4 (``--base-weights int4``)
decode_qdq_*             the same as QDQ with full encodings: w8a8 (nearest rounding); w8a8 with mixed
                         precision (``--sensitive-db 30``) and GPTQ; w8a16 and w4a16 with both. Logit SQNR,
                         argmax and greedy-token agreement with FP32 alongside
hot_switch               v3: between use-cases (strengths only)
answer_generate / _serve one 32-token greedy answer of v3 ``caps`` through ``generate`` and through ``serve``
turn_kept / turn_fresh   a chat's third turn to its first token (v3 ``caps``), the KV cache of turns one and
                         two kept (``chat``'s ``PromptCache``) / from an empty cache
cold_switch_cache        v2: between three adapters' patches (page cache warm)
cold_switch_peer16       v2: between three 14.4 MB adapters shaped like llama.cpp's (page cache warm)
compile_int8_*           the README's INT8 compile (w8a16, GPTQ, --sensitive-db 30, two use-cases), a child process:
                         its wall time and peak RSS (``bench.compile_cost``; ``--quick``: on 8 calibration prompts)
=======================  ==============================================================================

llama.cpp's decode and prefill on the same GGUF files are taken in the same rounds as ours when its
``llama-bench`` is installed (``bench.llamacpp``; rows ``llamacpp_*``, ratios with the goal <= 1 for decode). Its
adapter overheads and adapter load times, and its decode where llama-bench is not installed, are numbers measured
once on an earlier machine (``LLAMA_CPP``, through llama-cpp-python 0.3.36, 2 threads): the table says so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from lora_runtime.bench.blocks import blocks_rows, ratio_goal
from lora_runtime.bench.compile_cost import compile_cost_ratios, compile_cost_rows
from lora_runtime.bench.default import GOALS
from lora_runtime.bench.report import machine, versions, with_ratios
from lora_runtime.bench.serve import serve_rows, turn_rows
from lora_runtime.bench.timing import Row, alternate, measure, measure_interleaved, quiet_options
from lora_runtime.compiler.compile import compile_bundle
from lora_runtime.compiler.options import CompileOptions, QuantOptions, WeightOnlyOptions
from lora_runtime.compiler.points import find_candidates
from lora_runtime.demo_llm import shipped_adapters
from lora_runtime.export import merge_use_case
from lora_runtime.llm import Chat, calibration_data, find_smollm2, import_gguf
from lora_runtime.progress import Progress
from lora_runtime.runtime.switcher import Runtime
from lora_runtime.tensorfile import save_tensors
from lora_runtime.version import __version__

PROMPT = [{"role": "user", "content": "Give me three tips for better sleep."}]
# INT8 rows: preset, --sensitive-db, --weight-rounding
PRESETS = (("w8a8", None, "nearest"), ("w8a8", 30.0, "gptq"), ("w8a16", 30.0, "gptq"), ("w4a16", 30.0, "gptq"))
# llama.cpp on this machine: decode ms/token; per-token overhead of its two adapters (low-high of its
# runs); adapter load ms of the 1.8 MB and the 14.4 MB adapter.
LLAMA_CPP = {"decode_ms": 6.8, "qv8_overhead": (1.04, 1.21), "peer16_overhead": (1.26, 1.51),
             "load_qv8_ms": 2.0, "load_peer16_ms": 11.9}


def peer_adapter(model: Path, folder: Path, seed: int, r: int = 16,
                 targets: tuple[str, ...] = ("o_proj", "gate_proj", "up_proj", "down_proj")) -> Path:
    """A seeded F32 PEFT folder with rank ``r`` on every ``targets`` module of ``model`` (PEFT names)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for c in find_candidates(onnx.load(str(model), load_external_data=False).graph):
        module = c.weight.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in targets:
            continue
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((r, c.in_features)) / np.sqrt(c.in_features)
                                           ).astype(np.float32)
        tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((c.out_features, r)) * 0.01).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
              "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "inference_mode": True}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_tensors(folder / "adapter_model.safetensors", dict(sorted(tensors.items())), {"format": "pt"})
    return folder


def run_bench_smollm2(work: Path | None = None, quick: bool = False) -> dict:
    work = Path(work or "graphs/built/bench-smollm2")
    reps = 10 if quick else 40
    rows: list[Row] = []
    with Progress("bench", total=11 + len(PRESETS), delay_s=0.0) as bar:
        model_dir = work / "model"
        if not (model_dir / "base.onnx").is_file():
            import_gguf(find_smollm2(), model_dir, max_seq=512, weights="float32")
        bar.step("model")
        ad = shipped_adapters()
        two = {k: ad[k] for k in ("caps", "listify")}
        peers = {f"peer16{x}": peer_adapter(model_dir / "base.onnx", work / "adapters" / f"peer16{x}", seed)
                 for x, seed in (("a", 1), ("b", 2), ("c", 3))}  # three: two slot sets hold two adapters
        bundles = {
            "v1": compile_bundle(model_dir / "base.onnx", ad, work / "b-v1", generation="v1", force=True),
            "v2": compile_bundle(model_dir / "base.onnx", ad, work / "b-v2", generation="v2", force=True),
            "v2_peer16": compile_bundle(model_dir / "base.onnx", peers, work / "b-v2-peer16", generation="v2",
                                        force=True),
            "v3_n1": compile_bundle(model_dir / "base.onnx", {"caps": ad["caps"]}, work / "b-v3-n1",
                                    generation="v3", use_cases=["caps=caps", "base="], force=True),
            "v3_n2": compile_bundle(model_dir / "base.onnx", two, work / "b-v3-n2", generation="v3",
                                    use_cases=["both=caps,listify", "caps=caps", "base="], force=True),
            "v3_n2_int4": compile_bundle(model_dir / "base.onnx", two, work / "b-v3-n2-int4",
                                         CompileOptions("v3", weight_only=WeightOnlyOptions.of("int4"),
                                                        measure_accuracy=False),
                                         use_cases=["both=caps,listify", "caps=caps", "base="], force=True),
        }
        calib = calibration_data(model_dir, work / "calibration.npz", samples=8 if quick else 32, seq_len=48,
                                 force=True)
        bar.step("bundles")
        readme_calib = calibration_data(model_dir, work / "calibration-readme.npz", samples=8 if quick else 32,
                                        force=True)  # calibration-data's defaults, as the README's compile
        rows += compile_cost_rows(model_dir, readme_calib, work / "b-compile-cost")
        bar.step("compile cost")
        for preset, sens, rounding in PRESETS:
            key = f"qdq_{preset}" + (f"_s{int(sens)}" if sens else "") + ("_gptq" if rounding == "gptq" else "")
            quant = QuantOptions("full", calib, preset=preset, weight_rounding=rounding, sensitive_db=sens,
                                 ort_reference=False)
            bundles[key] = compile_bundle(model_dir / "base.onnx", two, work / f"b-{key}",
                                          CompileOptions("v3", quant=quant),
                                          use_cases=["both=caps,listify", "caps=caps", "base="], force=True)
            bar.step(key)
        (work / "merged").mkdir(parents=True, exist_ok=True)
        merged = merge_use_case(bundles["v2"], work / "merged" / "caps.onnx", use_case="caps", force=True)
        bar.step("merged")
        chat = Chat.load(model_dir)
        ids = np.array([chat.encode(chat.prompt(PROMPT))], np.int64)
        empty = np.zeros((1, chat.kv_heads, 0, chat.head_dim), np.float32)

        so = quiet_options()  # every session here runs interleaved with the others
        base = ort.InferenceSession(str(model_dir / "base.onnx"), so, providers=["CPUExecutionProvider"])
        merged_sess = ort.InferenceSession(str(merged), so, providers=["CPUExecutionProvider"])
        past_names = [i.name for i in base.get_inputs() if i.name.startswith("past_")]
        prefill = {"input_ids": ids} | {n: empty for n in past_names}
        rows.append(measure("prefill_base", lambda: base.run(None, prefill), max(reps // 4, 3), warmup=1))
        bar.step("prefill")

        def decoder(run):  # noqa: ANN001, ANN202  (one token at the prompt's context, the same every time)
            names = [o.name for o in base.get_outputs()]
            out = dict(zip(names, run(prefill)))
            past = {k.replace("present_", "past_"): v for k, v in out.items() if k.startswith("present_")}
            step = {"input_ids": np.array([[int(out["logits"][0, -1].argmax())]], np.int64)} | past
            return lambda: run(step)

        runners = {"decode_base": decoder(lambda f: base.run(None, f)),
                   "decode_merged": decoder(lambda f: merged_sess.run(None, f))}
        runtimes = {}
        for key, use_case in [("v1", "caps"), ("v2", "caps"), ("v2_qv8", "listify"), ("v2_peer16", "peer16a"),
                              ("v3_n1", "caps"), ("v3_n2", "both"),
                              ("v3_n2_int4", "both"), *((k, "both") for k in bundles if k.startswith("qdq_"))]:
            rt = Runtime.open(bundles[key.replace("_qv8", "")].path, session_options=quiet_options())
            rt.switch(use_case)
            runtimes[key] = rt
            runners[f"decode_{key}"] = decoder(lambda f, rt=rt: list(rt.run(f).values()))
        bar.step("sessions")
        rows += measure_interleaved(runners, reps, block=5)
        bar.step("decode")
        rows.append(measure("hot_switch", alternate(runtimes["v3_n2"], ["both", "caps", "base"]), 2000))
        served, skipped = serve_rows(bundles["v3_n1"].path, "caps", 4 if quick else 10)
        rows += served
        turns, conversation = turn_rows(bundles["v3_n1"].path, "caps", 4 if quick else 10)
        rows += turns
        rt2 = runtimes["v2"]
        rows.append(measure("cold_switch_cache", alternate(rt2, ["caps", "listify", "signoff"], expect="cold"),
                            200, nbytes=rt2.layout.nbytes))
        rtp = runtimes["v2_peer16"]
        rows.append(measure("cold_switch_peer16", alternate(rtp, list(peers), expect="cold"), 200,
                            nbytes=rtp.layout.nbytes))
        bar.step("switches")
        t = time.perf_counter()
        Runtime.open(bundles["v3_n2"].path)
        rows.append(Row("runtime_open", (time.perf_counter() - t) * 1e6, None, 1, None))
        for name, folder in ad.items():
            size = (folder / "adapter_model.safetensors").stat().st_size
            rows.append(Row(f"adapter_bytes_{name}", None, None, 1, size))
        blocks, blocks_accuracy, blocks_ratios, blocks_spread = blocks_rows(work, model_dir, ad, PROMPT, reps)
        rows += blocks
        bar.step("GGUF blocks kept")
        bar.step("done")
    accuracy = dict(blocks_accuracy)
    for k, b in bundles.items():
        if k.startswith("qdq_"):
            e = b.manifest.accuracy_of("fp32")
            greedy = e.greedy_agreement
            accuracy[f"decode_{k} (v3, 2 adapters, full encodings) vs FP32: logit SQNR dB / argmax agreement / "
                     "greedy tokens agreeing"] = {
                u: f"{e.sqnr_db[u]:.1f} / {e.argmax_agreement[u]:.0%} / {greedy.get(u, float('nan')):.0%}"
                for u in b.manifest.use_case_names}
    report = with_ratios(rows, {"lora_runtime": __version__, "size": "smollm2", "quick": quick,
                                 "accuracy_text": accuracy,
                                 "machine": machine(), "versions": versions(),
                                 "model": {"recipe": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32)",
                                           "prompt_tokens": int(ids.shape[1])}}, GOALS)
    by = {r.name: r for r in rows}
    for num in ("decode_merged", "decode_v1", "decode_v2", "decode_v2_qv8", "decode_v2_peer16", "decode_v3_n1",
                "decode_v3_n2", "decode_v3_n2_int4",
                *(f"decode_{k}" for k in bundles if k.startswith("qdq_"))):
        report["ratios"][f"{num} / decode_base"] = {"value": by[num].p50_us / by["decode_base"].p50_us,
                                                    "goal": None, "met": None}
    peer = {"decode_v2_qv8 / decode_base": LLAMA_CPP["qv8_overhead"],
            "decode_v2_peer16 / decode_base": LLAMA_CPP["peer16_overhead"]}
    for key, (lo, hi) in peer.items():  # per-token adapter overhead within or below llama.cpp's measured range
        value = report["ratios"][key]["value"]
        report["ratios"][key] |= {"goal": f"<= {hi} (llama.cpp: {lo}-{hi})", "met": value <= hi}
    cold = by["cold_switch_peer16"].p50_us / 1e3 / LLAMA_CPP["load_peer16_ms"]
    report["ratios"]["cold_switch_peer16 / llama.cpp adapter load"] = {"value": cold, "goal": "<= 0.25",
                                                                        "met": cold <= 0.25}
    report["ratios"]["hot_switch (us)"] = {"value": by["hot_switch"].p50_us, "goal": "<= 10",
                                           "met": by["hot_switch"].p50_us <= 10}
    report["ratios"] |= compile_cost_ratios(by)
    report["ratios"] |= {k: {"value": v, "goal": None if g is None else f"<= {g}", "met": None if g is None else v <= g}
                         | ({"rounds": f"{s.q25:.3g}-{s.q75:.3g} ({s.rounds})"} if (s := blocks_spread.get(k)) else {})
                         for k, v in blocks_ratios.items() for g in [ratio_goal(k)]}
    if "decode_blocks4 / llamacpp_decode_q4_1" not in blocks_ratios:  # llama-bench not here: another machine's
        speed = by["decode_blocks4"].p50_us / 1e3
        report["ratios"]["decode_blocks4 (ms) vs llama.cpp's Q4_1 decode elsewhere"] = {
            "value": speed, "goal": f"<= {LLAMA_CPP['decode_ms']}", "met": speed <= LLAMA_CPP["decode_ms"]}
    report["peer"] = {"llama.cpp": LLAMA_CPP}
    if served:  # one answer of 32 tokens through the server vs generate: HTTP, JSON and the use-case lock
        ratio = by["answer_serve"].p50_us / by["answer_generate"].p50_us
        report["ratios"]["answer_serve / answer_generate"] = {"value": ratio, "goal": "<= 1.05", "met": ratio <= 1.05}
    ratio = by["turn_kept"].p50_us / by["turn_fresh"].p50_us
    report["ratios"]["turn_kept / turn_fresh"] = {"value": ratio, "goal": None, "met": None}
    report["model"]["third_turn"] = conversation  # its prompt tokens and how many the kept cache held
    if skipped:
        report["skipped"] = [skipped]
    report["ratios"]["decode_v3_n1 / decode_merged"] = {
        "value": by["decode_v3_n1"].p50_us / by["decode_merged"].p50_us, "goal": None, "met": None}
    return report
