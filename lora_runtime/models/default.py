"""The embedded default model: a small Llama-style decoder and three PEFT adapters, all from a seed.

Nothing is downloaded: ``build_default(preset, out_dir)`` writes ``base.onnx`` and
``adapters/<name>/`` (real PEFT folders, the same format ``save_pretrained`` writes) so the
demo, the tests and the bench exercise exactly the path a user's files take.

The decoder is :mod:`lora_runtime.models.llama` (the same builder real checkpoints use) with seeded
weights: Llama-style, RMSNorm, grouped-query attention with rotary positions, gated SiLU MLP, weights
named after their PEFT module path (``model.layers.0.self_attn.q_proj.weight``) and stored
(in, out) for MatMul. The recipes are in ``graphs/default-<preset>.json`` too (a test keeps them equal).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx

from lora_runtime.errors import InputError
from lora_runtime.lora_config import LoraConfig, rank_and_scaling
from lora_runtime.models.llama import DATA_FILE, LlamaShape, build_llama, linear_shapes
from lora_runtime.tensorfile import save_tensors


@dataclass(frozen=True)
class AdapterRecipe:
    """A seeded PEFT LoRA adapter: its config fields and the modules it targets."""

    name: str
    r: int
    lora_alpha: float
    target_modules: list[str] | str
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    seed: int = 1


@dataclass(frozen=True)
class ModelRecipe:
    """Sizes of the default decoder. ``d_model`` must divide by ``n_heads``; n_heads by n_kv_heads."""

    name: str
    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_seq: int = 128  # rotary and causal-mask tables are this long: the longest input
    seed: int = 0
    opset: int = 17
    external_data: bool = False  # write weights to base.onnx.data (as exporters do for big models)
    adapters: tuple[AdapterRecipe, ...] = ()
    seq_len: int = 16  # the demo/bench input length

    def to_json(self) -> dict:
        return asdict(self)


_DEMO_ADAPTERS = (
    AdapterRecipe("summarize", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], seed=11),
    AdapterRecipe("translate", r=16, lora_alpha=16, use_rslora=True,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], seed=12),
    AdapterRecipe("tone", r=4, lora_alpha=8, target_modules=r".*\.mlp\.(gate|up|down)_proj",
                  rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 2}, seed=13),
)

PRESETS: dict[str, ModelRecipe] = {
    "tiny": ModelRecipe("tiny", vocab=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                        max_seq=64, adapters=_DEMO_ADAPTERS, seq_len=8),
    "bench": ModelRecipe("bench", vocab=2048, d_model=1024, n_layers=8, n_heads=16, n_kv_heads=8, d_ff=2048,
                         max_seq=128, external_data=True, seq_len=32, adapters=(
                             AdapterRecipe("summarize", r=16, lora_alpha=32, seed=21,
                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                             AdapterRecipe("translate", r=16, lora_alpha=16, use_rslora=True, seed=22,
                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                             AdapterRecipe("tone", r=8, lora_alpha=16, seed=23, target_modules=["q_proj", "v_proj"]),
                         )),
    "1b": ModelRecipe("1b", vocab=32000, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
                      max_seq=256, external_data=True, seq_len=32, adapters=(
                          AdapterRecipe("summarize", r=32, lora_alpha=64, seed=31,  # ~27 MB: the cold-switch size
                                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                          AdapterRecipe("translate", r=64, lora_alpha=64, use_rslora=True, seed=32,
                                        target_modules=["q_proj", "v_proj"]),
                          AdapterRecipe("tone", r=8, lora_alpha=16, seed=33,
                                        target_modules=["gate_proj", "up_proj", "down_proj"]),
                      )),
}


def recipe(preset: str) -> ModelRecipe:
    if preset not in PRESETS:
        raise InputError(f"unknown model preset {preset!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[preset]


@dataclass(frozen=True)
class DefaultModel:
    recipe: ModelRecipe
    base: Path
    adapters: dict[str, Path]

    def inputs(self, seed: int = 0, seq_len: int | None = None) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        t = seq_len or self.recipe.seq_len
        return {"input_ids": rng.integers(0, self.recipe.vocab, size=(1, t), dtype=np.int64)}


def build_default(preset: str | ModelRecipe, out_dir: str | Path) -> DefaultModel:
    """Write the base model and its adapters under ``out_dir`` (reused if already built from the same recipe)."""
    r = recipe(preset) if isinstance(preset, str) else preset
    out = Path(out_dir)
    stamp = out / "recipe.json"
    text = json.dumps(r.to_json(), indent=1, sort_keys=True)
    adapters = {a.name: out / "adapters" / a.name for a in r.adapters}
    if stamp.is_file() and stamp.read_text() == text and (out / "base.onnx").is_file():
        return DefaultModel(r, out / "base.onnx", adapters)
    out.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    if r.external_data:  # streamed: each weight goes to the data file as it is generated
        partial = out / f".{DATA_FILE}.{os.getpid()}.partial"
        with open(partial, "wb") as data:
            model = build_model(r, data)
        os.replace(partial, out / DATA_FILE)  # a new file: bundles that hard-link the old one keep it
    else:
        model = build_model(r)
    onnx.save(model, str(out / "base.onnx"))
    for a in r.adapters:
        write_adapter(a, r, adapters[a.name])
    stamp.write_text(text)
    return DefaultModel(r, out / "base.onnx", adapters)


def module_shapes(r: ModelRecipe) -> dict[str, tuple[int, int]]:
    """(in, out) of every linear module, by PEFT module path."""
    return linear_shapes(shape_of(r))


def write_adapter(a: AdapterRecipe, r: ModelRecipe, folder: Path) -> None:
    """A PEFT folder for recipe ``a``: the modules its target_modules select, seeded A/B, PEFT's key names."""
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": f"lora_runtime/{r.name}",
              "r": a.r, "lora_alpha": a.lora_alpha, "target_modules": a.target_modules, "use_rslora": a.use_rslora,
              "rank_pattern": a.rank_pattern, "alpha_pattern": a.alpha_pattern, "fan_in_fan_out": False,
              "lora_dropout": 0.0, "bias": "none", "use_dora": False, "modules_to_save": None,
              "inference_mode": True}
    parsed = LoraConfig.from_json(config)
    rng = np.random.default_rng(a.seed)
    tensors = {}
    for module, (d_in, d_out) in module_shapes(r).items():
        if module == "lm_head" or not parsed.targets(module):
            continue
        rank, _ = rank_and_scaling(parsed, module)
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, d_in)) / np.sqrt(d_in)).astype(np.float32)
        tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((d_out, rank)) * 0.1 / np.sqrt(rank)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_tensors(folder / "adapter_model.safetensors", dict(sorted(tensors.items())), {"format": "pt"})


def shape_of(r: ModelRecipe) -> LlamaShape:
    return LlamaShape(vocab=r.vocab, d_model=r.d_model, n_layers=r.n_layers, n_heads=r.n_heads,
                      n_kv_heads=r.n_kv_heads, d_ff=r.d_ff, max_seq=r.max_seq, opset=r.opset)


def build_model(r: ModelRecipe, data: BinaryIO | None = None, static_cache: int | None = None) -> onnx.ModelProto:
    """The decoder graph with seeded weights: embeddings N(0, 1), norms 1 + N(0, 0.1), linears N(0, 1/in).

    With ``data`` (a file opened for writing, named ``base.onnx.data`` next to the model), every weight is
    written there as it is generated (see :func:`lora_runtime.models.llama.build_llama`). ``static_cache=C``:
    the same weights in the static-KV-cache graph of an accelerator deployment.
    """
    rng = np.random.default_rng(r.seed)

    def weights(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if len(shape) == 1:  # an RMSNorm weight
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        w = rng.standard_normal(shape, dtype=np.float32)
        if not name.startswith("model.embed_tokens"):
            w *= np.float32(1.0 / np.sqrt(shape[0]))
        return w

    return build_llama(shape_of(r), weights, data=data, kv_cache=static_cache is not None, static_cache=static_cache,
                       name=f"lora_runtime_default_{r.name}")
