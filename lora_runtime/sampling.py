"""Sampling defaults, one place for ``generate``, the CLI's llama.cpp-style flags and ``serve``'s request defaults:
llama.cpp's meanings (temperature 0: greedy; top_k 0: all tokens; repeat_penalty 1: off; seed -1: random)."""

from __future__ import annotations

TEMPERATURE = 0.0
TOP_K = 0
TOP_P = 1.0
REPEAT_PENALTY = 1.0
REPEAT_LAST_N = 64
SEED = -1
