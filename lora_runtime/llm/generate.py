"""Text generation from a bundle of an imported LLM: prefill, then one token per run with the KV cache
(``lora_runtime.llm.cache``: a growing cache, or the static one of a static-cache import).

Generation runs the bundle's graph through :class:`lora_runtime.Runtime`. A :class:`PromptCache` keeps
the KV cache of one generation for the next (the turns of a chat): the next prompt's tokens that it
already holds are not run again, as long as the use-case and strengths are the same (keys and values
computed under another adapter would be stale: then the cache starts empty).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lora_runtime import sampling
from lora_runtime.bundle import Bundle, manifest_stamp
from lora_runtime.errors import BundleError, InputError, LoraRuntimeError
from lora_runtime.llm.cache import KVCache, make_cache
from lora_runtime.llm.chat import Chat
from lora_runtime.runtime.session import make_session
from lora_runtime.runtime.switcher import OPEN_ATTEMPTS, Runtime


@dataclass(frozen=True)
class Generation:
    text: str
    ids: list[int]
    prompt_tokens: int
    prefill_ms: float
    decode_ms_per_token: float
    finish: str = "stop"  # "stop": the end token or a stop string; "length": max_new_tokens reached
    cached_tokens: int = 0  # prompt tokens whose keys and values a PromptCache already held (not run again)


class PromptCache:
    """The KV cache of the last generation, for the next one: pass the same object to each turn's
    :func:`generate`. It is used only under the use-case and strengths it was computed with, and only for the
    longest common prefix of the token ids (so an edited or trimmed conversation is handled too)."""

    def __init__(self) -> None:
        self.cache: KVCache | None = None
        self.key: tuple | None = None

    def take(self, rt: Runtime, ids: Sequence[int], capacity: int) -> tuple[KVCache, int]:
        """A cache for ``ids`` and how many of their first tokens it holds (at most all but the last: the
        last token's run gives the logits of the answer's first)."""
        key = (rt, rt.current, tuple(sorted(rt.strengths.items())))  # the runtime itself: an id can be reused
        if self.cache is None or self.key is None or key[0] is not self.key[0] or key[1:] != self.key[1:]:
            self.cache, self.key = make_cache(rt.input_shapes, capacity), key
        held = self.cache.ids
        n = next((i for i, (a, b) in enumerate(zip(held, ids)) if a != b), min(len(held), len(ids)))
        n = min(n, len(ids) - 1)
        self.cache.truncate(n)
        return self.cache, n

    def clear(self) -> None:
        self.cache = self.key = None


def generate(rt: Runtime, chat: Chat, prompt: str | list[dict[str, str]] | list[int], *, max_new_tokens: int = 64,
             temperature: float = sampling.TEMPERATURE, top_p: float = sampling.TOP_P, seed: int | None = None,
             on_text: Callable[[str], None] | None = None, stop: Sequence[str] = (),
             run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None, top_k: int = sampling.TOP_K,
             repeat_penalty: float = sampling.REPEAT_PENALTY, repeat_last_n: int = sampling.REPEAT_LAST_N,
             cache: PromptCache | None = None) -> Generation:
    """Greedy (temperature 0) or sampled decoding of the current use-case, streaming text to ``on_text``.

    ``prompt``: raw text, chat messages (rendered with the model's chat template), or token ids. ``stop``:
    strings that end the answer (not included). ``run``: what runs the graph (default ``rt.run``; a server
    passes one that runs each step under its request's use-case). Sampling as llama.cpp's: ``repeat_penalty``
    divides positive (multiplies negative) logits of the last ``repeat_last_n`` tokens, then ``top_k`` (0: all),
    ``top_p`` and ``temperature``. ``cache``: a :class:`PromptCache` kept between the turns of a conversation
    (only with the default ``run``: the runtime's current use-case is the one the cache is checked against).
    """
    bad = [f"{name} {value}" for name, value, ok in (
        ("temperature", temperature, math.isfinite(temperature) and temperature >= 0),
        ("top_p", top_p, 0 < top_p <= 1), ("max_new_tokens", max_new_tokens, max_new_tokens >= 0),
        ("top_k", top_k, top_k >= 0), ("repeat_penalty", repeat_penalty,
                                       math.isfinite(repeat_penalty) and repeat_penalty > 0),
        ("repeat_last_n", repeat_last_n, repeat_last_n >= 0)) if not ok]
    if bad:
        raise InputError(f"{', '.join(bad)}: need a finite temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 0, "
                         "top_k >= 0, a finite repeat_penalty > 0 and repeat_last_n >= 0")
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
    if cache is not None and run is not None:
        raise InputError("a PromptCache needs the runtime's own run (the cache is checked against its use-case)")
    rng = np.random.default_rng(None if seed is None or seed < 0 else seed)  # -1: random, as llama.cpp's

    def pick(logits: np.ndarray, answer: list[int]) -> int:
        recent = (ids + answer)[-repeat_last_n:] if repeat_penalty != 1.0 and repeat_last_n else []
        return _pick(logits, temperature, top_p, rng, top_k, repeat_penalty, recent)

    kv, held = (cache.take(rt, ids, chat.max_seq) if cache is not None  # room for the turns to come
                else (make_cache(rt.input_shapes, len(ids) + max_new_tokens), 0))
    try:
        return _decode(kv, run or rt.run, chat, ids, held, max_new_tokens, pick, on_text, stop)
    except BaseException:
        if cache is not None:
            cache.clear()  # stopped half-way (Ctrl-C, a failed run): which tokens it holds is not known
        raise


def _decode(kv: KVCache, run: Callable, chat: Chat, ids: list[int], held: int,
            max_new_tokens: int, pick: Callable[[np.ndarray, list[int]], int],  # (logits, the answer so far)
            on_text: Callable[[str], None] | None, stop: Sequence[str]) -> Generation:
    """Prefill ``ids`` after the ``held`` tokens already in ``kv``, then decode."""
    out_ids: list[int] = []
    shown = ""
    finish, text = "length", ""
    t0 = time.perf_counter()
    for chunk in kv.chunks(ids[held:]):
        logits = kv.step(run, chunk)
    t_decode = time.perf_counter()
    for step in range(max_new_tokens):
        if step:
            logits = kv.step(run, [out_ids[-1]])
        nxt = pick(logits[-1], out_ids)
        if nxt == chat.eos_id:
            finish = "stop"
            break
        out_ids.append(nxt)
        text = chat.decode(out_ids)
        hit = min((text.find(x) for x in stop if x and x in text), default=-1)
        if hit >= 0:
            text, finish = text[:hit], "stop"
        if on_text is not None and not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            end = len(text) if hit >= 0 else _safe_end(text, stop)  # hold back what may begin a stop string
            if end > len(shown):
                on_text(text[len(shown):end])
                shown = text[:end]
        if hit >= 0:
            break
    if on_text is not None and len(text) > len(shown) and not text.endswith("\ufffd"):
        on_text(text[len(shown):])  # what was held back as a possible stop string's beginning
    end_t = time.perf_counter()
    decoded = max(len(out_ids) - 1, 0)
    return Generation(text, out_ids, len(ids), (t_decode - t0) * 1e3,
                      (end_t - t_decode) * 1e3 / decoded if decoded else 0.0, finish, held)


def _safe_end(text: str, stop: Sequence[str]) -> int:
    """How much of ``text`` can be shown: all but a tail that is the beginning of a stop string."""
    keep = 0
    for x in stop:
        for k in range(min(len(x) - 1, len(text)), 0, -1):
            if text.endswith(x[:k]):
                keep = max(keep, k)
                break
    return len(text) - keep


def _pick(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator, top_k: int = 0,
          penalty: float = 1.0, recent: Sequence[int] = ()) -> int:
    if penalty != 1.0 and len(recent):
        logits = logits.astype(np.float64)  # a copy
        seen = np.unique(np.asarray(recent, np.int64))
        logits[seen] = np.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
    if temperature == 0:
        return int(np.argmax(logits))
    if 0 < top_k < logits.size:
        cut = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits >= cut, logits, -np.inf)
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


def open_llm(path: str | os.PathLike[str], device: str = "cpu") -> tuple[Runtime, Chat]:
    """The runtime and the tokenizer of one and the same bundle, also while a compile --force replaces it."""
    for _ in range(OPEN_ATTEMPTS):
        rt = Runtime.open(path, device=device)
        try:
            chat = Chat.load(path)
        except LoraRuntimeError:
            if manifest_stamp(path) == rt.bundle.stamp:
                raise
            continue
        if manifest_stamp(path) == rt.bundle.stamp:
            return rt, chat
    raise BundleError(f"{path}: replaced while it was being opened, {OPEN_ATTEMPTS} times in a row; open it again")
