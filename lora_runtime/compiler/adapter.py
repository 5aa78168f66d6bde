"""Load a Hugging Face PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``) or a llama.cpp
LoRA adapter GGUF (``lora_runtime.models.gguf_adapter``).

Keys are ``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r).
A module the config's ``modules_to_save`` selects is saved whole under the module's own keys,
``base_model.model.<module>.weight`` (out, in) and ``...bias`` (out,) (PEFT strips its
``modules_to_save.<adapter>.`` infix when saving): only Linear modules (a classifier head, a pooler)
are taken, as :class:`SavedModule`. Weights come back as float32 (F16 widens exactly, BF16 by bit
shift); everything else is rejected with the offending key named. Pickle files are never opened.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_runtime.bundle import sha256_file
from lora_runtime.errors import AdapterError, TensorFileError
from lora_runtime.lora_config import LoraConfig, check_name, rank_and_scaling
from lora_runtime.models.gguf_adapter import is_gguf, read_gguf_lora
from lora_runtime.tensorfile import read_header

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_A, _B = ".lora_A.weight", ".lora_B.weight"
_FLOAT_DTYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class LoraPair:
    """One module's A (r, in) and B (out, r), with its resolved rank and scaling."""

    module: str
    a: np.ndarray  # (r, in) float32
    b: np.ndarray  # (out, r) float32
    scaling: float
    dtype: str  # as stored in the file: "F32", "F16" or "BF16" (a GGUF adapter's also "Q8_0")

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.a.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.b.shape[0])


@dataclass(frozen=True)
class SavedModule:
    """A Linear module the adapter saved whole (``modules_to_save``): its weight (out, in) and bias (out,)."""

    module: str
    weight: np.ndarray  # (out, in) float32
    bias: np.ndarray | None  # (out,) float32, or None for a Linear without bias
    dtype: str  # as stored in the file

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (self.bias.nbytes if self.bias is not None else 0)


@dataclass(frozen=True)
class Adapter:
    """One trained LoRA: its name, where it came from, its config and its pairs sorted by module."""

    name: str
    source: str
    config: LoraConfig
    pairs: tuple[LoraPair, ...]
    sha256: str  # of adapter_model.safetensors (or of the GGUF file)
    saved: tuple[SavedModule, ...] = ()  # modules_to_save, sorted by module

    def pair(self, module: str) -> LoraPair | None:
        return next((p for p in self.pairs if p.module == module), None)

    def saved_module(self, module: str) -> SavedModule | None:
        return next((s for s in self.saved if s.module == module), None)

    @property
    def nbytes(self) -> int:
        return sum(p.a.nbytes + p.b.nbytes for p in self.pairs)


def load_adapter(path: str | os.PathLike[str], name: str | None = None, *,
                 base: str | os.PathLike[str] | None = None, head_dim: int | None = None) -> Adapter:
    """Load and validate a PEFT LoRA folder or a llama.cpp GGUF LoRA file. ``name`` defaults to the folder name
    (the file's stem). A GGUF adapter's q/k rows are un-permuted per head of ``head_dim`` rows, read from ``base``
    (the ONNX base it will be compiled against: its KV-cache inputs) unless given."""
    folder = Path(path)
    is_file = folder.is_file()
    try:
        name = check_name("adapter", name if name is not None else folder.stem if is_file else folder.name)
    except ValueError as e:
        raise AdapterError(f"{folder}: {e}") from e
    if is_file:
        if not is_gguf(folder):
            raise AdapterError(f"{folder}: a file, neither a PEFT adapter folder nor a GGUF LoRA adapter")
        lora = read_gguf_lora(folder, base=base, head_dim=head_dim)
        pairs = tuple(LoraPair(m, a, b, rank_and_scaling(lora.config, m)[1], dtype) for m, a, b, dtype in lora.pairs)
        return Adapter(name, str(folder), lora.config, pairs, sha256_file(folder))
    if not folder.is_dir():
        raise AdapterError(f"{folder}: adapter folder not found (expected {CONFIG_FILE} + {WEIGHTS_FILE})")
    config = _read_config(folder / CONFIG_FILE)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = (f"; found {', '.join(pickles)}: pickle files are never loaded, re-save with "
                "save_pretrained(..., safe_serialization=True)") if pickles else ""
        raise AdapterError(f"{weights}: missing{hint}")
    try:
        tf = read_header(weights)
        pairs, saved = _read_pairs(tf, config)
    except TensorFileError as e:
        raise AdapterError(str(e)) from e
    return Adapter(name, str(folder), config, pairs, sha256_file(weights), saved)


def _read_config(path: Path) -> LoraConfig:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise AdapterError(f"{path}: missing; a PEFT adapter folder needs {CONFIG_FILE}") from e
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from e
    return LoraConfig.from_json(data, source=str(path))


def _read_pairs(tf, config: LoraConfig) -> tuple[tuple[LoraPair, ...], tuple[SavedModule, ...]]:
    path = tf.path
    modules: dict[str, dict[str, str]] = {}
    saved: dict[str, dict[str, str]] = {}  # module -> tensor ("weight", "bias", ...) -> key
    for key in tf.entries:
        if "lora_embedding_" in key:
            raise AdapterError(f"{path}: tensor {key!r} is an embedding LoRA; only Linear/Conv1D LoRA is supported")
        if "lora_magnitude_vector" in key:
            raise AdapterError(f"{path}: tensor {key!r} is a DoRA magnitude; DoRA adapters are not supported")
        if key.startswith(_PREFIX) and not key.endswith((_A, _B)) and "." in key[len(_PREFIX):]:
            module, _, tensor = key[len(_PREFIX):].rpartition(".")
            if ".lora_" not in key and config.saves(module):
                saved.setdefault(module, {})[tensor] = key
                continue
        if not key.startswith(_PREFIX) or not key.endswith((_A, _B)):
            why = (f"not selected by modules_to_save {list(config.modules_to_save)}" if config.modules_to_save
                   else f"expected keys '{_PREFIX}<module>{_A}' / '{_B}'")
            raise AdapterError(f"{path}: tensor {key!r} is not a LoRA A/B weight ({why})")
        module, kind = key[len(_PREFIX):-len(_A)], key[-len(_A):]
        modules.setdefault(module, {})[kind] = key
    if not modules:
        raise AdapterError(f"{path}: holds no LoRA tensors")
    both = sorted(set(modules) & set(saved))
    if both:
        raise AdapterError(f"{path}: module {both[0]!r} has LoRA tensors and is saved whole (modules_to_save); "
                           "PEFT does one or the other")
    return _lora_pairs(tf, config, modules), tuple(_saved_module(tf, m, saved[m]) for m in sorted(saved))


def _saved_module(tf, module: str, keys: dict[str, str]) -> SavedModule:
    """A module saved whole: only a Linear (2-D weight (out, in), optional bias (out,)) can be swapped."""
    path = tf.path
    other = sorted(set(keys) - {"weight", "bias"})
    if other or "weight" not in keys:
        what = f"tensor {keys[other[0]]!r}" if other else "no weight tensor"
        raise AdapterError(f"{path}: module {module!r} in modules_to_save has {what}; only a Linear's weight and bias "
                           "can be saved modules")
    tensors = {}
    for t, key in keys.items():
        e = tf.entries[key]
        if e.dtype not in _FLOAT_DTYPES:
            raise AdapterError(f"{path}: tensor {key!r} has dtype {e.dtype}; saved modules must be F32, F16 or BF16")
        value = tf.read(key, float32=True).astype(np.float32, copy=False)
        if not np.isfinite(value).all():
            raise AdapterError(f"{path}: tensor {key!r} holds NaN or infinite values")
        tensors[t] = value
    w, b = tensors["weight"], tensors.get("bias")
    if w.ndim != 2:
        kind = {1: "a norm layer's", 4: "a convolution's"}.get(w.ndim, f"a {w.ndim}-D")
        raise AdapterError(f"{path}: tensor {keys['weight']!r} has shape {w.shape}, {kind} weight: module {module!r} "
                           "in modules_to_save is not a Linear; only Linear modules (classifier heads) can be saved "
                           "modules")
    if b is not None and b.shape != (w.shape[0],):
        raise AdapterError(f"{path}: tensor {keys['bias']!r} has shape {b.shape}; the bias of a Linear with weight "
                           f"{w.shape} is ({w.shape[0]},)")
    return SavedModule(module, w, b, tf.entries[keys["weight"]].dtype)


def _lora_pairs(tf, config: LoraConfig, modules: dict[str, dict[str, str]]) -> tuple[LoraPair, ...]:
    path = tf.path
    pairs = []
    for module in sorted(modules):
        keys = modules[module]
        for kind in (_A, _B):
            if kind not in keys:
                raise AdapterError(f"{path}: module {module!r} has no {kind[1:]} tensor")
        ea, eb = tf.entries[keys[_A]], tf.entries[keys[_B]]
        for e in (ea, eb):
            if e.dtype not in _FLOAT_DTYPES:
                raise AdapterError(f"{path}: tensor {e.name!r} has dtype {e.dtype}; LoRA weights must be "
                                   "F32, F16 or BF16")
            if len(e.shape) != 2:
                raise AdapterError(f"{path}: tensor {e.name!r} has shape {e.shape}; expected 2-D "
                                   "(Conv LoRA is not supported)")
        if ea.shape[0] != eb.shape[1]:
            raise AdapterError(f"{path}: module {module!r}: lora_A {ea.shape} and lora_B {eb.shape} disagree on "
                               "the rank (A is (r, in), B is (out, r))")
        if not config.targets(module):
            raise AdapterError(f"{path}: module {module!r} has LoRA tensors but target_modules "
                               f"{config.target_modules!r} does not select it")
        rank, scaling = rank_and_scaling(config, module)
        if ea.shape[0] != rank:
            raise AdapterError(f"{path}: tensor {ea.name!r} has rank {ea.shape[0]} but the config gives "
                               f"module {module!r} rank {rank} (r / rank_pattern)")
        a, b = tf.read(ea.name, float32=True), tf.read(eb.name, float32=True)
        for e, t in ((ea, a), (eb, b)):
            if not np.isfinite(t).all():
                raise AdapterError(f"{path}: tensor {e.name!r} holds NaN or infinite values")
        pairs.append(LoraPair(module, a.astype(np.float32, copy=False), b.astype(np.float32, copy=False),
                              scaling, ea.dtype))
    return tuple(pairs)

