"""llama.cpp's rows (lora_runtime.bench.llamacpp): found or skipped with the reason, its llama-bench JSON read as
ns per sample, and a llama-bench process taking its turn in bench.alone's rounds. The JSON fixture is real
llama-bench output (llama.cpp c392e50, SmolLM2's Q4_1 file, ``-p 38 -n 16 -r 3 -o json``); the process here is a
stand-in script that prints it. No timing is asserted."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from lora_runtime.bench.alone import TaskFailed, measure_alone
from lora_runtime.bench.blocks import ratio_goal
from lora_runtime.bench.llamacpp import LLAMA_BENCH_ENV, find_llama_bench, llamacpp_task, parse

FIXTURE = Path(__file__).parent / "fixtures" / "llamacpp" / "llama-bench-q4_1.json"
ROWS = {"decode": "llamacpp_decode_q4_1", "prefill": "llamacpp_prefill_q4_1"}


def test_llama_bench_json_as_ns_per_sample() -> None:
    tests = json.loads(FIXTURE.read_text())
    pp = next(t for t in tests if t["n_prompt"] and not t["n_gen"])
    tg = next(t for t in tests if t["n_gen"] and not t["n_prompt"])
    got = parse(FIXTURE.read_text(), ROWS)
    assert got["llamacpp_prefill_q4_1"] == pp["samples_ns"]  # the whole prompt per repetition
    # per generated token: llama-bench's own tokens/s per repetition is the reciprocal
    per_token = got["llamacpp_decode_q4_1"]
    assert len(per_token) == len(tg["samples_ts"]) == 3
    for ns, ts in zip(per_token, tg["samples_ts"]):
        assert ns == pytest.approx(1e9 / ts, rel=1e-3)
    with pytest.raises(RuntimeError, match="no test for llamacpp_decode_x"):
        parse(json.dumps([pp]), {"decode": "llamacpp_decode_x"})


def test_missing_llama_bench_names_the_way_to_give_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(LLAMA_BENCH_ENV, raising=False)
    exe, why = find_llama_bench()
    assert exe is None and "llama-bench is not installed" in why and LLAMA_BENCH_ENV in why
    monkeypatch.setenv(LLAMA_BENCH_ENV, str(tmp_path / "nope"))
    exe, why = find_llama_bench()
    assert exe is None and str(tmp_path / "nope") in why


def _stand_in(tmp_path: Path, body: str) -> Path:
    exe = tmp_path / "llama-bench"
    exe.write_text(f"#!{sys.executable}\n{body}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_a_llama_bench_process_takes_its_turn_in_the_rounds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    args = tmp_path / "args.txt"
    exe = _stand_in(tmp_path, "import sys\n"
                              f"open({str(args)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
                              f"print(open({str(FIXTURE)!r}).read())")
    monkeypatch.setenv(LLAMA_BENCH_ENV, str(exe))
    assert find_llama_bench() == (str(exe), None)
    task = llamacpp_task(str(exe), tmp_path / "m.gguf", 38, ROWS)
    by_round: dict[str, list[float]] = {}
    rows = {r.name: r for r in measure_alone({"llamacpp": task}, 12, rounds=2, by_round=by_round)}
    assert set(rows) == set(ROWS.values()) and all(r.runs == 6 for r in rows.values())  # 3 samples x 2 rounds
    assert all(len(v) == 2 for v in by_round.values())
    calls = args.read_text().splitlines()
    assert len(calls) == 2  # one process per round
    assert calls[0].split() == ["-m", str(tmp_path / "m.gguf"), "-t", "2", "-r", "3", "-o", "json", "-p", "38",
                                "-n", "16"]


def test_a_failing_llama_bench_is_reported_by_its_rows(tmp_path: Path) -> None:
    exe = _stand_in(tmp_path, "import sys\nprint('error: failed to load model', file=sys.stderr)\nsys.exit(1)")
    task = llamacpp_task(str(exe), tmp_path / "m.gguf", 38, {"decode": "llamacpp_decode_q4_1"})
    with pytest.raises(TaskFailed, match="llamacpp_decode_q4_1: .*failed to load model"):
        measure_alone({"l": task}, 3, rounds=1)


def test_goals_against_llama_cpp() -> None:
    assert ratio_goal("decode_blocks4 / llamacpp_decode_q4_1") == 1.0
    assert ratio_goal("prefill_blocks4 / llamacpp_prefill_q4_1") is None


def test_a_peer_that_fails_is_dropped_with_its_rows_and_why(tmp_path: Path) -> None:
    """A peer (``optional``) whose second round fails: its first round's rows go too (the rounds stay paired), the
    reason is kept, and the other tasks' rows are all there."""
    good = _stand_in(tmp_path, f"print(open({str(FIXTURE)!r}).read())")
    flaky_dir = tmp_path / "flaky"
    flaky_dir.mkdir()
    count = flaky_dir / "count"
    flaky = _stand_in(flaky_dir, "import sys, pathlib\n"
                                 f"c = pathlib.Path({str(count)!r})\n"
                                 "n = int(c.read_text()) if c.exists() else 0\n"
                                 "c.write_text(str(n + 1))\n"
                                 "if n:\n"
                                 "    print('error: unknown argument: -o', file=sys.stderr); sys.exit(1)\n"
                                 f"print(open({str(FIXTURE)!r}).read())")
    tasks = {"ours": llamacpp_task(str(good), tmp_path / "a.gguf", 38, {"decode": "decode_x"}),
             "peer": llamacpp_task(str(flaky), tmp_path / "b.gguf", 38, {"decode": "llamacpp_decode_x"})}
    by_round: dict[str, list[float]] = {}
    dropped: dict[str, str] = {}
    rows = measure_alone(tasks, 12, rounds=3, by_round=by_round, optional={"peer"}, dropped=dropped)
    assert [r.name for r in rows] == ["decode_x"] and rows[0].runs == 9  # 3 samples x 3 rounds
    assert set(by_round) == {"decode_x"} and len(by_round["decode_x"]) == 3
    assert set(dropped) == {"peer"} and "unknown argument: -o" in dropped["peer"]
    assert count.read_text() == "2"  # not run again once dropped
