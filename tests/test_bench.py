"""The bench produces every row the issue names, with sane values (no timing is asserted: that is its job)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from lora_runtime.bench.bundle import run_bench_bundle
from lora_runtime.bench.default import run_bench
from lora_runtime.bench.report import format_table, plot
from lora_runtime.cli import main

ROWS = ["hot_switch", "hot_switch_100", "cold_switch_cache", "cold_switch_disk", "cold_switch_cache_100",
        "cold_switch_cache_f16", "run_v2_f16", "file_read_2buf", "run_v2_int8", "run_v2_int4", "run_v3_int4",
        "run_int8_v1", "run_int8_v2", "run_int8_v3", "run_int8_v3_full", "hot_switch_int8_full",
        "preloaded_switch_100", "memcpy", "file_read", "file_read_disk", "runtime_open", "session_rebuild",
        "ort_adapter_load", "ort_adapter_switch", "ort_adapter_run", "run_base", "run_merged", "run_v1", "run_v2",
        "run_v3", "run_v3_n1", "run_v3_n2", "run_v3_n4", "run_v3_n8"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return run_bench("tiny", tmp_path_factory.mktemp("bench"), quick=True)


def test_every_row_is_measured(report):
    by = {r["name"]: r for r in report["results"]}
    for name in ROWS:
        r = by[name]
        assert set(r) == {"name", "p50_us", "p99_us", "runs", "bytes"}
        assert 0 < r["p50_us"] <= r["p99_us"] and r["runs"] >= 3, name
    patch = by["patch_bytes"]["bytes"]
    assert by["cold_switch_cache"]["bytes"] == by["memcpy"]["bytes"] == patch > 0
    # a preloaded use-case costs exactly its patch, nothing hidden
    assert by["resident_per_preloaded_use_case"]["bytes"] == by["patch_bytes_100"]["bytes"] > 0
    assert by["resident_scratch_sets"]["bytes"] == 2 * patch
    json.dumps(report)
    assert {"cold_switch_cache / file_read", "session_rebuild / cold_switch_cache", "run_v3_n4 / run_merged",
            "hot_switch / run_v3"} <= set(report["ratios"])
    table = format_table(report)
    assert all(name in table for name in ROWS)


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is the [plot] extra")
def test_plot_writes_a_png(report, tmp_path):
    plot(report, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_of_a_bundle(tiny, tmp_path):
    from lora_runtime import compile_bundle

    b = compile_bundle(tiny.base, tiny.adapters, tmp_path / "b", generation="v2")
    report = run_bench_bundle(b.path, quick=True)
    names = {r["name"] for r in report["results"]}
    assert {"cold_switch_cache", "cold_switch_disk", "memcpy", "file_read", "run_v2", "run_merged",
            "session_rebuild"} <= names
    assert main(["bench", str(tmp_path / "missing"), "--quick"]) == 2


def test_interleaved_sessions_are_quiet():
    """Sessions that take turns in one process (bench --model smollm2's own v1/v2/v3 rows) do not spin between runs
    (an idle spinning session slowed the next one); rows against a peer are taken alone (test_bench_alone)."""
    from lora_runtime.bench.timing import quiet_options

    assert quiet_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
