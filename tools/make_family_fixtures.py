#!/usr/bin/env python3
"""Tiny random checkpoints of the LLM families `import-model` names as supported, as Hugging Face folders,
with the logits transformers computes for them, with and without a real PEFT adapter.

    /work/fxvenv/bin/python tools/make_family_fixtures.py [--out tests/fixtures/families]

Per family (`llama`, `mistral`, `qwen2`): `config.json` and `model.safetensors` (`save_pretrained`),
`adapter/` (PEFT LoRA r4 alpha8 on q_proj and v_proj, B initialised non-zero), `expected.npz` with
`input_ids` (1, 7), `base` and `adapter` logits (1, 7, vocab), float32, eager attention. Qwen2's q/k/v
projections carry biases (its config never says so: they are part of the architecture). Deterministic:
seeded, and the checks below stop the script if a family is not what the test expects of it.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model

ROOT = Path(__file__).resolve().parent.parent
SIZE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
            tie_word_embeddings=False)


def families():
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    return {
        "llama": (LlamaForCausalLM, LlamaConfig(**SIZE)),
        "mistral": (MistralForCausalLM, MistralConfig(**SIZE, sliding_window=4096)),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(**SIZE)),
    }


def make(name: str, cls, config, out: Path) -> None:
    torch.manual_seed(sum(map(ord, name)))
    config._attn_implementation = "eager"
    model = cls(config).eval()
    with torch.no_grad():  # norm weights and biases away from their init, so a dropped one shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    if name == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None, "Qwen2 without q/k/v biases"
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, safe_serialization=True)
    for extra in ("generation_config.json",):
        (folder / extra).unlink(missing_ok=True)
    ids = torch.randint(0, config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(input_ids=ids).logits.float().numpy()
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    with torch.no_grad():
        adapted = lora(input_ids=ids).logits.float().numpy()
    assert np.abs(adapted - base).max() > 1e-3, f"{name}: the adapter changes nothing"
    lora.save_pretrained(folder / "adapter")
    (folder / "adapter" / "README.md").unlink(missing_ok=True)
    np.savez(folder / "expected.npz", input_ids=ids.numpy(), base=base, adapter=adapted)
    cfg = json.loads((folder / "config.json").read_text())
    print(f"{name}: {cfg['architectures']}, {sum(f.stat().st_size for f in folder.rglob('*') if f.is_file())} bytes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "families")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import transformers

    for name, (cls, config) in families().items():
        make(name, cls, config, args.out)
    (args.out / "versions.json").write_text(json.dumps({"torch": torch.__version__,
                                                        "transformers": transformers.__version__}, indent=1) + "\n")


if __name__ == "__main__":
    main()
