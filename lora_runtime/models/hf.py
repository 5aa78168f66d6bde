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
from pathlib import Path

import onnx

from lora_runtime.errors import BaseModelError, TensorFileError
from lora_runtime.models.llama import DATA_FILE, LlamaShape, build_llama
from lora_runtime.tensorfile import TensorFile, read_header

_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def _config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise BaseModelError(f"{path}: missing; a Hugging Face model folder needs config.json") from None
    except (OSError, ValueError) as e:
        raise BaseModelError(f"{path}: not valid JSON ({e})") from e
    archs = cfg.get("architectures") or []
    if not any(a in _ARCHS for a in archs) and cfg.get("model_type") != "llama":
        raise BaseModelError(f"{path}: architectures {archs}; only Llama-family models are supported")
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise BaseModelError(f"{path}: rope_scaling {cfg['rope_scaling']!r} is not supported")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise BaseModelError(f"{path}: attention/MLP biases are not supported")
    return cfg


def shape_from_config(cfg: dict, max_seq: int = 2048) -> LlamaShape:
    heads = int(cfg["num_attention_heads"])
    d = int(cfg["hidden_size"])
    if int(cfg.get("head_dim") or d // heads) != d // heads:
        raise BaseModelError("config.json: head_dim other than hidden_size / num_attention_heads is not supported")
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    return LlamaShape(vocab=int(cfg["vocab_size"]), d_model=d, n_layers=int(cfg["num_hidden_layers"]), n_heads=heads,
                      n_kv_heads=int(cfg.get("num_key_value_heads") or heads), d_ff=int(cfg["intermediate_size"]),
                      max_seq=min(max_seq, int(cfg.get("max_position_embeddings", max_seq))),
                      rms_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(rope))


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
                  static_cache: int | None = None, max_seq: int = 2048) -> tuple[Path, LlamaShape]:
    """Write ``out_dir/base.onnx`` (+ external data, + tokenizer.json when the folder has one)."""
    folder = Path(folder)
    cfg = _config(folder)
    shape = shape_from_config(cfg, max_seq)
    where = _index(folder)
    tied = bool(cfg.get("tie_word_embeddings")) or "lm_head.weight" not in where

    def weights(name: str, graph_shape: tuple[int, ...]):  # noqa: ANN202
        src = "model.embed_tokens.weight" if name == "lm_head.weight" and tied else name
        tf = where.get(src)
        if tf is None:
            raise BaseModelError(f"{folder}: tensor {src!r} is missing")
        w = tf.read(src, float32=True)
        if re.search(r"(_proj|lm_head)\.weight$", name):
            w = w.T  # (out, in) -> (in, out)
        return w

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / DATA_FILE, "wb") as data:
        proto = build_llama(shape, weights, data=data, kv_cache=kv_cache, static_cache=static_cache,
                            name=str(cfg.get("_name_or_path", "llama")))
    onnx.save(proto, str(out / "base.onnx"))
    if (folder / "tokenizer.json").is_file():
        shutil.copyfile(folder / "tokenizer.json", out / "tokenizer.json")
    return out / "base.onnx", shape
