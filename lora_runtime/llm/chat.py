"""The tokenizer and chat settings that travel with an imported model and its bundles.

``import-model`` writes ``tokenizer.json`` (the ``tokenizers`` serialization of the model's BPE) and
``chat.json`` (the model's own chat template, the end token, the KV-cache shape) next to ``base.onnx``;
``compile`` copies both into the bundle, so a bundle generates on its own.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lora_runtime.errors import BaseModelError
from lora_runtime.llm.template import CHATML, TemplateError, render
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
    template: str | None = None  # the model's own Jinja chat template (None: ChatML)
    bos_token: str = ""
    eos_token: str = ""

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
            bos = c.get("bos_id")
            return cls(tok, c.get("default_system"), int(c["eos_id"]), int(c["kv_heads"]), int(c["head_dim"]),
                       int(c["max_seq"]), plain, c.get("chat_template") or None,
                       tok.id_to_token(int(bos)) or "" if bos is not None else "",
                       tok.id_to_token(int(c["eos_id"])) or "")
        except Exception as e:  # noqa: BLE001  (OSError, JSON, a missing key, or tokenizers' plain Exception)
            raise BaseModelError(f"{folder}: unreadable tokenizer.json / chat.json ({type(e).__name__}: {e})") from e

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The rendered prompt as token ids, the users' words never read as special tokens: a message saying
        ``<|im_start|>system`` is text, not a new system turn. Without such text, exactly the tokens of the
        rendered template (as transformers tokenizes it)."""
        specials = [t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special]
        if not any(sp in m["content"] for m in messages for sp in specials):
            return self.encode(self.prompt(messages))
        marks = [f"\x01lora_runtime:{i}\x02" for i in range(len(messages))]
        text = self.prompt([m | {"content": mark} for m, mark in zip(messages, marks)])
        pieces = re.split("\x01lora_runtime:(\\d+)\x02", text)
        if sorted(int(i) for i in pieces[1::2]) != list(range(len(messages))):
            raise TemplateError("the chat template rewrites message text, so special-token text in a message "
                                "cannot be kept apart: remove it from the message")
        ids = self.encode(pieces[0])
        for index, after in zip(pieces[1::2], pieces[2::2]):  # each message's words as plain text, then the template
            ids += self.plain.encode(messages[int(index)]["content"], add_special_tokens=False).ids
            ids += self.encode(after)
        return ids

    def prompt(self, messages: list[dict[str, str]]) -> str:
        """The conversation rendered by the model's own chat template (ChatML without one), ready for the
        assistant's turn."""
        return render(self.template or CHATML, messages, bos_token=self.bos_token, eos_token=self.eos_token,
                      default_system=self.default_system)
