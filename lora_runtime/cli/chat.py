"""``lora-runtime chat``: a conversation with a bundle, switching use-cases between turns.

Line editing and history come from ``readline`` where Python has it. Ctrl-C stops the answer being written
(what was written stays in the conversation) and, at the prompt, clears the line; Ctrl-D or ``/quit`` ends.
When the conversation no longer fits the model's context with room for an answer, the oldest exchanges are
dropped (the system prompt stays). What users type is text: ``<|im_start|>`` in a message is not a token.
The KV cache stays between turns (:class:`lora_runtime.llm.PromptCache`): a turn runs only its new tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from lora_runtime.errors import LoraRuntimeError
from lora_runtime.llm import Chat, PromptCache, generate
from lora_runtime.runtime.switcher import Runtime

HELP = """commands:
  /use NAME   switch to use-case NAME (starts a new conversation: the old one was under another adapter)
  /use        list the use-cases
  /reset      start a new conversation
  /help       this list
  /quit       end (or Ctrl-D); Ctrl-C stops an answer
  //text      send "/text" as a message"""


def run_chat(rt: Runtime, chat: Chat, *, options: dict | None = None, system: str | None = None,
             read: Callable[[str], str] = input, out: Callable[[str], None] = lambda t: print(t, end="", flush=True),
             note: Callable[[str], None] = lambda t: print(t, file=sys.stderr)) -> int:
    """The conversation loop; ``options``: :func:`lora_runtime.llm.generate`'s (sampling, ``max_new_tokens``);
    ``system``: a system message for every conversation (else the model's default)."""
    options = dict(options or {})
    max_new_tokens = options.setdefault("max_new_tokens", 128)
    start = [{"role": "system", "content": system}] if system else []
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    note(f"use-cases: {', '.join(rt.use_cases)} (current: {rt.current}); /help lists the commands")
    history: list[dict[str, str]] = list(start)
    cache = PromptCache()
    while True:
        try:
            line = read(f"[{rt.current}]> ").strip()
        except EOFError:
            return 0
        except KeyboardInterrupt:
            note("")  # a new prompt, as a shell does
            continue
        if line.startswith("/") and not line.startswith("//"):
            word, _, rest = line.partition(" ")
            if word in ("/quit", "/exit"):
                return 0
            if word == "/help":
                note(HELP)
            elif word == "/reset":
                history = list(start)
                note("new conversation")
            elif word == "/use" and not rest.strip():
                note(f"use-cases: {', '.join(rt.use_cases)} (current: {rt.current})")
            elif word == "/use":
                try:
                    r = rt.switch(rest.strip())
                except LoraRuntimeError as e:
                    note(f"error: {e}")
                    continue
                history = list(start)  # keys and values computed under another adapter are stale
                note(f"switched to {r.use_case}: {r.kind}, {r.seconds * 1e6:.0f} us, {r.bytes_moved} bytes moved")
            else:
                note(f"unknown command {word}; /help lists them (//text sends /text as a message)")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line[1:] if line.startswith("//") else line})
        if not _fit(chat, history, max_new_tokens, note, len(start)):
            continue
        written: list[str] = []
        try:
            g = generate(rt, chat, history, on_text=lambda text, written=written: (written.append(text), out(text)),
                         cache=cache, **options)
            answer = g.text
        except KeyboardInterrupt:
            answer = "".join(written)
            note("\n[stopped]")
        except LoraRuntimeError as e:
            note(f"error: {e}")
            history.pop()
            continue
        out("\n")
        history.append({"role": "assistant", "content": answer})


def _fit(chat: Chat, history: list[dict[str, str]], max_new_tokens: int, note: Callable[[str], None],
         keep: int = 0) -> bool:
    """Drop the oldest exchanges (after the first ``keep`` messages: the system prompt) until the prompt and an
    answer fit the context; False if the last message alone does not (it is dropped)."""
    dropped = 0
    while len(chat.prompt_ids(history)) + max_new_tokens > chat.max_seq and len(history) > keep + 1:
        del history[keep: keep + (2 if len(history) > keep + 2 else 1)]
        dropped += 1
    if dropped:
        note(f"[the {dropped} oldest exchange(s) no longer fit the {chat.max_seq}-token context: dropped]")
    if len(chat.prompt_ids(history)) + max_new_tokens > chat.max_seq:
        note(f"error: this message and an answer of {max_new_tokens} tokens exceed the {chat.max_seq}-token context; "
             "write less (or lower --max-new-tokens)")
        del history[keep:]
        return False
    return True
