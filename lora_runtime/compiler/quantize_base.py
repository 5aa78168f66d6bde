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
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lora_runtime.compiler.points import Candidate, find_candidates, node_keys
from lora_runtime.errors import BaseModelError
from lora_runtime.quant.encodings import Encoding

log = logging.getLogger(__name__)

BASE_WEIGHTS = ("float32", "int8", "int4")
DATA_ALIGN = 65536


@dataclass(frozen=True)
class QuantizedWeight:
    """What replaced one weight: for the manifest, the inspect report and the encodings file."""

    weight: str
    node: str
    bits: int
    block_size: int
    in_features: int
    out_features: int
    scales: str  # initializer holding (out * blocks) float32 scales
    sqnr_db: float  # of the dequantized weight against the float32 weight
    encoding: Encoding  # the same numbers in the AIMET/QAIRT encodings format



def quantize_block(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W (K, N) float -> (unsigned codes uint8 (N, blocks, block_size), scales (N, blocks), dequantized (K, N))."""
    k, n = w.shape
    blocks = -(-k // block_size)
    wt = np.zeros((n, blocks * block_size), np.float32)
    wt[:, :k] = w.T
    grouped = wt.reshape(n, blocks, block_size)
    qmax = 2 ** (bits - 1) - 1
    scales = np.abs(grouped).max(axis=-1) / qmax
    scales[scales == 0] = 1.0
    codes = (np.clip(np.rint(grouped / scales[..., None]), -qmax - 1, qmax) + 2 ** (bits - 1)).astype(np.uint8)
    deq = ((codes.astype(np.float32) - 2 ** (bits - 1)) * scales[..., None]).reshape(n, -1)[:, :k].T
    return codes, scales.astype(np.float32), deq


def matmul_nbits(writer: DataWriter, weight: str, x: str, outputs: list[str], name: str, codes: np.ndarray,
                 scales: np.ndarray, k: int, bits: int, accuracy_level: int, bias: str | None = None
                 ) -> tuple[onnx.NodeProto, list[TensorProto]]:
    """ONNX Runtime's ``MatMulNBits`` over unsigned ``codes`` (N, blocks, block_size) uint8, dequantized as
    ``(code - 2^(bits-1)) * scale`` with ``scales`` (N, blocks); 4-bit codes are packed two per byte, low
    nibble first. Returns the node and its two initializers (written to ``writer``)."""
    n, _, block_size = codes.shape
    packed = codes if bits == 8 else (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    b_name, s_name = f"{weight}.q{bits}", f"{weight}.scales"
    inits = [writer.tensor(b_name, packed, TensorProto.UINT8, list(packed.shape)),
             writer.tensor(s_name, scales.reshape(-1), TensorProto.FLOAT, [scales.size])]
    node = helper.make_node("MatMulNBits", [x, b_name, s_name] + (["", "", bias] if bias else []), outputs,
                            name=name, domain="com.microsoft", K=k, N=n, bits=bits, block_size=block_size,
                            accuracy_level=accuracy_level)
    return node, inits


def default_block_size(bits: int, in_features: int) -> int:
    """int4: 32 (what MatMulNBits and QAIRT's LPBQ use); int8: the whole input dim (per-channel)."""
    if bits == 4:
        return 32
    return max(16, 1 << (in_features - 1).bit_length())


class DataWriter:
    def __init__(self, f: BinaryIO, location: str) -> None:
        self.f, self.location = f, location

    def tensor(self, name: str, value: np.ndarray | bytes, data_type: int, dims: list[int]) -> TensorProto:
        raw = value if isinstance(value, bytes) else np.ascontiguousarray(value).tobytes()
        offset = self.f.tell()
        offset += -offset % (DATA_ALIGN if len(raw) >= DATA_ALIGN else 64)  # big tensors page-aligned: mapped
        self.f.seek(offset)
        self.f.write(raw)
        t = TensorProto(name=name, data_type=data_type, dims=dims, data_location=TensorProto.EXTERNAL)
        for key, v in (("location", self.location), ("offset", str(offset)), ("length", str(len(raw)))):
            t.external_data.add(key=key, value=v)
        return t


def read_tensor(t: TensorProto, base_dir: Path) -> np.ndarray:
    """One initializer's values, reading external data by offset (never the whole file)."""
    if t.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    count = int(np.prod(t.dims, dtype=np.int64))
    path = base_dir / info.get("location", "")
    if not path.resolve().is_relative_to(base_dir.resolve()) or not path.is_file():
        raise BaseModelError(f"{base_dir}: external data {info.get('location')!r} of {t.name!r} is missing or "
                             "outside the model's folder")
    with open(path, "rb") as f:
        f.seek(int(info.get("offset", 0)))
        raw = f.read(count * dtype.itemsize)
    if len(raw) != count * dtype.itemsize:
        raise BaseModelError(f"{base_dir / info['location']}: external data of {t.name!r} is truncated")
    return np.frombuffer(raw, dtype).reshape(tuple(t.dims))


def quantize_base(model: onnx.ModelProto, base_dir: Path, out: Path, data_name: str, bits: int,
                  block_size: int | None = None, accuracy_level: int = 4,
                  keep_float: frozenset[str] = frozenset()) -> list[QuantizedWeight]:
    """Rewrite ``model`` in place: linear layers to MatMulNBits, all external base data into ``out/data_name``.

    ``keep_float``: weights never quantized (the LoRA slots, whose branch MatMuls look like candidates).
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    by_node = {c.node: c for c in find_candidates(graph) if c.weight not in keep_float}
    done: list[QuantizedWeight] = []
    nodes: list[onnx.NodeProto] = []
    new_inits: list[TensorProto] = []
    with open(out / data_name, "wb") as f:
        writer = DataWriter(f, data_name)
        for node, key in zip(graph.node, node_keys(graph)):
            c = by_node.get(key)
            bias = _bias(node, c, inits) if c is not None else "not a candidate"
            if c is None or isinstance(bias, str):
                if c is not None:
                    log.info("not quantized: %s %s: %s", node.op_type, c.node, bias)
                nodes.append(node)
                continue
            w = read_tensor(inits[c.weight], base_dir).astype(np.float32)
            w = w.T if c.transposed else w  # (in, out)
            bs = block_size or default_block_size(bits, c.in_features)
            codes, scales, deq = quantize_block(w, bits, bs)
            err = float(np.sum((w.astype(np.float64) - deq) ** 2))
            sqnr = float("inf") if err == 0 else 10 * np.log10(float(np.sum(w.astype(np.float64) ** 2)) / err)
            q_node, q_inits = matmul_nbits(writer, c.weight, c.x, list(node.output), node.name or c.node, codes,
                                           scales, c.in_features, bits, accuracy_level, bias)
            nodes.append(q_node)
            new_inits += q_inits
            s_name = q_inits[1].name
            done.append(QuantizedWeight(c.weight, c.node, bits, bs, c.in_features, c.out_features, s_name, sqnr,
                                        _encoding(c.weight, bits, bs, scales, c.in_features)))
        nodes, kept = own_what_is_left(graph, nodes, writer, base_dir)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return done


def _encoding(name: str, bits: int, block_size: int, scales: np.ndarray, in_features: int) -> Encoding:
    """PER_CHANNEL when one block spans the input dim, else PER_BLOCK: scales in (out, block) order, symmetric
    codes (``offset = -2^(bits-1)``, AIMET's convention: x = (q + offset) * scale)."""
    flat = tuple(float(x) for x in scales.reshape(-1))
    kind = "PER_CHANNEL" if scales.shape[1] == 1 and block_size >= in_features else "PER_BLOCK"
    return Encoding(name, "INT", kind, bits, True, flat, (-(2 ** (bits - 1)),) * len(flat),
                    block_size if kind == "PER_BLOCK" else None)


def own_what_is_left(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], writer: DataWriter,
                     base_dir: Path) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """After weights were replaced: drop the Transposes that only fed them and the float weights themselves,
    and copy every other external base tensor into the bundle's own data file (one tensor at a time)."""
    inits = {t.name for t in graph.initializer}
    used = consumed(nodes)
    nodes = [n for n in nodes if not (n.op_type == "Transpose" and n.input[0] in inits
                                      and not any(o in used for o in n.output))]
    used = consumed(nodes) | {i.name for i in graph.input}
    kept: list[TensorProto] = []
    for t in graph.initializer:
        if t.name not in used:
            continue
        if t.data_location == TensorProto.EXTERNAL and not in_bundle(t):
            kept.append(writer.tensor(t.name, read_tensor(t, base_dir).tobytes(), t.data_type, list(t.dims)))
        else:
            kept.append(t)
    return nodes, kept


def consumed(nodes: list[onnx.NodeProto]) -> set[str]:
    return {i for n in nodes for i in n.input if i}


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


def in_bundle(t: TensorProto) -> bool:
    """LoRA parameters already live in the bundle's patch files."""
    info = {e.key: e.value for e in t.external_data}
    return info.get("location", "").startswith("patches/")
