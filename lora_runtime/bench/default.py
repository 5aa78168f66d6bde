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

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lora_runtime.bench.report import machine, versions, with_ratios
from lora_runtime.bench.timing import Row, alternate, disk_rows, limit_rows, measure, measure_interleaved, next_patch
from lora_runtime.bundle import Bundle
from lora_runtime.compiler.compile import compile_bundle
from lora_runtime.compiler.options import CompileOptions, QuantOptions, WeightOnlyOptions
from lora_runtime.export import export_ort_adapter, merge_use_case
from lora_runtime.models.default import AdapterRecipe, build_default, recipe, write_adapter
from lora_runtime.progress import Progress
from lora_runtime.runtime.session import make_session
from lora_runtime.runtime.switcher import Runtime
from lora_runtime.version import __version__

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
    bundles["v2_f16"] = compile_bundle(model.base, model.adapters, work / "bundle-v2_f16",
                                       CompileOptions("v2", lora_dtype="float16"), use_cases=singles,
                                       sample_inputs=model.inputs(), force=True)
    bar.step("compiled v2_f16")
    calibration = work / "calibration.npz"
    np.savez(calibration, **{k: np.stack([model.inputs(seed=100 + i)[k] for i in range(8 if quick else 24)])
                             for k in model.inputs()})
    for key, gen, mode in INT8:
        bundles[key] = compile_bundle(model.base, model.adapters, work / f"bundle-{key}",
                                      CompileOptions(gen, quant=QuantOptions(mode, calibration, ort_reference=False)),
                                      use_cases=specs[gen][1], force=True)
        bar.step(f"compiled {key}")
    for gen, kind in QUANTIZED:
        bundles[f"{gen}_{kind}"] = compile_bundle(model.base, model.adapters, work / f"bundle-{gen}_{kind}",
                                                  CompileOptions(gen, weight_only=WeightOnlyOptions.of(kind)),
                                                  use_cases=specs[gen][1], sample_inputs=model.inputs(), force=True)
        bar.step(f"compiled {gen}_{kind}")
    (work / "merged").mkdir(parents=True, exist_ok=True)
    merged = merge_use_case(bundles["v2"], work / "merged" / "summarize.onnx", use_case="summarize", force=True)
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
        flip = alternate(rt3, ["summarize", "translate"])
        rows.append(measure("hot_switch", flip, reps["switch"]))
        rt100 = Runtime.open(b["v3_100"].path, preload="all")
        rows.append(measure("hot_switch_100", alternate(rt100, rt100.use_cases), reps["switch"]))
        bar.step("hot switches")

        rt2 = Runtime.open(b["v2"].path)
        patch = b["v2"].file(b["v2"].manifest.adapter("summarize").patch or "")
        patch_bytes = rt2.layout.nbytes
        cycle = alternate(rt2, ["summarize", "translate", "tone"], expect="cold")
        rows.append(measure("cold_switch_cache", cycle, reps["cold"], nbytes=patch_bytes))
        rows += disk_rows(cycle, next_patch(rt2, ["summarize", "translate", "tone"]), patch_bytes, reps["disk"])
        bar.step("cold switches")

        rt16 = Runtime.open(b["v2_f16"].path)
        rows.append(measure("cold_switch_cache_f16", alternate(rt16, ["summarize", "translate", "tone"],
                                                               expect="cold"), reps["cold"], nbytes=rt16.layout.nbytes))
        bar.step("float16 slots")

        rt8 = Runtime.open(b["int8_v3_full"].path)
        rows.append(measure("hot_switch_int8_full", alternate(rt8, ["summarize", "translate"], expect="hot"),
                            reps["switch"]))
        del rt8

        rt_many = Runtime.open(b["v2_100"].path)
        rows.append(measure("cold_switch_cache_100", alternate(rt_many, rt_many.use_cases, expect="cold"),
                            reps["cold"], nbytes=rt_many.layout.nbytes))
        rt_many.preload(rt_many.use_cases)
        rows.append(measure("preloaded_switch_100", alternate(rt_many, rt_many.use_cases, expect="hot"),
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


def _ort_adapter_rows(bundle: Bundle, feeds: dict[str, np.ndarray], work: Path, runs: int) -> list[Row]:
    sess = make_session(bundle)
    names = ["summarize", "translate", "tone"]
    (work / "ort_adapters").mkdir(parents=True, exist_ok=True)
    paths = [export_ort_adapter(bundle, n, work / "ort_adapters" / f"{n}.onnx_adapter", force=True) for n in names]
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
    return with_ratios(rows, {
        "lora_runtime": __version__, "size": size, "quick": quick, "machine": machine(), "versions": versions(),
        "accuracy": {f"{key} vs the float32 bundle, output SQNR dB": _sqnr(s.bundles[key], "float32_bundle")
                     for key in ("v2_f16", *(f"{g}_{k}" for g, k in QUANTIZED))} | {
            f"run_{key} ({mode} encodings, w8a8) vs FP32 on held-out inputs, SQNR dB": _sqnr(s.bundles[key], "fp32")
            for key, _, mode in INT8},
        "model": {"recipe": r.name, "layers": r.n_layers, "d_model": r.d_model, "base_bytes": base_bytes,
                  "seq_len": r.seq_len, "points_v2": len(s.bundles["v2"].manifest.points)}}, GOALS)


def _sqnr(bundle: Bundle, key: str) -> dict[str, float]:
    measured = bundle.manifest.accuracy_of(key)
    return measured.sqnr_db if measured else {}


