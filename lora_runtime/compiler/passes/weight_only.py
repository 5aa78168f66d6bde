"""Weight-only quantization of the base model: int8 per-channel or int4 block-wise, LoRA branches float.

Every MatMul/Gemm with a constant 2-D weight (the attachment points and every other linear layer)
becomes ONNX Runtime's ``MatMulNBits``; the branch added at an attachment point is untouched::

    before:  x ──► MatMul(W float32, (in, out)) ──► y.base ──► Add(branch) ──► y
    after:   x ──► MatMulNBits(B uint8 (out, blocks, blob), scales (out * blocks)) ──► y.base ──► Add ──► y

Symmetric codes, dequantized as ``(code - 2^(bits-1)) * scale`` per block of ``block_size`` input
features (int8 default: one block per output channel). The quantized weights, and every other external
tensor of the base, are streamed one tensor at a time into the bundle's own data file: a quantized
bundle does not need the float32 weights at all, and never holds them all in memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from lora_runtime.compiler.passes import PassResult
from lora_runtime.compiler.passes.emit import matmul_nbits, own_base_tensors, use_ms_domain
from lora_runtime.compiler.points import Candidate, find_candidates
from lora_runtime.external_data import DataWriter, read_tensor
from lora_runtime.graph import GraphEdit
from lora_runtime.quant.encodings import Encoding

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightOnlyPassOptions:
    base_dir: Path  # where the base model's external data is
    out: Path  # the bundle being written
    data_name: str  # its own data file, relative to ``out``
    bits: int
    block_size: int | None = None  # None: default_block_size(bits, in_features)
    accuracy_level: int = 4  # MatMulNBits' int8 compute
    keep_float: frozenset[str] = frozenset()  # weights never quantized: the LoRA slots


@dataclass(frozen=True)
class QuantizedWeight:
    """What replaced one weight: for the manifest and the encodings file."""

    block_size: int
    sqnr_db: float  # of the dequantized weight against the float32 weight
    encoding: Encoding  # the same numbers in the AIMET/QAIRT encodings format


@dataclass(frozen=True)
class WeightOnlyResult(PassResult):
    weights: tuple[QuantizedWeight, ...]


def quantize_block(w: np.ndarray, bits: int, block_size: int, scale_dtype: type = np.float32
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W (K, N) float -> (unsigned codes uint8 (N, blocks, block_size), scales (N, blocks), dequantized (K, N)).
    ``scale_dtype`` float16: the scales are the float16 values the graph will hold, the codes chosen for those."""
    k, n = w.shape
    blocks = -(-k // block_size)
    wt = np.zeros((n, blocks * block_size), np.float32)
    wt[:, :k] = w.T
    grouped = wt.reshape(n, blocks, block_size)
    qmax = 2 ** (bits - 1) - 1
    scales = (np.abs(grouped).max(axis=-1) / qmax).astype(scale_dtype).astype(np.float32)
    scales[scales == 0] = 1.0
    codes = (np.clip(np.rint(grouped / scales[..., None]), -qmax - 1, qmax) + 2 ** (bits - 1)).astype(np.uint8)
    deq = ((codes.astype(np.float32) - 2 ** (bits - 1)) * scales[..., None]).reshape(n, -1)[:, :k].T
    return codes, scales.astype(np.float32), deq


def default_block_size(bits: int, in_features: int) -> int:
    """int4: 32 (what MatMulNBits and QAIRT's LPBQ use); int8: the whole input dim (per-channel)."""
    if bits == 4:
        return 32
    return max(16, 1 << (in_features - 1).bit_length())


def quantize_weights(model: onnx.ModelProto, options: WeightOnlyPassOptions) -> WeightOnlyResult:
    """Rewrite ``model`` in place: linear layers to MatMulNBits, all external base data into the bundle's file."""
    o = options
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    by_node = {c.node: c for c in find_candidates(graph) if c.weight not in o.keep_float}
    done: list[QuantizedWeight] = []
    edit = GraphEdit(graph)
    with open(o.out / o.data_name, "wb") as f:
        writer = DataWriter(f, o.data_name)
        for i, key, node in edit.keyed():
            c = by_node.get(key)
            if c is None:
                continue
            bias = _bias(node, c, {t: inits[t] for t in node.input[2:] if t in inits})
            if isinstance(bias, str):
                log.info("not quantized: %s %s: %s", node.op_type, c.node, bias)
                continue
            w = read_tensor(inits[c.weight], o.base_dir).astype(np.float32)
            w = w.T if c.transposed else w  # (in, out)
            bs = o.block_size or default_block_size(o.bits, c.in_features)
            codes, scales, deq = quantize_block(w, o.bits, bs, helper.tensor_dtype_to_np_dtype(c.elem_type))
            err = float(np.sum((w.astype(np.float64) - deq) ** 2))
            sqnr = float("inf") if err == 0 else 10 * np.log10(float(np.sum(w.astype(np.float64) ** 2)) / err)
            q_node, q_inits = matmul_nbits(writer, c.weight, c.x, list(node.output), node.name or c.node, codes,
                                           scales, c.in_features, o.bits, o.accuracy_level, bias, c.elem_type)
            edit.replace(i, [q_node])
            edit.add_initializers(q_inits)
            done.append(QuantizedWeight(bs, sqnr, _encoding(c.weight, o.bits, bs, scales, c.in_features)))
        edit.apply()
        own_base_tensors(graph, writer, o.base_dir)
    use_ms_domain(model)
    return WeightOnlyResult(model, tuple(done))


def _encoding(name: str, bits: int, block_size: int, scales: np.ndarray, in_features: int) -> Encoding:
    """PER_CHANNEL when one block spans the input dim, else PER_BLOCK: scales in (out, block) order, symmetric
    codes (``offset = -2^(bits-1)``, AIMET's convention: x = (q + offset) * scale)."""
    flat = tuple(float(x) for x in scales.reshape(-1))
    kind = "PER_CHANNEL" if scales.shape[1] == 1 and block_size >= in_features else "PER_BLOCK"
    return Encoding(name, "INT", kind, bits, True, flat, (-(2 ** (bits - 1)),) * len(flat),
                    block_size if kind == "PER_BLOCK" else None)


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
