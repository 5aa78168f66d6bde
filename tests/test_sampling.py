"""Sampling as llama.cpp samples: repeat penalty on recent tokens, then top-k, top-p and temperature."""

from __future__ import annotations

import numpy as np

from lora_runtime.llm.generate import _pick, _safe_end

LOGITS = np.array([2.0, 1.9, -1.0, 0.5, -3.0], np.float32)


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    rng = np.random.default_rng(0)
    assert _pick(LOGITS, 0.0, 1.0, rng) == 0
    assert _pick(LOGITS, 0.0, 1.0, rng, penalty=2.0, recent=[0]) == 1  # 2.0 / 2 < 1.9
    assert _pick(LOGITS, 0.0, 1.0, rng, penalty=1.0, recent=[0]) == 0  # 1: off
    negative = np.array([-1.0, -1.5], np.float32)
    assert _pick(negative, 0.0, 1.0, rng) == 0
    assert _pick(negative, 0.0, 1.0, rng, penalty=2.0, recent=[0]) == 1  # -1 * 2 < -1.5
    assert LOGITS[0] == 2.0 and negative[0] == -1.0  # the caller's logits are not modified


def test_top_k_keeps_only_the_k_likeliest():
    seen = {_pick(LOGITS, 5.0, 1.0, np.random.default_rng(s), top_k=2) for s in range(200)}
    assert seen == {0, 1}
    assert {_pick(LOGITS, 5.0, 1.0, np.random.default_rng(s), top_k=1) for s in range(50)} == {0}
    assert len({_pick(LOGITS, 5.0, 1.0, np.random.default_rng(s)) for s in range(300)}) == 5  # all, without k


def test_stop_strings_hold_back_only_a_possible_beginning():
    assert _safe_end("Hello EN", ["END"]) == len("Hello ")
    assert _safe_end("Hello E", ["END", "\n\n"]) == len("Hello ")
    assert _safe_end("Hello\n", ["\n\n"]) == len("Hello")
    assert _safe_end("Hello", ["END"]) == len("Hello")
