"""Chat templates rendered as transformers renders them (Jinja2 sandbox, trim/lstrip blocks, raise_exception)."""

from __future__ import annotations

import pytest

from lora_runtime.llm.template import CHATML, TemplateError, render

GEMMA_LIKE = (  # no system role: the template refuses one, as Gemma's does
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")


def test_a_template_other_than_chatml():
    text = render(GEMMA_LIKE, [{"role": "user", "content": "  Hi  "}, {"role": "assistant", "content": "Hello"},
                               {"role": "user", "content": "Why?"}], bos_token="<bos>")
    assert text == ("<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
                    "<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n")


def test_the_templates_own_refusal_is_a_one_line_error():
    with pytest.raises(TemplateError, match="refused the conversation: System role not supported"):
        render(GEMMA_LIKE, [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])


def test_the_sandbox_keeps_templates_away_from_python():
    with pytest.raises(TemplateError, match="failed to render"):
        render("{{ messages.__class__.__mro__[1].__subclasses__() }}", [{"role": "user", "content": "x"}])


def test_chatml_fallback_adds_the_default_system_message_only_when_none_is_given():
    user = [{"role": "user", "content": "Hi"}]
    assert render(CHATML, user, default_system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    own = [{"role": "system", "content": "S"}, *user]
    assert render(CHATML, own, default_system="Be brief.").startswith("<|im_start|>system\nS<|im_end|>")
