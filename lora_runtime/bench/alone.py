"""Rows taken alone: each task in its own child process, with one session, ONNX Runtime's default options.

Why: rows that compare runtimes (ours against ONNX Runtime GenAI) cannot share a process fairly on 2 cores.
With ONNX Runtime's defaults, a session's intra-op threads spin after each run, and an idle session's spinning
steals the cores from whichever session runs next (AMD EPYC machine: GenAI's int4 decode 14.5 ms next to two
spinning sessions of ours, 6.8-7.2 ms alone). Without spinning (``timing.quiet_options``) sessions are fair to
each other but each runs slower than it does alone: our Q4_0 import's decode 8.7-9.3 ms quiet, 5.8-6.6 ms
spinning, GenAI's graph the same. An app with one model runs it with the defaults, as GenAI runs its own; so the
peer rows are taken that way, one process per task, in ``rounds`` that take the tasks in turn (the order rotated
each round) so the machine's drift hits them alike.

A task is a JSON-able dict: ``kind`` (``plain``: an imported LLM's base graph in a bare ONNX Runtime session;
``runtime``: a bundle through :class:`Runtime` with a use-case and the KV cache ``generate`` uses; ``genai``: an
ONNX Runtime GenAI model folder, optionally with an adapter; ``llamacpp``: llama.cpp's ``llama-bench`` on a GGUF
file, ``bench.llamacpp``), its paths, the prompt ``ids``, the KV
``capacity``, and ``rows``: the row name of each measurement it takes (``decode``: one token at the prompt's
context, the same every time; ``prefill``: the whole prompt; ``open``: the process's first open of the model).
The child runs ``python -m lora_runtime.bench.alone`` with the task on stdin and prints the times (ns) as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lora_runtime.bench.genai import (
    GENAI_PYTHON_ENV,
    PRECISIONS,
    folders,
    genai_models,
    import_genai,
    missing_models,
    one_generator,
    open_model,
)
from lora_runtime.bench.llamacpp import run_llama_bench
from lora_runtime.bench.timing import Row, rss
from lora_runtime.llm.cache import make_cache
from lora_runtime.runtime.bound import Bound, Graph, run_bound
from lora_runtime.runtime.switcher import Runtime

WARMUP = 10
KINDS = ("plain", "runtime", "genai", "llamacpp")


class Plain:
    """One base graph in an ONNX Runtime session: a prompt's prefill, then one-token steps at its context (the ort
    flavour's KV cache bound once, in place; the standard graph's fed as arrays). ``options``: the session's
    (ONNX Runtime's defaults when None)."""

    def __init__(self, path: Path, capacity: int, options: ort.SessionOptions | None = None) -> None:
        self.sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.sess.get_outputs()]
        self.inputs = {i.name: i.shape for i in self.sess.get_inputs()}
        self.cache = make_cache([self.inputs], capacity)
        # the runtime's own binding of a graph with buffers (``runtime.bound``): the same per-token work as a bundle's
        self._graph = Graph(self.sess, {i.name: i for i in self.sess.get_inputs()}, self.names)
        self._bound = Bound(self.sess.io_binding())

    def _run(self, feeds, buffers=None):  # noqa: ANN001, ANN202  (what a KV cache's step calls)
        if buffers is None:
            return dict(zip(self.names, self.sess.run(None, feeds)))
        return run_bound(self._graph, self._bound, feeds, buffers)

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.cache.truncate(0)
        return self.cache.step(self._run, ids)

    def stepper(self, ids: list[int]) -> Callable[[], object]:
        """A callable running one token after ``ids`` (the cache cut back to ``ids`` after each run)."""
        nxt = int(self.prefill(ids)[-1].argmax())
        return lambda: (self.cache.step(self._run, [nxt]), self.cache.truncate(len(ids)))


def plain_task(model: Path, ids: list[int], capacity: int, rows: Mapping[str, str], *, threads: int = 2) -> dict:
    return {"kind": "plain", "model": str(model), "ids": ids, "capacity": capacity, "rows": dict(rows),
            "threads": threads}


def runtime_task(bundle: Path, use_case: str, ids: list[int], capacity: int, rows: Mapping[str, str], *,
                 threads: int = 2) -> dict:
    return {"kind": "runtime", "bundle": str(bundle), "use_case": use_case, "ids": ids, "capacity": capacity,
            "rows": dict(rows), "threads": threads}


def genai_task(folder: Path, ids: list[int], capacity: int, rows: Mapping[str, str], *, threads: int = 2,
               adapter: Path | None = None) -> dict:
    return {"kind": "genai", "folder": str(folder), "ids": ids, "capacity": capacity, "rows": dict(rows),
            "threads": threads, "adapter": str(adapter) if adapter else None}


def genai_tasks(prompt_ids: Sequence[int], max_length: int, *, models: Path | None = None, threads: int = 2
                ) -> tuple[dict[str, dict], str | None]:
    """Tasks for ONNX Runtime GenAI's rows compared with ours (each in a process of its own): decode, prefill and
    open of fp32 and int4, decode of each LoRA graph with ``qv8`` active; ``({}, reason)`` when GenAI or its models are
    missing (where GenAI does not import here, $LORA_RUNTIME_GENAI_PYTHON's python must have it)."""
    models = genai_models(models)
    try:
        import_genai()
    except ImportError as e:
        if not os.environ.get(GENAI_PYTHON_ENV):
            return {}, f"{e}; or set {GENAI_PYTHON_ENV} to a python that has it"
    reason = missing_models(models)
    if reason:
        return {}, reason
    ids, paths = [int(i) for i in prompt_ids], folders(models)
    tasks = {}
    for p in PRECISIONS:
        tasks[f"genai_{p}"] = genai_task(paths[p], ids, max_length, {"decode": f"genai_decode_{p}",
                                                                     "prefill": f"genai_prefill_{p}",
                                                                     "open": f"genai_open_{p}"}, threads=threads)
        tasks[f"genai_{p}_qv8"] = genai_task(paths[f"{p}-lora"], ids, max_length, {"decode": f"genai_decode_{p}_qv8"},
                                             threads=threads, adapter=paths[f"{p}-lora"] / "qv8.onnx_adapter")
    return tasks, None


def _callables(task: Mapping) -> tuple[dict[str, Callable[[], object]], object, int]:
    """(measurement -> callable, what keeps them alive, ns the open took) for a task, in this process. The open:
    the session (``plain``), ``Runtime.open`` (``runtime``), GenAI's ``og.Model`` (``genai``)."""
    ids = [int(i) for i in task["ids"]]
    so = ort.SessionOptions()  # ONNX Runtime's defaults (spinning threads), the task's thread count
    so.intra_op_num_threads = task["threads"]
    so.log_severity_level = 3
    t = time.perf_counter_ns()
    if task["kind"] == "plain":
        plain = Plain(Path(task["model"]), task["capacity"], so)
        opened = time.perf_counter_ns() - t
        return {"decode": plain.stepper(ids), "prefill": lambda: plain.prefill(ids)}, plain, opened
    if task["kind"] == "runtime":
        rt = Runtime.open(task["bundle"], session_options=so)
        opened = time.perf_counter_ns() - t
        rt.switch(task["use_case"])
        kv = make_cache(rt.input_shapes, task["capacity"])
        nxt = int(kv.step(rt.run, ids)[-1].argmax())
        return {"decode": lambda: (kv.step(rt.run, [nxt]), kv.truncate(len(ids))),
                "prefill": lambda: (kv.truncate(0), kv.step(rt.run, ids))}, (rt, kv), opened
    if task["kind"] == "genai":
        og = import_genai()
        t = time.perf_counter_ns()
        model = open_model(og, Path(task["folder"]), task["threads"])
        opened = time.perf_counter_ns() - t
        gen, nxt, adapters = one_generator(og, model, ids, task["capacity"],
                                           Path(task["adapter"]) if task.get("adapter") else None)
        n = len(ids)
        return {"decode": lambda: (gen.rewind_to(n), gen.append_tokens([nxt])),
                "prefill": lambda: (gen.rewind_to(0), gen.append_tokens(ids))}, (gen, adapters, model), opened
    raise ValueError(f"task kind {task['kind']!r}: not one of {', '.join(KINDS)}")


def run_task(task: Mapping, calls: int) -> dict[str, dict]:
    """The task's measurements here: ``{"times": {row: ns, ...}, "bytes": {row: n}}``. ``decode``: ``calls`` timed
    calls after a warm-up; ``prefill``: a quarter of them, at least 3; ``open``: the one open this process made
    (the first, as an app's), with the resident memory it added as the row's bytes."""
    before = rss()
    fns, keep, opened = _callables(task)
    added = rss() - before
    times, nbytes = {}, {}
    for what, row in task["rows"].items():
        if what == "open":
            times[row], nbytes[row] = [opened], added
            continue
        fn = fns[what]
        n = calls if what == "decode" else max(calls // 4, 3)
        for _ in range(WARMUP if what == "decode" else 1):
            fn()
        t = []
        for _ in range(n):
            start = time.perf_counter_ns()
            fn()
            t.append(time.perf_counter_ns() - start)
        times[row] = t
    del keep
    return {"times": times, "bytes": nbytes}


def _python(task: Mapping) -> str:
    """The python a task's child runs: this one, or for GenAI tasks where it does not import here,
    $LORA_RUNTIME_GENAI_PYTHON (``bench.genai``)."""
    if task["kind"] == "genai":
        try:
            import_genai()
        except ImportError:
            return os.environ.get(GENAI_PYTHON_ENV) or sys.executable
    return sys.executable


class TaskFailed(RuntimeError):
    """A task's child process failed (its last stderr line says why)."""


def _child(task: Mapping, calls: int) -> dict[str, dict]:
    """``run_task`` in a child process of its own (see the module docstring); a ``llamacpp`` task's child is
    ``llama-bench`` itself (``bench.llamacpp``)."""
    if task["kind"] == "llamacpp":
        try:
            return run_llama_bench(task, calls)
        except RuntimeError as e:
            raise TaskFailed(f"{', '.join(task['rows'].values())}: {e}") from e
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    done = subprocess.run([_python(task), "-m", "lora_runtime.bench.alone", str(calls)], input=json.dumps(task),
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise TaskFailed(f"{', '.join(task['rows'].values())}: the child process failed ({done.returncode}): {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_alone(tasks: Mapping[str, Mapping], calls: int, rounds: int = 2,
                  on_round: Callable[[int], None] | None = None, by_round: dict[str, list[float]] | None = None,
                  optional: Collection[str] = (), dropped: dict[str, str] | None = None) -> list[Row]:
    """Each task's rows, every task in a child process of its own per round; ``calls`` timed decode calls per row
    in all (split over the rounds, at least 3 per round). p50 and p99 over all rounds' calls (an open row: one
    per round); bytes: the last round's. ``by_round``: filled with each row's p50 (us) in each round, in order
    (what :func:`paired` compares). A task named in ``optional`` (a peer's: GenAI, llama.cpp) that fails is dropped
    with all its rows, and why goes in ``dropped``; any other task's failure raises :class:`TaskFailed`."""
    names = list(tasks)
    times: dict[str, list[int]] = {}
    nbytes: dict[str, int] = {}
    per_round = max(-(-calls // rounds), 3)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if dropped is not None and name in dropped:
                continue
            try:
                got = _child(tasks[name], per_round)
            except TaskFailed as e:
                if name not in optional or dropped is None:
                    raise
                dropped[name] = str(e)
                for row in tasks[name]["rows"].values():
                    times.pop(row, None)
                    nbytes.pop(row, None)
                    if by_round is not None:
                        by_round.pop(row, None)
                continue
            for row, t in got["times"].items():
                times.setdefault(row, []).extend(t)
                if by_round is not None:
                    by_round.setdefault(row, []).append(float(np.percentile(t, 50) / 1e3))
            nbytes |= got["bytes"]
        if on_round:
            on_round(r)
    return [Row(row, float(np.percentile(t, 50) / 1e3), float(np.percentile(t, 99) / 1e3), len(t), nbytes.get(row))
            for row, t in times.items()]


@dataclass(frozen=True)
class Paired:
    """One row against another, round by round: the median of the rounds' ratios of their p50s, and the quartiles."""

    value: float
    q25: float
    q75: float
    rounds: int


def paired(by_round: Mapping[str, Sequence[float]], num: str, den: str) -> Paired | None:
    """``num`` / ``den`` from :func:`measure_alone`'s ``by_round`` (None unless both rows have every round).

    Why rounds: this VM's speed drifts 10-30 % over minutes, and the p50 of all rounds' calls pooled moves with
    whichever round ran fast; two rows taken in the same round (seconds apart) drift together, so each round's
    ratio cancels it, and the median of the rounds' ratios is the figure a goal is judged on (the quartiles say how
    far one round's ratio strays)."""
    a, b = by_round.get(num), by_round.get(den)
    if not a or not b or len(a) != len(b):
        return None
    r = np.asarray(a, np.float64) / np.asarray(b, np.float64)
    return Paired(float(np.median(r)), float(np.percentile(r, 25)), float(np.percentile(r, 75)), len(r))


def main(argv: list[str] | None = None) -> int:
    """The child: the task (JSON) on stdin, the calls as the argument; the times (JSON) on stdout."""
    args = sys.argv[1:] if argv is None else argv
    task = json.loads(sys.stdin.read())
    print(json.dumps(run_task(task, int(args[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
