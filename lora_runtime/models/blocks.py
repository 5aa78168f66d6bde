"""Quantized blocks kept as the file holds them: GGUF's Q4_0, Q4_1, Q8_0 and Q4_K as ONNX Runtime's block ops.

A GGUF row of ``K`` values is ``K / 32`` blocks; each block stores its own scale ``d`` (float16), for Q4_1 a
minimum ``m`` too, and one code per value. In MatMulNBits' terms (codes unsigned, zero point ``2^(bits-1)``,
the op's default)::

    Q4_0   w = d * (q - 8)                    q = 4-bit code           MatMulNBits(bits=4)
    Q8_0   w = d * c                          c = int8, code = c + 128 MatMulNBits(bits=8)
    Q4_1   w = d * q + m = d * (q - 8) + o    o = 8 d + m              MatMulNBits(bits=4) + BlockSum(x) @ o

Q4_1's per-block constant ``o`` is exact as a correction: ``sum_k x_k w_kn = sum_b (d_bn sum_j x_j (q_j - 8)) +
sum_b o_bn sum_{j in b} x_j``, the second term a (T, blocks) x (blocks, N) MatMul on the block sums of ``x``.
ONNX Runtime's MatMulNBits would take ``m`` as a float zero point, but runs ~10x slower with one (ORT 1.32's
CPU kernel). Nothing is rounded again: the graph computes the file's own weights, up to float accumulation.

GGUF packs a 4-bit block's 32 codes as 16 bytes, value ``j`` in the low nibble of byte ``j`` and value
``j + 16`` in its high nibble; MatMulNBits wants values ``2i`` and ``2i + 1`` in byte ``i`` (low first).
Q4_K's super-blocks of 256 are 8 blocks of 32 with 6-bit scales and minimums: Q4_1's form once those are
multiplied out. Other types (F16, Q5_*, Q6_K and the other K-quants) are not kept here: the importer dequantizes
them to float32 (at accuracy level 0 an 8-bit MatMulNBits has no fast kernel anyway; see ``KeptWriter``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from lora_runtime.external_data import DataWriter
from lora_runtime.names import block_offsets, block_scales, block_zero_points, packed_weight

MS_DOMAIN = "com.microsoft"
BLOCK = 32
KEPT = ("Q4_0", "Q4_1", "Q8_0", "Q4_K")  # GGML types kept as blocks
_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "Q4_K": 144}
_PER = {"Q4_K": 256}  # values per GGML block (32 for the others)


@dataclass(frozen=True)
class Blocks:
    """A (rows, K) weight as blocks along K: ``w[n, b*bs + j] = scales[n, b] * (codes[n, b, j] - 2^(bits-1))
    (+ offsets[n, b])``. Rows are output features (GGUF and Hugging Face keep linear weights (out, in))."""

    kind: str  # the GGML type it came from
    bits: int
    codes: np.ndarray  # (rows, blocks, block_size) uint8, unsigned
    scales: np.ndarray  # (rows, blocks) float32
    offsets: np.ndarray | None = None  # (rows, blocks) float32: Q4_1's 8 d + m
    source: str = ""  # the file's tensor: two weights of one source (a tied lm_head) share one copy

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def k(self) -> int:
        return self.codes.shape[1] * self.codes.shape[2]

    @property
    def block_size(self) -> int:
        return self.codes.shape[2]

    def take_rows(self, order: np.ndarray) -> Blocks:
        """The same blocks with rows reordered (llama.cpp's q/k permutation undone)."""
        return Blocks(self.kind, self.bits, self.codes[order], self.scales[order],
                      None if self.offsets is None else self.offsets[order], self.source)

    def dequantize(self) -> np.ndarray:
        """(rows, K) float32: what the graph computes with (for checks; the graph never holds it)."""
        w = (self.codes.astype(np.float32) - 2 ** (self.bits - 1)) * self.scales[..., None]
        if self.offsets is not None:
            w += self.offsets[..., None]
        return w.reshape(self.rows, self.k)


def from_ggml(raw: np.ndarray, kind: str, rows: int, k: int, source: str = "") -> Blocks | None:
    """The blocks of a GGUF tensor's raw bytes (``rows`` rows of ``k`` values), or None for a type not kept."""
    if kind not in KEPT:
        return None
    size, per = _BYTES[kind], _PER.get(kind, BLOCK)
    if k % per:
        raise ValueError(f"{kind}: {k} values per row is not a whole number of {per}-value blocks")
    blk = np.ascontiguousarray(raw, np.uint8).reshape(rows, k // per, size)
    if kind == "Q4_K":
        return _q4_k(blk, rows, k, source)
    d = blk[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":
        codes = (blk[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return Blocks(kind, 8, codes, d, source=source)
    qs = blk[..., 4:] if kind == "Q4_1" else blk[..., 2:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # values 0..15, then 16..31
    if kind == "Q4_0":
        return Blocks(kind, 4, codes, d, source=source)
    m = blk[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    return Blocks(kind, 4, codes, d, 8 * d + m, source)


def _q4_k(blk: np.ndarray, rows: int, k: int, source: str) -> Blocks:
    """Q4_K (llama.cpp's ``block_q4_K``, 144 bytes per 256 values): float16 ``d`` and ``dmin``, 12 bytes of 6-bit
    scales ``sc`` and minimums ``mn`` for 8 sub-blocks of 32, 128 bytes of codes (each 32-byte run: a sub-block in
    the low nibbles, the next in the high ones). ``w = d sc q - dmin mn``: per 32, scale ``d sc`` and offset
    ``8 d sc - dmin mn`` (as Q4_1)."""
    d = blk[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (rows, supers)
    dmin = blk[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    sb = blk[..., 4:16].astype(np.uint8)  # bytes 0-3: sc low 6 bits (sub 0-3), 4-7: mn (0-3), 8-11: sub 4-7
    sc = np.concatenate([sb[..., 0:4] & 63, (sb[..., 8:12] & 0xF) | ((sb[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([sb[..., 4:8] & 63, (sb[..., 8:12] >> 4) | ((sb[..., 4:8] >> 6) << 4)], axis=-1)
    qs = blk[..., 16:].reshape(*blk.shape[:2], 4, 32)  # 4 runs of 32 bytes: sub-blocks (2r, 2r + 1)
    codes = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(rows, k // BLOCK, BLOCK)  # (rows, subs, 32)
    scale = (d[..., None] * sc.astype(np.float32)).reshape(rows, -1)
    low = (dmin[..., None] * mn.astype(np.float32)).reshape(rows, -1)
    return Blocks("Q4_K", 4, codes.astype(np.uint8), scale, 8 * scale - low, source)


def packed(b: Blocks) -> np.ndarray:
    """MatMulNBits' B: (rows, blocks, block_size * bits / 8) uint8, 4-bit codes two per byte, low nibble first."""
    if b.bits == 8:
        return np.ascontiguousarray(b.codes)
    return (b.codes[..., 0::2] | (b.codes[..., 1::2] << 4)).astype(np.uint8)


def matmul_nbits(writer: DataWriter, weight: str, x: str, outputs: list[str], name: str, codes: np.ndarray,
                 scales: np.ndarray, k: int, bits: int, accuracy_level: int, bias: str | None = None,
                 scale_type: int = TensorProto.FLOAT, zero_points: np.ndarray | None = None
                 ) -> tuple[onnx.NodeProto, list[TensorProto]]:
    """ONNX Runtime's ``MatMulNBits`` over unsigned ``codes`` (N, blocks, block_size) uint8, dequantized as
    ``(code - zero) * scale`` with ``scales`` (N, blocks) and ``zero`` = ``2^(bits-1)`` (the op's default) or
    ``zero_points`` (N, blocks) uint8; 4-bit codes and zero points are packed two per byte, low nibble first.
    ``scale_type`` is the type of ``x`` (float32, or float16 for a float16 layer). Returns the node and its
    initializers (written to ``writer``): ``<weight>.q<bits>``, ``<weight>.scales`` (and ``<weight>.zero_points``)."""
    n, _, block_size = codes.shape
    data = packed(Blocks("", bits, codes, scales))
    b_name, s_name = packed_weight(weight, bits), block_scales(weight)
    scales = scales.reshape(-1).astype(helper.tensor_dtype_to_np_dtype(scale_type))
    inits = [writer.tensor(b_name, data, TensorProto.UINT8, list(data.shape)),
             writer.tensor(s_name, scales, scale_type, [scales.size])]
    inputs = [x, b_name, s_name]
    if zero_points is not None:
        zp = packed_zero_points(zero_points, bits).reshape(-1)
        inits.append(writer.tensor(block_zero_points(weight), zp, TensorProto.UINT8, [zp.size]))
        inputs.append(inits[-1].name)
    if bias:
        inputs += [""] * (5 - len(inputs)) + [bias]
    node = helper.make_node("MatMulNBits", inputs, outputs, name=name, domain=MS_DOMAIN, K=k, N=n, bits=bits,
                            block_size=block_size, accuracy_level=accuracy_level)
    return node, inits


def packed_zero_points(zero: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' zero points: (N, blocks) uint8 codes -> (N, ceil(blocks * bits / 8)) bytes; 4-bit ones two per
    byte (block ``2i`` in the low nibble of byte ``i``), an odd last block's high nibble 0."""
    zero = np.asarray(zero, np.uint8)
    if bits == 8:
        return np.ascontiguousarray(zero)
    if zero.shape[1] % 2:
        zero = np.concatenate([zero, np.zeros((zero.shape[0], 1), np.uint8)], axis=1)
    return (zero[:, 0::2] | (zero[:, 1::2] << 4)).astype(np.uint8)


class KeptWriter:
    """Emits linear layers and embedding lookups over kept blocks into one data file (``writer``).

    A source's bytes are written once: a tied lm_head's MatMulNBits reads the embedding's codes, and the lookup
    (``GatherBlockQuantized``, 8-bit only) reads the same bytes through a second initializer shaped (rows, K)
    at the same place in the file. Q4_1's block sums of an input are made once for every layer reading it
    (q/k/v, gate/up)."""

    def __init__(self, writer: DataWriter, accuracy_level: int | dict[int, int] = 0) -> None:
        self.writer = writer
        self.levels = accuracy_level if isinstance(accuracy_level, dict) else {4: accuracy_level, 8: accuracy_level}
        self.written: dict[str, tuple[TensorProto, TensorProto]] = {}  # source -> (codes, scales) initializers
        self.sums: dict[tuple[str, int], str] = {}  # (input, block size) -> its block sums
        self.emitted: set[str] = set()

    def _codes(self, weight: str, b: Blocks) -> tuple[TensorProto, TensorProto]:
        """The codes (MatMulNBits' B) and scales of ``b``'s source, written to the data file once."""
        key = b.source or weight
        if key not in self.written:
            data, scales = packed(b), b.scales.reshape(-1).astype(np.float32)
            t = self.writer.tensor(packed_weight(weight, b.bits), data, TensorProto.UINT8, list(data.shape))
            st = self.writer.tensor(block_scales(weight), scales, TensorProto.FLOAT, [scales.size])
            self.written[key] = (t, st)
        return self.written[key]

    def _used(self, tensors: tuple[TensorProto, ...]) -> list[TensorProto]:
        """The initializers among ``tensors`` not in the graph yet (each goes in once, when a node reads it)."""
        new = [t for t in tensors if t.name not in self.emitted]
        self.emitted |= {t.name for t in new}
        return new

    def linear(self, weight: str, module: str, x: str, out: str, b: Blocks
               ) -> tuple[list[onnx.NodeProto], list[TensorProto]] | None:
        """``out = x @ w.T`` for ``w`` (N, K) held as ``b``: one MatMulNBits (+ Q4_1's correction). None for
        8-bit blocks below accuracy level 4: ONNX Runtime 1.32's CPU kernel for those has no fast path (SmolLM2's
        576x49152 head: 156 ms per token, vs 2.1 ms at level 4), and a Q8_0 weight is exact in float32."""
        if b.bits == 8 and self.levels[8] < 4:
            return None
        made = self._codes(weight, b)
        inits = self._used(made)
        codes, scales = (t.name for t in made)
        y = out if b.offsets is None else f"{module}.blocks_out"
        nodes = [helper.make_node("MatMulNBits", [x, codes, scales], [y], name=f"{module}.MatMulNBits",
                                  domain=MS_DOMAIN, K=b.k, N=b.rows, bits=b.bits, block_size=b.block_size,
                                  accuracy_level=self.levels[b.bits])]
        if b.offsets is not None:
            sums = self.sums.get((x, b.block_size))
            if sums is None:
                sums = self.sums[(x, b.block_size)] = f"{x}.block_sums"
                shape = f"{sums}.shape"
                inits.append(helper.make_tensor(shape, TensorProto.INT64, [4], [0, 0, -1, b.block_size]))
                nodes += [helper.make_node("Reshape", [x, shape], [f"{sums}.blocks"], name=f"{sums}.Reshape"),
                          helper.make_node("ReduceSum", [f"{sums}.blocks", f"{shape}.axes"], [sums],
                                           name=f"{sums}.ReduceSum", keepdims=0)]
                inits.append(helper.make_tensor(f"{shape}.axes", TensorProto.INT64, [1], [-1]))
            offsets = np.ascontiguousarray(b.offsets.T, np.float32)  # (blocks, N)
            inits.append(self.writer.array(block_offsets(weight), offsets))
            nodes += [helper.make_node("MatMul", [sums, block_offsets(weight)], [f"{module}.block_offset"],
                                       name=f"{module}.BlockOffset"),
                      helper.make_node("Add", [y, f"{module}.block_offset"], [out], name=f"{module}.AddOffset")]
        return nodes, inits

    def embedding(self, weight: str, ids: str, out: str, b: Blocks
                  ) -> tuple[list[onnx.NodeProto], list[TensorProto]] | None:
        """``out = w[ids]`` straight from 8-bit blocks; None for blocks GatherBlockQuantized cannot read."""
        if b.bits != 8 or b.offsets is not None:
            return None
        codes, scales = (_view(t, dims) for t, dims in zip(self._codes(weight, b),
                                                           ([b.rows, b.k], [b.rows, b.k // b.block_size])))
        node = helper.make_node("GatherBlockQuantized", [codes.name, ids, scales.name], [out], name=f"{weight}.Gather",
                                domain=MS_DOMAIN, gather_axis=0, quantize_axis=1, block_size=b.block_size, bits=8)
        return [node], self._used((codes, scales))


def _view(t: TensorProto, dims: list[int]) -> TensorProto:
    """Another initializer over the same bytes of the data file, shaped ``dims``."""
    view = TensorProto(name=f"{t.name}.{'x'.join(map(str, dims))}", data_type=t.data_type, dims=dims,
                       data_location=TensorProto.EXTERNAL)
    view.external_data.extend(t.external_data)
    return view
