"""The manifest: what a bundle holds, as typed values, and its JSON form (``manifest.json``).

Written by the compiler, read by everything else. Every field is a frozen dataclass or a plain value;
results of the compile (quantization, accuracy) are typed too, never free-form dictionaries.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from lora_runtime.errors import BundleError, InputError, UseCaseError
from lora_runtime.names import GRAPH

FORMAT = "lora_runtime.bundle"
FORMAT_VERSION = 2
INTEGRITY = "manifest_sha256"
SLOT_KINDS = ("lora_A", "lora_B", "lora_scaling", "strength", "encoding", "saved")
DTYPE_BYTES = {"float32": 4, "float16": 2, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2}


@dataclass(frozen=True)
class Column:
    """Adapter ``adapter`` owns rank columns [start, stop) at a point, with its PEFT scaling there."""

    adapter: str
    start: int
    stop: int
    scaling: float


@dataclass(frozen=True)
class Point:
    """An attachment point: the base op, its size, the slot rank and who sits there."""

    module: str
    node: str
    op_type: str
    weight: str  # the base weight initializer
    weight_transposed: bool  # stored (out, in) rather than (in, out)
    in_features: int
    out_features: int
    rank: int
    columns: tuple[Column, ...]
    # a module inside a packed point (v3 on the ort flavour): the packed branch whose slots hold its columns (rank
    # columns [start, stop) of ``<packed>.lora_A.weight``), and its rows of ``<packed>.lora_B.weight``
    packed: str | None = None
    rows: tuple[int, int] | None = None

    @property
    def branch(self) -> str:
        """The branch this point's LoRA sits in: its slots are ``lora_a(branch)``, ``lora_b(branch)``."""
        return self.packed or self.module


@dataclass(frozen=True)
class Slot:
    """An updatable tensor: what a switch writes. Shapes are fixed at compile time."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str  # one of SLOT_KINDS

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def nbytes(self) -> int:
        return DTYPE_BYTES[self.dtype] * math.prod(self.shape)


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    source: str
    sha256: str  # of the adapter's safetensors file
    config: dict[str, Any]
    nbytes: int  # its own LoRA weights, unpadded, in float32
    patch: str | None  # v1/v2: its patch file; v3: None (the group patch holds it)
    saved: tuple[str, ...] = ()  # the modules it saves whole (modules_to_save)
    saved_patch: str | None = None  # their values (the base's for the other saved modules); None: it saves none


@dataclass(frozen=True)
class SavedModuleInfo:
    """A module adapters save whole (``modules_to_save``): the base op whose weight and bias its slots replace."""

    module: str
    node: str
    op_type: str
    weight: str  # the base weight initializer the slot replaced
    bias: str | None  # the base bias initializer, or None (the op had none: the base's bias slot holds zeros)
    in_features: int
    out_features: int
    weight_slot: str  # (out, in)
    bias_slot: str | None  # (out,), or None for a Linear without bias
    adapters: tuple[str, ...]  # the adapters that save it


@dataclass(frozen=True)
class UseCase:
    name: str
    strengths: dict[str, float]  # adapter -> strength; empty: the base model alone
    encodings: str | None = None  # updatable encodings: this use-case's encoding slot values (a patch)


@dataclass(frozen=True)
class FileInfo:
    sha256: str
    nbytes: int


@dataclass(frozen=True)
class BaseInfo:
    name: str  # file name of the base model the bundle was compiled from
    sha256: str  # of the base .onnx file
    nbytes: int
    data_files: tuple[str, ...]  # external data files, linked into the bundle under the same names
    dtype: str = "float32"  # what its linear layers compute in: float32, float16, or both ("float32+float16")
    blocks: str = ""  # ops over quantized blocks kept from a GGUF ("210 MatMulNBits 4-bit, ..."); "" for none


@dataclass(frozen=True)
class WeightOnly:
    """What ``--base-weights int8|int4`` did: MatMulNBits weights in the bundle's own data file."""

    dtype: str  # "int8" or "int4"
    weights: int  # linear weights quantized
    block_sizes: tuple[int, ...]
    data_bytes: int
    weight_sqnr_db_min: float | None
    weight_sqnr_db_mean: float | None
    op: str
    encodings: str | None  # the encodings file, or None when not written
    encodings_note: str = ""  # why it was not written
    int8_modules: tuple[str, ...] = ()  # an int4 base's modules kept at 8 bits (--int8-modules)
    int8_weights: int = 0  # the weights they matched
    embeddings: tuple[str, ...] = ()  # embedding tables held as 8-bit blocks (GatherBlockQuantized)


@dataclass(frozen=True)
class MixedPrecision:
    """Activations that ``--sensitive-db`` widened: tensor -> (bits or "float16", dB at the preset's bitwidth)."""

    threshold_db: float
    tensors: dict[str, tuple[int | str, float]]

    @property
    def wide16(self) -> int:
        return sum(1 for bits, _ in self.tensors.values() if bits == 16)

    @property
    def float16(self) -> int:
        return sum(1 for bits, _ in self.tensors.values() if bits == "float16")


@dataclass(frozen=True)
class Quantization:
    """What ``--encodings`` did: the mode, preset and rounding, what was calibrated, and the files written."""

    mode: str
    preset: str
    weight_rounding: str
    calibration_method: str
    samples: int  # calibration samples
    held_out: int  # samples kept for the accuracy report
    activations: int
    base_weights: int
    lora_weights: int
    updatable: int
    files: tuple[str, ...]  # the encodings files
    execution: str  # how the base linear layers run, in words
    mixed_precision: MixedPrecision | None = None


@dataclass(frozen=True)
class Accuracy:
    """One comparison, per use-case: the outputs of ``test`` against those of ``reference``."""

    key: str  # "fp32" (this bundle vs its FP32 graph), "float32_bundle", "ort_quantize_static", ...
    test: str
    reference: str
    inputs: str
    sqnr_db: dict[str, float]  # of the first output (the logits)
    argmax_agreement: dict[str, float] = field(default_factory=dict)
    greedy_agreement: dict[str, float] = field(default_factory=dict)
    greedy: str = ""  # what greedy_agreement was measured on, e.g. "4 prompts x 16 tokens"


@dataclass(frozen=True)
class DecodeGraph:
    """A second graph of a static-shape bundle (``--decode-shape``): the same ops, weights and encodings at other
    static shapes, e.g. an LLM's one-token decode step next to its N-token prefill graph."""

    graph: str  # bundle-relative
    static_shapes: dict[str, int]  # every dim_param baked into it
    context: str | None = None  # its EPContext model (--htp-context)
    placement: str = ""
    qnn_ops: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """What the bundle was compiled for: ONNX Runtime's CPU provider, or the HTP through QNN."""

    name: str = "cpu"  # "cpu" or "htp"
    soc_model: str | None = None
    htp_arch: str | None = None
    static_shapes: dict[str, int] = field(default_factory=dict)  # dim_param -> the value baked in
    strength_range: tuple[float, float] | None = None  # INT8 on the HTP: what the lora_alpha encoding covers
    context: str | None = None  # the EPContext model (compiled ahead of time for the HTP), bundle-relative
    placement: str = ""  # where the nodes ran when the compiler checked, e.g. "all 412 nodes on QNN"
    qnn_ops: dict[str, int] = field(default_factory=dict)  # "FullyConnected ufixed16 x sfixed8" -> count
    decode: DecodeGraph | None = None
    base_path: bool = False  # v3 on the CPU: with every strength 0 the graph skips its LoRA branches (an If)


def saved_holder(module: str, holders: Sequence[str]) -> str | None:
    """The adapter whose copy of a saved module (``modules_to_save``) is in force among the active ``holders`` of
    it (None: the base's): PEFT's rule (``ModulesToSaveWrapper``), at most one active adapter may hold it."""
    if len(holders) > 1:
        raise UseCaseError(f"adapters {holders[0]!r} and {holders[1]!r} both save module {module!r} "
                           "(modules_to_save): PEFT takes a saved module from one active adapter only; mix them "
                           "without one of the two")
    return holders[0] if holders else None


@dataclass(frozen=True)
class Manifest:
    generation: str
    base: BaseInfo
    points: tuple[Point, ...]
    slots: tuple[Slot, ...]
    adapters: tuple[AdapterInfo, ...]
    use_cases: tuple[UseCase, ...]
    files: dict[str, FileInfo]
    versions: dict[str, str]
    graph: str = GRAPH
    group_patch: str | None = None
    default_adapter: str | None = None  # v2: the adapter the graph's parameters hold
    union_encodings: str | None = None  # updatable encodings: the set used for ad-hoc strengths
    weight_only: WeightOnly | None = None
    quantization: Quantization | None = None
    accuracy: tuple[Accuracy, ...] = ()
    target: Target = field(default_factory=Target)
    saved_modules: tuple[SavedModuleInfo, ...] = ()  # modules_to_save: swapped whole with each use-case
    saved_patch: str | None = None  # the base's values of the saved modules
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def use_case(self, name: str) -> UseCase:
        for u in self.use_cases:
            if u.name == name:
                return u
        raise UseCaseError(f"unknown use-case {name!r}; this bundle has {', '.join(self.use_case_names) or 'none'}")

    @property
    def use_case_names(self) -> list[str]:
        return [u.name for u in self.use_cases]

    @property
    def adapter_names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def adapter(self, name: str) -> AdapterInfo:
        for a in self.adapters:
            if a.name == name:
                return a
        raise UseCaseError(f"unknown adapter {name!r}; this bundle has {', '.join(self.adapter_names)}")

    def accuracy_of(self, key: str) -> Accuracy | None:
        return next((a for a in self.accuracy if a.key == key), None)

    @property
    def patched_slots(self) -> list[Slot]:
        """The slots a weight patch carries: LoRA A/B (and v1/v2's lora_scaling)."""
        return [s for s in self.slots if s.kind not in ("strength", "encoding", "saved")]

    @property
    def saved_slots(self) -> list[Slot]:
        """The slots a saved-module patch carries: each saved module's weight (out, in) and bias (out,)."""
        return [s for s in self.slots if s.kind == "saved"]

    def saved_sources(self, adapters: Iterable[str]) -> tuple[str | None, ...]:
        """Per saved module, the adapter (of those active) whose copy is in force, None for the base's: PEFT's rule
        (``ModulesToSaveWrapper``), at most one active adapter may hold a given module."""
        active = list(adapters)
        return tuple(saved_holder(s.module, [a for a in active if a in s.adapters]) for s in self.saved_modules)

    def saved_patch_of(self, source: str | None) -> str:
        """The patch holding ``source``'s values of the saved modules (None: the base's)."""
        rel = self.saved_patch if source is None else self.adapter(source).saved_patch
        if rel is None:
            raise BundleError(f"no saved-module patch for {source or 'the base'!r} in the manifest")
        return rel

    @property
    def encoding_slots(self) -> list[Slot]:
        """The slots an encodings patch carries: the scales and zero points that change per use-case."""
        return [s for s in self.slots if s.kind == "encoding"]

    def strength_value(self, strengths: Mapping[str, float]) -> np.ndarray:
        """The ``lora_alpha`` value for adapter strengths: a scalar (v1/v2) or one entry per adapter (v3)."""
        for name, s in strengths.items():
            self.adapter(name)
            if not isinstance(s, (int, float, np.floating)) or isinstance(s, bool) or not math.isfinite(s):
                raise InputError(f"strength of adapter {name!r} must be a finite number, got {s!r}")
            scaling = max((abs(c.scaling) for p in self.points for c in p.columns if c.adapter == name), default=1.0)
            with np.errstate(over="ignore"):
                scaled = float(np.float32(s) * np.float32(max(scaling, 1.0)))
            if not math.isfinite(scaled):
                raise InputError(f"strength {s!r} of adapter {name!r} overflows float32 once scaled by the adapter's "
                                 f"PEFT scaling ({scaling:g}): the outputs would be inf/NaN")
        r = self.target.strength_range
        outside = next((n for n, s in strengths.items() if r is not None and not r[0] <= s <= r[1]), None)
        if outside is not None:
            raise InputError(f"strength {strengths[outside]} of adapter {outside!r} is outside [{r[0]:g}, {r[1]:g}], "
                             "the range this bundle's lora_alpha encoding covers (compiled into the HTP graph): "
                             "recompile with a use-case at that strength")
        if self.generation == "v3":
            return np.array([float(strengths.get(a, 0.0)) for a in self.adapter_names], np.float32)
        if len(strengths) > 1:
            raise UseCaseError(f"{self.generation} holds one adapter at a time, got {len(strengths)}: "
                               "compile with --generation v3 for mixes")
        return np.array(next(iter(strengths.values()), 0.0), np.float32)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Any, where: str) -> Manifest:
        try:
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                raise BundleError(f"{where}: not a lora_runtime bundle manifest")
            if d.get("format_version") != FORMAT_VERSION:
                raise BundleError(f"{where}: format_version {d.get('format_version')!r}, this lora_runtime reads "
                                  f"{FORMAT_VERSION}; recompile the bundle")
            for slot in d["slots"]:  # what Slot.nbytes and the runtime's arenas rely on
                if slot["kind"] not in SLOT_KINDS or slot["dtype"] not in DTYPE_BYTES:
                    raise BundleError(f"{where}: slot {slot['name']!r} has kind {slot['kind']!r} and dtype "
                                      f"{slot['dtype']!r}; expected one of {SLOT_KINDS} and {tuple(DTYPE_BYTES)}")
            q = d.get("quantization")
            return cls(
                generation=str(d["generation"]),
                base=BaseInfo(**{**d["base"], "data_files": tuple(d["base"]["data_files"])}),
                points=tuple(_typed(Point, {**p, "columns": tuple(Column(**c) for c in p["columns"])})
                             for p in d["points"]),
                slots=tuple(Slot(**{**s, "shape": tuple(s["shape"])}) for s in d["slots"]),
                adapters=tuple(AdapterInfo(**{**a, "saved": tuple(a.get("saved", ()))}) for a in d["adapters"]),
                use_cases=tuple(UseCase(**u) for u in d["use_cases"]),
                files={k: FileInfo(**v) for k, v in d["files"].items()},
                versions=dict(d["versions"]), graph=d["graph"], group_patch=d.get("group_patch"),
                default_adapter=d.get("default_adapter"), union_encodings=d.get("union_encodings"),
                weight_only=_typed(WeightOnly, d.get("weight_only")),
                quantization=None if q is None else _typed(Quantization, {
                    **q, "mixed_precision": _mixed_precision(q.get("mixed_precision"))}),
                accuracy=tuple(_typed(Accuracy, a) for a in d.get("accuracy", ())),
                target=_target(d.get("target", {})),
                saved_modules=tuple(_typed(SavedModuleInfo, s) for s in d.get("saved_modules", ())),
                saved_patch=d.get("saved_patch"))
        except (KeyError, TypeError, AttributeError) as e:
            raise BundleError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from e


def _target(d: dict[str, Any]) -> Target:
    decode = d.get("decode")
    return replace(_typed(Target, d), decode=None if decode is None else _typed(DecodeGraph, decode))


def _typed(cls: type, d: dict[str, Any] | None) -> Any:
    """A flat dataclass from its JSON object: lists become tuples where the field is a tuple."""
    if d is None:
        return None
    values = {}
    for f in fields(cls):
        if f.name in d:
            v = d[f.name]
            values[f.name] = tuple(v) if isinstance(v, list) and str(f.type).startswith("tuple") else v
    return cls(**values)


def _mixed_precision(d: dict[str, Any] | None) -> MixedPrecision | None:
    if d is None:
        return None
    return MixedPrecision(d["threshold_db"], {t: (bits, db) for t, (bits, db) in d["tensors"].items()})


def digest(data: dict[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON, without the digest itself: catches edits and corruption."""
    body = {k: v for k, v in data.items() if k != INTEGRITY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
