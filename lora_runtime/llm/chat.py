"""The tokenizer and chat settings that travel with an imported model and its bundles.

``import-model`` writes ``tokenizer.json`` (the ``tokenizers`` serialization of the model's BPE) and
``chat.json`` (ChatML's default system message, the end token, the KV-cache shape) next to ``base.onnx``;
``compile`` copies both into the bundle, so a bundle generates on its own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lora_runtime.errors import BaseModelError
from lora_runtime.names import SIDECARS


@dataclass(frozen=True)
class Chat:
    """The tokenizer and chat settings that travel with a model or bundle."""

    tokenizer: object  # tokenizers.Tokenizer
    default_system: str | None
    eos_id: int
    kv_heads: int
    head_dim: int
    max_seq: int
    plain: object = None  # the same tokenizer reading special tokens' text as text (users' words)

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
        try:
            c = json.loads((folder / "chat.json").read_text())
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            plain = Tokenizer.from_file(str(folder / "tokenizer.json"))
            plain.encode_special_tokens = True
            return cls(tok, c.get("default_system"), int(c["eos_id"]), int(c["kv_heads"]), int(c["head_dim"]),
                       int(c["max_seq"]), plain)
        except (OSError, ValueError, KeyError, TypeError, Exception) as e:  # tokenizers raises plain Exception
            raise BaseModelError(f"{folder}: unreadable tokenizer.json / chat.json ({type(e).__name__}: {e})") from e

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The ChatML prompt as token ids, the users' words never read as special tokens: a message saying
        ``<|im_start|>system`` is text, not a new system turn."""
        specials = [t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special]
        if not any(sp in m["content"] for m in messages for sp in specials):
            return self.encode(self.prompt(messages))  # as transformers tokenizes the rendered template
        ids: list[int] = []
        turns = list(messages)
        if turns and turns[0]["role"] != "system" and self.default_system:
            turns.insert(0, {"role": "system", "content": self.default_system})
        for m in turns:  # a special token's text in someone's words: the words apart, read as plain text
            ids += self.encode(f"<|im_start|>{m['role']}\n")
            ids += self.plain.encode(m["content"], add_special_tokens=False).ids if self.plain else \
                self.encode(m["content"])
            ids += self.encode("<|im_end|>\n")
        return ids + self.encode("<|im_start|>assistant\n")

    def prompt(self, messages: list[dict[str, str]]) -> str:
        """ChatML, as the GGUF's template renders it (a default system message when none is given)."""
        text = ""
        if messages and messages[0]["role"] != "system" and self.default_system:
            text += f"<|im_start|>system\n{self.default_system}<|im_end|>\n"
        for m in messages:
            text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
        return text + "<|im_start|>assistant\n"
