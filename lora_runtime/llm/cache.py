"""The KV cache a generation loop keeps between runs, in the three shapes an imported LLM's graph can take.

In-place cache (``import-model --graph ort``, the default with kept blocks; ONNX Runtime's GroupQueryAttention)::

    feeds  input_ids (1, T), seqlens_k (1,) = held + T - 1, total_sequence_length () = held + T
    bound  past_key.<i> and present_key.<i>: one buffer (1, KV, capacity, hd) per layer, bound once; the graph
           writes the new tokens' keys and values into it, nothing is copied per run

Growing cache (the standard graph; ONNX Runtime's plain shape)::

    feeds  input_ids (1, T), past_key.<i> (1, KV, past, hd)      outputs present_key.<i> (1, KV, past+T, hd)

Static cache (``import-model --static-cache C``; what an accelerator deploys, QAIRT Genie's shape)::

    feeds  input_ids (1, T), position_ids (1, T), past_bias (1, 1, 1, C), past_key.<i> (1, KV, C, hd)
    outputs present_key.<i> (1, KV, T, hd): the new tokens only, written into their slots by the caller

A graph compiled with static shapes takes a fixed T: a prefill graph (T = N) and a decode graph (T = 1). The
static cache feeds a prompt in chunks of the largest T a graph takes (the last one padded: padding comes
after the real tokens, which attend causally, so it changes nothing they compute, and its keys are not
kept), then one token per run with the smallest.

Both remember the tokens they hold (``ids``) and can be cut back to a prefix (``truncate``): the next chat
turn's prompt begins with the tokens of the last one, so only its new tokens need a run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from lora_runtime.errors import InputError
from lora_runtime.models.llama import MASK, SEQLENS_K, TOTAL_LENGTH

PAST_BIAS, POSITIONS = "past_bias", "position_ids"


def _kv_names(inputs: Sequence[str]) -> list[str]:
    return [n for n in inputs if n.startswith(("past_key.", "past_value."))]


class GrowingCache:
    """``past`` grows by the tokens of each run (one graph, free ``sequence`` and ``past`` dims)."""

    def __init__(self, inputs: Mapping[str, Sequence[object]]) -> None:
        self._past = {n: np.zeros(_with_len(inputs[n], 0), np.float32) for n in _kv_names(list(inputs))}
        self.ids: list[int] = []
        self.capacity: int | None = None

    @property
    def length(self) -> int:
        return len(self.ids)

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tokens' keys and values only."""
        self._past = {k: v[:, :, :n] for k, v in self._past.items()}
        del self.ids[n:]

    def chunks(self, ids: Sequence[int]) -> list[list[int]]:
        return [list(ids)]

    def step(self, run, ids: Sequence[int]) -> np.ndarray:  # noqa: ANN001  (Runtime.run)
        """Run ``ids`` after the cached tokens; keep their keys and values; return their logits (T, vocab)."""
        out = run({"input_ids": np.array([ids], np.int64)} | self._past)
        self._past = {n: out[n.replace("past_", "present_")] for n in self._past}
        self.ids.extend(ids)
        return out["logits"][0]


class InPlaceCache:
    """One buffer per KV input, ``capacity`` tokens long, bound as both ``past_*`` and ``present_*``."""

    def __init__(self, inputs: Mapping[str, Sequence[object]], capacity: int) -> None:
        self.capacity = capacity
        self._buffers: dict[str, ort.OrtValue] = {}
        for n in _kv_names(list(inputs)):
            self._buffers[n] = ort.OrtValue.ortvalue_from_numpy(np.zeros(_with_len(inputs[n], capacity), np.float32))
            self._buffers[n.replace("past_", "present_")] = self._buffers[n]
        self.ids: list[int] = []

    @property
    def length(self) -> int:
        return len(self.ids)

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tokens: later ones are written again by later runs, never read before."""
        del self.ids[n:]

    def chunks(self, ids: Sequence[int]) -> list[list[int]]:
        return [list(ids)]

    def step(self, run, ids: Sequence[int]) -> np.ndarray:  # noqa: ANN001  (Runtime.run)
        """Run ``ids`` after the held tokens (their keys and values written into the buffers); their logits."""
        total = self.length + len(ids)
        if total > self.capacity:
            raise InputError(f"the KV cache holds {self.capacity} tokens; {self.length} are used and {len(ids)} "
                             "more do not fit")
        out = run({"input_ids": np.array([ids], np.int64), SEQLENS_K: np.array([total - 1], np.int32),
                   TOTAL_LENGTH: np.array(total, np.int32)}, buffers=self._buffers)
        self.ids.extend(ids)
        return out["logits"][0]


class StaticCache:
    """C slots per layer, filled in order; ``lengths``: the token counts the runtime's graphs take (None: any)."""

    def __init__(self, inputs: Mapping[str, Sequence[object]], lengths: Sequence[int | None]) -> None:
        kv = _kv_names(list(inputs))
        self.capacity = int(inputs[PAST_BIAS][-1])
        self._cache = {n: np.zeros(_with_len(inputs[n], self.capacity), np.float32) for n in kv}
        self._bias = np.full((1, 1, 1, self.capacity), MASK, np.float32)
        fixed = sorted({n for n in lengths if n is not None})
        self._free = None in lengths
        self._largest = fixed[-1] if fixed else None
        self._fixed = fixed
        self.ids: list[int] = []

    @property
    def length(self) -> int:
        return len(self.ids)

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tokens only: later slots are masked (and written again by later steps)."""
        self._bias[..., n:] = MASK
        del self.ids[n:]

    def chunks(self, ids: Sequence[int]) -> list[list[int]]:
        """The prompt in runs: whole when a graph takes any length, else chunks of the largest fixed length."""
        if self._free or self._largest is None:
            return [list(ids)]
        n = self._largest
        return [list(ids[i:i + n]) for i in range(0, len(ids), n)]

    def feeds(self, ids: Sequence[int]) -> dict[str, np.ndarray]:
        """The graph inputs that run ``ids`` after the cached tokens, padded to the smallest length a graph
        takes that holds them (the cache's arrays, not copies: run them before the next :meth:`step`)."""
        t = len(ids)
        if self.length + t > self.capacity:
            raise InputError(f"the static KV cache holds {self.capacity} tokens; {self.length} are used and "
                             f"{t} more do not fit")
        width = t if self._free else next((n for n in self._fixed if n >= t), None)
        if width is None:
            raise InputError(f"no graph of this bundle takes {t} tokens (its graphs take {self._fixed})")
        padded = list(ids) + [0] * (width - t)
        positions = [min(self.length + i, self.capacity - 1) for i in range(width)]
        return {"input_ids": np.array([padded], np.int64), POSITIONS: np.array([positions], np.int64),
                PAST_BIAS: self._bias.copy()} | self._cache

    def step(self, run, ids: Sequence[int]) -> np.ndarray:  # noqa: ANN001  (Runtime.run)
        """Run ``ids`` after the cached tokens; write their keys and values into the next slots; return their
        logits (len(ids), vocab)."""
        t = len(ids)
        out = run(self.feeds(ids))
        for n, slots in self._cache.items():
            slots[:, :, self.length:self.length + t] = out[n.replace("past_", "present_")][:, :, :t]
        self._bias[..., self.length:self.length + t] = 0.0
        self.ids.extend(ids)
        return out["logits"][0, :t]


def make_cache(graphs: Sequence[Mapping[str, Sequence[object]]], capacity: int | None = None) -> KVCache:
    """The cache for a runtime's graphs (``Runtime.input_shapes``: per graph, input name -> shape, the main graph
    first); each graph's ``input_ids`` length is the T it takes (None where it is free). ``capacity``: the
    model's positions (an in-place cache's buffers are that long; pages never written cost no memory)."""
    if SEQLENS_K in graphs[0]:
        if capacity is None:
            raise InputError("an in-place KV cache (a graph with seqlens_k) needs the model's positions (capacity)")
        return InPlaceCache(graphs[0], capacity)
    lengths = [t if isinstance(t := g["input_ids"][1], int) else None for g in graphs]
    return StaticCache(graphs[0], lengths) if PAST_BIAS in graphs[0] else GrowingCache(graphs[0])


def _with_len(shape: Sequence[object], n: int) -> tuple[int, ...]:
    """A KV input's shape (1, KV, len, hd) with its length set to ``n``."""
    return tuple(n if i == 2 else int(d) for i, d in enumerate(shape))  # type: ignore[arg-type]


def next_step(feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The feeds of the one-token step after a static-cache run of ``feeds`` that gave ``outputs``: its keys and
    values written into the next slots, its greedy token at the next position."""
    ids = np.asarray(feeds["input_ids"])
    t = ids.shape[1]
    bias = np.array(feeds[PAST_BIAS], np.float32)
    filled = int(np.count_nonzero(bias[0, 0, 0] == 0.0))
    if filled + t + 1 > bias.shape[-1]:
        raise InputError(f"the static KV cache holds {bias.shape[-1]} tokens: no room for a step after {filled + t}")
    step = {"input_ids": np.array([[int(np.argmax(outputs["logits"][0, -1]))]], np.int64),
            POSITIONS: np.asarray(feeds[POSITIONS])[:, -1:] + 1}
    for name in _kv_names(list(feeds)):
        cache = np.array(feeds[name], np.float32)
        cache[:, :, filled:filled + t] = outputs[name.replace("past_", "present_")][:, :, :t]
        step[name] = cache
    bias[..., filled:filled + t] = 0.0
    return step | {PAST_BIAS: bias}


KVCache = GrowingCache | StaticCache | InPlaceCache
