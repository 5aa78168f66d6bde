"""Calibration samples for an imported LLM: built-in chat prompts, tokenized, with empty KV caches."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from lora_runtime.errors import InputError
from lora_runtime.llm.cache import PAST_BIAS, POSITIONS
from lora_runtime.llm.chat import Chat
from lora_runtime.models.llama import MASK
from lora_runtime.names import GRAPH
from lora_runtime.staging import check_new_file, new_file

# A small built-in prompt list for calibration: varied chat requests (facts, advice, lists, code, prose).
# Each calibration sample starts with its own prompt, so at most len(CALIBRATION_PROMPTS) distinct samples.
CALIBRATION_PROMPTS = (
    "What is the capital of Australia?", "Explain photosynthesis to a ten-year-old.",
    "Give me three tips for a good job interview.", "Write a Python function that reverses a string.",
    "Summarize the plot of Romeo and Juliet in two sentences.", "How do vaccines train the immune system?",
    "List five fruits that are rich in vitamin C.", "What causes the seasons on Earth?",
    "Translate 'good morning, how are you?' into French.", "Write a short poem about the sea at night.",
    "What is the difference between a virus and a bacterium?", "How do I boil an egg so the yolk stays soft?",
    "Explain what a hash table is and when to use one.", "Why is the sky blue?",
    "Suggest a name for a bakery that sells sourdough bread.", "What are the main causes of inflation?",
    "How does a bicycle stay upright when it moves?", "Write an email asking my manager for a day off.",
    "What is the Pythagorean theorem? Give an example.", "Describe the water cycle step by step.",
    "Recommend three classic novels and say why.", "How do I convert Celsius to Fahrenheit?",
    "What were the main causes of the First World War?", "Explain recursion with a simple example.",
    "Plan a one-day trip to Rome for a first-time visitor.", "What does a cell's mitochondrion do?",
    "Write a limerick about a cat who loves cheese.", "How can I save money on groceries?",
    "What is machine learning, in plain words?", "Why do leaves change color in the fall?",
    "Give me a recipe for a simple tomato pasta sauce.", "How does compound interest work?",
)


def calibration_data(folder: str | os.PathLike[str], out: str | os.PathLike[str], *, samples: int = 16,
                     seq_len: int = 64, seed: int = 0, force: bool = False) -> Path:
    """Calibration samples for an imported LLM: chat prompts of the built-in list, tokenized and cut to
    ``seq_len`` tokens (shorter ones are padded with the next prompts), with empty KV caches. Each sample
    starts with a prompt of its own (no two samples repeat, so held-out samples are not calibration ones).
    A static-cache model gets its positions and an empty, masked cache: the prefill graph's first chunk (the
    encodings of the cache inputs are tied to the keys and values the graph writes, so they need no samples)."""
    if not 1 <= samples <= len(CALIBRATION_PROMPTS):
        raise InputError(f"calibration-data makes 1 to {len(CALIBRATION_PROMPTS)} samples from its built-in prompt "
                         f"list, not {samples}; for more, write your own .npz (keys: the graph's inputs)")
    if seq_len < 1:
        raise InputError(f"seq_len must be at least 1, got {seq_len}")
    check_new_file(out, force=force)  # refused before any work
    chat = Chat.load(folder)
    if seq_len > chat.max_seq:
        raise InputError(f"seq_len {seq_len} exceeds the model's context of {chat.max_seq} positions")
    graph = _graph(Path(folder))
    if any(i.name == "seqlens_k" for i in graph.input):
        raise InputError(f"{folder}: an ort-graph import (GroupQueryAttention) takes no calibration samples here: "
                         "--encodings needs the standard graph and kept blocks need none; import with --graph standard")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(CALIBRATION_PROMPTS))
    rows = []
    for i in range(samples):
        ids: list[int] = []
        k = i
        while len(ids) < seq_len:  # pad with the next prompts of the shuffled list
            ids += chat.encode(chat.prompt([{"role": "user", "content": CALIBRATION_PROMPTS[order[k % len(order)]]}]))
            k += 1
        rows.append(ids[:seq_len])
    names = [i.name for i in graph.input]
    arrays = {"input_ids": np.array(rows, np.int64)[:, None, :]}
    slots = 0
    if PAST_BIAS in names:  # a static cache: C empty slots, masked
        bias = next(i for i in graph.input if i.name == PAST_BIAS)
        slots = bias.type.tensor_type.shape.dim[-1].dim_value
        if seq_len > slots:
            raise InputError(f"seq_len {seq_len} exceeds the static KV cache's {slots} slots")
        arrays[POSITIONS] = np.broadcast_to(np.arange(seq_len, dtype=np.int64), (samples, 1, seq_len)).copy()
        arrays[PAST_BIAS] = np.full((samples, 1, 1, 1, slots), MASK, np.float32)
    empty = np.zeros((samples, 1, chat.kv_heads, slots, chat.head_dim), np.float32)
    arrays |= {n: empty for n in names if n.startswith(("past_key.", "past_value."))}
    with new_file(out, force=force) as tmp, open(tmp, "wb") as f:  # exactly ``out`` (numpy appends ".npz")
        np.savez(f, **arrays)
    return Path(out).absolute()


def _graph(folder: Path) -> onnx.GraphProto:
    """The graph of an imported model folder (``base.onnx``) or of a bundle compiled from one."""
    for name in ("base.onnx", GRAPH):
        if (folder / name).is_file():
            try:
                return onnx.load(str(folder / name), load_external_data=False).graph
            except Exception as e:  # noqa: BLE001  (onnx's DecodeError and friends)
                raise InputError(f"{folder / name}: not a readable ONNX model ({type(e).__name__})") from e
    raise InputError(f"{folder}: neither an imported model folder (base.onnx) nor a bundle ({GRAPH})")
