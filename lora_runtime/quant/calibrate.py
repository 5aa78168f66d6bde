"""Calibration: the range of every tensor that gets an activation encoding, per use-case.

Calibration data is an ``.npz`` whose keys are the graph's input names, each array with a leading
sample axis (an input of shape (1, 8) is stored as (N, 1, 8)). For each use-case the float graph runs
every sample with that use-case's slot values, and the requested intermediate tensors (added as graph
outputs of a copy of the graph made in memory, its external data read from the graph's folder) are reduced to
min/max, or to a percentile of each sample's values.

Why not ONNX Runtime's calibrators: they load the model with ``onnx.load`` (which refuses the
hard-linked base weights of a bundle), write their own augmented model and cannot feed the LoRA slots
per use-case; the reduction itself is a few lines of numpy.

Memory: one session of the float graph, the ``X^T X`` statistics GPTQ asks for (float32, ``in^2 * 4`` bytes per
linear input, added in place), and the rows kept for the sensitivity pass written to a file as they come
(:class:`lora_runtime.arrays.Spill`): nothing grows with the number of samples.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from lora_runtime.arrays import Spill, blas_threads, read_npz
from lora_runtime.bundle import Bundle
from lora_runtime.errors import InputError
from lora_runtime.runtime.session import check_feeds, input_specs, slot_feeds

METHODS = ("minmax", "percentile")
KEEP = 16384  # values kept per tensor and run for the sensitivity measurement (whole rows: tokens)
GRAM_ROWS = 256  # rows of a tensor gathered for one X^T X product (SmolLM2: 100 MB of rows at a time)


@dataclass(frozen=True)
class TensorRange:
    """Observed range of one tensor (min <= 0 <= max is enforced later, by the encoding)."""

    min: float
    max: float

    def union(self, other: TensorRange) -> TensorRange:
        return TensorRange(min(self.min, other.min), max(self.max, other.max))


def load_calibration(path: str | os.PathLike[str]) -> list[dict[str, np.ndarray]]:
    """Samples from an .npz whose arrays share a leading sample axis (names and dtypes are checked on use)."""
    data = read_npz(path, "calibration data")
    if not data:
        raise InputError(f"{path}: calibration data holds no arrays")
    counts = {k: v.shape[0] if v.ndim else 0 for k, v in data.items()}
    n = min(counts.values())
    if n == 0 or len(set(counts.values())) != 1:
        raise InputError(f"{path}: every array needs the same leading sample axis, got {counts}")
    return [{k: v[i] for k, v in data.items()} for i in range(n)]


def split_held_out(samples: Sequence[dict[str, np.ndarray]], fraction: float = 0.25) -> tuple[list, list]:
    """The last ``fraction`` of the samples (at least one) is held out for the accuracy report."""
    if len(samples) < 2:
        return list(samples), list(samples)
    k = max(1, int(round(len(samples) * fraction)))
    return list(samples[:-k]), list(samples[-k:])


def collect_ranges(bundle: Bundle, tensors: Sequence[str], samples: Sequence[dict[str, np.ndarray]],
                   use_cases: Sequence[str], *, method: str = "minmax", percentile: float = 99.99,
                   step: Callable[[str], None] | None = None,
                   keep_values: MutableMapping[str, list[np.ndarray]] | Spill | None = None,
                   gram: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, TensorRange]]:
    """Per use-case, the range of each of ``tensors`` over ``samples`` (float graph, slot values fed).

    ``keep_values``: filled with a strided subsample of the rows (the tensor flattened to its last axis: one
    row per token; about ``KEEP`` values per tensor and run) of every tensor, for the sensitivity
    measurement of mixed precision (a :class:`Spill` keeps them on disk). ``gram``: for each tensor named by
    its keys, ``X^T X`` (float32) over all use-cases and samples (rows: the tensor flattened to its last axis), for
    GPTQ rounding of the weights that read it. ``step`` is told the use-case after each run.
    """
    if method not in METHODS:
        raise InputError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")
    m = bundle.manifest
    sess = _with_outputs(bundle.file(m.graph), tensors)
    expected = input_specs(sess, {s.name for s in m.slots})
    feeds = [_checked(expected, sample, i) for i, sample in enumerate(samples)]
    with blas_threads(1):  # the Gram products between runs (see lora_runtime.arrays.blas_threads)
        return _calibrate(bundle, sess, tensors, feeds, use_cases, method, percentile, step, keep_values, gram)


def input_grams(model_path: Path, tensors: Sequence[str], samples: Sequence[dict[str, np.ndarray]],
                step: Callable[[str], None] | None = None) -> tuple[dict[str, np.ndarray], int]:
    """``X^T X`` (float32) of each of ``tensors`` over ``samples`` through the plain model at ``model_path`` (no
    LoRA), and the rows (tokens) they sum: what GPTQ rounds the base weights of ``--base-weights`` with. The
    model's folder is not written to."""
    sess = _with_outputs(model_path, tensors)
    expected = input_specs(sess, set())
    feeds = [_checked(expected, sample, i) for i, sample in enumerate(samples)]
    gram: dict[str, np.ndarray] = {}
    grams = _Grams(gram)
    rows = 0
    with blas_threads(1):
        for feed in feeds:
            for i, (t, v) in enumerate(zip(tensors, sess.run(list(tensors), feed))):
                x = np.asarray(v, np.float32).reshape(-1, v.shape[-1])
                rows += len(x) if i == 0 else 0
                grams.add(t, x)
            if step:
                step(model_path.name)
        grams.flush()
    return gram, rows


def _with_outputs(graph: Path, tensors: Sequence[str]) -> ort.InferenceSession:
    """A CPU session of ``graph`` with ``tensors`` added as outputs: the graph is augmented in memory and its
    external data read from its own folder (nothing is written beside it)."""
    model = onnx.load(str(graph), load_external_data=False)
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors
                              if t not in known)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_mem_pattern = False  # hundreds of outputs: no arena planned for a run's every intermediate
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # numpy works between runs
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(graph.parent))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _calibrate(bundle: Bundle, sess: ort.InferenceSession, tensors: Sequence[str],
               feeds: Sequence[dict[str, np.ndarray]], use_cases: Sequence[str], method: str, percentile: float,
               step: Callable[[str], None] | None,
               keep_values: MutableMapping[str, list[np.ndarray]] | Spill | None,
               gram: dict[str, np.ndarray] | None) -> dict[str, dict[str, TensorRange]]:
    m = bundle.manifest
    out: dict[str, dict[str, TensorRange]] = {}
    grams = _Grams(gram) if gram is not None else None
    for name in use_cases:
        slots = slot_feeds(bundle, m.use_case(name).strengths, name)
        ranges: dict[str, TensorRange] = {}
        for sample in feeds:
            values = sess.run(list(tensors), sample | slots)
            for t, v in zip(tensors, values):
                r = _reduce(v, method, percentile)
                ranges[t] = ranges[t].union(r) if t in ranges else r
                if grams is not None and t in grams.gram:
                    grams.add(t, np.asarray(v, np.float32).reshape(-1, v.shape[-1]))
                if keep_values is not None:
                    rows = np.asarray(v, np.float32).reshape(-1, v.shape[-1] if v.ndim else 1)
                    kept = rows[:: max(1, rows.size // KEEP)]
                    if isinstance(keep_values, Spill):
                        keep_values.add(t, kept)
                    else:  # a copy: a view would hold the whole output
                        keep_values.setdefault(t, []).append(kept.copy())
            if step:
                step(name)
        out[name] = ranges
    if grams is not None:
        grams.flush()
    return out


class _Grams:
    """``X^T X`` per tensor in float32, added in place into ``gram``, from rows gathered ``GRAM_ROWS`` at a time: a
    run's 64 tokens make a short product that BLAS computes at a fraction of its speed (SmolLM2: 1.1 s of products
    per run by runs, a third of that by 256 rows). A value that is not yet a matrix (a placeholder) is replaced."""

    def __init__(self, gram: dict[str, np.ndarray]) -> None:
        self.gram = gram
        self.rows: dict[str, tuple[np.ndarray, int]] = {}

    def add(self, t: str, x: np.ndarray) -> None:
        buf, fill = self.rows.get(t, (None, 0))
        if buf is None or buf.shape[1] != x.shape[1]:
            self.flush(t)
            buf, fill = np.empty((GRAM_ROWS, x.shape[1]), np.float32), 0
        if fill + len(x) > GRAM_ROWS:
            self._product(t, buf[:fill])
            fill = 0
        if len(x) > GRAM_ROWS:
            self._product(t, x)
        else:
            buf[fill:fill + len(x)] = x
            fill += len(x)
        self.rows[t] = (buf, fill)

    def flush(self, t: str | None = None) -> None:
        for name in [t] if t is not None else list(self.rows):
            buf, fill = self.rows.pop(name, (None, 0))
            if buf is not None and fill:
                self._product(name, buf[:fill])

    def _product(self, t: str, x: np.ndarray) -> None:
        xtx = x.T @ x
        g = self.gram.get(t)
        if isinstance(g, np.ndarray) and g.shape == xtx.shape:
            g += xtx
        else:
            self.gram[t] = xtx


def _checked(expected: Mapping[str, ort.NodeArg], sample: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    try:
        return check_feeds(expected, sample)
    except InputError as e:
        raise InputError(f"calibration sample {i}: {e}") from None


def _reduce(v: np.ndarray, method: str, percentile: float) -> TensorRange:
    v = np.asarray(v, np.float32)
    if method == "minmax":
        return TensorRange(float(v.min()), float(v.max()))
    lo, hi = np.percentile(v, [100.0 - percentile, percentile])
    return TensorRange(float(lo), float(hi))


def union(ranges: Mapping[str, Mapping[str, TensorRange]]) -> dict[str, TensorRange]:
    """One range per tensor over all use-cases: what non-updatable encodings are calibrated on."""
    out: dict[str, TensorRange] = {}
    for per_tensor in ranges.values():
        for t, r in per_tensor.items():
            out[t] = out[t].union(r) if t in out else r
    return out
