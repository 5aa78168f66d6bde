"""Greedy-token agreement of an imported LLM's bundle with a reference bundle, on held-out chat prompts."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import onnxruntime as ort

from lora_runtime.bundle import Bundle
from lora_runtime.eval.accuracy import LogitsScore
from lora_runtime.llm.cache import make_cache
from lora_runtime.llm.chat import Chat
from lora_runtime.llm.generate import GREEDY_PROMPTS, generate, greedy_runs
from lora_runtime.metrics import prefix_agreement
from lora_runtime.runtime.switcher import Runtime

GREEDY_TOKENS = 16  # how many of the first greedy tokens are compared


def greedy_agreement(reference: Mapping[str, list[list[int]]], test: Bundle, chat: Chat, use_cases: Sequence[str],
                     *, session: ort.InferenceSession | None = None, step: Callable[[str], None] | None = None
                     ) -> dict[str, float]:
    """Per use-case, the mean share of the first ``GREEDY_TOKENS`` greedy tokens of ``test`` that agree with
    ``reference`` (from :func:`reference_tokens`) before the first difference."""
    runs = reference_tokens(test, chat, use_cases, session=session, step=step)
    return {u: prefix_agreement(reference[u], runs[u], GREEDY_TOKENS) for u in use_cases}


def reference_tokens(bundle: Bundle, chat: Chat, use_cases: Sequence[str], *,
                     session: ort.InferenceSession | None = None, step: Callable[[str], None] | None = None
                     ) -> dict[str, list[list[int]]]:
    """The first ``GREEDY_TOKENS`` greedy tokens of each held-out prompt per use-case (``greedy_runs``), through
    ``session`` when given (a bundle with one graph: a decode graph has sessions of its own); ``step`` is told the
    use-case after each prompt (with a decode graph, after each use-case's prompts)."""
    if session is None or bundle.manifest.target.decode is not None:
        runs = greedy_runs(bundle, chat, use_cases, tokens=GREEDY_TOKENS)
        for u in use_cases if step else ():
            step(u)
        return runs
    rt = Runtime(bundle, session)
    out: dict[str, list[list[int]]] = {}
    for u in use_cases:
        rt.switch(u)
        out[u] = []
        for p in GREEDY_PROMPTS:
            out[u].append(generate(rt, chat, [{"role": "user", "content": p}], max_new_tokens=GREEDY_TOKENS).ids)
            if step:
                step(u)
    return out


def greedy_count(use_cases: Sequence[str]) -> int:
    """How many greedy generations :func:`reference_tokens` runs."""
    return len(GREEDY_PROMPTS) * len(use_cases)


def described() -> str:
    return f"{len(GREEDY_PROMPTS)} prompts x {GREEDY_TOKENS} tokens"


def prompt_scores(test: Bundle, reference: Bundle, chat: Chat, use_cases: Sequence[str], *,
                  test_session: ort.InferenceSession, reference_session: ort.InferenceSession,
                  step: Callable[[str], None] | None = None) -> dict[str, LogitsScore]:
    """Per use-case, the logits of each held-out chat prompt (a user turn in the chat template, one prefill, an empty
    KV cache) of ``test`` scored against ``reference``'s: what an imported LLM is measured on without calibration
    samples (random token ids say little of a language model). Bundles with one graph; ``step`` is told the use-case
    after each prompt of each bundle."""
    prompts = [chat.prompt_ids([{"role": "user", "content": p}]) for p in GREEDY_PROMPTS]
    rts = Runtime(reference, reference_session), Runtime(test, test_session)
    out = {}
    for u in use_cases:
        out[u] = score = LogitsScore()
        for rt in rts:
            rt.switch(u)
        for ids in prompts:
            got = []
            for rt in rts:
                kv = make_cache(rt.input_shapes, chat.max_seq)
                got.append(kv.step(rt.run, ids))
                if step:
                    step(u)
            score.add(*got)
    return out
