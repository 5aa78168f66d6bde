"""Weight-only quantization of the base model: int8 or int4 block-wise, LoRA branches float.

Every MatMul/Gemm with a constant 2-D weight (the attachment points and every other linear layer)
becomes ONNX Runtime's ``MatMulNBits``; the branch added at an attachment point is untouched::

    before:  x ──► MatMul(W float32, (in, out)) ──► y.base ──► Add(branch) ──► y
    after:   x ──► MatMulNBits(B uint8 (out, blocks, blob), scales (out * blocks)) ──► y.base ──► Add ──► y

Codes dequantized as ``(code - zero) * scale`` per block of ``block_size`` input features (32 by default; a block
as long as the input is one scale per output channel): symmetric, ``zero = 2^(bits-1)`` (the op's default), or
asymmetric, a zero point per block (``zero_points``) and each block's range searched (:func:`quantize_grid`);
codes nearest, or GPTQ's from the layers' calibration inputs (``hessians``). In an int4 base, the ``wide``
weights (``--int8-modules``) get 8-bit codes in the same blocks as the 4-bit ones: at accuracy level 4 ONNX
Runtime quantizes the activations in the weight's blocks, and a block spanning the whole input (per output
channel) lost 2 dB of SmolLM2's logit SQNR there (23.3 -> 21.3 dB with v_proj and down_proj at 8 bits). The
quantized weights, and every other external tensor of the base, are streamed one tensor at a time into the
bundle's own data file: a quantized bundle does not need the float32 weights at all, and never holds them all in
memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from lora_runtime.compiler.packed import packed_modules
from lora_runtime.compiler.passes import PassResult
from lora_runtime.compiler.passes.emit import MS_DOMAIN, matmul_nbits, own_base_tensors, use_ms_domain
from lora_runtime.compiler.points import Candidate, find_candidates
from lora_runtime.external_data import DataWriter, read_tensor
from lora_runtime.graph import GraphEdit
from lora_runtime.metrics import sqnr_db
from lora_runtime.names import block_scales, packed_weight
from lora_runtime.quant.encodings import Encoding
from lora_runtime.quant.gptq import Hessians

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightOnlyPassOptions:
    base_dir: Path  # where the base model's external data is
    out: Path  # the bundle being written
    data_name: str  # its own data file, relative to ``out``
    bits: int
    block_size: int | None = None  # None: DEFAULT_BLOCK_SIZE
    accuracy_level: int = 4  # MatMulNBits' int8 compute
    keep_float: frozenset[str] = frozenset()  # weights never quantized: the LoRA slots
    symmetric: bool = True  # False: a zero point per block, its [min, max] clip searched (see quantize_grid)
    hessians: Hessians | None = None  # the linear inputs' X^T X: GPTQ codes (and the clip search's weights)
    wide: frozenset[str] = frozenset()  # weights at 8 bits (in the same blocks) in an int4 base (``module_weights``)


@dataclass(frozen=True)
class QuantizedWeight:
    """What replaced one weight: for the manifest and the encodings file."""

    block_size: int
    sqnr_db: float  # of the dequantized weight against the float32 weight
    encoding: Encoding  # the same numbers in the AIMET/QAIRT encodings format


@dataclass(frozen=True)
class WeightOnlyResult(PassResult):
    weights: tuple[QuantizedWeight, ...]
    embeddings: tuple[QuantizedWeight, ...] = ()  # tables read by GatherBlockQuantized (8-bit)


@dataclass(frozen=True)
class BlockWeight:
    """One weight on its block grid: ``w[k, n] = (codes[n, b, j] - zero[n, b]) * scales[n, b]`` for ``k = b *
    block_size + j``; ``zeros`` None: symmetric (zero ``2^(bits-1)``)."""

    codes: np.ndarray  # (N, blocks, block_size) uint8
    scales: np.ndarray  # (N, blocks) float32
    zeros: np.ndarray | None  # (N, blocks) uint8
    dequantized: np.ndarray  # (K, N) float32


CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # asymmetric grids tried per block: [min, max] shrunk by these


def quantize_grid(w: np.ndarray, bits: int, block_size: int, scale_dtype: type = np.float32,
                  symmetric: bool = True, importance: np.ndarray | None = None,
                  rounding: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None) -> BlockWeight:
    """W (K, N) float on a grid of ``block_size`` input rows per scale.

    Symmetric: ``scale = max|w| / (2^(bits-1) - 1)``, zero ``2^(bits-1)``. Asymmetric: per block, ``[min, max]``
    shrunk towards zero by each of ``CLIPS`` (both ends scaled), ``scale = (max - min) / (2^bits - 1)``, zero
    the rounded code of 0; the clip whose nearest codes give the smallest error, weighted by ``importance`` (K,)
    (the mean square of each input feature: an error on a large input counts more; None: all 1), is kept.
    ``rounding(w, scale, zero)`` (both (K, N)) chooses the codes on that grid (GPTQ); None: nearest."""
    k, n = w.shape
    blocks = -(-k // block_size)
    wt = np.zeros((n, blocks * block_size), np.float32)
    wt[:, :k] = w.T
    g = wt.reshape(n, blocks, block_size)
    top = 2 ** bits - 1
    imp = np.ones(blocks * block_size, np.float32)
    if importance is not None:
        imp[:k] = np.maximum(np.asarray(importance, np.float32), 0) + 1e-12
    imp = imp.reshape(blocks, block_size)
    if symmetric:
        scales = _scales(np.abs(g).max(axis=-1) / (2 ** (bits - 1) - 1), scale_dtype)
        zeros = np.full(scales.shape, 2 ** (bits - 1), np.float32)
    else:
        lo, hi = np.minimum(g.min(axis=-1), 0), np.maximum(g.max(axis=-1), 0)
        best = None
        for c in CLIPS:
            sc = _scales((hi - lo) * c / top, scale_dtype)
            z = np.clip(np.rint(-lo * c / sc), 0, top)
            q = np.clip(np.rint(g / sc[..., None]) + z[..., None], 0, top)
            err = (((q - z[..., None]) * sc[..., None] - g) ** 2 * imp).sum(axis=-1)
            if best is None:
                best, scales, zeros = err, sc, z
            else:
                better = err < best
                best = np.where(better, err, best)
                scales, zeros = np.where(better, sc, scales), np.where(better, z, zeros)
    if rounding is None:
        codes = np.clip(np.rint(g / scales[..., None]) + zeros[..., None], 0, top).astype(np.uint8)
    else:
        full = (np.repeat(scales.T, block_size, axis=0)[:k], np.repeat(zeros.T, block_size, axis=0)[:k])
        q = rounding(np.asarray(w, np.float32), *full)  # (K, N)
        pad = np.zeros((blocks * block_size, n), np.uint8)
        pad[:k] = q
        codes = np.ascontiguousarray(pad.T).reshape(n, blocks, block_size)
    deq = ((codes.astype(np.float32) - zeros[..., None]) * scales[..., None]).reshape(n, -1)[:, :k].T
    return BlockWeight(codes, scales.astype(np.float32), None if symmetric else zeros.astype(np.uint8), deq)


def _scales(raw: np.ndarray, dtype: type) -> np.ndarray:
    """Scales as the graph will hold them (``dtype``), in float32; a block of zeros gets scale 1."""
    s = raw.astype(dtype).astype(np.float32)
    s[s == 0] = 1.0
    return s


# 32 input features (what MatMulNBits and QAIRT's LPBQ use), for int8 too: at accuracy level 4 ONNX Runtime quantizes
# the activations in blocks of the weight's block length, and SmolLM2 with int8 weights per output channel (a block
# of the input dim, padded to a power of two) gave 20.9 dB of logit SQNR in 243 MB against 28.5 dB in 159 MB with 32
DEFAULT_BLOCK_SIZE = 32


def quantize_weights(model: onnx.ModelProto, options: WeightOnlyPassOptions) -> WeightOnlyResult:
    """Rewrite ``model`` in place: linear layers to MatMulNBits, all external base data into the bundle's file."""
    o = options
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    by_node = {c.node: c for c in find_candidates(graph) if c.weight not in o.keep_float}
    tables = _embedding_tables(graph, o.keep_float)
    done: list[QuantizedWeight] = []
    embedded: list[QuantizedWeight] = []
    looked_up: dict[str, tuple[TensorProto, TensorProto]] = {}  # embedding table -> its codes and scales
    edit = GraphEdit(graph)
    with open(o.out / o.data_name, "wb") as f:
        writer = DataWriter(f, o.data_name)
        for i, key, node in edit.keyed():
            if node.op_type == "Gather" and node.input[0] in tables:
                name = node.input[0]
                if name not in looked_up:  # a table two Gathers read is written once
                    t = inits[name]
                    looked_up[name], made = _embedding_codes(writer, name, read_tensor(t, o.base_dir), t.data_type)
                    edit.add_initializers(looked_up[name])
                    embedded.append(made)
                edit.replace(i, [_gather_blocks(node, key, *looked_up[name])])
                continue
            c = by_node.get(key)
            if c is None:
                continue
            bias = _bias(node, c, {t: inits[t] for t in node.input[2:] if t in inits})
            if isinstance(bias, str):
                log.info("not quantized: %s %s: %s", node.op_type, c.node, bias)
                continue
            w = read_tensor(inits[c.weight], o.base_dir).astype(np.float32)
            w = w.T if c.transposed else w  # (in, out)
            bits = 8 if c.weight in o.wide else o.bits
            bs = o.block_size or DEFAULT_BLOCK_SIZE  # the wide ones too: see the module docstring
            q = quantize_grid(w, bits, bs, helper.tensor_dtype_to_np_dtype(c.elem_type), o.symmetric,
                              *_data_aware(o.hessians, c, bits))
            sqnr = sqnr_db(w, q.dequantized)
            q_node, q_inits = matmul_nbits(writer, c.weight, c.x, list(node.output), node.name or c.node, q.codes,
                                           q.scales, c.in_features, bits, o.accuracy_level, bias, c.elem_type,
                                           q.zeros)
            edit.replace(i, [q_node])
            edit.add_initializers(q_inits)
            done.append(QuantizedWeight(bs, sqnr, _encoding(c.weight, bits, bs, q.scales, c.in_features, q.zeros)))
        edit.apply()
        own_base_tensors(graph, writer, o.base_dir)
    use_ms_domain(model)
    return WeightOnlyResult(model, tuple(done), tuple(embedded))


EMBEDDING_BLOCK = 32


def _embedding_tables(graph: onnx.GraphProto, keep_float: frozenset[str]) -> set[str]:
    """The embedding tables: float 2-D initializers that a ``Gather`` (axis 0) indexes by a graph input (token ids;
    not the rotary tables, indexed by computed positions), their width a multiple of ``EMBEDDING_BLOCK``."""
    inits = {t.name: t for t in graph.initializer}
    ids = {v.name for v in graph.input} - set(inits)
    found = set()
    for n in graph.node:
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        t = inits.get(n.input[0]) if n.op_type == "Gather" and n.input[1] in ids and axis == 0 else None
        if (t is not None and t.name not in keep_float and len(t.dims) == 2 and t.dims[1] % EMBEDDING_BLOCK == 0
                and t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)):
            found.add(t.name)
    return found


def _embedding_codes(writer: DataWriter, name: str, table: np.ndarray, elem: int
                     ) -> tuple[tuple[TensorProto, TensorProto], QuantizedWeight]:
    """An embedding table as 8-bit symmetric codes in blocks of ``EMBEDDING_BLOCK`` along each row (zero point 128,
    the op's default), written to the data file: (codes, scales) initializers, and what it cost. A quarter of the
    float32 table's bytes; the table is the base's biggest tensor (SmolLM2: 113 MB of float32)."""
    w = np.asarray(table, np.float32)  # (rows, width)
    q = quantize_grid(w.T, 8, EMBEDDING_BLOCK, helper.tensor_dtype_to_np_dtype(elem))  # codes (rows, blocks, 32)
    rows, width = w.shape
    codes = writer.tensor(packed_weight(name, 8), q.codes.reshape(rows, width), TensorProto.UINT8, [rows, width])
    scales = writer.tensor(block_scales(name), q.scales.astype(helper.tensor_dtype_to_np_dtype(elem)), elem,
                           [rows, width // EMBEDDING_BLOCK])
    made = QuantizedWeight(EMBEDDING_BLOCK, sqnr_db(w.T, q.dequantized),
                           _encoding(name, 8, EMBEDDING_BLOCK, q.scales, width))
    return (codes, scales), made


def _gather_blocks(node: onnx.NodeProto, key: str, codes: TensorProto, scales: TensorProto) -> onnx.NodeProto:
    """``Gather(table, ids)`` as ONNX Runtime's ``GatherBlockQuantized`` over the table's codes: the lookup exact to
    the codes; ``key``, the node's unique key, names it when the graph left it unnamed."""
    return helper.make_node("GatherBlockQuantized", [codes.name, node.input[1], scales.name], list(node.output),
                            name=node.name or key, domain=MS_DOMAIN, gather_axis=0, quantize_axis=1,
                            block_size=EMBEDDING_BLOCK, bits=8)


def module_weights(graph: onnx.GraphProto, modules: Sequence[str], skip: frozenset[str] = frozenset()
                   ) -> dict[str, list[str]]:
    """The linear weights (not in ``skip``) of each module name, matched as PEFT's ``target_modules`` list matches:
    the module path itself or its last dotted parts (``v_proj`` matches ``model.layers.0.self_attn.v_proj``). A
    packed op (the ort flavour's q/k/v or gate/up) matches when any module it packs does: it is one weight."""
    packed = packed_modules(graph)
    found: dict[str, list[str]] = {m: [] for m in modules}
    for c in find_candidates(graph):
        if c.weight in skip:
            continue
        names = (*c.aliases, *packed.get(c.y, ()))
        for m in modules:
            if any(n == m or n.endswith("." + m) for n in names):
                found[m].append(c.weight)
    return found


def _data_aware(hessians: Hessians | None, c: Candidate, bits: int) -> tuple:
    """quantize_grid's ``importance`` and ``rounding`` for weight ``c``: from its input's statistics, if collected."""
    if hessians is None or c.x not in hessians:
        return None, None
    top = 2 ** bits - 1
    return hessians.diagonal(c.x), lambda w, scale, zero: hessians.round(c.x, c.weight, w, scale, zero, 0, top,
                                                                        np.uint8)


def _encoding(name: str, bits: int, block_size: int, scales: np.ndarray, in_features: int,
              zeros: np.ndarray | None = None) -> Encoding:
    """PER_CHANNEL when one block spans the input dim, else PER_BLOCK: scales in (out, block) order, unsigned codes
    with ``offset = -zero`` (AIMET's convention: x = (q + offset) * scale; symmetric: ``-2^(bits-1)``)."""
    flat = tuple(float(x) for x in scales.reshape(-1))
    kind = "PER_CHANNEL" if scales.shape[1] == 1 and block_size >= in_features else "PER_BLOCK"
    offsets = (-(2 ** (bits - 1)),) * len(flat) if zeros is None else tuple(-int(z) for z in zeros.reshape(-1))
    return Encoding(name, "INT", kind, bits, zeros is None, flat, offsets, block_size if kind == "PER_BLOCK" else None)


def _bias(node: onnx.NodeProto, c: Candidate, inits: dict[str, TensorProto]) -> str | None:
    """Gemm's C as MatMulNBits' bias (None: no bias); a str says why the op stays float."""
    if node.op_type != "Gemm":
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return "Gemm with alpha or beta other than 1"
    if len(node.input) < 3 or not node.input[2]:
        return None
    bias = inits.get(node.input[2])
    if bias is None or list(bias.dims) not in ([c.out_features], [1, c.out_features]):
        return "Gemm bias is not a constant of shape (out,)"
    if list(bias.dims) != [c.out_features]:
        return "Gemm bias of shape (1, out)"
    return node.input[2]
