"""Encodings files given to a compile (``--encodings-file [USE_CASE=]F``), matched to the tensors a bundle encodes.

AIMET names every tensor it quantizes in the graph it was given, which is more than a bundle encodes (the strength
input ``lora_alpha``, norms, attention, constants; int32 biases). So, per file:

- an entry for a tensor the bundle encodes is used as written: it replaces the calibrated encoding;
- an entry for a tensor of the graph that the bundle does not encode is ignored; a file's ignored entries are
  reported in one warning line with their count (``EncodingsWarning``), never an error;
- an entry for a tensor the graph does not have is an error naming it, unless AIMET wrote the file (its
  ``producer``, or aimet_onnx's per-adapter layout): a typo in a hand-written file must be loud, while AIMET may
  have seen a graph with tensors this one has not (it is then counted in the warning). A file none of whose entries
  names a tensor of the graph is an error either way: it was made for another graph;
- a tensor the bundle encodes that the file does not name takes the entry of a tensor it equals through
  data-movement ops (Reshape, Transpose, Squeeze, Unsqueeze, Flatten, Identity; never Cast), up or down the graph:
  AIMET quantizes a Transpose's input where the bundle quantizes its output (1.0.0 files; 2.0.0 names both).
  Per-channel entries cross only Transpose (their axis follows the permutation) and Identity.

A file for every use-case overrides the calibrated encodings in every set; a use-case's own file overrides that
use-case's set, for the tensors whose encodings change per use-case in the mode (others are counted in the warning),
and may change scale and offset only (the graph is built with one bitwidth, type and granularity per tensor).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import onnx
from onnx import helper

from lora_runtime.quant.encodings import (
    VERSION,
    Encoding,
    EncodingsError,
    EncodingsFile,
    EncodingsWarning,
    check_fits,
)
from lora_runtime.quant.reader import read_encodings

MOVES = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")  # values kept, only laid out anew
_AXIS_MOVES = ("Transpose", "Identity")  # a per-channel encoding crosses these
_EXAMPLES = 3

Move = tuple[str, str, "tuple[int, ...] | None"]  # (op type, the tensor on the other side, Transpose's perm)


@dataclass(frozen=True)
class GraphTensors:
    """The float graph's tensor names and its data-movement edges."""

    names: frozenset[str]
    ndim: Mapping[str, int]  # initializers and inputs whose rank is declared
    up: Mapping[str, Move]  # a data-movement op's output -> (op, its data input, perm)
    down: Mapping[str, tuple[Move, ...]]  # a tensor -> (op, output, perm) of each data-movement op reading it

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> GraphTensors:
        names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
        ndim = {t.name: len(t.dims) for t in graph.initializer}
        ndim |= {i.name: len(i.type.tensor_type.shape.dim) for i in graph.input if i.type.tensor_type.HasField("shape")}
        up: dict[str, Move] = {}
        down: dict[str, list[Move]] = {}
        for n in graph.node:
            names.update(x for x in (*n.input, *n.output) if x)
            if n.op_type in MOVES and n.domain in ("", "ai.onnx") and n.input and n.output:
                perm = next((tuple(helper.get_attribute_value(a)) for a in n.attribute if a.name == "perm"), None)
                up[n.output[0]] = (n.op_type, n.input[0], perm)
                down.setdefault(n.input[0], []).append((n.op_type, n.output[0], perm))
        return cls(frozenset(names), ndim, up, {k: tuple(v) for k, v in down.items()})

    def equals(self, t: str) -> Iterator[tuple[str, tuple[tuple[str, tuple[int, ...] | None, bool], ...]]]:
        """Tensors equal to ``t`` through data-movement ops, nearest first, upstream first: ``(name, steps)``
        with each step ``(op, perm, upstream)`` from ``t`` outward."""
        x, steps = t, ()
        while x in self.up:
            op, x, perm = self.up[x]
            steps = (*steps, (op, perm, True))
            yield x, steps
        frontier = [(t, ())]
        while frontier:
            nxt = []
            for y, path in frontier:
                for op, out, perm in self.down.get(y, ()):
                    step = (*path, (op, perm, False))
                    yield out, step
                    nxt.append((out, step))
            frontier = nxt


@dataclass(frozen=True)
class Targets:
    """What a bundle encodes: each tensor's shape as ``check_fits`` takes it (weights (in, out), None where not
    judged), its channel axis there, the channel axis in the graph's own layout, and which change per use-case;
    ``kept``: tensors encoded here whose encodings no file can change, and why (said in the warning)."""

    shapes: Mapping[str, Sequence[int | None] | None]
    channel_axes: Mapping[str, int]
    graph_axes: Mapping[str, int]
    updatable: frozenset[str]
    mode: str
    kept: frozenset[str] = frozenset()
    kept_why: str = ""


@dataclass(frozen=True)
class Given:
    """The encodings files of a compile: one for every use-case (or none), and one per use-case."""

    shared: EncodingsFile | None
    per_use_case: Mapping[str, EncodingsFile]
    graph: GraphTensors


def given_files(shared: EncodingsFile | None, paths: Mapping[str, str | os.PathLike[str]], graph: onnx.GraphProto,
                use_cases: Sequence[str]) -> Given | None:
    """Read the per-use-case files and check every file's names against the float graph (before calibrating)."""
    unknown = [u for u in paths if u not in use_cases]
    if unknown:
        raise EncodingsError(f"--encodings-file {unknown[0]}={os.fspath(paths[unknown[0]])}: the bundle has no "
                             f"use-case {unknown[0]!r} (its use-cases: {', '.join(use_cases)})")
    if shared is None and not paths:
        return None
    given = Given(shared, {u: read_encodings(p) for u, p in paths.items()}, GraphTensors.of(graph))
    for f in ([shared] if shared else []) + list(given.per_use_case.values()):
        check_names(f, given.graph)
    return given


def check_names(f: EncodingsFile, g: GraphTensors) -> None:
    """Refuse a file naming tensors the graph does not have (hand-written), or no tensor of it at all (any)."""
    names = f.names()
    absent = [n for n in names if n not in g.names]
    if names and len(absent) == len(names):
        raise EncodingsError(f"{f.source}: none of its {len(names)} entries names a tensor of this graph (e.g. "
                             f"{absent[0]!r}): it was made for another graph (export it from the bundle's float graph)")
    if absent and not f.from_aimet:
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise EncodingsError(f"{f.source}: tensor {absent[0]!r} is not in the graph{more}")


@dataclass(frozen=True)
class Matched:
    entries: dict[str, Encoding]  # tensor encoded here -> the file's encoding (renamed when carried)
    unused: tuple[str, ...]  # the file's names of graph tensors not encoded here
    absent: tuple[str, ...]  # the file's names of tensors this graph does not have


def match(f: EncodingsFile, targets: Targets, g: GraphTensors) -> Matched:
    """The file's entries for the tensors in ``targets``, directly or carried across data-movement ops."""
    by_name = {n: f[n] for n in f.names()}
    entries, used = {}, set()
    for t in targets.shapes:
        if t in by_name:
            entries[t], used = by_name[t], used | {t}
            continue
        for other, steps in g.equals(t):
            enc = by_name.get(other)
            carried = None if enc is None else _carry(enc, t, steps, g, t in targets.channel_axes)
            if carried is not None:
                entries[t], used = carried, used | {other}
                break
    unused = tuple(n for n in by_name if n not in used and n in g.names)
    return Matched(entries, unused, tuple(n for n in by_name if n not in g.names))


def _carry(enc: Encoding, t: str, steps: tuple, g: GraphTensors, channels: bool) -> Encoding | None:
    """``enc`` moved onto ``t`` across ``steps`` (from ``t`` outward); None where a per-channel entry cannot go
    (``channels``: ``t`` is quantized per channel here)."""
    if enc.dtype == "FLOAT" or enc.enc_type == "PER_TENSOR":
        return dataclasses.replace(enc, name=t, axis=None)
    if not channels or any(op not in _AXIS_MOVES for op, _perm, _up in steps):
        return None
    axis = enc.axis
    for op, perm, upstream in reversed(steps):
        if axis is None or op != "Transpose":
            continue
        if perm is None:  # the default: reversed dims
            axis = None if t not in g.ndim else g.ndim[t] - 1 - axis % g.ndim[t]
        else:
            axis = perm.index(axis % len(perm)) if upstream else perm[axis % len(perm)]
    return dataclasses.replace(enc, name=t, axis=axis)


def apply(given: Given, targets: Targets, union: Mapping[str, Encoding],
          per_use_case: Mapping[str, Mapping[str, Encoding]], weights: Mapping[str, Encoding]
          ) -> tuple[dict[str, Encoding], dict[str, dict[str, Encoding]], dict[str, Encoding]]:
    """The sets with the files' entries in force: ``union`` (every use-case's graph), ``per_use_case`` and the base
    ``weights``; warns once per file about what it ignored."""
    union, weights = dict(union), dict(weights)
    per_use_case = {u: dict(e) for u, e in per_use_case.items()}
    if given.shared is not None:
        mine = _used(given.shared, match(given.shared, targets, given.graph), targets, given.graph, ())
        for sets in (union, weights, *per_use_case.values()):
            sets.update({t: e for t, e in mine.items() if t in sets})
    for u, f in given.per_use_case.items():
        m = match(f, targets, given.graph)
        shared = tuple(t for t in m.entries if t not in targets.updatable)
        mine = _used(f, m, targets, given.graph, shared)
        for t, e in mine.items():
            now = per_use_case[u].get(t) or union[t]
            if _form(e) != _form(now):
                raise EncodingsError(f"{f.source}: tensor {t!r}: use-case {u!r} gets {_form(e)} but the graph is built "
                                     f"with {_form(now)}: a use-case's own encoding changes scale and offset only "
                                     "(give --encodings-file F, for every use-case, the same form)")
        per_use_case[u].update(mine)
    return union, per_use_case, weights


def _used(f: EncodingsFile, m: Matched, targets: Targets, g: GraphTensors, shared: tuple[str, ...]
          ) -> dict[str, Encoding]:
    """The entries of ``m`` that take effect, checked against the graph; one warning for everything else."""
    mine = {t: e for t, e in m.entries.items() if t not in shared}
    for t, e in mine.items():
        if e.zero_point_shift:
            raise EncodingsError(f"{f.source}: tensor {t!r}: zero_point_shift {e.zero_point_shift[0]} (a grid "
                                 "shifted by a fraction of a step) has no ONNX QuantizeLinear form: zero points are "
                                 "integers; re-export without shift_zero_point")
        if e.dtype == "INT" and e.enc_type != "PER_TENSOR" and t not in targets.channel_axes:
            raise EncodingsError(f"{f.source}: tensor {t!r} is encoded {e.enc_type}, but this bundle quantizes it per "
                                 "tensor (an activation or a constant)")
        expected, ndim = targets.graph_axes.get(t), g.ndim.get(t)
        if e.axis is not None and expected is not None and ndim and e.axis % ndim != expected:
            raise EncodingsError(f"{f.source}: tensor {t!r} is encoded per channel along axis {e.axis}, but this "
                                 f"bundle quantizes it per output channel, axis {expected} of its {ndim}-D layout")
    check_fits(EncodingsFile(VERSION, tuple(mine.values()), (), source=f.source), targets.shapes,
               targets.channel_axes)
    ignored = [*m.unused, *m.absent, *shared]
    if ignored:
        notes = [f"{len(m.absent)} not in this graph"] if m.absent else []
        kept = [n for n in m.unused if n in targets.kept]
        if kept:
            notes.append(f"{len(kept)} {targets.kept_why}")
        if shared:
            notes.append(f"{len(shared)} for tensors every use-case shares in {targets.mode} mode")
        examples = ", ".join(ignored[:_EXAMPLES]) + (", ..." if len(ignored) > _EXAMPLES else "")
        warnings.warn(f"{f.source}: {len(ignored)} entries for tensors this bundle does not quantize were ignored "
                      f"({'; '.join([f'{len(mine)} used', *notes])}): e.g. {examples}", EncodingsWarning, stacklevel=3)
    return mine


def _form(e: Encoding) -> str:
    """What a graph is built with for an encoding: everything but its values."""
    if e.dtype == "FLOAT":
        return f"FLOAT {e.bw}"
    sym = "symmetric" if e.is_sym else "asymmetric"
    return f"INT{e.bw} {sym} {e.enc_type} x{len(e.scale)}" + (f" block {e.block_size}" if e.block_size else "")
