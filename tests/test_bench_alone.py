"""Rows taken alone (lora_runtime.bench.alone): each task in a child process of its own, its rows named as asked,
every round's calls counted, a failing child reported by the rows it was to take. No timing is asserted."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lora_runtime.bench import genai
from lora_runtime.bench.alone import (
    Plain,
    TaskFailed,
    genai_tasks,
    measure_alone,
    paired,
    plain_task,
    run_task,
    runtime_task,
)
from lora_runtime.bench.report import format_table

PROMPT = [{"role": "user", "content": "Give me three tips for better sleep."}]


@pytest.fixture(scope="module")
def prompt_ids(smollm2_blocks: Path) -> list[int]:
    from lora_runtime.llm import Chat

    return Chat.load(smollm2_blocks).prompt_ids(PROMPT)


def test_plain_and_runtime_tasks_in_children(smollm2_blocks: Path, prompt_ids: list[int], tmp_path: Path) -> None:
    from lora_runtime.compiler.compile import compile_bundle
    from lora_runtime.demo_llm import shipped_adapters

    b = compile_bundle(smollm2_blocks / "base.onnx", {"listify": shipped_adapters()["listify"]}, tmp_path / "b",
                       generation="v3", use_cases=["listify=listify"])
    tasks = {"base": plain_task(smollm2_blocks / "base.onnx", prompt_ids, 256,
                                {"decode": "decode_x", "prefill": "prefill_x"}),
             "qv8": runtime_task(b.path, "listify", prompt_ids, 256, {"decode": "decode_qv8_x", "open": "open_x"})}
    rounds = []
    by_round: dict[str, list[float]] = {}
    rows = {r.name: r for r in measure_alone(tasks, 8, rounds=2, on_round=rounds.append, by_round=by_round)}
    assert rounds == [0, 1]
    # each row's p50 in each round, in order; the p50 of the calls pooled lies between the rounds' p50s
    assert set(by_round) == set(rows) and all(len(v) == 2 for v in by_round.values())
    for name, v in by_round.items():
        assert min(v) <= rows[name].p50_us <= max(v), name
    got = paired(by_round, "decode_qv8_x", "decode_x")
    assert got is not None and got.rounds == 2
    assert min(a / b for a, b in zip(by_round["decode_qv8_x"], by_round["decode_x"])) <= got.value
    assert set(rows) == {"decode_x", "prefill_x", "decode_qv8_x", "open_x"}
    assert rows["decode_x"].runs == rows["decode_qv8_x"].runs == 8  # 4 calls in each of 2 rounds
    assert rows["prefill_x"].runs == 6  # a quarter of the decode calls, at least 3, per round
    assert rows["open_x"].runs == 2 and rows["open_x"].bytes > 0  # one open per process: the resident memory it added
    assert all(0 < r.p50_us <= r.p99_us for r in rows.values())


def test_a_task_measures_what_it_names(smollm2_blocks: Path, prompt_ids: list[int]) -> None:
    """In this process: the decode row runs one token at the prompt's context, the same token each time, so the
    plain session's logits are the same before and after the timed calls."""
    task = plain_task(smollm2_blocks / "base.onnx", prompt_ids, 256, {"decode": "d"})
    times = run_task(task, 3)["times"]
    assert list(times) == ["d"] and len(times["d"]) == 3 and min(times["d"]) > 0
    plain = Plain(smollm2_blocks / "base.onnx", 256)
    step = plain.stepper(prompt_ids)
    first = step()[0][-1].copy()
    step()
    assert (step()[0][-1] == first).all()
    assert plain.cache.length == len(prompt_ids)


def test_failing_child_names_its_rows(tmp_path: Path) -> None:
    task = plain_task(tmp_path / "missing.onnx", [1, 2], 16, {"decode": "decode_missing"})
    with pytest.raises(TaskFailed, match="decode_missing.*failed"):
        measure_alone({"m": task}, 3, rounds=1)


def test_genai_tasks_skipped_with_the_reason(tmp_path: Path) -> None:
    tasks, why = genai_tasks([1, 2, 3], 64, models=tmp_path / "none")
    assert tasks == {} and why and "\n" not in why


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None,
                    reason="onnxruntime-genai is the [genai] extra")
def test_genai_task_in_a_child(prompt_ids: list[int]) -> None:
    models = genai.genai_models()
    if genai.missing_models(models):
        pytest.skip(genai.missing_models(models))
    tasks, why = genai_tasks(prompt_ids, 256, models=models)
    assert why is None
    assert {r for t in tasks.values() for r in t["rows"].values()} == {
        "genai_decode_fp32", "genai_prefill_fp32", "genai_decode_int4", "genai_prefill_int4",
        "genai_decode_fp32_qv8", "genai_decode_int4_qv8", "genai_open_fp32", "genai_open_int4"}
    rows = measure_alone({"int4_qv8": tasks["genai_int4_qv8"]}, 3, rounds=1)
    assert [r.name for r in rows] == ["genai_decode_int4_qv8"] and rows[0].p50_us > 0


def test_paired_ratio_is_the_median_of_the_rounds_ratios() -> None:
    """Worked by hand: rounds' ratios 2, 2, 3, 2 -> median 2, quartiles 2 and 2.25 (linear between the sorted 2, 2,
    2, 3); a drift that slows both rows in one round (round 4: both x2) leaves its ratio as it is."""
    by_round = {"a": [2.0, 4.0, 6.0, 16.0], "b": [1.0, 2.0, 2.0, 8.0], "short": [1.0]}
    got = paired(by_round, "a", "b")
    assert (got.value, got.q25, got.q75, got.rounds) == (2.0, 2.0, 2.25, 4)
    assert paired(by_round, "a", "short") is None  # not taken in every round
    assert paired(by_round, "a", "missing") is None


def test_the_table_shows_a_ratio_s_rounds() -> None:
    report = {"size": "smollm2", "quick": False, "machine": {"cpus": 2, "cpu": "x"}, "versions": {"onnxruntime": "1"},
              "results": [], "ratios": {"decode_qv8_x / decode_x": {"value": 1.08, "goal": "<= 1.1", "met": True,
                                                                   "rounds": "1.02-1.15 (6)"},
                                        "other": {"value": 2.0, "goal": None, "met": None}}}
    lines = format_table(report).splitlines()
    row = next(line for line in lines if line.startswith("decode_qv8_x / decode_x"))
    assert row.split()[3:] == ["1.08", "<=", "1.1", "yes", "1.02-1.15", "(6)"]
    assert next(line for line in lines if line.startswith("other")).split() == ["other", "2"]
    assert "rounds: quartiles" in lines[lines.index(row) - 1]
    del report["ratios"]["decode_qv8_x / decode_x"]  # no ratio taken in rounds: no such column
    assert "rounds" not in format_table(report)
