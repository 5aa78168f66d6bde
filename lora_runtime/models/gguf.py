"""Llama-family checkpoints in GGUF (llama.cpp's format) to an ONNX graph, no torch.

Needs the ``gguf`` package (maintained by the llama.cpp project, numpy only): ``pip install
'lora_runtime[llm]'``. Every tensor is dequantized on its own (Q4_0, Q4_1, Q8_0, F16, F32, ... whatever
``gguf.quants`` knows) as the graph builder asks for it, and streamed to external data.

GGUF names and layout, mapped to PEFT module paths (HF layout is (out, in); the graph wants (in, out))::

    token_embd            model.embed_tokens            blk.N.attn_q / attn_k   q_proj / k_proj (un-permuted)
    blk.N.attn_norm       input_layernorm               blk.N.attn_v / output   v_proj / o_proj
    blk.N.ffn_norm        post_attention_layernorm      blk.N.ffn_gate/up/down  mlp.gate/up/down_proj
    output_norm           model.norm                    output (or token_embd)  lm_head (tied if absent)

llama.cpp's converter stores q and k rows permuted for its rotary layout
(``w.reshape(heads, 2, rows // heads // 2, in).swapaxes(1, 2)``); :func:`unpermute` undoes it
(``w.reshape(heads, rows // heads // 2, 2, in).swapaxes(1, 2)``; heads are the attention heads for q,
the KV heads for k), as ``transformers`` does when it loads a GGUF.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lora_runtime.errors import BaseModelError
from lora_runtime.models.blocks import BLOCK, Blocks, from_ggml
from lora_runtime.models.llama import DATA_FILE, LlamaShape, build_llama

LAYER_MODULES = {  # GGUF block tensor -> PEFT module path under model.layers.N (adapters map with it too)
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class GgufModel:
    """A GGUF file's Llama shape, its metadata and where each tensor is."""

    path: Path
    shape: LlamaShape
    metadata: dict[str, Any]
    tensors: dict[str, Any]  # GGUF name -> gguf.ReaderTensor
    tied: bool


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise BaseModelError("reading GGUF needs the 'gguf' package: pip install 'lora_runtime[llm]'") from None
    return gguf


def open_gguf(path: str | os.PathLike[str], max_seq: int = 2048) -> GgufModel:
    """Read a Llama-architecture GGUF's header (tensor data stays memory-mapped)."""
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise BaseModelError(f"{path}: GGUF file not found")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct.error, ... for files it cannot parse
        raise BaseModelError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.rsplit(".", 1)[1] in ("tokens", "merges", "token_type"):
            continue  # large lists: read on demand by the tokenizer
        try:
            meta[key] = field.contents()
        except Exception:  # noqa: BLE001  (fields of types this gguf version cannot render)
            continue
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise BaseModelError(f"{path}: architecture {arch!r}; only llama-family GGUF files are supported")

    def need(key: str) -> Any:
        if f"llama.{key}" not in meta:
            raise BaseModelError(f"{path}: metadata llama.{key} is missing")
        return meta[f"llama.{key}"]

    tensors = {t.name: t for t in reader.tensors}
    heads = int(need("attention.head_count"))
    d = int(need("embedding_length"))
    rope_dim = int(meta.get("llama.rope.dimension_count", d // heads))
    if rope_dim != d // heads:
        raise BaseModelError(f"{path}: partial rotary embeddings ({rope_dim} of {d // heads}) are not supported")
    vocab = int(meta.get("llama.vocab_size") or tensors["token_embd.weight"].shape[-1])
    shape = LlamaShape(vocab=vocab, d_model=d, n_layers=int(need("block_count")), n_heads=heads,
                       n_kv_heads=int(meta.get("llama.attention.head_count_kv", heads)),
                       d_ff=int(need("feed_forward_length")),
                       max_seq=min(max_seq, int(meta.get("llama.context_length", max_seq))),
                       rms_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
                       rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)))
    for key in ("rope.scaling.type", "expert_count"):
        if meta.get(f"llama.{key}") not in (None, "none", 0, 1):
            raise BaseModelError(f"{path}: llama.{key} = {meta[f'llama.{key}']!r} is not supported (refused rather "
                                 "than built wrong)")
    known = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{name}.weight" for i in range(shape.n_layers) for name in LAYER_MODULES}
    unused = sorted(set(tensors) - known)
    if unused:  # e.g. rope_freqs.weight (Llama 3's scaled rotary), attention biases, expert weights
        raise BaseModelError(f"{path}: {len(unused)} tensor(s) the Llama builder has no place for, e.g. "
                             f"{', '.join(unused[:3])}: the model computes something the graph would not (refused)")
    return GgufModel(path, shape, meta, tensors, tied="output.weight" not in tensors)


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of q/k rows (``w`` is (out, in))."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantized(model: GgufModel, name: str) -> np.ndarray:
    """One GGUF tensor as float32, in numpy's (rows, cols) order: (out, in) for linear weights."""
    gguf = _gguf()
    t = model.tensors.get(name)
    if t is None:
        raise BaseModelError(f"{model.path}: tensor {name!r} is missing")
    try:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise BaseModelError(f"{model.path}: tensor {name!r} has type {t.tensor_type.name}, which gguf "
                             "cannot dequantize") from e
    return np.asarray(values, np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))


def weights_for(model: GgufModel):  # noqa: ANN201  (a lora_runtime.models.llama.Weights callable)
    """The graph builder's weights, read and dequantized one at a time from the GGUF."""
    s = model.shape

    def weights(name: str, shape: tuple[int, ...]) -> np.ndarray:
        src = gguf_name(model, name)
        w = dequantized(model, src)
        if src.endswith("attn_q.weight"):
            w = unpermute(w, s.n_heads)
        elif src.endswith("attn_k.weight"):
            w = unpermute(w, s.n_kv_heads)
        return w if w.ndim == 1 or name == "model.embed_tokens.weight" else w.T  # (out, in) -> (in, out)

    return weights


def gguf_name(model: GgufModel, name: str) -> str:
    """The GGUF tensor behind a graph weight (Hugging Face name)."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "token_embd.weight" if model.tied else "output.weight"}
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
    found = next((g for g, hf in LAYER_MODULES.items() if m and hf == m.group(2)), None)
    if m is None or found is None:
        raise BaseModelError(f"{model.path}: no GGUF tensor for {name!r}")
    return f"blk.{m.group(1)}.{found}.weight"


OUTPUT_TYPES = ("Q4_0", "Q8_0")  # --output-tensor-type: what lm_head can be requantized to (llama-quantize's flag)


def blocks_for(model: GgufModel, output_type: str | None = None):  # noqa: ANN201  (a models.llama.KeptBlocks)
    """The graph builder's kept blocks: a linear weight or the embedding table the file holds as Q4_0, Q4_1 or
    Q8_0, rows in Hugging Face order (q/k un-permuted); None for every other tensor (read as float32).

    ``output_type`` (one of ``OUTPUT_TYPES``, checked by :func:`build_from_gguf`): lm_head in that type whatever
    the file holds, as llama.cpp's ``llama-quantize --output-tensor-type`` makes it: the head's values (the tied
    embedding's, when the file has no ``output.weight``) quantized by gguf's port of llama.cpp's reference
    quantizer. A tied model's embedding lookup keeps the file's own table. Kept as is when the file already holds
    the head in that type."""
    s = model.shape

    def blocks(name: str) -> Blocks | None:
        src = gguf_name(model, name)
        t = model.tensors.get(src)
        if t is None or len(t.shape) != 2:
            return None
        k, rows = (int(x) for x in t.shape)
        if name == "lm_head.weight" and output_type not in (None, t.tensor_type.name):
            gguf = _gguf()
            if k % BLOCK:
                raise BaseModelError(f"{model.path}: {src} has rows of {k} values, not whole {BLOCK}-value blocks: "
                                     f"it cannot be {output_type}")
            raw = gguf.quants.quantize(dequantized(model, src), getattr(gguf.GGMLQuantizationType, output_type))
            return from_ggml(raw, output_type, rows, k, source=f"{src}@{output_type}")
        b = from_ggml(t.data, t.tensor_type.name, rows, k, source=src)
        if b is None:
            return None
        if src.endswith(("attn_q.weight", "attn_k.weight")):
            heads = s.n_heads if src.endswith("attn_q.weight") else s.n_kv_heads
            b = b.take_rows(unpermute(np.arange(rows), heads))
        return b

    return blocks


def build_from_gguf(path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, kv_cache: bool = True,
                    static_cache: int | None = None, max_seq: int = 2048,
                    report: Callable[[str], None] | None = None, keep_blocks: bool = True,
                    accuracy_level: int = 0, flavour: str = "standard", pack: bool = True,
                    output_type: str | None = None) -> tuple[Path, GgufModel]:
    """Write ``out_dir/base.onnx`` (+ ``base.onnx.data``) from a GGUF; returns the model path and the GGUF.

    ``keep_blocks``: weights the file holds as Q4_0, Q4_1, Q4_K or Q8_0 stay those blocks (``models.blocks``:
    MatMulNBits at ``accuracy_level``, the embedding table by GatherBlockQuantized when 8-bit); False:
    everything dequantized to float32. ``flavour``: ``models.llama.build_llama``'s (standard ONNX ops, what
    --encodings and the HTP take; or ONNX Runtime's fused attention, with q/k/v and gate/up packed by ``pack``).
    ``output_type``: lm_head requantized to these blocks (:func:`blocks_for`; needs ``keep_blocks``)."""
    if output_type is not None and output_type not in OUTPUT_TYPES:
        raise BaseModelError(f"output tensor type {output_type!r}: one of {', '.join(OUTPUT_TYPES)}")
    if output_type is not None and not keep_blocks:
        raise BaseModelError(f"{path}: an output tensor type needs the file's blocks kept (weights 'blocks')")
    if output_type == "Q8_0" and accuracy_level < 4:  # (an 8-bit head below level 4 would run float: see blocks.py)
        raise BaseModelError(f"{path}: output tensor type Q8_0 needs accuracy level 4")
    model = open_gguf(path, max_seq=max_seq)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / DATA_FILE, "wb") as data:
        proto = build_llama(model.shape, weights_for(model), data=data, kv_cache=kv_cache, static_cache=static_cache,
                            report=report, name=str(model.metadata.get("general.name", "llama")),
                            blocks=blocks_for(model, output_type) if keep_blocks else None,
                            accuracy_level=accuracy_level,
                            flavour=flavour, pack=pack)
    onnx.save(proto, str(out / "base.onnx"))
    return out / "base.onnx", model
