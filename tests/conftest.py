from __future__ import annotations

from pathlib import Path

import pytest

from lora_runtime.models.default import DefaultModel, build_default

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> DefaultModel:
    """The embedded default model, tiny preset, with its three PEFT adapters."""
    return build_default("tiny", tmp_path_factory.mktemp("tiny"))
