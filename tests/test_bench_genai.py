"""The ONNX Runtime GenAI peer rows (lora_runtime.bench.genai): skipped with a reason without GenAI or its models,
and, where both are here (the [genai] extra; tools/make_genai_model.py), rows with times."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from lora_runtime.bench import genai
from lora_runtime.bench.genai import ADAPTERS, GENAI_PYTHON_ENV, PRECISIONS, genai_rows

MODELS = Path(__file__).resolve().parent.parent / "graphs" / "built" / "genai"
IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 2]  # any in-vocabulary ids will do


@pytest.fixture
def no_genai(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # `import onnxruntime_genai` fails
    monkeypatch.delenv(GENAI_PYTHON_ENV, raising=False)


def test_skipped_without_genai(no_genai: None, tmp_path: Path) -> None:
    rows, info, skipped = genai_rows(tmp_path, IDS, 3, models=MODELS)
    assert rows == [] and info == {}
    assert skipped is not None and "onnxruntime-genai" in skipped and "\n" not in skipped
    assert GENAI_PYTHON_ENV in skipped


def test_skipped_keeps_the_callers_rows(no_genai: None, tmp_path: Path) -> None:
    rows, _, skipped = genai_rows(tmp_path, IDS, 3, also={"ours": lambda: None})
    assert skipped and [r.name for r in rows] == ["ours"] and rows[0].p50_us is not None


def test_skipped_without_models(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(genai, "import_genai", lambda: object())  # GenAI "installed", no model folders
    rows, _, skipped = genai_rows(tmp_path, IDS, 3, models=tmp_path / "none")
    assert rows == []
    assert skipped is not None and "tools/make_genai_model.py" in skipped and "\n" not in skipped


def test_child_process_reports_its_reason(no_genai: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """LORA_RUNTIME_GENAI_PYTHON: the rows come from a child; here it has no models (or no GenAI) and says so."""
    monkeypatch.setenv(GENAI_PYTHON_ENV, sys.executable)
    rows, _, skipped = genai_rows(tmp_path / "work", IDS, 3, models=tmp_path / "none")
    assert rows == []
    assert skipped is not None and ("tools/make_genai_model.py" in skipped or "onnxruntime-genai" in skipped)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None,
                    reason="onnxruntime-genai is the [genai] extra")
def test_rows_have_times(tmp_path: Path) -> None:
    if genai.missing_models(MODELS):
        pytest.skip(genai.missing_models(MODELS))
    rows, info, skipped = genai_rows(tmp_path, IDS, 2, models=MODELS, opens=1, also={"ours": lambda: None})
    assert skipped is None
    by = {r.name: r for r in rows}
    expected = {"ours"}
    for p in PRECISIONS:
        expected |= {f"genai_decode_{p}", f"genai_decode_{p}_lora_none", f"genai_prefill_{p}", f"genai_open_{p}"}
        expected |= {f"genai_decode_{p}_{a}" for a in ADAPTERS}
    expected |= {f"genai_adapter_load_{a}" for a in ADAPTERS}
    assert expected <= set(by)
    assert all(by[n].p50_us and by[n].p50_us > 0 for n in expected)
    assert info["genai"]["threads"] == 2 and info["genai"]["interleaved_with"] == ["ours"]
    # an adapter changes the greedy token somewhere; without one, the LoRA graph gives the base graph's
    tokens = info["genai"]["next_token"]
    assert tokens["genai_decode_fp32_lora_none"] == tokens["genai_decode_fp32"]
    assert tokens["genai_decode_int4_lora_none"] == tokens["genai_decode_int4"]


def test_goals_against_our_own_base_are_not_put_on_ratios_to_genai() -> None:
    """A v3 bundle with no adapter has its x1.03 goal against our plain base; the same bundle's ratio to GenAI's
    decode (and an adapter's to GenAI's adapter) carries no goal of ours, nor does the flat twin."""
    from lora_runtime.bench.blocks import PEERS, ratio_goal

    assert ratio_goal("decode_v3none_q4_0_blocks4 / decode_q4_0_blocks4") == 1.03
    assert ratio_goal("decode_qv8_blocks4 / decode_blocks4") == 1.10
    assert ratio_goal("decode_v3none_flat_q4_0_blocks4 / decode_q4_0_blocks4") is None
    assert all(ratio_goal(f"{ours} / {theirs}") is None for ours, theirs in PEERS)
