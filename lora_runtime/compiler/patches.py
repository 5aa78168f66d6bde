"""The slot table and the patches, made from one ordered list so they cannot disagree.

For every attachment point the plan fixes the slot rank (max over adapters in v1/v2, sum in v3) and, in
v3, which adapter owns each rank column. :class:`PatchLayout` then lists the slots in patch order,
each with the function that fills it from adapters::

    v1/v2:  lora_scaling (P,) | A_0 (R_0, in) | B_0 (out, R_0) | A_1 | B_1 | ...     one patch per adapter,
                                                                                    zero-padded to R_p
    v3:     A_0 (R_0, in) = [A_0^1; A_0^2; ...] | B_0 (out, R_0) = [B_0^1 B_0^2 ...] | ...   one group patch
    then:   lora_alpha (strength: a graph input, in no patch)

The slot table the manifest records and every patch written iterate over that same list. The runtime lays
its arenas out exactly as a patch's data section, so a cold switch is one positioned read.

Saved modules (``modules_to_save``) have a layout of their own, :class:`SavedLayout`, in every generation::

    <m_0>.modules_to_save.weight (out, in) | <m_0>.modules_to_save.bias (out,) | <m_1>... one patch for the base's
                                                                                   values, one per saving adapter
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from lora_runtime.compiler.adapter import Adapter
from lora_runtime.compiler.packed import PackedOp
from lora_runtime.compiler.passes.branch import Branch, Member
from lora_runtime.compiler.points import AttachmentPoint, SavedPoint
from lora_runtime.errors import AdapterError
from lora_runtime.external_data import read_tensor
from lora_runtime.manifest import Column, Point, SavedModuleInfo, Slot
from lora_runtime.names import (
    GROUP_PATCH,
    PACKED_SLICE,
    SAVED_PATCH,
    SCALING,
    STRENGTH,
    adapter_patch,
    lora_a,
    lora_b,
    saved_bias,
    saved_patch,
    saved_weight,
)
from lora_runtime.quant.encodings import Encoding
from lora_runtime.tensorfile import TensorFile, save_tensors

Fill = Callable[[Sequence[Adapter]], np.ndarray]  # the adapters a patch holds -> one slot's values
_ONNX_TYPES = {"F32": TensorProto.FLOAT, "F16": TensorProto.FLOAT16, "I8": TensorProto.INT8,
               "I16": TensorProto.INT16}


def plan_branches(points: Sequence[AttachmentPoint], adapters: Sequence[Adapter], generation: str,
                  packed: Mapping[str, PackedOp] | None = None) -> list[Branch]:
    """Each point's slot rank and, in v3, the owner and PEFT scaling of every rank column. ``packed`` (v3 only):
    the packed linear ops whose module slices become one packed point each (``passes.branch``), by Split key."""
    branches: list[Branch] = []
    groups: dict[str, list[AttachmentPoint]] = {}
    for point in points:
        owner = point.candidate.node.rsplit("/", 1)[0] if point.candidate.op_type == PACKED_SLICE else None
        if packed and owner in packed:
            if owner not in groups:
                groups[owner] = []
                branches.append(Branch(-1, owner, point.candidate, 0))  # a placeholder in graph order
            groups[owner].append(point)
            continue
        pairs = [(i, a.pair(point.module)) for i, a in enumerate(adapters) if a.pair(point.module)]
        if generation == "v3":
            cols = [(i, pair.scaling) for i, pair in pairs for _ in range(pair.rank)]
            branches.append(Branch(len(branches), point.module, point.candidate, len(cols),
                                   tuple(i for i, _ in cols), tuple(s for _, s in cols)))
        else:
            branches.append(Branch(len(branches), point.module, point.candidate,
                                   max(pair.rank for _, pair in pairs)))
    for p, b in enumerate(branches):
        if b.index < 0:
            branches[p] = _packed_branch(p, packed[b.module], groups[b.module], adapters)  # type: ignore[index]
    return branches


def _packed_branch(index: int, op: PackedOp, points: Sequence[AttachmentPoint], adapters: Sequence[Adapter]) -> Branch:
    """One branch on ``op``'s whole output for the modules of ``points``: columns module by module (in row order),
    each adapter's within."""
    members = sorted((Member(p.module, p.candidate, *op.rows[p.candidate.aliases[0]]) for p in points),
                     key=lambda m: m.start)
    cols = [(i, pair.scaling) for m in members for i, a in enumerate(adapters) if (pair := a.pair(m.module))
            for _ in range(pair.rank)]
    return Branch(index, op.name, op.candidate, len(cols), tuple(i for i, _ in cols), tuple(s for _, s in cols),
                  tuple(members))


@dataclass(frozen=True)
class PatchLayout:
    """The patched slots in patch order, each with how a patch fills it (see the module docstring)."""

    generation: str
    lora_dtype: str
    entries: tuple[tuple[Slot, Fill], ...]
    n_adapters: int

    @classmethod
    def of(cls, branches: Sequence[Branch], generation: str, n_adapters: int, lora_dtype: str) -> PatchLayout:
        entries: list[tuple[Slot, Fill]] = []
        if generation != "v3":
            entries.append((Slot(SCALING, (len(branches),), "float32", "lora_scaling"), _scaling(branches)))
        for b in branches:
            c = b.candidate
            entries.append((Slot(lora_a(b.module), (b.rank, c.in_features), lora_dtype, "lora_A"),
                            _stacked(b, "a", generation)))
            entries.append((Slot(lora_b(b.module), (c.out_features, b.rank), lora_dtype, "lora_B"),
                            _stacked(b, "b", generation)))
        return cls(generation, lora_dtype, tuple(entries), n_adapters)

    def integer(self, encodings: Mapping[str, Encoding]) -> PatchLayout:
        """The same layout with the LoRA A/B slots holding integer codes on their (symmetric, per-tensor)
        encodings: what a graph with full QDQ groups reads through its DequantizeLinear."""
        entries = []
        for slot, fill in self.entries:
            enc = encodings.get(slot.name)
            if enc is not None and slot.kind in ("lora_A", "lora_B"):
                dtype = {8: "int8", 16: "int16"}[enc.bw]
                slot, fill = dataclasses.replace(slot, dtype=dtype), _codes(fill, enc, np.dtype(dtype))
            entries.append((slot, fill))
        return dataclasses.replace(self, entries=tuple(entries))

    @property
    def slots(self) -> tuple[Slot, ...]:
        """The slot table: the patched slots, then the strength input."""
        shape = () if self.generation != "v3" else (self.n_adapters,)
        return (*(s for s, _ in self.entries), Slot(STRENGTH, shape, "float32", "strength"))

    def patch(self, adapters: Sequence[Adapter], what: str) -> dict[str, np.ndarray]:
        """The values of one patch (``adapters``: one in v1/v2, all in v3), in slot order and slot dtype;
        float16 slots must hold every value. ``what`` names the patch in messages."""
        out = {}
        for slot, fill in self.entries:
            values = fill(adapters)
            if slot.dtype == "float16":
                peak = float(np.abs(values).max()) if values.size else 0.0
                if peak > float(np.finfo(np.float16).max):
                    raise AdapterError(f"{what}: tensor {slot.name!r} holds |x| = {peak:.4g}, beyond float16; "
                                       "compile with --lora-dtype float32")
            out[slot.name] = values.astype(slot.numpy_dtype)
        return out

    def write(self, root: Path, adapters: Sequence[Adapter]) -> dict[str, TensorFile]:
        """Every patch of the bundle under ``root``: bundle-relative path -> its validated header."""
        (root / "patches").mkdir(exist_ok=True)
        if self.generation == "v3":
            return {GROUP_PATCH: save_tensors(root / GROUP_PATCH, self.patch(adapters, "the adapter group"))}
        return {adapter_patch(a.name): save_tensors(root / adapter_patch(a.name),
                                                    self.patch([a], f"adapter {a.name!r}")) for a in adapters}


def _codes(fill: Fill, enc: Encoding, dtype: np.dtype) -> Fill:
    scale = float(enc.scale[0])
    info = np.iinfo(dtype)

    def codes(adapters: Sequence[Adapter]) -> np.ndarray:
        return np.clip(np.rint(fill(adapters).astype(np.float64) / scale), info.min, info.max).astype(dtype)
    return codes


def _scaling(branches: Sequence[Branch]) -> Fill:
    def fill(adapters: Sequence[Adapter]) -> np.ndarray:
        (adapter,) = adapters
        return np.array([p.scaling if (p := adapter.pair(b.module)) else 0.0 for b in branches], np.float32)
    return fill


def _stacked(b: Branch, which: str, generation: str) -> Fill:
    """A (R, in) or B (out, R) at ``b``: v3 concatenates every adapter's along the rank; v1/v2 zero-pads one. A
    packed point's B holds each module's B in that module's rows and columns, zeros elsewhere."""
    c = b.candidate
    shape = (b.rank, c.in_features) if which == "a" else (c.out_features, b.rank)
    axis = 0 if which == "a" else 1

    def fill(adapters: Sequence[Adapter]) -> np.ndarray:
        if b.members:
            return _packed_fill(b, which, adapters)
        pairs = [p for p in (a.pair(b.module) for a in adapters) if p is not None]
        parts = [p.a if which == "a" else p.b for p in pairs]
        if generation == "v3":
            return np.concatenate(parts, axis=axis)
        out = np.zeros(shape, np.float32)
        if parts:
            rank = parts[0].shape[axis]
            if which == "a":
                out[:rank] = parts[0]
            else:
                out[:, :rank] = parts[0]
        return out
    return fill


def _packed_fill(b: Branch, which: str, adapters: Sequence[Adapter]) -> np.ndarray:
    pairs = [(m, p) for m in b.members for p in (a.pair(m.module) for a in adapters) if p is not None]
    if which == "a":
        return np.concatenate([p.a for _, p in pairs], axis=0)
    out, start = np.zeros((b.candidate.out_features, b.rank), np.float32), 0
    for m, p in pairs:
        out[m.start:m.stop, start:start + p.rank] = p.b
        start += p.rank
    return out


def external_parameters(tf: TensorFile, rel: str) -> dict[str, TensorProto]:
    """Initializers whose data is the patch file itself: ONNX external data at the tensors' offsets."""
    out = {}
    for e in tf.entries.values():
        t = TensorProto(name=e.name, data_type=_ONNX_TYPES[e.dtype], dims=list(e.shape))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", rel), ("offset", str(e.begin)), ("length", str(e.nbytes))):
            t.external_data.add(key=key, value=value)
        out[e.name] = t
    return out


def point_records(branches: Sequence[Branch], adapters: Sequence[Adapter], generation: str) -> tuple[Point, ...]:
    """The manifest's points: each branch's op and which adapter owns which rank columns; a packed point's
    modules each as a point of their own, naming the packed branch whose slots hold their columns and rows."""
    return tuple(p for b in branches for p in _records(b, adapters, generation))


def _records(b: Branch, adapters: Sequence[Adapter], generation: str) -> tuple[Point, ...]:
    if b.members:
        out, start = [], 0
        for m in b.members:
            cols = []
            for a in adapters:
                if (pair := a.pair(m.module)) is not None:
                    cols.append(Column(a.name, start, start + pair.rank, pair.scaling))
                    start += pair.rank
            c = m.candidate
            out.append(Point(m.module, c.node, c.op_type, c.weight, c.transposed, c.in_features, c.out_features,
                             cols[-1].stop - cols[0].start, tuple(cols), b.module, (m.start, m.stop)))
        return tuple(out)
    cols, start = [], 0
    for a in adapters:
        pair = a.pair(b.module)
        if pair is None:
            continue
        if generation == "v3":
            cols.append(Column(a.name, start, start + pair.rank, pair.scaling))
            start += pair.rank
        else:
            cols.append(Column(a.name, 0, pair.rank, pair.scaling))
    c = b.candidate
    return (Point(b.module, c.node, c.op_type, c.weight, c.transposed, c.in_features, c.out_features, b.rank,
                  tuple(cols)),)


@dataclass(frozen=True)
class SavedLayout:
    """The saved modules' slots in patch order, with the base's own values (see the module docstring)."""

    points: tuple[SavedPoint, ...]
    slots: tuple[Slot, ...]
    base: Mapping[str, np.ndarray]  # slot -> the base's value, in the slot's dtype and shape

    @classmethod
    def of(cls, points: Sequence[SavedPoint], graph: onnx.GraphProto, base_dir: Path) -> SavedLayout:
        """Slots typed as the base op computes; the base's weight read (out, in), its bias (out,) or zeros."""
        inits = {t.name: t for t in graph.initializer}
        slots, base = [], {}
        for p in points:
            c = p.candidate
            w = read_tensor(inits[c.weight], base_dir)
            base[saved_weight(p.module)] = np.ascontiguousarray(w if c.transposed else w.T)
            slots.append(Slot(saved_weight(p.module), (c.out_features, c.in_features), str(w.dtype), "saved"))
            if p.has_bias:
                b = (read_tensor(inits[p.bias], base_dir).reshape(-1) if p.bias is not None
                     else np.zeros(c.out_features, w.dtype))
                base[saved_bias(p.module)] = b
                slots.append(Slot(saved_bias(p.module), (c.out_features,), str(b.dtype), "saved"))
        return cls(tuple(points), tuple(slots), base)

    def values(self, adapter: Adapter | None) -> dict[str, np.ndarray]:
        """One patch: ``adapter``'s copies of the modules it saves, the base's values for the rest."""
        out = dict(self.base)
        for p in self.points:
            s = adapter.saved_module(p.module) if adapter is not None else None
            if s is not None:
                out[saved_weight(p.module)] = s.weight
                if s.bias is not None:
                    out[saved_bias(p.module)] = s.bias
        return {slot.name: out[slot.name].astype(slot.numpy_dtype) for slot in self.slots}

    def write(self, root: Path, adapters: Sequence[Adapter]) -> dict[str, TensorFile]:
        """The base's patch and one per adapter that saves a module: bundle-relative path -> its header."""
        if not self.points:
            return {}
        (root / saved_patch("x")).parent.mkdir(parents=True, exist_ok=True)
        out = {SAVED_PATCH: save_tensors(root / SAVED_PATCH, self.values(None))}
        for a in adapters:
            if a.saved:
                out[saved_patch(a.name)] = save_tensors(root / saved_patch(a.name), self.values(a))
        return out

    def records(self) -> tuple[SavedModuleInfo, ...]:
        return tuple(SavedModuleInfo(p.module, p.candidate.node, p.candidate.op_type, p.candidate.weight, p.bias,
                                     p.candidate.in_features, p.candidate.out_features, saved_weight(p.module),
                                     saved_bias(p.module) if p.has_bias else None, p.adapters) for p in self.points)
