"""``lora-runtime bench``: switch latency and inference cost against the physical limits and the peers.

Everything is measured in one run, side by side, and reported as rows
``{"name", "p50_us", "p99_us", "runs", "bytes"}`` plus the ratios the goals are stated in: these
machines are noisy, ratios from one run are what compare. What each row means:

=========================  =========================================================================
hot_switch                 v3 group resident: switch between use-cases (strengths only)
hot_switch_100             the same with 100 use-cases, cycling through all of them
cold_switch_cache          v2, three adapters, two scratch sets: every switch copies a patch
                           (page cache warm)
cold_switch_disk           the same after dropping the patch's pages (``posix_fadvise DONTNEED``)
cold_switch_cache_100      v2 with 100 adapters cycled, none preloaded: every switch copies a patch
cold_switch_cache_f16      the cold switch with float16 LoRA slots (``--lora-dtype float16``): half the bytes
run_v2_f16                 a v2 run with float16 slots (the branch widens A/B to float32 per run)
run_v2_int8/_int4, run_v3_int4  runs with the base weights quantized (``--base-weights``; MatMulNBits)
run_int8_*                 INT8 QDQ bundles (``--encodings``, w8a8): v1 non-updatable, v2 full, v3 both
hot_switch_int8_full       a v3 switch with fully updatable encodings (binds the use-case's encodings set)
bundle_bytes_*             what a bundle holds on disk besides linked base data (quantized bundles own
                           their weights: the float32 data is not linked)
preloaded_switch_100       v2 with 100 adapters, all preloaded ("RAM"): a switch rebinds, copies nothing
memcpy                     numpy copy of the patch's bytes between preallocated buffers (RAM limit)
file_read                  open + ``readinto`` of the patch file into a preallocated buffer + close
file_read_2buf             the same alternating between two buffers, as a double-buffered switch must
file_read_disk             the same after dropping its pages (storage limit)
runtime_open               ``Runtime.open`` of the v2 bundle (what a switch must be a small part of)
session_rebuild            a new ``InferenceSession`` on a model with the adapter merged into the
                           weights (what a naive user, and AIMET's ``load_adapter``, do per switch)
ort_adapter_load           ONNX Runtime's ``LoraAdapter.Load`` of an exported ``.onnx_adapter``
ort_adapter_switch         a run with ``RunOptions.add_active_adapter`` of another adapter than the
                           previous run's (switch + first run)
ort_adapter_run            steady runs with the same active adapter
run_base / run_merged      the base model; the adapter baked into the weights (zero-overhead ideal)
run_v1 / run_v2 / run_v3   one adapter active through the runtime (v3: the 3-adapter group)
run_v3_n{1,2,4,8}          v3 groups of n rank-16 adapters on q/k/v/o, all active
patch_bytes(_100)          memory rows (bytes only): a v2 patch of the 3-adapter / 100-adapter bundle
resident_*                 bytes resident per preloaded use-case (100-adapter bundle), and scratch sets
=========================  =========================================================================
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lora_runtime import __version__
from lora_runtime.accuracy import synthesize_inputs
from lora_runtime.bundle import Bundle
from lora_runtime.compiler.compile import compile_bundle
from lora_runtime.compiler.export import export_ort_adapter, merge_use_case
from lora_runtime.default_model import AdapterRecipe, build_default, recipe, write_adapter
from lora_runtime.errors import InputError
from lora_runtime.progress import Progress
from lora_runtime.runtime.runtime import Runtime
from lora_runtime.runtime.simple import make_session

N_GROUP = (1, 2, 4, 8)
QUANTIZED = (("v2", "int8"), ("v2", "int4"), ("v3", "int4"))  # base weights quantized, LoRA float
INT8 = (("int8_v1", "v1", "non-updatable"), ("int8_v2", "v2", "full"), ("int8_v3", "v3", "non-updatable"),
        ("int8_v3_full", "v3", "full"))  # QDQ with encodings (w8a8), calibrated on 24 seeded inputs (--quick: 8)
N_MANY = 100

# goal name -> (numerator row, denominator row, limit, "<=" or ">=")
GOALS = {
    "cold_switch_cache / file_read": ("cold_switch_cache", "file_read", 1.3, "<="),
    "cold_switch_disk / file_read_disk": ("cold_switch_disk", "file_read_disk", 1.2, "<="),
    "session_rebuild / cold_switch_cache": ("session_rebuild", "cold_switch_cache", 200.0, ">="),
    "hot_switch / run_v3": ("hot_switch", "run_v3", 0.01, "<="),
    "hot_switch_100 / hot_switch": ("hot_switch_100", "hot_switch", 1.2, "<="),
    "run_v1 / run_merged": ("run_v1", "run_merged", 1.10, "<="),
    "run_v2 / run_merged": ("run_v2", "run_merged", 1.10, "<="),
    "run_v3_n4 / run_merged": ("run_v3_n4", "run_merged", 1.25, "<="),
    "cold_switch_cache / file_read_2buf": ("cold_switch_cache", "file_read_2buf", None, ""),
    "cold_switch_cache / memcpy": ("cold_switch_cache", "memcpy", None, ""),
    "cold_switch_cache_f16 / cold_switch_cache": ("cold_switch_cache_f16", "cold_switch_cache", None, ""),
    "run_v2_f16 / run_v2": ("run_v2_f16", "run_v2", None, ""),
    "run_v2_int8 / run_v2": ("run_v2_int8", "run_v2", None, ""),
    "run_int8_v3 / run_v3": ("run_int8_v3", "run_v3", None, ""),
    "run_int8_v2 / run_v2": ("run_int8_v2", "run_v2", None, ""),
    "run_int8_v3_full / run_int8_v3": ("run_int8_v3_full", "run_int8_v3", None, ""),
    "hot_switch_int8_full / hot_switch": ("hot_switch_int8_full", "hot_switch", None, ""),
    "run_v2_int4 / run_v2": ("run_v2_int4", "run_v2", None, ""),
    "bundle_bytes_v2_int4 / base_bytes": ("bundle_bytes_v2_int4", "base_bytes", 0.25, "<="),
    "ort_adapter_switch / run_v2": ("ort_adapter_switch", "run_v2", None, ""),
    "runtime_open / cold_switch_cache": ("runtime_open", "cold_switch_cache", None, ""),
}


@dataclass(frozen=True)
class Row:
    name: str
    p50_us: float | None
    p99_us: float | None
    runs: int
    bytes: int | None


def measure(name: str, fn: Callable[[], object], runs: int, *, warmup: int = 2,
            setup: Callable[[], object] | None = None, nbytes: int | None = None) -> Row:
    """p50/p99 of ``fn`` over ``runs`` calls; ``setup`` runs before each call, untimed."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = np.empty(runs)
    for i in range(runs):
        if setup:
            setup()
        t = time.perf_counter_ns()
        fn()
        times[i] = time.perf_counter_ns() - t
    return Row(name, float(np.percentile(times, 50) / 1e3), float(np.percentile(times, 99) / 1e3), runs, nbytes)


def measure_interleaved(fns: dict[str, Callable[[], object]], runs: int, block: int = 5) -> list[Row]:
    """Like :func:`measure` for several callables, in round-robin blocks so slow drift hits all alike.

    Each block starts with an untimed call: ONNX Runtime's worker threads of the session that ran
    before keep spinning for a moment after its run, and would be billed to whoever runs next.
    """
    times: dict[str, list[int]] = {name: [] for name in fns}
    while min(len(t) for t in times.values()) < runs:
        for name, fn in fns.items():
            fn()
            for _ in range(block):
                t = time.perf_counter_ns()
                fn()
                times[name].append(time.perf_counter_ns() - t)
    return [Row(name, float(np.percentile(t, 50) / 1e3), float(np.percentile(t, 99) / 1e3), len(t), None)
            for name, t in times.items()]


def drop_pages(path: Path) -> None:
    """Evict a file from the page cache (clean pages only; ours are)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_file(path: Path, buf: bytearray) -> None:
    with open(path, "rb", buffering=0) as f:
        f.readinto(buf)


def disk_rows(cycle: Callable[[], object], nxt: Callable[[], Path], nbytes: int, runs: int,
              warmup: int = 2) -> list[Row]:
    """``cold_switch_disk`` and ``file_read_disk``, taken in turns on the same file: each round drops the
    pages of the patch the next switch reads, reads it plainly, drops them again, then switches. Storage
    on these machines drifts a lot; in turns, both rows see the same device."""
    switch, read = [], []
    for i in range(runs + warmup):
        p = nxt()
        buf = bytearray(p.stat().st_size)
        drop_pages(p)
        t = time.perf_counter_ns()
        read_file(p, buf)
        r = time.perf_counter_ns() - t
        drop_pages(p)
        t = time.perf_counter_ns()
        cycle()
        w = time.perf_counter_ns() - t
        if i >= warmup:
            read.append(r)
            switch.append(w)
    return [Row(name, float(np.percentile(v, 50) / 1e3), float(np.percentile(v, 99) / 1e3), runs, size)
            for name, v, size in (("cold_switch_disk", switch, nbytes), ("file_read_disk", read, len(buf)))]


def limit_rows(patch: Path, nbytes: int, runs: int, disk_runs: int | None = None) -> list[Row]:
    """The physical limits for a patch: memcpy of its slot bytes, and reads of its file.

    ``file_read`` reads into one buffer again and again, which the CPU caches favour; a double-buffered
    switch must write the buffer it did not write last time, so ``file_read_2buf`` alternates between
    two buffers: the honest limit for a cold switch.
    """
    src, dst = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
    size = patch.stat().st_size
    bufs = [bytearray(size), bytearray(size)]
    turn = [0]

    def read_alternating() -> None:
        turn[0] ^= 1
        read_file(patch, bufs[turn[0]])

    rows = [measure("memcpy", lambda: np.copyto(dst, src), runs, nbytes=nbytes),
            measure("file_read", lambda: read_file(patch, bufs[0]), runs, nbytes=size),
            measure("file_read_2buf", read_alternating, runs, nbytes=size)]
    if disk_runs:  # without a cold switch to pair it with (see disk_rows)
        rows.append(measure("file_read_disk", lambda: read_file(patch, bufs[0]), disk_runs,
                            setup=lambda: drop_pages(patch), nbytes=size))
    return rows


@dataclass
class _Setup:
    work: Path
    base: Path
    feeds: dict[str, np.ndarray]
    bundles: dict[str, Bundle]
    merged: Path


def _prepare(size: str, work: Path, bar: Progress, quick: bool = False) -> _Setup:
    r = recipe(size)
    model = build_default(r, work / "model")
    adapters_dir = work / "model" / "adapters"
    group = {}
    for i in range(max(N_GROUP)):
        a = AdapterRecipe(f"n{i}", r=16, lora_alpha=32, seed=100 + i,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        if not (adapters_dir / a.name / "adapter_model.safetensors").is_file():
            write_adapter(a, r, adapters_dir / a.name)
        group[a.name] = adapters_dir / a.name
    bar.step("model")
    names = list(model.adapters)
    singles = ["base="] + [f"{a}={a}" for a in names]
    rng = np.random.default_rng(0)
    specs: dict[str, tuple[dict[str, Path], list[str], str]] = {
        "v1": (model.adapters, singles, "v1"), "v2": (model.adapters, singles, "v2"),
        "v3": (model.adapters, singles + ["mix=" + ",".join(f"{a}:0.5" for a in names)], "v3"),
        "v3_100": (model.adapters, [f"u{i}=" + ",".join(f"{a}:{s:.3f}" for a, s in zip(names, rng.random(3)))
                                    for i in range(N_MANY)], "v3"),
        "v2_100": ({f"m{i}": group[f"n{i % len(group)}"] for i in range(N_MANY)},
                   [f"m{i}=m{i}" for i in range(N_MANY)], "v2"),
    }
    for n in N_GROUP:
        sub = {k: group[k] for k in list(group)[:n]}
        specs[f"v3_n{n}"] = (sub, ["all=" + ",".join(sub), "base="], "v3")
    bundles = {}
    for key, (adapters, use_cases, gen) in specs.items():
        bundles[key] = compile_bundle(model.base, adapters, work / f"bundle-{key}", generation=gen,
                                      use_cases=use_cases, force=True)
        bar.step(f"compiled {key}")
    bundles["v2_f16"] = compile_bundle(model.base, model.adapters, work / "bundle-v2_f16", generation="v2",
                                       use_cases=singles, lora_dtype="float16", sample_inputs=model.inputs(),
                                       force=True)
    bar.step("compiled v2_f16")
    calibration = work / "calibration.npz"
    np.savez(calibration, **{k: np.stack([model.inputs(seed=100 + i)[k] for i in range(8 if quick else 24)])
                             for k in model.inputs()})
    for key, gen, mode in INT8:
        bundles[key] = compile_bundle(model.base, model.adapters, work / f"bundle-{key}", generation=gen,
                                      use_cases=specs[gen][1], encodings=mode, calibration=calibration,
                                      ort_reference=False, force=True)
        bar.step(f"compiled {key}")
    for gen, kind in QUANTIZED:
        bundles[f"{gen}_{kind}"] = compile_bundle(
            model.base, model.adapters, work / f"bundle-{gen}_{kind}", generation=gen, base_weights=kind,
            use_cases=specs[gen][1], sample_inputs=model.inputs(), force=True)
        bar.step(f"compiled {gen}_{kind}")
    merged = merge_use_case(bundles["v2"], work / "merged" / "summarize.onnx", use_case="summarize")
    return _Setup(work, model.base, model.inputs(), bundles, merged)


def run_bench(size: str = "bench", work: Path | None = None, quick: bool = False) -> dict:
    """Build, compile and measure everything; return the JSON-ready report."""
    work = Path(work or f"graphs/built/bench-{size}")
    k = 0.2 if quick else 1.0
    reps = {name: max(int(n * k), 3) for name, n in {
        "switch": 2000, "cold": 300, "disk": 100, "copy": 300, "run": 30, "rebuild": 5, "open": 5}.items()}
    rows: list[Row] = []
    with Progress("bench", total=17 + len(N_GROUP) + len(QUANTIZED) + len(INT8), delay_s=0.0) as bar:
        s = _prepare(size, work, bar, quick)
        b = s.bundles
        feeds = s.feeds

        # --- switches --------------------------------------------------------------------------------
        rt3 = Runtime.open(b["v3"].path)
        flip = _alternate(rt3, ["summarize", "translate"])
        rows.append(measure("hot_switch", flip, reps["switch"]))
        rt100 = Runtime.open(b["v3_100"].path, preload="all")
        rows.append(measure("hot_switch_100", _alternate(rt100, rt100.use_cases), reps["switch"]))
        bar.step("hot switches")

        rt2 = Runtime.open(b["v2"].path)
        patch = b["v2"].file(b["v2"].manifest.adapter("summarize").patch or "")
        patch_bytes = rt2.layout.nbytes
        cycle = _alternate(rt2, ["summarize", "translate", "tone"], expect="cold")
        rows.append(measure("cold_switch_cache", cycle, reps["cold"], nbytes=patch_bytes))
        rows += disk_rows(cycle, _next_patch(rt2, ["summarize", "translate", "tone"]), patch_bytes, reps["disk"])
        bar.step("cold switches")

        rt16 = Runtime.open(b["v2_f16"].path)
        rows.append(measure("cold_switch_cache_f16", _alternate(rt16, ["summarize", "translate", "tone"],
                                                               expect="cold"), reps["cold"], nbytes=rt16.layout.nbytes))
        bar.step("float16 slots")

        rt8 = Runtime.open(b["int8_v3_full"].path)
        rows.append(measure("hot_switch_int8_full", _alternate(rt8, ["summarize", "translate"], expect="hot"),
                            reps["switch"]))
        del rt8

        rt_many = Runtime.open(b["v2_100"].path)
        rows.append(measure("cold_switch_cache_100", _alternate(rt_many, rt_many.use_cases, expect="cold"),
                            reps["cold"], nbytes=rt_many.layout.nbytes))
        rt_many.preload(rt_many.use_cases)
        rows.append(measure("preloaded_switch_100", _alternate(rt_many, rt_many.use_cases, expect="hot"),
                            reps["switch"]))
        mem = rt_many.memory()
        resident_per = sum(mem["preloaded_bytes"].values()) // N_MANY
        patch_bytes_many = rt_many.layout.nbytes
        del rt_many
        bar.step("100 use-cases")

        rows += limit_rows(patch, patch_bytes, reps["copy"])
        bar.step("limits")

        rows.append(measure("runtime_open", lambda: Runtime.open(b["v2"].path), reps["open"], warmup=1))
        so = ort.SessionOptions()
        rows.append(measure("session_rebuild", lambda: ort.InferenceSession(str(s.merged), so,
                                                                            providers=["CPUExecutionProvider"]),
                            reps["rebuild"], warmup=1))
        bar.step("session rebuild")

        rows += _ort_adapter_rows(b["v2"], feeds, s.work, reps["run"])
        bar.step("ONNX Runtime adapters")

        # --- inference cost: every run row measured round-robin, so drift hits all of them alike ------
        base_sess = ort.InferenceSession(str(s.base), providers=["CPUExecutionProvider"])
        merged_sess = ort.InferenceSession(str(s.merged), providers=["CPUExecutionProvider"])
        runners: dict[str, Callable[[], object]] = {
            "run_base": lambda: base_sess.run(None, feeds), "run_merged": lambda: merged_sess.run(None, feeds)}
        for key, use_case in [("v1", "summarize"), ("v2", "summarize"), ("v3", "summarize"),
                              ("v2_f16", "summarize"), *((f"{g}_{k}", "summarize") for g, k in QUANTIZED),
                              *((key, "summarize") for key, _, _ in INT8),
                              *((f"v3_n{n}", "all") for n in N_GROUP)]:
            rt = {"v2": rt2, "v3": rt3, "v2_f16": rt16}.get(key) or Runtime.open(b[key].path)
            rt.switch(use_case)
            runners[f"run_{key}"] = lambda rt=rt: rt.run(feeds)
        bar.step("sessions for runs")
        rows += measure_interleaved(runners, reps["run"])
        bar.step("runs")

        rows.append(Row("patch_bytes", None, None, 1, patch_bytes))
        rows.append(Row("base_bytes", None, None, 1, sum(p.stat().st_size for p in s.base.parent.glob("base.onnx*"))))
        for key in ("v2", *(f"{g}_{k}" for g, k in QUANTIZED)):
            m = b[key].manifest
            rows.append(Row(f"bundle_bytes_{key}", None, None, 1,
                            sum(f.nbytes for k, f in m.files.items() if k not in m.base.data_files)))
        rows.append(Row("patch_bytes_100", None, None, N_MANY, patch_bytes_many))
        rows.append(Row("resident_per_preloaded_use_case", None, None, N_MANY, resident_per))
        rows.append(Row("resident_scratch_sets", None, None, 1, rt2.memory()["scratch_bytes"]))
    return _report(rows, s, size, quick)


def _alternate(rt: Runtime, names: list[str], expect: str | None = None) -> Callable[[], object]:
    """A callable that switches to the next use-case in turn (and checks the switch kind)."""
    state = {"i": 0}

    def step() -> None:
        state["i"] = (state["i"] + 1) % len(names)
        report = rt.switch(names[state["i"]])
        if expect and report.kind != expect:
            raise RuntimeError(f"bench expected a {expect} switch to {names[state['i']]}, got {report.kind}")

    return step


def _next_patch(rt: Runtime, names: list[str]) -> Callable[[], Path]:
    """The patch the next ``_alternate`` step will read (to drop its pages first)."""
    def nxt() -> Path:
        current = names.index(rt.current) if rt.current in names else -1
        name = names[(current + 1) % len(names)]
        return rt.bundle.file(rt.manifest.adapter(name).patch or "")
    return nxt


def _ort_adapter_rows(bundle: Bundle, feeds: dict[str, np.ndarray], work: Path, runs: int) -> list[Row]:
    sess = make_session(bundle)
    names = ["summarize", "translate", "tone"]
    (work / "ort_adapters").mkdir(exist_ok=True)
    paths = [export_ort_adapter(bundle, n, work / "ort_adapters" / f"{n}.onnx_adapter") for n in names]
    load = measure("ort_adapter_load", lambda: ort.LoraAdapter().Load(str(paths[0])), runs)
    options = []
    for p in paths:
        a = ort.LoraAdapter()
        a.Load(str(p))
        ro = ort.RunOptions()
        ro.add_active_adapter(a)
        options.append((a, ro))
    full = feeds | {"lora_alpha": np.array(1.0, np.float32)}
    state = {"i": 0}

    def switch_run() -> None:
        state["i"] = (state["i"] + 1) % len(options)
        sess.run(None, full, options[state["i"]][1])

    switch = measure("ort_adapter_switch", switch_run, runs)
    steady = measure("ort_adapter_run", lambda: sess.run(None, full, options[0][1]), runs)
    return [load, switch, steady]


def _report(rows: list[Row], s: _Setup, size: str, quick: bool) -> dict:
    r = recipe(size)
    base_bytes = sum(p.stat().st_size for p in s.base.parent.glob("base.onnx*"))
    return _with_ratios(rows, {
        "lora_runtime": __version__, "size": size, "quick": quick, "machine": _machine(), "versions": _versions(),
        "accuracy": {f"{key} vs the float32 bundle, output SQNR dB": s.bundles[key].manifest.extra["accuracy"][
            "use_cases"] for key in ("v2_f16", *(f"{g}_{k}" for g, k in QUANTIZED))} | {
            f"run_{key} ({mode} encodings, w8a8) vs FP32 on held-out inputs, SQNR dB":
                s.bundles[key].manifest.extra["encodings"]["sqnr_db"] for key, _, mode in INT8},
        "model": {"recipe": r.name, "layers": r.n_layers, "d_model": r.d_model, "base_bytes": base_bytes,
                  "seq_len": r.seq_len, "points_v2": len(s.bundles["v2"].manifest.points)}})


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def format_table(report: dict) -> str:
    lines = [f"lora-runtime bench ({report['size']}{', quick' if report['quick'] else ''}) on "
             f"{report['machine']['cpus']} cpus, {report['machine']['cpu']}, onnxruntime "
             f"{report['versions']['onnxruntime']}", "",
             f"{'row':<34} {'p50 us':>12} {'p99 us':>12} {'runs':>6} {'bytes':>12}"]
    for r in report["results"]:
        p50 = f"{r['p50_us']:.1f}" if r["p50_us"] is not None else "-"
        p99 = f"{r['p99_us']:.1f}" if r["p99_us"] is not None else "-"
        nbytes = f"{r['bytes']:,}" if r["bytes"] is not None else ""
        lines.append(f"{r['name']:<34} {p50:>12} {p99:>12} {r['runs']:>6} {nbytes:>12}")
    for what, values in report.get("accuracy", {}).items():
        lines += ["", f"accuracy: {what}: " + ", ".join(f"{k} {v:.1f}" for k, v in values.items())]
    for what, values in report.get("accuracy_text", {}).items():
        lines += ["", f"accuracy: {what}: " + ", ".join(f"{k} {v}" for k, v in values.items())]
    lines += ["", f"{'ratio (p50)':<40} {'value':>10} {'goal':>10} {'met':>5}"]
    for name, v in report["ratios"].items():
        met = "" if v["met"] is None else ("yes" if v["met"] else "NO")
        lines.append(f"{name:<40} {v['value']:>10.4g} {v['goal'] or '':>10} {met:>5}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'lora_runtime[plot]'") from None
    by = {r["name"]: r for r in report["results"]}
    switch = [n for n in ("hot_switch", "hot_switch_100", "hot_switch_int8_full", "preloaded_switch_100",
                          "cold_switch_cache",
                          "cold_switch_cache_f16",
                          "cold_switch_cache_100", "cold_switch_disk", "memcpy", "file_read", "file_read_2buf",
                          "file_read_disk",
                          "ort_adapter_load", "ort_adapter_switch", "runtime_open", "session_rebuild") if n in by]
    runs = [n for n in ("run_base", "run_merged", "run_v1", "run_v2", "run_v2_f16", "run_v2_int8", "run_v2_int4",
                        "run_v3_int4", "run_int8_v1", "run_int8_v2", "run_int8_v3", "run_int8_v3_full", "run_v3",
                        "run_v3_n1", "run_v3_n2",
                        "run_v3_n4", "run_v3_n8", "ort_adapter_run") if n in by]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 5.5))
    colors = ["tab:green" if n.startswith(("hot", "preloaded")) else "tab:blue" if n.startswith("cold")
              else "tab:gray" if n.startswith(("memcpy", "file_read")) else "tab:olive"
              if n == "runtime_open" else "tab:red" for n in switch]
    labels = [f"{n} (+ a run)" if n == "ort_adapter_switch" else n for n in switch]
    a1.barh(labels, [by[n]["p50_us"] for n in switch], color=colors)
    a1.set_xscale("log")
    a1.set_xlabel("p50 latency (us, log scale)")
    a1.set_title("switch latency vs physical limits (gray) and peers (red)")
    a1.invert_yaxis()
    if "run_merged" not in by or not runs:
        fig.savefig(path, dpi=110)
        return
    merged = by["run_merged"]["p50_us"]
    a2.barh(runs, [by[n]["p50_us"] / merged for n in runs], color="tab:purple")
    a2.axvline(1.0, color="k", lw=0.8)
    a2.set_xlabel("run time / run_merged (p50)")
    a2.set_title("inference cost per generation vs merged weights")
    a2.invert_yaxis()
    fig.suptitle(f"lora-runtime bench: {report['model']['recipe']} model, {report['machine']['cpus']} cpus, "
                 f"onnxruntime {report['versions']['onnxruntime']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_bench_bundle(path: Path, quick: bool = False) -> dict:
    """The rows a given bundle supports: its switches next to the limits, its run cost next to merged."""
    from lora_runtime.bundle import open_bundle

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
            rows.append(measure("hot_switch", _alternate(rt, m.use_case_names), n["switch"]))
        patch = bundle.file(m.group_patch or m.adapter(m.adapters[0].name).patch or "")
        adapters = list(dict.fromkeys(next(iter(m.use_case(u).strengths)) for u in named))
        if m.generation != "v3" and len(adapters) >= 3:
            firsts = [next(u for u in named if next(iter(m.use_case(u).strengths)) == a) for a in adapters]
            cycle = _alternate(rt, firsts, expect="cold")
            rows.append(measure("cold_switch_cache", cycle, n["cold"], nbytes=rt.layout.nbytes))
            rows += disk_rows(cycle, _next_patch(rt, firsts), rt.layout.nbytes, n["disk"])
        bar.step("switches")
        paired = any(r.name == "file_read_disk" for r in rows)
        rows += limit_rows(patch, rt.layout.nbytes, n["cold"], None if paired else n["disk"])
        bar.step("limits")
        rows.append(measure("runtime_open", lambda: Runtime.open(path), n["open"], warmup=1))
        bar.step("open")
        if named:
            rt.switch(named[0])
            rows.append(measure(f"run_{m.generation}", lambda: rt.run(feeds), n["run"]))
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                merged = merge_use_case(bundle, Path(tmp) / "merged.onnx", use_case=named[0])
                rows.append(measure("session_rebuild", lambda: ort.InferenceSession(
                    str(merged), providers=["CPUExecutionProvider"]), 3, warmup=1))
                sess = ort.InferenceSession(str(merged), providers=["CPUExecutionProvider"])
                rows.append(measure("run_merged", lambda: sess.run(None, feeds), n["run"]))
        bar.step("runs")
        rows.append(Row("patch_bytes", None, None, 1, rt.layout.nbytes))
        bar.step("done")
    return _with_ratios(rows, {"lora_runtime": __version__, "size": f"bundle {path}", "quick": quick,
                               "machine": _machine(), "versions": _versions(),
                               "model": {"recipe": str(path), "generation": m.generation, "points": len(m.points)}},
                        generation=m.generation)


def _with_ratios(rows: list[Row], report: dict, generation: str | None = None) -> dict:
    """Add the rows and the ratio table; with ``generation``, run_v* goals apply to that bundle's run row."""
    by = {r.name: r for r in rows}
    ratios = {}
    for num, den, limit, op in GOALS.values():
        if generation and num.startswith("run_v"):
            num = f"run_{generation}"
        key = f"{num} / {den}"
        if key in ratios or num not in by or den not in by:
            continue
        a, b = by[num], by[den]
        if a.p50_us and b.p50_us:
            value = a.p50_us / b.p50_us
        elif a.p50_us is None and b.p50_us is None and a.bytes and b.bytes:
            value = a.bytes / b.bytes  # memory rows compare by bytes
        else:
            continue
        met = None if limit is None else (value <= limit if op == "<=" else value >= limit)
        ratios[key] = {"value": value, "goal": f"{op} {limit}" if limit is not None else None, "met": met}
    return report | {"results": [asdict(x) for x in rows], "ratios": ratios}


def _machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu": _cpu_name(),
            "python": platform.python_version()}


def _versions() -> dict:
    return {"onnxruntime": ort.__version__, "numpy": np.__version__}


def main_bench(bundle: str | None, size: str, json_path: str | None, plot_path: str | None, quick: bool,
               work: str | None) -> dict:
    if bundle is not None:
        report = run_bench_bundle(Path(bundle), quick)
    elif size == "smollm2":
        from lora_runtime.bench_llm import run_bench_smollm2

        report = run_bench_smollm2(Path(work) if work else None, quick)
    elif size == "1b":
        from lora_runtime.bench_scale import run_bench_scale

        report = run_bench_scale(size, Path(work) if work else None, quick)
    else:
        report = run_bench(size, Path(work) if work else None, quick)
    print(format_table(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {json_path}", file=sys.stderr)
    if plot_path:
        plot(report, Path(plot_path))
        print(f"wrote {plot_path}", file=sys.stderr)
    return report
