"""llama.cpp on the same GGUF files, in the same run as ours: its own benchmark tool, ``llama-bench``, when it is
installed (``$LORA_RUNTIME_LLAMA_BENCH``, else ``llama-bench`` on the PATH); its rows are skipped, with the reason,
otherwise. Nothing is downloaded: build it yourself (``cmake -B build -DGGML_NATIVE=ON && cmake --build build
--target llama-bench``), then point the variable at ``build/bin/llama-bench``.

A task of kind ``llamacpp`` takes its turn in ``bench.alone``'s rounds like ours: one ``llama-bench`` process per
round, ``-t`` threads, ``-p`` the chat prompt's token count (row ``prefill``: each repetition's time for the whole
prompt), ``-n`` :data:`N_GEN` tokens from an empty context (row ``decode``: each repetition's time / ``N_GEN``;
ours is one token at the prompt's context, which llama-bench of early 2025 cannot set), ``-r`` repetitions.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

LLAMA_BENCH_ENV = "LORA_RUNTIME_LLAMA_BENCH"
N_GEN = 16  # tokens per decode repetition


def find_llama_bench() -> tuple[str | None, str | None]:
    """(the llama-bench executable, None) or (None, why not)."""
    given = os.environ.get(LLAMA_BENCH_ENV)
    if given:
        if Path(given).is_file() and os.access(given, os.X_OK):
            return given, None
        return None, f"${LLAMA_BENCH_ENV}={given} is not an executable file"
    found = shutil.which("llama-bench")
    if found:
        return found, None
    return None, f"llama-bench is not installed (on the PATH, or ${LLAMA_BENCH_ENV}): llama.cpp's rows not taken"


def llamacpp_task(exe: str, gguf: Path, n_prompt: int, rows: Mapping[str, str], *, threads: int = 2) -> dict:
    """A ``bench.alone`` task: ``rows`` maps "decode" and/or "prefill" to row names."""
    return {"kind": "llamacpp", "exe": exe, "model": str(gguf), "n_prompt": n_prompt, "rows": dict(rows),
            "threads": threads}


def run_llama_bench(task: Mapping, calls: int) -> dict[str, dict]:
    """One ``llama-bench`` process for the task: ``{"times": {row: ns per sample}, "bytes": {}}`` as
    ``bench.alone`` children report; ``calls`` decode calls make ``calls // 4`` repetitions (at least 3)."""
    reps = max(calls // 4, 3)
    rows = task["rows"]
    cmd = [task["exe"], "-m", task["model"], "-t", str(task["threads"]), "-r", str(reps), "-o", "json",
           "-p", str(task["n_prompt"] if "prefill" in rows else 0), "-n", str(N_GEN if "decode" in rows else 0)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {tail}")
    return {"times": parse(done.stdout, rows), "bytes": {}}


def parse(out: str, rows: Mapping[str, str]) -> dict[str, list[int]]:
    """llama-bench's JSON (one object per test, ``samples_ns`` a repetition each) as ns per sample: a prompt test's
    whole time (row ``prefill``), a generation test's time per token (row ``decode``)."""
    times: dict[str, list[int]] = {}
    for t in json.loads(out):
        if t["n_gen"] and not t["n_prompt"] and "decode" in rows:
            times[rows["decode"]] = [int(ns) // int(t["n_gen"]) for ns in t["samples_ns"]]
        elif t["n_prompt"] and not t["n_gen"] and "prefill" in rows:
            times[rows["prefill"]] = [int(ns) for ns in t["samples_ns"]]
    missing = set(rows.values()) - set(times)
    if missing:
        raise RuntimeError(f"llama-bench's output has no test for {', '.join(sorted(missing))}")
    return times
