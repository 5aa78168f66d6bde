"""The bench report: rows plus the ratios the goals are stated in, as a table, JSON, or a plot.

These machines are noisy: only ratios of rows taken in one run compare. A goal is
``(numerator row, denominator row, limit, "<=" or ">=")``; memory rows (no times) compare by bytes.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lora_runtime.bench.timing import Row
from lora_runtime.errors import InputError

Goal = tuple[str, str, float | None, str]


def with_ratios(rows: list[Row], report: dict, goals: Mapping[str, Goal], generation: str | None = None
                ) -> dict:
    """Add the rows and the ratio table; with ``generation``, run_v* goals apply to that bundle's run row."""
    by = {r.name: r for r in rows}
    ratios = {}
    for num, den, limit, op in goals.values():
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


def machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu": cpu_name(),
            "python": platform.python_version()}


def versions() -> dict:
    return {"onnxruntime": ort.__version__, "numpy": np.__version__}


def cpu_name() -> str:
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
    rounds = "  rounds: quartiles (n)" if any("rounds" in v for v in report["ratios"].values()) else ""
    lines += ["", f"{'ratio (p50)':<40} {'value':>10} {'goal':>10} {'met':>5}{rounds}"]
    for name, v in report["ratios"].items():
        met = "" if v["met"] is None else ("yes" if v["met"] else "NO")
        lines.append(f"{name:<40} {v['value']:>10.4g} {v['goal'] or '':>10} {met:>5}  {v.get('rounds', '')}".rstrip())
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
        fig.savefig(path, dpi=110, format="png")
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
    fig.savefig(path, dpi=110, format="png")
