"""Tokenizer and chat template from a GGUF's metadata.

GPT-2-style byte-level BPE (``tokenizer.ggml.model == "gpt2"``): the ``tokenizers`` library builds it from
the GGUF's vocabulary and merges; tokens of type CONTROL (3) are special tokens. The ``smollm``
pre-tokenizer splits digits one by one before the byte-level split, as SmolLM's ``tokenizer.json`` does.
The GGUF's chat template (``tokenizer.chat_template``) is kept as written, for ``lora_runtime.llm`` to render
with Jinja; its default system message is read out too (the ChatML fallback uses it).
Needs ``pip install 'lora_runtime[llm]'`` (``tokenizers``, ``gguf``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lora_runtime.errors import BaseModelError
from lora_runtime.models.gguf import GgufModel

CONTROL = 3


@dataclass(frozen=True)
class GgufTokenizer:
    """What a GGUF says about its tokens; :class:`lora_runtime.llm.Chat` uses it (saved as tokenizer.json)."""

    tokenizer: Any  # tokenizers.Tokenizer
    bos_id: int | None
    eos_id: int
    default_system: str | None  # ChatML's system message when a conversation has none
    chat_template: str | None = None  # the GGUF's own Jinja template (tokenizer.chat_template)


def tokenizer_from_gguf(model: GgufModel) -> GgufTokenizer:
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        raise BaseModelError("the tokenizer needs the 'tokenizers' package: pip install 'lora_runtime[llm]'") from None
    import gguf

    reader = gguf.GGUFReader(str(model.path))
    kind = model.metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise BaseModelError(f"{model.path}: tokenizer model {kind!r}; only GPT-2-style BPE is supported")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if model.metadata.get("tokenizer.ggml.pre") == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    template = str(model.metadata.get("tokenizer.chat_template", ""))
    found = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template, re.S)
    bos = model.metadata.get("tokenizer.ggml.bos_token_id")
    return GgufTokenizer(tok, int(bos) if bos is not None else None,
                         int(model.metadata.get("tokenizer.ggml.eos_token_id", 2)),
                         found.group(1) if found else None, template or None)
