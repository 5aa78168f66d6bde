"""How apps talk to the model. Server overhead: the same greedy answer through ``generate`` and through
``lora-runtime serve`` (HTTP, JSON, the per-step use-case lock), interleaved in one run; skipped with the reason
when the [serve] extra is missing. A chat turn: the third turn's first token with the KV cache of the first
two kept (``PromptCache``, as ``chat`` runs) and from an empty cache."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from lora_runtime.bench.timing import Row, measure_interleaved
from lora_runtime.llm import Chat, PromptCache, generate
from lora_runtime.runtime.switcher import Runtime

TOKENS = 32
QUESTION = [{"role": "user", "content": "Give me three tips for better sleep."}]
TURNS = ("Give me three tips for better sleep.", "Which of them matters most, and why?", "Summarize that in one line.")


def turn_rows(bundle: Path, use_case: str, runs: int, answer_tokens: int = 48) -> tuple[list[Row], dict]:
    """Rows ``turn_kept`` and ``turn_fresh``: the third chat turn's prefill and first token, with the KV cache of
    turns one and two kept and from an empty cache; and the conversation's token counts."""
    rt, chat = Runtime.open(bundle), Chat.load(bundle)
    rt.switch(use_case)
    cache, talk = PromptCache(), []
    for question in TURNS[:2]:
        talk.append({"role": "user", "content": question})
        g = generate(rt, chat, talk, max_new_tokens=answer_tokens, cache=cache)
        talk.append({"role": "assistant", "content": g.text})
    held = cache.cache.length  # what the cache holds after turn two: its prompt and answer
    talk.append({"role": "user", "content": TURNS[2]})

    def kept() -> None:
        cache.cache.truncate(held)  # as it was after turn two
        generate(rt, chat, talk, max_new_tokens=1, cache=cache)

    rows = measure_interleaved({"turn_kept": kept, "turn_fresh": lambda: generate(rt, chat, talk, max_new_tokens=1)},
                               runs, block=2)
    cache.cache.truncate(held)
    g = generate(rt, chat, talk, max_new_tokens=1, cache=cache)
    return rows, {"prompt_tokens": g.prompt_tokens, "cached_tokens": g.cached_tokens}


def serve_rows(bundle: Path, use_case: str, runs: int) -> tuple[list[Row], str | None]:
    """Rows ``answer_generate`` and ``answer_serve`` (one answer of TOKENS tokens each), or why they are missing."""
    try:
        import uvicorn  # noqa: F401

        from lora_runtime.serve import in_background, make_app
    except ImportError as e:
        return [], f"serve rows skipped: {e} (pip install 'lora_runtime[serve]')"
    rt, chat = Runtime.open(bundle), Chat.load(bundle)
    rt.switch(use_case)
    body = json.dumps({"model": use_case, "messages": QUESTION, "max_tokens": TOKENS, "temperature": 0,
                       "stop": []}).encode()
    with in_background(make_app(bundle)) as url:

        def over_http() -> None:
            req = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req) as r:
                json.loads(r.read())

        rows = measure_interleaved({"answer_generate": lambda: generate(rt, chat, QUESTION, max_new_tokens=TOKENS),
                                    "answer_serve": over_http}, runs, block=2)
    return rows, None
