"""The model's own chat template, rendered as transformers renders it.

A GGUF carries it as ``tokenizer.chat_template``, a Hugging Face folder in ``tokenizer_config.json``; the
importer stores it in ``chat.json``. Rendering follows ``transformers``' ``apply_chat_template``: Jinja2's
immutable sandbox (a template cannot touch Python objects), ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension, ``raise_exception`` and a ``tojson`` filter, and the variables ``messages``,
``add_generation_prompt``, ``bos_token`` and ``eos_token``. Without a stored template, ChatML is the fallback.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime

from lora_runtime.errors import BaseModelError, InputError

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' and default_system %}"
          "{{ '<|im_start|>system\n' + default_system + '<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class TemplateError(InputError):
    """The chat template refused the conversation (its own ``raise_exception``) or failed to render."""


def render(template: str, messages: Sequence[dict[str, str]], *, bos_token: str = "", eos_token: str = "",
           default_system: str | None = None, add_generation_prompt: bool = True) -> str:
    """The conversation as the model was trained to read it."""
    try:
        from jinja2.exceptions import TemplateError as JinjaError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise BaseModelError("chat templates need Jinja2: pip install 'lora_runtime[llm]'") from None

    def raise_exception(message: str) -> None:
        raise TemplateError(f"the chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, bos_token=bos_token,
            eos_token=eos_token, default_system=default_system)
    except TemplateError:
        raise
    except JinjaError as e:
        raise TemplateError(f"the chat template failed to render: {e}") from e
