#!/usr/bin/env python3
"""Tiny random checkpoints of the LLM families `import-model` names as supported, as Hugging Face folders,
with the logits transformers computes for them, with and without a real PEFT adapter.

    /work/fxvenv/bin/python tools/make_family_fixtures.py [--out tests/fixtures/families]

Per family (`llama`, `mistral`, `qwen2`, `qwen3`, `gemma`, `gemma2`, `phi3`): `config.json` and `model.safetensors`
(`save_pretrained`), `adapter/` (PEFT LoRA r4 alpha8, B initialised non-zero, on q_proj and v_proj; Gemma
also down_proj; Phi-3 its fused qkv_proj and gate_up_proj), `expected.npz` with `input_ids` (1, 7), `base`
and `adapter` logits (1, 7, vocab), float32, eager attention. What each family adds to Llama: Qwen2's q/k/v
biases (its config never says so: they are part of the architecture), Qwen3's q/k norms and a head_dim other
than hidden_size / heads, Gemma's norm offset (x * (1 + w)), gelu-tanh MLP, embedding scale, tied lm_head and
single KV head, Gemma 2's norms around the attention and MLP outputs and soft-capped scores and logits
(small caps here, so the tanh bends), Phi-3's fused projections. Deterministic:
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
    import transformers as t

    return {
        "llama": (t.LlamaForCausalLM, t.LlamaConfig(**SIZE), ["q_proj", "v_proj"]),
        "mistral": (t.MistralForCausalLM, t.MistralConfig(**SIZE, sliding_window=4096), ["q_proj", "v_proj"]),
        "qwen2": (t.Qwen2ForCausalLM, t.Qwen2Config(**SIZE), ["q_proj", "v_proj"]),
        # q/k norms, and a head_dim that is not hidden_size / heads
        "qwen3": (t.Qwen3ForCausalLM, t.Qwen3Config(**SIZE, head_dim=16), ["q_proj", "v_proj"]),
        # norm offset, gelu-tanh MLP, embedding scale, tied lm_head, one KV head, head_dim 16
        "gemma": (t.GemmaForCausalLM, t.GemmaConfig(**(SIZE | {"tie_word_embeddings": True, "num_key_value_heads": 1}),
                                                    head_dim=16), ["q_proj", "v_proj", "down_proj"]),
        # Gemma's, plus norms around attention and MLP outputs, soft-capped scores and logits, its own query scale
        "gemma2": (t.Gemma2ForCausalLM, t.Gemma2Config(**(SIZE | {"tie_word_embeddings": True}), head_dim=16,
                                                      query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                                                      final_logit_softcapping=1.5, sliding_window=4096),
                   ["q_proj", "v_proj", "down_proj"]),
        # fused qkv_proj and gate_up_proj: PEFT attaches to the fused modules
        "phi3": (t.Phi3ForCausalLM, t.Phi3Config(**SIZE, pad_token_id=0), ["qkv_proj", "gate_up_proj"]),
    }


def make(name: str, cls, config, targets: list[str], out: Path) -> None:
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
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                            init_lora_weights=False))
    with torch.no_grad():
        adapted = lora(input_ids=ids).logits.float().numpy()
    assert np.abs(adapted - base).max() > 1e-3, f"{name}: the adapter changes nothing"
    lora.save_pretrained(folder / "adapter")
    (folder / "adapter" / "README.md").unlink(missing_ok=True)
    config_path = folder / "adapter" / "adapter_config.json"  # PEFT writes target_modules in set order: sorted
    adapter_config = json.loads(config_path.read_text())
    adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    np.savez(folder / "expected.npz", input_ids=ids.numpy(), base=base, adapter=adapted)
    cfg = json.loads((folder / "config.json").read_text())
    print(f"{name}: {cfg['architectures']}, {sum(f.stat().st_size for f in folder.rglob('*') if f.is_file())} bytes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "families")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import transformers

    for name, (cls, config, targets) in families().items():
        make(name, cls, config, targets, args.out)
    (args.out / "versions.json").write_text(json.dumps({"torch": torch.__version__,
                                                        "transformers": transformers.__version__}, indent=1) + "\n")


if __name__ == "__main__":
    main()
