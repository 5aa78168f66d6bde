"""``lora-runtime bench BUNDLE``: the rows a given bundle supports, next to the limits and merged weights."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnxruntime as ort

from lora_runtime.bench.default import GOALS
from lora_runtime.bench.report import machine, versions, with_ratios
from lora_runtime.bench.timing import Row, alternate, disk_rows, limit_rows, measure, next_patch
from lora_runtime.bundle import open_bundle
from lora_runtime.eval.accuracy import synthesize_inputs
from lora_runtime.export import merge_use_case
from lora_runtime.progress import Progress
from lora_runtime.runtime.session import make_session
from lora_runtime.runtime.switcher import Runtime
from lora_runtime.version import __version__


def run_bench_bundle(path: Path, quick: bool = False) -> dict:
    """The rows a given bundle supports: its switches next to the limits, its run cost next to merged."""
    k = 0.2 if quick else 1.0
    n = {name: max(int(v * k), 3) for name, v in {"switch": 2000, "cold": 300, "disk": 100, "run": 30,
                                                 "open": 5}.items()}
    bundle = open_bundle(path)
    m = bundle.manifest
    feeds = synthesize_inputs(make_session(bundle), {sl.name for sl in m.slots})
    rows: list[Row] = []
    with Progress("bench", total=6, delay_s=0.0) as bar:
        rt = Runtime.open(path)
        named = [u.name for u in m.use_cases if u.strengths]
        if m.generation == "v3" and len(m.use_cases) > 1:
            rows.append(measure("hot_switch", alternate(rt, m.use_case_names), n["switch"]))
        patch = bundle.file(m.group_patch or m.adapter(m.adapters[0].name).patch or "")
        adapters = list(dict.fromkeys(next(iter(m.use_case(u).strengths)) for u in named))
        if m.generation != "v3" and len(adapters) >= 3:
            firsts = [next(u for u in named if next(iter(m.use_case(u).strengths)) == a) for a in adapters]
            cycle = alternate(rt, firsts, expect="cold")
            rows.append(measure("cold_switch_cache", cycle, n["cold"], nbytes=rt.layout.nbytes))
            rows += disk_rows(cycle, next_patch(rt, firsts), rt.layout.nbytes, n["disk"])
        bar.step("switches")
        paired = any(r.name == "file_read_disk" for r in rows)
        rows += limit_rows(patch, rt.layout.nbytes, n["cold"], None if paired else n["disk"])
        bar.step("limits")
        rows.append(measure("runtime_open", lambda: Runtime.open(path), n["open"], warmup=1))
        bar.step("open")
        if named:
            rt.switch(named[0])
            rows.append(measure(f"run_{m.generation}", lambda: rt.run(feeds), n["run"]))
            with tempfile.TemporaryDirectory() as tmp:
                merged = merge_use_case(bundle, Path(tmp) / "merged.onnx", use_case=named[0])
                rows.append(measure("session_rebuild", lambda: ort.InferenceSession(
                    str(merged), providers=["CPUExecutionProvider"]), 3, warmup=1))
                sess = ort.InferenceSession(str(merged), providers=["CPUExecutionProvider"])
                rows.append(measure("run_merged", lambda: sess.run(None, feeds), n["run"]))
        bar.step("runs")
        rows.append(Row("patch_bytes", None, None, 1, rt.layout.nbytes))
        bar.step("done")
    return with_ratios(rows, {"lora_runtime": __version__, "size": f"bundle {path}", "quick": quick,
                               "machine": machine(), "versions": versions(),
                               "model": {"recipe": str(path), "generation": m.generation, "points": len(m.points)}},
                       GOALS, generation=m.generation)


