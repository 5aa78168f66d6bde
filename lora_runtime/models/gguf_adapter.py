"""LoRA adapters in GGUF, as llama.cpp's ``convert_lora_to_gguf.py`` writes them and ``src/llama-adapter.cpp`` reads
them, mapped back to the PEFT module paths of the base's graph.

The format (llama.cpp's source, not guessed):

- metadata ``general.type = "adapter"``, ``adapter.type = "lora"``, ``general.architecture`` (the base's; llama.cpp
  refuses a mismatch) and ``adapter.lora.alpha`` (float32, the PEFT config's one ``lora_alpha``);
- per base weight ``<gguf name>.weight`` two tensors, ``.weight.lora_a`` with ggml ne (in, r), numpy (r, in): PEFT's
  A; ``.weight.lora_b`` ne (r, out), numpy (out, r): PEFT's B (llama.cpp checks ``a.ne[0] == W.ne[0]``,
  ``b.ne[1] == W.ne[1]``, ``a.ne[1] == b.ne[0]``); F32, F16, BF16 or Q8_0 (the converter's ``--outtype``);
- scale = alpha / rank, rank = ``b.ne[0]`` per tensor, and 1 when alpha is 0 (``llama_adapter_lora_weight::get_scale``):
  the converter writes neither ``use_rslora`` nor ``rank_pattern`` / ``alpha_pattern``.

Names go through llama.cpp's tensor map (``blk.N.attn_q`` is ``model.layers.N.self_attn.q_proj``: the base importer's
:data:`~lora_runtime.models.gguf.LAYER_MODULES`; ``output`` is ``lm_head``). For q and k the converter runs
``LlamaModel.permute`` on the LoRA pair, which permutes B's rows like the base weight's rows and leaves A alone
(``LoraTorchTensor.permute``). Every base graph here holds q/k in Hugging Face's layout (the GGUF importer un-permutes
them, a Hugging Face import or a transformers export never permuted them), while a llama-architecture GGUF adapter is
always in llama.cpp's rotary layout (that is how llama.cpp applies it), so B of ``attn_q`` / ``attn_k`` is always
un-permuted: per head of ``head_dim`` rows, which the adapter file does not carry. It comes from the base the adapter
is compiled against (the last dimension of its KV-cache inputs, ``past_key.<i>`` here or ``past_key_values.<i>.key``
in Optimum's exports, ``(batch, kv_heads, past, head_dim)``), or is given; without either, a q/k adapter is refused.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lora_runtime.errors import AdapterError, BaseModelError
from lora_runtime.lora_config import LoraConfig
from lora_runtime.models.gguf import LAYER_MODULES, unpermute

MAGIC = b"GGUF"
_TYPES = ("F32", "F16", "BF16", "Q8_0")  # what convert_lora_to_gguf.py --outtype writes
_PAIR = re.compile(r"(?P<base>.+\.weight)\.lora_(?P<half>[ab])")
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_KV_KEY = re.compile(r"past.*key", re.IGNORECASE)
_ROTARY = ("attn_q", "attn_k")


@dataclass(frozen=True)
class GgufLora:
    """A GGUF LoRA adapter in PEFT's terms: its config (rank and scale rule) and (module, A, B, dtype) per module."""

    config: LoraConfig
    pairs: tuple[tuple[str, np.ndarray, np.ndarray, str], ...]  # A (r, in), B (out, r) float32, un-permuted


def is_gguf(path: Path) -> bool:
    """A file with GGUF's magic (or named ``.gguf``)."""
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def read_gguf_lora(path: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None,
                   head_dim: int | None = None) -> GgufLora:
    """Read and validate a GGUF LoRA adapter; q/k B rows are un-permuted with ``head_dim`` (or ``base``'s)."""
    path = Path(path)
    reader = _reader(path)
    meta = _metadata(reader, path)
    alpha = meta["alpha"]
    halves: dict[str, dict[str, Any]] = {}
    for t in reader.tensors:
        m = _PAIR.fullmatch(t.name)
        if m is None:
            why = ("a norm weight (mergekit-extract-lora): not LoRA; llama.cpp skips it, which computes another model "
                   "than the one the adapter was extracted from" if t.name.endswith("_norm.weight")
                   else "expected <tensor>.weight.lora_a / .lora_b")
            raise AdapterError(f"{path}: tensor {t.name!r}: {why} (refused)")
        halves.setdefault(m.group("base"), {})[m.group("half")] = t
    if not halves:
        raise AdapterError(f"{path}: holds no LoRA tensors")
    pairs, ranks = [], {}
    for gname in sorted(halves):
        module, rotary = _module(path, gname)
        for half in "ab":
            if half not in halves[gname]:
                raise AdapterError(f"{path}: tensor {gname}.lora_{half} is missing (its pair has only lora_"
                                   f"{'b' if half == 'a' else 'a'})")
        a, dtype = _read(path, halves[gname]["a"])
        b, _ = _read(path, halves[gname]["b"])
        if a.shape[0] != b.shape[1]:
            raise AdapterError(f"{path}: tensor {gname}.lora_a {a.shape} and .lora_b {b.shape} disagree on the rank "
                               "(numpy shapes; lora_a is (r, in), lora_b (out, r))")
        if rotary:
            if head_dim is None:
                head_dim = _head_dim(path, gname, base)
            b = _unpermuted(path, f"{gname}.lora_b", b, head_dim)
        ranks[module] = int(a.shape[0])
        pairs.append((module, a, b, dtype))
    pairs.sort(key=lambda p: p[0])
    return GgufLora(_config(ranks, alpha, meta["arch"], head_dim), tuple(pairs))


def base_head_dim(base: str | os.PathLike[str]) -> int | None:
    """The head size of an ONNX decoder: the last dimension of its KV-cache key inputs, if it has any and they agree."""
    base = Path(base)
    if not base.is_file():
        raise BaseModelError(f"{base}: base model not found")
    try:
        model = onnx.load(str(base), load_external_data=False)
    except Exception as e:  # noqa: BLE001  (protobuf raises DecodeError, onnx its own)
        raise BaseModelError(f"{base}: not a readable ONNX model ({type(e).__name__}: {e})") from e
    dims = set()
    for i in model.graph.input:
        shape = i.type.tensor_type.shape.dim
        if _KV_KEY.search(i.name) and len(shape) == 4:
            dims.add(shape[3].dim_value if shape[3].HasField("dim_value") else None)
    return dims.pop() if len(dims) == 1 and None not in dims else None


def _reader(path: Path) -> Any:
    try:
        import gguf
    except ImportError:
        raise AdapterError(f"{path}: reading GGUF needs the 'gguf' package: pip install 'lora_runtime[llm]'") from None
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct.error, ... for files it cannot parse
        raise AdapterError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def _metadata(reader: Any, path: Path) -> dict[str, Any]:
    def field(key: str) -> Any:
        f = reader.fields.get(key)
        try:
            return None if f is None else f.contents()
        except Exception:  # noqa: BLE001  (a field this gguf version cannot render)
            return None

    kind = field("general.type")
    if kind != "adapter":
        raise AdapterError(f"{path}: general.type is {kind!r}, not 'adapter': a model GGUF, not a LoRA adapter (a base "
                           "model comes in with import-model)")
    if field("adapter.type") != "lora":
        raise AdapterError(f"{path}: adapter.type is {field('adapter.type')!r}; only LoRA adapters are supported")
    arch = field("general.architecture")
    if arch != "llama":
        raise AdapterError(f"{path}: general.architecture is {arch!r}; only llama-architecture GGUF adapters are "
                           "supported (their tensor names and q/k layout are llama's)")
    if "adapter.alora.invocation_tokens" in reader.fields:
        raise AdapterError(f"{path}: adapter.alora.invocation_tokens is set; activated LoRA changes the forward pass "
                           "and is not supported (plain LoRA only)")
    alpha = field("adapter.lora.alpha")
    if alpha is None:
        raise AdapterError(f"{path}: metadata adapter.lora.alpha is missing: the scale (alpha / rank) is unknown")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterError(f"{path}: adapter.lora.alpha must be a finite number, got {alpha!r}")
    return {"alpha": float(alpha), "arch": arch}


def _module(path: Path, gname: str) -> tuple[str, bool]:
    """The PEFT module path of a GGUF base-tensor name, and whether llama.cpp permuted its rows."""
    m = _BLOCK.fullmatch(gname)
    if m and m.group(2) in LAYER_MODULES and not m.group(2).endswith("norm"):
        return f"model.layers.{m.group(1)}.{LAYER_MODULES[m.group(2)]}", m.group(2) in _ROTARY
    if gname == "output.weight":
        return "lm_head", False
    if gname == "token_embd.weight":
        raise AdapterError(f"{path}: tensor {gname}.lora_a/b is an embedding LoRA; only linear LoRA is supported")
    known = ", ".join(n for n in LAYER_MODULES if not n.endswith("norm"))
    raise AdapterError(f"{path}: tensor {gname}.lora_a/b: no module of a llama base has this name (known: "
                       f"blk.N.{{{known}}}.weight, output.weight)")


def _read(path: Path, t: Any) -> tuple[np.ndarray, str]:
    import gguf

    kind = t.tensor_type.name
    if kind not in _TYPES:
        raise AdapterError(f"{path}: tensor {t.name!r} has type {kind}; LoRA weights must be {', '.join(_TYPES)}")
    ne = tuple(int(x) for x in t.shape)
    if len(ne) != 2:
        raise AdapterError(f"{path}: tensor {t.name!r} has {len(ne)} dimensions {ne}; expected 2")
    values = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(ne[::-1])
    if not np.isfinite(values).all():
        raise AdapterError(f"{path}: tensor {t.name!r} holds NaN or infinite values")
    return np.ascontiguousarray(values), kind


def _head_dim(path: Path, gname: str, base: str | os.PathLike[str] | None) -> int:
    why = (f"{path}: tensor {gname}.lora_b: llama.cpp stores q/k LoRA rows permuted per attention head, and undoing "
           "that needs the base's head size, which an adapter GGUF does not carry")
    if base is None:
        raise AdapterError(f"{why}: load it with the base it is compiled against (base=), or give head_dim=")
    found = base_head_dim(base)
    if found is None:
        raise AdapterError(f"{why}; the base {base} has no KV-cache inputs (past_key...) to read it from (import-model "
                           "writes them): refused rather than guessed; give head_dim= to load_adapter")
    return found


def _unpermuted(path: Path, name: str, b: np.ndarray, head_dim: int) -> np.ndarray:
    rows = b.shape[0]
    if head_dim < 2 or head_dim % 2 or rows % head_dim:
        raise AdapterError(f"{path}: tensor {name!r} has {rows} rows, not a whole number of heads of the base's "
                           f"head size {head_dim} (is it the base the adapter was made for?)")
    return np.ascontiguousarray(unpermute(b, rows // head_dim))


def _config(ranks: dict[str, int], alpha: float, arch: str, head_dim: int | None) -> LoraConfig:
    """PEFT terms for llama.cpp's rule, scale = alpha / rank of each tensor (1 when alpha is 0), through the one
    scaling function: ``r`` the commonest rank, ``rank_pattern`` (exact module names) for the others."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    others = tuple((re.escape(m), k) for m, k in sorted(ranks.items()) if k != r)
    return LoraConfig(
        r=r, lora_alpha=alpha if alpha else float(r), rank_pattern=others,
        alpha_pattern=() if alpha else tuple((m, float(k)) for m, k in others), target_modules=tuple(sorted(ranks)),
        extra={"format": "gguf", "general.architecture": arch, "adapter.lora.alpha": alpha,
               "rotary_head_dim": head_dim})
