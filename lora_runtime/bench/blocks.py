"""Rows of ``bench --model smollm2`` for the GGUF's blocks kept (``import-model --weights blocks``), side by side
with the float32 import of the same file, in one interleaved run:

=========================  ======================================================================================
decode_f32 / _blocks0/4    one token at the chat prompt's context through the plain base graph: float32 import;
                           blocks kept at accuracy level 0 (float compute, the file's weights exactly) / level 4
                           (activations to 8-bit blocks, llama.cpp's arithmetic)
decode_qv8_f32 / ...       the same bases in a v3 bundle with ``listify`` active (r=8 on q/v of all 30 layers)
prefill_f32 / ...          the chat prompt through each plain base
open_f32 / ...             ``Runtime.open`` of each v3 bundle (page cache warm)
=========================  ======================================================================================

Accuracy of each blocks import against the float32 one (logit SQNR over the prompt, greedy tokens agreeing on
held-out prompts) goes in the report's ``accuracy_text``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lora_runtime.bench.timing import Row, measure, measure_interleaved
from lora_runtime.compiler.compile import compile_bundle
from lora_runtime.llm import GREEDY_PROMPTS, Chat, find_smollm2, import_gguf
from lora_runtime.metrics import prefix_agreement
from lora_runtime.runtime.switcher import Runtime

BASES = {"f32": ("float32", 0), "blocks0": ("blocks", 0), "blocks4": ("blocks", 4)}
GREEDY_TOKENS = 32


def _imported(folder: Path, weights: str, level: int) -> Path:
    """The SmolLM2 import of this kind in ``folder``, made once."""
    stamp = folder / "chat.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()).get("weights", "float32") == weights
            and (json.loads(stamp.read_text()).get("accuracy_level") or 0) == level):
        import_gguf(find_smollm2(), folder, max_seq=512, weights=weights, accuracy_level=level, force=True)
    return folder


def _greedy(sess: ort.InferenceSession, ids: list[int], n: int, eos: int) -> list[int]:
    names = [o.name for o in sess.get_outputs()]
    past = {i.name: np.zeros((1, 3, 0, 64), np.float32) for i in sess.get_inputs() if i.name.startswith("past_")}
    feeds, out = {"input_ids": np.array([ids], np.int64)} | past, []
    for _ in range(n):
        res = dict(zip(names, sess.run(None, feeds)))
        out.append(int(res["logits"][0, -1].argmax()))
        if out[-1] == eos:
            break
        feeds = {"input_ids": np.array([[out[-1]]], np.int64)} | {
            k.replace("present_", "past_"): v for k, v in res.items() if k.startswith("present_")}
    return out


def blocks_rows(work: Path, float_model: Path, adapter: Path, prompt: list[dict[str, str]], reps: int
                ) -> tuple[list[Row], dict[str, dict[str, str]], dict[str, float]]:
    """(rows, accuracy text, ratios) for the three imports; ``float_model`` is the bench's float32 import."""
    models = {k: float_model if k == "f32" else _imported(work / f"model-{k}", *v) for k, v in BASES.items()}
    chat = Chat.load(float_model)
    ids = chat.prompt_ids(prompt)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sessions = {k: ort.InferenceSession(str(m / "base.onnx"), so, providers=["CPUExecutionProvider"])
                for k, m in models.items()}
    bundles = {k: compile_bundle(m / "base.onnx", {"listify": adapter}, work / f"b-qv8-{k}", generation="v3",
                                 use_cases=["listify=listify"], force=True) for k, m in models.items()}
    rows: list[Row] = []
    runtimes = {}
    for k, b in bundles.items():
        t = time.perf_counter()
        runtimes[k] = Runtime.open(b.path)
        rows.append(Row(f"open_{k}", (time.perf_counter() - t) * 1e6, None, 1, None))
        runtimes[k].switch("listify")
    empty = np.zeros((1, chat.kv_heads, 0, chat.head_dim), np.float32)
    prefill = {"input_ids": np.array([ids], np.int64)} | {
        i.name: empty for i in sessions["f32"].get_inputs() if i.name.startswith("past_")}

    def decoder(run, names):  # noqa: ANN001, ANN202  (one token at the prompt's context, the same every time)
        out = dict(zip(names, run(prefill)))
        step = {"input_ids": np.array([[int(out["logits"][0, -1].argmax())]], np.int64)} | {
            n.replace("present_", "past_"): v for n, v in out.items() if n.startswith("present_")}
        return lambda: run(step)

    runners = {}
    for k, s in sessions.items():
        names = [o.name for o in s.get_outputs()]
        runners[f"decode_{k}"] = decoder(lambda f, s=s: s.run(None, f), names)
        rt = runtimes[k]
        runners[f"decode_qv8_{k}"] = decoder(lambda f, rt=rt: list(rt.run(f).values()), names)
        rows.append(measure(f"prefill_{k}", lambda s=s: s.run(None, prefill), max(reps // 4, 3), warmup=1))
    rows += measure_interleaved(runners, reps, block=5)
    by = {r.name: r for r in rows}
    ref_logits = sessions["f32"].run(["logits"], prefill)[0].astype(np.float64)
    prompts = [chat.prompt_ids([{"role": "user", "content": p}]) for p in GREEDY_PROMPTS]
    ref_greedy = [_greedy(sessions["f32"], p, GREEDY_TOKENS, chat.eos_id) for p in prompts]
    accuracy = {}
    for k in ("blocks0", "blocks4"):
        got = sessions[k].run(["logits"], prefill)[0]
        sqnr = 10 * np.log10(np.sum(ref_logits ** 2) / np.sum((got - ref_logits) ** 2))
        greedy = prefix_agreement(ref_greedy, [_greedy(sessions[k], p, GREEDY_TOKENS, chat.eos_id) for p in prompts],
                                  GREEDY_TOKENS)
        accuracy[f"decode_{k} vs the float32 import: logit SQNR dB / greedy tokens agreeing "
                 f"({len(prompts)} prompts x {GREEDY_TOKENS})"] = {"base": f"{sqnr:.1f} / {greedy:.0%}"}
    ratios = {f"decode_{k} / decode_f32": by[f"decode_{k}"].p50_us / by["decode_f32"].p50_us
              for k in ("blocks0", "blocks4")}
    ratios |= {f"decode_qv8_{k} / decode_{k}": by[f"decode_qv8_{k}"].p50_us / by[f"decode_{k}"].p50_us
               for k in BASES}
    ratios |= {f"prefill_{k} / prefill_f32": by[f"prefill_{k}"].p50_us / by["prefill_f32"].p50_us
               for k in ("blocks0", "blocks4")}
    return rows, accuracy, ratios
