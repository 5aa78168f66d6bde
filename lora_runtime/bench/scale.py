"""``lora-runtime bench --size 1b``: what real model sizes cost, measured in one run.

The 1b default model (16 layers, d=2048, GQA, ~1.1B parameters, 4.4 GB of float32 weights in
external data) with adapters of rank 8-64. Rows (all in the same report format as the main bench):

=============================  ======================================================================
build_model                    generating the seeded model, streamed tensor by tensor (bytes: weights)
compile_v1/v2/v3               compile time in a fresh process (bytes: what the bundle adds on disk)
compile_v*_peak_rss            peak RSS of that process (bytes)
base_bytes                     the base model's weights (bytes)
runtime_open                   ``Runtime.open`` of the v3 bundle in a fresh process (page cache warm)
runtime_open_rss               RSS that process gained in ``Runtime.open`` (bytes), vs base_bytes
hot_switch / hot_switch_100    v3 strength switches, between 2 and among 100 use-cases
cold_switch_cache / _disk      v2 switch copying a ~27 MB patch (rank-32 q/k/v/o), warm / dropped
memcpy, file_read(_2buf/_disk) the physical limits for the same bytes (see lora_runtime/bench.py)
preloaded_switch_100           v2 with 100 use-cases all preloaded: a switch copies nothing
resident_per_preloaded_use_case  resident bytes per preloaded use-case (vs patch_bytes)
run_base, run_v2, run_v3       one inference of ``seq_len`` tokens
=============================  ======================================================================

No merged-model rows here: merging rewrites every attachment weight in Python, which at this size
is the gigabytes-in-Python pattern the runtime exists to avoid (``lora-runtime merge`` still works).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lora_runtime.bench.default import GOALS
from lora_runtime.bench.report import machine, versions, with_ratios
from lora_runtime.bench.timing import Row, alternate, disk_rows, limit_rows, measure, next_patch
from lora_runtime.bundle import Bundle
from lora_runtime.compiler.compile import compile_bundle
from lora_runtime.models.default import AdapterRecipe, build_default, recipe, write_adapter
from lora_runtime.progress import Progress
from lora_runtime.runtime.switcher import Runtime
from lora_runtime.version import __version__

N_MANY = 100

_COMPILE = """
import json, sys, time
from lora_runtime import compile_bundle
base, out, gen, adapters = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
t = time.perf_counter()
b = compile_bundle(base, adapters, out, generation=gen, force=True)
dt = time.perf_counter() - t
own = sum(f.nbytes for k, f in b.manifest.files.items() if k not in b.manifest.base.data_files)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) parent process
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:")) * 1024
print(json.dumps({"seconds": dt, "peak_rss": hwm, "bundle_bytes": own}))
"""

_OPEN = """
import json, sys, time
import numpy, onnxruntime, lora_runtime
from lora_runtime import Runtime
from lora_runtime.bench.timing import rss
r0 = rss()
t = time.perf_counter()
rt = Runtime.open(sys.argv[1])
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "rss": rss() - r0}))
"""


def _python(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bench subprocess failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_bench_scale(size: str = "1b", work: Path | None = None, quick: bool = False) -> dict:
    r = recipe(size)
    work = Path(work or f"graphs/built/bench-{size}")
    k = 0.2 if quick else 1.0
    reps = {name: max(int(n * k), 3) for name, n in {"switch": 2000, "cold": 50, "disk": 20, "run": 5,
                                                     "compile": 3}.items()}
    rows: list[Row] = []
    with Progress("bench", total=12, delay_s=0.0) as bar:
        t = time.perf_counter()
        model = build_default(r, work / "model")
        base_bytes = sum(p.stat().st_size for p in (work / "model").glob("base.onnx*"))
        rows.append(Row("build_model", (time.perf_counter() - t) * 1e6, None, 1, base_bytes))
        adapters_dir = work / "model" / "adapters"
        group = {}
        for i in range(3):  # same layout, ~27 MB each: the cold-switch size of a 1B-class model's adapter
            a = AdapterRecipe(f"n{i}", r=32, lora_alpha=64, seed=200 + i,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
            if not (adapters_dir / a.name / "adapter_model.safetensors").is_file():
                write_adapter(a, r, adapters_dir / a.name)
            group[a.name] = str(adapters_dir / a.name)
        bar.step("model")

        adapters = {n: str(p) for n, p in model.adapters.items()}
        for gen in ("v1", "v2", "v3"):
            runs = [_python(_COMPILE, str(model.base), str(work / f"bundle-{gen}"), gen, json.dumps(adapters))
                    for _ in range(reps["compile"])]
            times = np.array([x["seconds"] for x in runs]) * 1e6
            rows.append(Row(f"compile_{gen}", float(np.median(times)), float(times.max()), len(runs),
                            runs[-1]["bundle_bytes"]))
            rows.append(Row(f"compile_{gen}_peak_rss", None, None, len(runs), max(x["peak_rss"] for x in runs)))
            bar.step(f"compile {gen}")
        rows.append(Row("base_bytes", None, None, 1, base_bytes))

        _python(_OPEN, str(work / "bundle-v3"))  # warm the page cache: measure the runtime, not the disk
        opened = [_python(_OPEN, str(work / "bundle-v3")) for _ in range(2 if quick else 3)]
        rows.append(Row("runtime_open", float(np.median([x["seconds"] for x in opened]) * 1e6),
                        float(max(x["seconds"] for x in opened) * 1e6), len(opened), None))
        rows.append(Row("runtime_open_rss", None, None, len(opened), int(max(x["rss"] for x in opened))))
        bar.step("runtime open")

        rng = np.random.default_rng(0)
        names = list(group)
        many = [f"u{i}=" + ",".join(f"{a}:{s:.3f}" for a, s in zip(names, rng.random(3))) for i in range(N_MANY)]
        v3 = compile_bundle(model.base, group, work / "bundle-v3-group", generation="v3", use_cases=many,
                            force=True)
        v2 = compile_bundle(model.base, {f"m{i}": group[names[i % 3]] for i in range(N_MANY)},
                            work / "bundle-v2-100", generation="v2", force=True)
        bar.step("compile 100 use-cases")
        feeds = model.inputs()

        rows += _v3_rows(v3.path, feeds, reps)
        bar.step("v3")
        rows += _v2_rows(v2, feeds, reps)
        bar.step("v2, cold and preloaded")
        rows += _base_rows(model.base, feeds, reps)
        bar.step("base")

    report = with_ratios(rows, {
        "lora_runtime": __version__, "size": size, "quick": quick, "machine": machine(), "versions": versions(),
        "model": {"recipe": r.name, "layers": r.n_layers, "d_model": r.d_model, "base_bytes": base_bytes,
                  "seq_len": r.seq_len, "points_v2": len(v2.manifest.points)}}, GOALS)
    by = {x.name: x for x in rows}
    extra = {
        "compile_v3_peak_rss / (base_bytes + adapter_bytes)": (
            by["compile_v3_peak_rss"].bytes / (base_bytes + sum(_dir_bytes(Path(p)) for p in adapters.values())),
            "<= 0.25"),
        "runtime_open_rss / base_bytes": (by["runtime_open_rss"].bytes / base_bytes, "<= 1.1"),
        "compile_v3 bundle_bytes / base_bytes": (by["compile_v3"].bytes / base_bytes, None),
        "cold_switch_cache / file_read": (by["cold_switch_cache"].p50_us / by["file_read"].p50_us, "<= 1.3"),
        "hot_switch_100 / hot_switch": (by["hot_switch_100"].p50_us / by["hot_switch"].p50_us, "<= 1.2"),
        "runtime_open / cold_switch_cache": (by["runtime_open"].p50_us / by["cold_switch_cache"].p50_us, None),
    }
    for name, (value, goal) in extra.items():
        met = None if goal is None else value <= float(goal.split()[1])
        report["ratios"][name] = {"value": value, "goal": goal, "met": met}
    return report


def _v3_rows(path: Path, feeds: dict[str, np.ndarray], reps: dict[str, int]) -> list[Row]:
    rt = Runtime.open(path)
    rows = [measure("hot_switch", alternate(rt, rt.use_cases[:2]), reps["switch"]),
            measure("hot_switch_100", alternate(rt, rt.use_cases), reps["switch"])]
    rt.switch(rt.use_cases[0])
    rows.append(measure("run_v3", lambda: rt.run(feeds), reps["run"], warmup=1))
    return rows


def _v2_rows(bundle: Bundle, feeds: dict[str, np.ndarray], reps: dict[str, int]) -> list[Row]:
    rt = Runtime.open(bundle.path)
    patch = bundle.file(bundle.manifest.adapter("m0").patch or "")
    nbytes = rt.layout.nbytes
    cycle = alternate(rt, ["m0", "m1", "m2"], expect="cold")
    rows = [measure("cold_switch_cache", cycle, reps["cold"], nbytes=nbytes)]
    nxt = next_patch(rt, ["m0", "m1", "m2"])
    rows += disk_rows(cycle, nxt, nbytes, reps["disk"])
    rows += limit_rows(patch, nbytes, reps["cold"])
    rt.switch("m0")
    rows.append(measure("run_v2", lambda: rt.run(feeds), reps["run"], warmup=1))
    t = time.perf_counter()
    rt.preload(rt.use_cases)
    rows.append(Row("preload_100", (time.perf_counter() - t) * 1e6, None, 1, rt.memory()["resident_bytes"]))
    rows.append(measure("preloaded_switch_100", alternate(rt, rt.use_cases, expect="hot"), reps["switch"]))
    mem = rt.memory()
    rows.append(Row("patch_bytes", None, None, 1, nbytes))
    rows.append(Row("resident_per_preloaded_use_case", None, None, N_MANY,
                    sum(mem["preloaded_bytes"].values()) // N_MANY))
    return rows


def _base_rows(base: Path, feeds: dict[str, np.ndarray], reps: dict[str, int]) -> list[Row]:
    sess = ort.InferenceSession(str(base), providers=["CPUExecutionProvider"])
    return [measure("run_base", lambda: sess.run(None, feeds), reps["run"], warmup=1)]


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file())
