"""Text generation from a bundle of an imported LLM: prefill, then one token per run with the KV cache
(``lora_runtime.llm.cache``: a growing cache, or the static one of a static-cache import).

Generation runs the bundle's graph through :class:`lora_runtime.Runtime`. The cache belongs to one
request: a use-case switch between requests starts the next one from an empty cache (keys and values
computed under another adapter would be stale).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lora_runtime.bundle import Bundle
from lora_runtime.errors import InputError
from lora_runtime.llm.cache import make_cache
from lora_runtime.llm.chat import Chat
from lora_runtime.runtime.session import make_session
from lora_runtime.runtime.switcher import Runtime


@dataclass(frozen=True)
class Generation:
    text: str
    ids: list[int]
    prompt_tokens: int
    prefill_ms: float
    decode_ms_per_token: float


def generate(rt: Runtime, chat: Chat, prompt: str | list[dict[str, str]] | list[int], *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             on_text: Callable[[str], None] | None = None) -> Generation:
    """Greedy (temperature 0) or sampled decoding of the current use-case, streaming text to ``on_text``.

    ``prompt``: raw text, chat messages (rendered with ChatML), or token ids.
    """
    if not (math.isfinite(temperature) and temperature >= 0) or not 0 < top_p <= 1 or max_new_tokens < 0:
        raise InputError(f"need a finite temperature >= 0 (got {temperature}), 0 < top_p <= 1 (got {top_p}) and "
                         f"max_new_tokens >= 0 (got {max_new_tokens})")
    if isinstance(prompt, str):
        ids = chat.encode(prompt)
    elif prompt and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
    else:
        ids = chat.prompt_ids(prompt)
    if not ids:
        raise InputError("the prompt encodes to no tokens")
    if len(ids) + max_new_tokens > chat.max_seq:
        raise InputError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceed the model's "
                         f"{chat.max_seq} positions")
    rng = np.random.default_rng(None if seed is None or seed < 0 else seed)  # -1: random, as llama.cpp's
    shapes = rt.input_shapes
    lengths = [s["input_ids"][1] if isinstance(s["input_ids"][1], int) else None for s in shapes]
    cache = make_cache(shapes[0], lengths)
    out_ids: list[int] = []
    shown = ""
    t0 = time.perf_counter()
    for chunk in cache.chunks(ids):
        logits = cache.step(rt.run, chunk)
    t_decode = time.perf_counter()
    for step in range(max_new_tokens):
        if step:
            logits = cache.step(rt.run, [out_ids[-1]])
        nxt = _pick(logits[-1], temperature, top_p, rng)
        if nxt == chat.eos_id:
            break
        out_ids.append(nxt)
        if on_text is not None:
            full = chat.decode(out_ids)
            if not full.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                on_text(full[len(shown):])
                shown = full
    end = time.perf_counter()
    decoded = max(len(out_ids) - 1, 0)
    return Generation(chat.decode(out_ids), out_ids, len(ids), (t_decode - t0) * 1e3,
                      (end - t_decode) * 1e3 / decoded if decoded else 0.0)


def _pick(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
    q = p[keep] / p[keep].sum()
    return int(rng.choice(keep, p=q))


# Held-out chat prompts (none is a calibration prompt) for the greedy-token agreement of quantized bundles.
GREEDY_PROMPTS = (
    "What is the tallest mountain in Europe?", "Give me three tips for better sleep.",
    "How does a refrigerator keep food cold?", "Write one sentence about autumn leaves.",
)


def greedy_runs(bundle: Bundle, chat: Chat, use_cases: Sequence[str], *, prompts: Sequence[str] = GREEDY_PROMPTS,
                tokens: int = 16) -> dict[str, list[list[int]]]:
    """The first ``tokens`` greedy tokens of each prompt (a ChatML user turn) under each use-case."""
    decode = make_session(bundle, graph="decode") if bundle.manifest.target.decode is not None else None
    rt = Runtime(bundle, make_session(bundle), decode=decode)
    out = {}
    for u in use_cases:
        rt.switch(u)
        out[u] = [generate(rt, chat, [{"role": "user", "content": p}], max_new_tokens=tokens).ids for p in prompts]
    return out
