"""Llama-family checkpoints as Hugging Face folders (``config.json`` + ``model.safetensors``) to ONNX, no torch.

Tensor names are already PEFT's module paths (``model.layers.0.self_attn.q_proj.weight``, stored (out, in));
each is read on its own from the (possibly sharded) safetensors files, F32/F16/BF16 widened exactly to
float32, transposed to the graph's (in, out), and streamed to external data. ``tokenizer.json`` (and the
chat template of ``tokenizer_config.json``) travel along when present, so the folder generates like a GGUF.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from lora_runtime.errors import BaseModelError, TensorFileError
from lora_runtime.models.llama import DATA_FILE, LlamaShape, build_llama, tensor_names
from lora_runtime.tensorfile import TensorFile, read_header

# architecture -> family, and what each family adds to Llama's decoder (LlamaShape's fields; Gemma's norm weights
# are stored as w with the norm computing x * (1 + w): folded into the weight at import)
_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
          "Qwen3ForCausalLM": "qwen3", "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2",
          "Phi3ForCausalLM": "phi3"}
_FAMILY = {"llama": {}, "mistral": {}, "qwen2": {"qkv_bias": True}, "qwen3": {"qk_norm": True},
           "gemma": {"embed_scale": True, "norm_offset": True},
           "gemma2": {"embed_scale": True, "norm_offset": True, "sandwich": True}, "phi3": {"fused": True}}
_BUILT = {"gemma2": ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar")}  # not neutral
_ACTS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}
# config fields that change the math, with the values this builder computes (anything else is refused by name)
_NEUTRAL: dict[str, tuple] = {
    "attention_bias": (False, None), "mlp_bias": (False, None),
    "partial_rotary_factor": (None, 1, 1.0), "attn_logit_softcapping": (None,), "final_logit_softcapping": (None,),
    "query_pre_attn_scalar": (None,), "use_qk_norm": (False, None), "qk_layernorm": (False, None),
    "embedding_multiplier": (None, 1, 1.0), "residual_multiplier": (None, 1, 1.0),
    "attention_multiplier": (None,), "logits_scaling": (None, 1, 1.0), "num_local_experts": (None, 0, 1),
    "num_experts": (None, 0, 1), "rope_interleaved": (None, False),
}


def _config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise BaseModelError(f"{path}: missing; a Hugging Face model folder needs config.json") from None
    except (OSError, ValueError) as e:
        raise BaseModelError(f"{path}: not valid JSON ({e})") from e
    archs = cfg.get("architectures") or []
    family = next((_ARCHS[a] for a in archs if a in _ARCHS), None if archs else cfg.get("model_type"))
    if family not in _FAMILY:
        raise BaseModelError(f"{path}: architectures {archs}; supported: {', '.join(_ARCHS)}")
    cfg["_family"] = family
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise BaseModelError(f"{path}: rope_scaling {scaling!r} is not supported (only plain rotary positions)")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise BaseModelError(f"{path}: partial_rotary_factor = {scaling['partial_rotary_factor']!r} is not supported "
                             "(the builder rotates whole heads)")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act", "silu")
    if act not in _ACTS:
        raise BaseModelError(f"{path}: hidden_act = {act!r} is not supported (supported: {', '.join(_ACTS)})")
    for field, neutral in _NEUTRAL.items():
        if field in cfg and cfg[field] not in neutral and field not in _BUILT.get(family, ()):
            raise BaseModelError(f"{path}: {field} = {cfg[field]!r} is not supported (the builder computes "
                                 f"{neutral[0]!r}); refused rather than built wrong")
    return cfg


def _check_window(cfg: dict, max_seq: int, path: Path) -> None:
    """Sliding-window attention equals full attention while every sequence fits the window: refuse only beyond."""
    window = cfg.get("sliding_window")
    sliding = "sliding_attention" in (cfg.get("layer_types") or []) or \
        (cfg.get("use_sliding_window", True) and window is not None)
    if sliding and window is not None and max_seq > int(window):
        raise BaseModelError(f"{path}: sliding_window = {window} is not supported beyond the window: import with "
                             f"--max-seq {window} or less (asked for {max_seq})")


def shape_from_config(cfg: dict, max_seq: int = 2048) -> LlamaShape:
    heads = int(cfg["num_attention_heads"])
    d = int(cfg["hidden_size"])
    family = cfg.get("_family") or _ARCHS.get(next(iter(cfg.get("architectures") or []), ""), "llama")
    adds = _FAMILY[family]
    head = int(cfg.get("head_dim") or d // heads)
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    act = _ACTS[cfg.get("hidden_activation") or cfg.get("hidden_act", "silu")]
    return LlamaShape(vocab=int(cfg["vocab_size"]), d_model=d, n_layers=int(cfg["num_hidden_layers"]), n_heads=heads,
                      n_kv_heads=int(cfg.get("num_key_value_heads") or heads), d_ff=int(cfg["intermediate_size"]),
                      max_seq=min(max_seq, int(cfg.get("max_position_embeddings", max_seq))),
                      rms_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(rope),
                      qkv_bias=adds.get("qkv_bias", False), head_size=None if head * heads == d else head,
                      qk_norm=adds.get("qk_norm", False), act="gelu_tanh" if family.startswith("gemma") else act,
                      embed_scale=float(np.float32(d ** 0.5)) if adds.get("embed_scale") else None,
                      fused=adds.get("fused", False), sandwich=adds.get("sandwich", False),
                      attn_scale=float(pre) ** -0.5 if (pre := cfg.get("query_pre_attn_scalar")) else None,
                      attn_softcap=cfg.get("attn_logit_softcapping") if family == "gemma2" else None,
                      final_softcap=cfg.get("final_logit_softcapping") if family == "gemma2" else None)


def _index(folder: Path) -> dict[str, TensorFile]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BaseModelError(f"{folder}: no *.safetensors weights (pickle checkpoints are never loaded)")
    where: dict[str, TensorFile] = {}
    for f in files:
        try:
            tf = read_header(f)
        except TensorFileError as e:
            raise BaseModelError(str(e)) from e
        for name in tf.entries:
            where[name] = tf
    return where


def build_from_hf(folder: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, kv_cache: bool = True,
                  static_cache: int | None = None, max_seq: int = 2048,
                  report: Callable[[str], None] | None = None, flavour: str = "standard") -> tuple[Path, LlamaShape]:
    """Write ``out_dir/base.onnx`` (+ external data, + tokenizer.json when the folder has one)."""
    folder = Path(folder)
    cfg = _config(folder)
    shape = shape_from_config(cfg, max_seq)
    _check_window(cfg, shape.max_seq, folder / "config.json")
    where = _index(folder)
    tied = bool(cfg.get("tie_word_embeddings")) or "lm_head.weight" not in where
    offset = _FAMILY[cfg["_family"]].get("norm_offset", False)
    unused = sorted(n for n in set(where) - tensor_names(shape) if not n.endswith("rotary_emb.inv_freq"))
    if unused:  # a tensor the graph has no place for computes something the graph would not: never build it wrong
        raise BaseModelError(f"{folder}: {len(unused)} tensor(s) the Llama builder has no place for, e.g. "
                             f"{', '.join(unused[:3])}: the model computes something the graph would not (refused)")

    def weights(name: str, graph_shape: tuple[int, ...]):  # noqa: ANN202
        src = "model.embed_tokens.weight" if name == "lm_head.weight" and tied else name
        tf = where.get(src)
        if tf is None:
            raise BaseModelError(f"{folder}: tensor {src!r} is missing")
        w = tf.read(src, float32=True)
        if re.search(r"(_proj|lm_head)\.weight$", name):
            w = w.T  # (out, in) -> (in, out)
        elif offset and re.search(r"(layernorm|model\.norm)\.weight$", name):
            w = 1.0 + w  # Gemma's norm computes x * (1 + w)
        return w

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / DATA_FILE, "wb") as data:
        proto = build_llama(shape, weights, data=data, kv_cache=kv_cache, static_cache=static_cache,
                            report=report, name=str(cfg.get("_name_or_path", "llama")), flavour=flavour)
    onnx.save(proto, str(out / "base.onnx"))
    if (folder / "tokenizer.json").is_file():
        shutil.copyfile(folder / "tokenizer.json", out / "tokenizer.json")
    return out / "base.onnx", shape
