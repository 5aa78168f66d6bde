"""Greedy-token agreement of an imported LLM's bundle with a reference bundle, on held-out chat prompts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lora_runtime.bundle import Bundle
from lora_runtime.llm.chat import Chat
from lora_runtime.llm.generate import GREEDY_PROMPTS, greedy_runs
from lora_runtime.metrics import prefix_agreement

GREEDY_TOKENS = 16  # how many of the first greedy tokens are compared


def greedy_agreement(reference: Mapping[str, list[list[int]]], test: Bundle, chat: Chat, use_cases: Sequence[str]
                     ) -> dict[str, float]:
    """Per use-case, the mean share of the first ``GREEDY_TOKENS`` greedy tokens of ``test`` that agree with
    ``reference`` (from :func:`reference_tokens`) before the first difference."""
    runs = greedy_runs(test, chat, use_cases, tokens=GREEDY_TOKENS)
    return {u: prefix_agreement(reference[u], runs[u], GREEDY_TOKENS) for u in use_cases}


def reference_tokens(bundle: Bundle, chat: Chat, use_cases: Sequence[str]) -> dict[str, list[list[int]]]:
    return greedy_runs(bundle, chat, use_cases, tokens=GREEDY_TOKENS)


def described() -> str:
    return f"{len(GREEDY_PROMPTS)} prompts x {GREEDY_TOKENS} tokens"
