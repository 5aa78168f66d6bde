"""The peer rows of ``bench --model smollm2``: ONNX Runtime GenAI on the same SmolLM2 weights, when it is installed.

GenAI is an optional extra (``pip install -e '.[genai]'``: ``onnxruntime-genai``, which needs only
``onnxruntime>=1.31`` and numpy, so it lives in the dev venv). Its models come from its own model builder:
``tools/make_genai_model.py`` (a torch venv) writes them to ``graphs/built/genai``. Without either, the rows are
skipped and the reason says what to run. Where GenAI cannot be imported here, ``LORA_RUNTIME_GENAI_PYTHON`` may
name another venv's python that has it: the rows are then taken in a child process of that python.

Rows (decode rows: one token at the context of the given prompt ids, the same every time: ``rewind_to`` the
prompt, then ``append_tokens`` of the greedy token, both inside the timed call; GenAI's session options get
``intra_op_num_threads`` = ``threads``, its KV buffers ``max_length`` tokens):

==============================  ===================================================================================
genai_decode_<p>                ``<p>`` fp32 or int4: the builder's graph (int4: its RTN int4, block 32,
                                accuracy_level 4, embedding and LM head included)
genai_decode_<p>_lora_none      the LoRA graph (a rank-0 branch on qkv/o/gate/up/down), no adapter active
genai_decode_<p>_qv8            the LoRA graph, ``listify`` active (r=8 on q/v), as an ``.onnx_adapter``
genai_decode_<p>_caps16         the LoRA graph, ``caps`` active (r=16 on o/gate/up/down)
genai_prefill_<p>               the prompt through the builder's graph (``rewind_to(0)``, ``append_tokens``)
genai_open_<p>                  ``og.Model`` of the builder's folder (page cache warm), p50 of ``opens``
genai_adapter_load_<a>          ``Adapters.load`` of the ``<a>`` adapter file into the int4 LoRA model; bytes: its size
==============================  ===================================================================================

Decode and prefill rows are taken round-robin (``measure_interleaved``) with any ``also`` callables the caller
passes, so ratios between them see the same load. ``bench --model smollm2`` takes the rows it compares with ours
alone instead (``bench.alone.genai_tasks``: each in a process of its own) and passes them as ``taken``.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lora_runtime.bench.timing import Row, measure_interleaved

GENAI_MODELS = Path("graphs/built/genai")
GENAI_PYTHON_ENV = "LORA_RUNTIME_GENAI_PYTHON"
GENAI_MODELS_ENV = "LORA_RUNTIME_GENAI_MODELS"
GENAI_INSTALL = "pip install 'onnxruntime-genai>=0.18' (or pip install -e '.[genai]')"
GENAI_BUILD = "run tools/make_genai_model.py with a torch venv (e.g. /work/fxvenv/bin/python tools/make_genai_model.py)"
PRECISIONS = ("fp32", "int4")
ADAPTERS = ("qv8", "caps16")  # files <name>.onnx_adapter in the LoRA folders (tools/make_genai_model.py)
# ratio rows for the report (with_ratios goals: no limit, just the table): ours / GenAI's
GENAI_GOALS = {
    "decode_base vs GenAI fp32": ("decode_base", "genai_decode_fp32", None, "<="),
    "decode_v2 (caps) vs GenAI fp32 caps16": ("decode_v2", "genai_decode_fp32_caps16", None, "<="),
    "decode_v2_qv8 vs GenAI fp32 qv8": ("decode_v2_qv8", "genai_decode_fp32_qv8", None, "<="),
    "prefill_base vs GenAI fp32": ("prefill_base", "genai_prefill_fp32", None, "<="),
}


def genai_models(models: Path | None = None) -> Path:
    """Where the GenAI model folders are: ``models``, else $LORA_RUNTIME_GENAI_MODELS, else graphs/built/genai."""
    return Path(models or os.environ.get(GENAI_MODELS_ENV) or GENAI_MODELS)


def folders(models: Path) -> dict[str, Path]:
    """The model folders the rows need, by role: ``fp32``, ``int4``, ``fp32-lora``, ``int4-lora``."""
    return {f"{p}{lora}": models / f"smollm2-{p}{lora}" for p in PRECISIONS for lora in ("", "-lora")}


def missing_models(models: Path) -> str | None:
    """Why the GenAI model folders cannot be used, or None."""
    absent = [str(f) for f in folders(models).values() if not (f / "genai_config.json").is_file()]
    absent += [str(models / f"smollm2-{p}-lora" / f"{a}.onnx_adapter") for p in PRECISIONS for a in ADAPTERS
               if not (models / f"smollm2-{p}-lora" / f"{a}.onnx_adapter").is_file()]
    if absent:
        return f"no GenAI model in {absent[0]}{f' (and {len(absent) - 1} more)' if len(absent) > 1 else ''}: " \
               f"{GENAI_BUILD}"
    return None


def import_genai():  # noqa: ANN201  (the onnxruntime_genai module)
    """``onnxruntime_genai``, or raises ImportError with a one-line reason."""
    try:
        return importlib.import_module("onnxruntime_genai")
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "onnxruntime_genai":
            raise ImportError(f"onnxruntime-genai (ONNX Runtime GenAI) is not installed: {GENAI_INSTALL}") from e
        raise ImportError(f"onnxruntime-genai is installed but does not load: {e}") from e


def genai_rows(work: Path, prompt_ids: Sequence[int], reps: int, *, models: Path | None = None, threads: int = 2,
               max_length: int = 512, opens: int = 3, also: Mapping[str, Callable[[], object]] | None = None,
               taken: Collection[str] = ()) -> tuple[list[Row], dict, str | None]:
    """GenAI's rows (see the module doc) and ``also``'s, interleaved; returns ``(rows, info, skipped)``.

    ``skipped`` is None, or the one-line reason there are no GenAI rows (GenAI not installed, its models not
    built); ``also``'s rows are then still taken. ``work``: where a child process (``LORA_RUNTIME_GENAI_PYTHON``)
    leaves its result. ``reps``: timed calls per decode row (prefill rows: a quarter, at least 3). ``taken``: decode,
    prefill and open rows the caller measures elsewhere (``bench.alone.genai_tasks``): not measured here."""
    models = genai_models(models)
    ids = [int(i) for i in prompt_ids]
    try:
        import_genai()
    except ImportError as e:
        python = os.environ.get(GENAI_PYTHON_ENV)
        if not python:
            return _also_only(also, reps), {}, f"{e}; or set {GENAI_PYTHON_ENV} to a python that has it"
        return _in_child(python, Path(work), models, ids, reps, threads, max_length, opens, also, taken)
    reason = missing_models(models)
    if reason:
        return _also_only(also, reps), {}, reason
    return _measure(models, ids, reps, threads, max_length, opens, also, taken)


def _also_only(also: Mapping[str, Callable[[], object]] | None, reps: int) -> list[Row]:
    return measure_interleaved(dict(also), reps, block=5) if also else []


def open_model(og, folder: Path, threads: int):  # noqa: ANN001, ANN201  (og.Model)
    """GenAI's model in ``folder``, its session on ``threads`` intra-op threads (and one inter-op)."""
    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    return og.Model(config)


def _prefilled(og, model, ids: list[int], max_length: int, adapters=None, adapter: str | None = None):  # noqa: ANN001, ANN202
    """A generator of ``model`` that has run ``ids`` (with ``adapters``' ``adapter`` active), and its greedy next
    token."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length)
    gen = og.Generator(model, params)
    if adapter:
        gen.set_active_adapter(adapters, adapter)
    gen.append_tokens(ids)
    return gen, int(np.argmax(np.asarray(gen.get_logits()).reshape(-1)))


def one_generator(og, model, ids: list[int], max_length: int, adapter: Path | None = None):  # noqa: ANN001, ANN201
    """(generator, greedy next token, what to keep alive with it) of ``model`` (``open_model``) after ``ids``, with
    the ``.onnx_adapter`` file ``adapter`` active (``bench.alone``'s GenAI tasks)."""
    adapters = None
    if adapter is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter), adapter.stem)
    gen, nxt = _prefilled(og, model, ids, max_length, adapters, adapter.stem if adapter else None)
    return gen, nxt, adapters


class _Decoders:
    """GenAI models, adapters and generators for the rows; ``close`` drops them (models last)."""

    def __init__(self, og, models: Path, ids: list[int], threads: int, max_length: int) -> None:  # noqa: ANN001
        self.og, self.ids, self.max_length, self.threads = og, ids, max_length, threads
        self.paths = folders(models)
        self.models = {role: self.open(path) for role, path in self.paths.items()}
        self.adapters = {}
        for p in PRECISIONS:
            ad = og.Adapters(self.models[f"{p}-lora"])
            for a in ADAPTERS:
                ad.load(str(self.paths[f"{p}-lora"] / f"{a}.onnx_adapter"), a)
            self.adapters[p] = ad
        self.generators: dict[str, object] = {}
        self.next_token: dict[str, int] = {}

    def open(self, folder: Path):  # noqa: ANN201  (og.Model)
        return open_model(self.og, folder, self.threads)

    def generator(self, key: str, role: str, adapter: str | None = None):  # noqa: ANN201
        adapters = self.adapters[role.removesuffix("-lora")] if adapter else None
        gen, self.next_token[key] = _prefilled(self.og, self.models[role], self.ids, self.max_length, adapters,
                                               adapter)
        self.generators[key] = gen
        return gen

    def decoder(self, key: str, role: str, adapter: str | None = None) -> Callable[[], None]:
        gen, n = self.generator(key, role, adapter), len(self.ids)
        step = [self.next_token[key]]

        def run() -> None:
            gen.rewind_to(n)
            gen.append_tokens(step)
        return run

    def prefill(self, key: str, role: str) -> Callable[[], None]:
        gen = self.generator(key, role)

        def run() -> None:
            gen.rewind_to(0)
            gen.append_tokens(self.ids)
        return run

    def close(self) -> None:
        self.generators.clear()
        self.adapters.clear()
        self.models.clear()


def _measure(models: Path, ids: list[int], reps: int, threads: int, max_length: int, opens: int,
             also: Mapping[str, Callable[[], object]] | None, taken: Collection[str]) -> tuple[list[Row], dict, None]:
    og = import_genai()
    d = _Decoders(og, models, ids, threads, max_length)
    try:
        decoders: dict[str, Callable[[], object]] = {}
        for p in PRECISIONS:
            decoders[f"genai_decode_{p}"] = d.decoder(f"genai_decode_{p}", p)
            decoders[f"genai_decode_{p}_lora_none"] = d.decoder(f"genai_decode_{p}_lora_none", f"{p}-lora")
            for a in ADAPTERS:
                decoders[f"genai_decode_{p}_{a}"] = d.decoder(f"genai_decode_{p}_{a}", f"{p}-lora", a)
        prefills = {f"genai_prefill_{p}": d.prefill(f"genai_prefill_{p}", p) for p in PRECISIONS}
        decoders = {k: v for k, v in decoders.items() if k not in taken}
        prefills = {k: v for k, v in prefills.items() if k not in taken}
        rows = measure_interleaved(decoders | dict(also or {}), reps, block=5)
        rows += measure_interleaved(prefills, max(reps // 4, 3), block=1) if prefills else []
        rows += _open_rows(d, opens, taken) + _adapter_rows(d, max(reps // 2, 5))
        info = {"genai": {
            "versions": _versions(og), "threads": threads, "max_length": max_length, "context": len(ids),
            "models": {role: str(path) for role, path in d.paths.items()},
            "next_token": dict(d.next_token),
            "interleaved_with": sorted(also or {}),
            "note": "decode = rewind_to(prompt) + append_tokens(1 token), timed together; the LoRA graph adds "
                    "x@A@B on qkv/o/gate/up/down (rank 0 when no adapter is active)"}}
        return rows, info, None
    finally:
        d.close()


def _open_rows(d: _Decoders, opens: int, taken: Collection[str]) -> list[Row]:
    rows = []
    for p in PRECISIONS:
        if f"genai_open_{p}" in taken:
            continue
        folder = d.paths[p]
        size = sum(f.stat().st_size for f in folder.glob("model.onnx*"))
        times = []
        for _ in range(opens):
            t = time.perf_counter_ns()
            model = d.open(folder)
            times.append(time.perf_counter_ns() - t)
            del model
        rows.append(Row(f"genai_open_{p}", float(np.percentile(times, 50) / 1e3), float(np.max(times) / 1e3),
                        opens, size))
    return rows


def _adapter_rows(d: _Decoders, runs: int) -> list[Row]:
    rows = []
    model = d.models["int4-lora"]
    for a in ADAPTERS:
        path = d.paths["int4-lora"] / f"{a}.onnx_adapter"
        times = []
        for _ in range(runs):
            ad = d.og.Adapters(model)
            t = time.perf_counter_ns()
            ad.load(str(path), a)
            times.append(time.perf_counter_ns() - t)
            del ad
        rows.append(Row(f"genai_adapter_load_{a}", float(np.percentile(times, 50) / 1e3),
                        float(np.percentile(times, 99) / 1e3), runs, path.stat().st_size))
    return rows


def _versions(og) -> dict[str, str]:  # noqa: ANN001
    import onnxruntime as ort

    return {"onnxruntime-genai": getattr(og, "__version__", "?"), "onnxruntime": ort.__version__}


def _in_child(python: str, work: Path, models: Path, ids: list[int], reps: int, threads: int, max_length: int,
              opens: int, also: Mapping[str, Callable[[], object]] | None, taken: Collection[str]
              ) -> tuple[list[Row], dict, str | None]:
    """The rows from ``python -m lora_runtime.bench.genai`` (another venv's python); ``also`` alone, here."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "genai-rows.json"
    out.unlink(missing_ok=True)
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop(GENAI_PYTHON_ENV, None)
    cmd = [python, "-m", "lora_runtime.bench.genai", "--out", str(out), "--models", str(models.resolve()),
           "--reps", str(reps), "--threads", str(threads), "--max-length", str(max_length), "--opens", str(opens),
           "--ids", ",".join(map(str, ids)), "--taken", ",".join(taken)]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    except OSError as e:
        return _also_only(also, reps), {}, f"{GENAI_PYTHON_ENV}={python} does not run: {e}"
    if done.returncode != 0 or not out.is_file():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return _also_only(also, reps), {}, f"GenAI in {python} failed ({done.returncode}): {tail}"
    result = json.loads(out.read_text())
    rows = [Row(**r) for r in result["rows"]] + _also_only(also, reps)
    info = result["info"]
    if info:
        info["genai"] |= {"python": python, "interleaved_with": []}
    return rows, info, result["skipped"]


def main(argv: list[str] | None = None) -> int:
    """The child side of ``LORA_RUNTIME_GENAI_PYTHON``: the rows as JSON in ``--out``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lora_runtime.bench.genai")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", type=Path, default=None)
    ap.add_argument("--ids", required=True, help="the prompt's token ids, comma separated")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--opens", type=int, default=3)
    ap.add_argument("--taken", default="", help="rows measured elsewhere, comma separated")
    a = ap.parse_args(argv)
    ids = [int(x) for x in a.ids.split(",") if x]
    rows, info, skipped = genai_rows(a.out.parent, ids, a.reps, models=a.models, threads=a.threads,
                                     max_length=a.max_length, opens=a.opens,
                                     taken=[t for t in a.taken.split(",") if t])
    a.out.write_text(json.dumps({"rows": [asdict(r) for r in rows], "info": info, "skipped": skipped}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
