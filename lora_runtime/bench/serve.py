"""Server overhead: the same greedy answer through ``generate`` and through ``lora-runtime serve`` (HTTP, JSON,
the per-step use-case lock), interleaved in one run. Skipped with the reason when the [serve] extra is missing."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from pathlib import Path

from lora_runtime.bench.timing import Row, measure_interleaved
from lora_runtime.llm import Chat, generate
from lora_runtime.runtime.switcher import Runtime

TOKENS = 32
QUESTION = [{"role": "user", "content": "Give me three tips for better sleep."}]


def serve_rows(bundle: Path, use_case: str, runs: int) -> tuple[list[Row], str | None]:
    """Rows ``answer_generate`` and ``answer_serve`` (one answer of TOKENS tokens each), or why they are missing."""
    try:
        import uvicorn

        from lora_runtime.serve import make_app
    except ImportError as e:
        return [], f"serve rows skipped: {e} (pip install 'lora_runtime[serve]')"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(bundle), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    rt, chat = Runtime.open(bundle), Chat.load(bundle)
    rt.switch(use_case)
    body = json.dumps({"model": use_case, "messages": QUESTION, "max_tokens": TOKENS, "temperature": 0,
                       "stop": []}).encode()

    def over_http() -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            json.loads(r.read())

    try:
        rows = measure_interleaved({"answer_generate": lambda: generate(rt, chat, QUESTION, max_new_tokens=TOKENS),
                                    "answer_serve": over_http}, runs, block=2)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    return rows, None
