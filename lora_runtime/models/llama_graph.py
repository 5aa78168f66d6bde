"""The Llama builder's tiny graph writer: nodes, initializers (inline or streamed to external data), fresh names,
and the building blocks every layer repeats (linear layers, float or over kept blocks; RMSNorm; rotary; ...)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lora_runtime.errors import BaseModelError
from lora_runtime.external_data import DataWriter
from lora_runtime.models.blocks import MS_DOMAIN, Blocks, KeptWriter
from lora_runtime.progress import Stage

DATA_FILE = "base.onnx.data"
PACKED = "lora_runtime.packed "  # a Split's doc_string: the modules a packed linear op's outputs are (JSON follows)

# name, shape in graph layout (linear weights (in, out)) -> float32 values
Weights = Callable[[str, tuple[int, ...]], np.ndarray]
# name -> the weight as blocks the graph keeps (rows = output features), or None: ask Weights
KeptBlocks = Callable[[str], Blocks | None]


class GraphWriter:
    """Tiny builder: nodes, initializers (inline or streamed to external data) and fresh names."""

    def __init__(self, weights: Weights, data: BinaryIO | None = None, stage: Stage | None = None) -> None:
        self.weights = weights
        self.stage = stage
        self.data = DataWriter(data, DATA_FILE) if data is not None else None
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.made: set[str] = set()
        self.count = 0
        self.eps = 1e-5  # RMSNorm's epsilon (the fused norm's attribute)
        self.blocks: KeptBlocks | None = None
        self.kept: KeptWriter | None = None

    def fresh(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def const(self, name: str, value: np.ndarray) -> str:
        if self.data is None or value.nbytes < 1024:
            self.inits.append(numpy_helper.from_array(value, name))
        else:
            self.inits.append(self.data.array(name, value))
        return name

    def shared(self, name: str, value: np.ndarray) -> str:
        """A constant made once, however many layers use it."""
        if name not in self.made:
            self.made.add(self.const(name, value))
        return name

    def weight(self, name: str, shape: tuple[int, ...]) -> str:
        return self.const(name, self._float(name, shape))

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str | None = None, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name or outputs[0], **attrs))
        return outputs[0]

    def _kept(self, name: str, shape: tuple[int, int]) -> Blocks | None:
        """The blocks of a weight the graph keeps quantized ((rows, K) = ``shape``), or None."""
        b = self.blocks(name) if self.blocks is not None else None
        if b is not None and (b.rows, b.k) != shape:
            raise BaseModelError(f"weight {name!r}: blocks of {b.rows}x{b.k}, the graph needs {shape[0]}x{shape[1]}")
        return b

    def _step(self, name: str, size: int) -> None:
        if self.stage is not None:
            self.stage.step(name, work=size)

    def embedding(self, name: str, shape: tuple[int, int], out: str) -> str:
        b = self._kept(name, shape)
        made = self.kept.embedding(name, "input_ids", out, b) if b is not None and self.kept else None
        if made is None:
            return self.node("Gather", [self.weight(name, shape), "input_ids"], [out], axis=0)
        self.nodes += made[0]
        self.inits += made[1]
        self._step(name, shape[0] * shape[1])
        return out

    def linear(self, module: str, x: str, d_in: int, d_out: int, out: str | None = None, bias: bool = False) -> str:
        y = f"{module}.matmul" if bias else out or f"{module}.out"
        b = self._kept(f"{module}.weight", (d_out, d_in))
        made = self.kept.linear(f"{module}.weight", module, x, y, b) if b is not None and self.kept else None
        if made is not None:
            self.nodes += made[0]
            self.inits += made[1]
            self._step(f"{module}.weight", d_in * d_out)
        else:
            self.node("MatMul", [x, self.weight(f"{module}.weight", (d_in, d_out))], [y], name=f"{module}.MatMul")
        if not bias:
            return y
        return self.node("Add", [y, self.weight(f"{module}.bias", (d_out,))], [out or f"{module}.out"])

    def packed_linear(self, packed: str, modules: list[str], x: str, d_in: int, d_outs: list[int], bias: bool = False
                      ) -> list[str]:
        """Linear layers reading one input as one op over their weights side by side, split back into each
        module's ``<module>.out`` (fewer, wider products: ONNX Runtime GenAI's q/k/v and gate/up layout). The
        ``Split`` says which module each output is (``PACKED``, for LoRA to attach to a module's slice). Kept blocks
        pack when every module keeps blocks of one kind of op; otherwise each module is its own op."""
        kept = [self._kept(f"{m}.weight", (n, d_in)) for m, n in zip(modules, d_outs)]
        if any(b is not None for b in kept) and not _packable(kept, self.kept):
            return [self.linear(m, x, d_in, n, bias=bias) for m, n in zip(modules, d_outs)]
        y = f"{packed}.matmul" if bias else f"{packed}.out"
        if kept[0] is not None and self.kept is not None:
            cat = Blocks(kept[0].kind, kept[0].bits, np.concatenate([b.codes for b in kept]),
                         np.concatenate([b.scales for b in kept]),
                         None if all(b.offsets is None for b in kept) else np.concatenate(
                             [b.offsets if b.offsets is not None else np.zeros_like(b.scales) for b in kept]))
            made = self.kept.linear(f"{packed}.weight", packed, x, y, cat)
            assert made is not None  # _packable checked it
            self.nodes += made[0]
            self.inits += made[1]
            for m, n in zip(modules, d_outs):
                self._step(f"{m}.weight", d_in * n)
        else:
            w = np.concatenate([self._float(f"{m}.weight", (d_in, n)) for m, n in zip(modules, d_outs)], axis=1)
            self.node("MatMul", [x, self.const(f"{packed}.weight", w)], [y], name=f"{packed}.MatMul")
        if bias:
            b = np.concatenate([self._float(f"{m}.bias", (n,)) for m, n in zip(modules, d_outs)])
            y = self.node("Add", [y, self.const(f"{packed}.bias", b)], [f"{packed}.out"])
        outs = [f"{m}.out" for m in modules]
        sizes = self.shared(f"c.split.{'_'.join(map(str, d_outs))}", np.array(d_outs, np.int64))
        self.node("Split", [y, sizes], outs, name=f"{packed}.Split", axis=-1)
        self.nodes[-1].doc_string = PACKED + json.dumps({"x": x, "in": d_in, "modules": modules})
        return outs

    def _float(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        w = np.asarray(self.weights(name, shape), np.float32)
        if w.shape != shape:
            raise BaseModelError(f"weight {name!r}: got shape {w.shape}, the graph needs {shape}")
        self._step(name, w.size)
        return w

    def rms_norm(self, module: str, x: str, d: int) -> str:
        w = self.weight(f"{module}.weight", (d,))
        sq = self.node("Pow", [x, "c.two_f"], [self.fresh("sq")])  # Pow, not Mul: ORT fuses this pattern
        ms = self.node("ReduceMean", [sq], [self.fresh("ms")], axes=[-1], keepdims=1)
        rs = self.node("Sqrt", [self.node("Add", [ms, "c.eps"], [self.fresh("mse")])], [self.fresh("rms")])
        normed = self.node("Div", [x, rs], [self.fresh("normed")])
        return self.node("Mul", [normed, w], [f"{module}.out"])

    def add_norm(self, module: str, x: str | None, h: str, d: int, fused: bool) -> tuple[str, str]:
        """``h + x`` (the residual stream; ``x`` None: ``h`` alone) and its RMSNorm: (normed, the new ``h``).
        ``fused``: one ONNX Runtime SkipSimplifiedLayerNormalization; else Add, then the norm's plain ops."""
        if x is None:
            return self.rms_norm(module, h, d), h
        if not fused:
            h = self.node("Add", [h, x], [self.fresh("h")])
            return self.rms_norm(module, h, d), h
        w = self.weight(f"{module}.weight", (d,))
        out, total = f"{module}.out", self.fresh("h")
        self.node("SkipSimplifiedLayerNormalization", [x, h, w], [out, "", "", total], name=f"{module}.SkipNorm",
                  domain=MS_DOMAIN, epsilon=float(self.eps))
        return out, total

    def activation(self, x: str, kind: str) -> str:
        """silu; gelu_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); gelu: 0.5 x (1 + erf(x / sqrt(2)))."""
        if kind == "silu":
            return self.node("Mul", [x, self.node("Sigmoid", [x], [self.fresh("sig")])], [self.fresh("silu")])
        c = {name: self.shared(f"c.gelu.{name}", np.array(v, np.float32)) for name, v in (
            ("half", 0.5), ("one", 1.0), ("k", 0.044715), ("s", np.sqrt(2.0 / np.pi)), ("r2", 1.0 / np.sqrt(2.0)))}
        if kind == "gelu_tanh":
            cube = self.node("Mul", [self.node("Mul", [x, x], [self.fresh("x2")]), x], [self.fresh("x3")])
            inner = self.node("Add", [x, self.node("Mul", [cube, c["k"]], [self.fresh("kx3")])], [self.fresh("in")])
            t = self.node("Tanh", [self.node("Mul", [inner, c["s"]], [self.fresh("sin")])], [self.fresh("tanh")])
        elif kind == "gelu":
            t = self.node("Erf", [self.node("Mul", [x, c["r2"]], [self.fresh("xr2")])], [self.fresh("erf")])
        else:
            raise BaseModelError(f"activation {kind!r} is not supported (silu, gelu_tanh, gelu)")
        half = self.node("Mul", [x, c["half"]], [self.fresh("hx")])
        return self.node("Mul", [half, self.node("Add", [t, c["one"]], [self.fresh("t1")])], [self.fresh("gelu")])

    def softcap(self, x: str, cap: float, what: str, out: str | None = None) -> str:
        """cap * tanh(x / cap)."""
        c = self.shared(f"c.softcap.{what}", np.array(cap, np.float32))
        t = self.node("Tanh", [self.node("Div", [x, c], [self.fresh("capped")])], [self.fresh("tanh")])
        return self.node("Mul", [t, c], [out or self.fresh("softcap")])

    def group_query_attention(self, i: int, q: str, k: str, v: str, s, module: str) -> str:  # noqa: ANN001
        """ONNX Runtime's fused attention of layer ``i`` over (1, T, heads * hd) q/k/v: Qwen3's per-head q/k norms
        first, then rotary (``rope.cos_half`` / ``rope.sin_half``, rotate-half layout), the causal softmax over
        ``past_key.<i>`` and the new keys, grouped heads; writes ``present_key.<i>`` / ``present_value.<i>``."""
        hd = s.head_dim
        if s.qk_norm:
            q = self.per_head_norm(f"{module}.q_norm", q, s.n_heads, hd)
            k = self.per_head_norm(f"{module}.k_norm", k, s.n_kv_heads, hd)
        out = f"{module}.attn"
        self.node("GroupQueryAttention", [q, k, v, f"past_key.{i}", f"past_value.{i}", "seqlens_k",
                                          "total_sequence_length", "rope.cos_half", "rope.sin_half"],
                  [out, f"present_key.{i}", f"present_value.{i}"], name=f"{module}.GroupQueryAttention",
                  domain=MS_DOMAIN, num_heads=s.n_heads, kv_num_heads=s.n_kv_heads,
                  scale=float(s.attn_scale or 1.0 / np.sqrt(hd)), do_rotary=1, rotary_interleaved=0)
        return out

    def per_head_norm(self, module: str, x: str, heads: int, hd: int) -> str:
        """RMSNorm over each head of (1, T, heads * hd)."""
        split = self.shared(f"c.heads{heads}", np.array([0, 0, heads, hd], np.int64))
        merge = self.shared("c.merge_heads", np.array([0, 0, -1], np.int64))
        y = self.rms_norm(module, self.node("Reshape", [x, split], [self.fresh("per_head")]), hd)
        return self.node("Reshape", [y, merge], [self.fresh("merged")])

    def heads(self, x: str, shape: str) -> str:
        r = self.node("Reshape", [x, shape], [self.fresh("split")])  # (1, T, H, hd)
        return self.node("Transpose", [r], [self.fresh("heads")], perm=[0, 2, 1, 3])  # (1, H, T, hd)

    def rope(self, x: str) -> str:
        x1, x2 = self.fresh("x1"), self.fresh("x2")
        self.node("Split", [x, "c.half"], [x1, x2], axis=-1)
        rot = self.node("Concat", [self.node("Neg", [x2], [self.fresh("neg")]), x1], [self.fresh("rot")], axis=-1)
        a = self.node("Mul", [x, "cos"], [self.fresh("xcos")])
        b = self.node("Mul", [rot, "sin"], [self.fresh("xsin")])
        return self.node("Add", [a, b], [self.fresh("roped")])

    def repeat_kv(self, x: str) -> str:
        u = self.node("Unsqueeze", [x, self.const(self.fresh("c.ax2"), np.array([2], np.int64))], [self.fresh("u")])
        e = self.node("Expand", [u, "c.rep"], [self.fresh("rep")])  # (1, KV, rep, T, hd)
        return self.node("Reshape", [e, "c.merge"], [self.fresh("kv")])  # (1, H, T, hd)


def _packable(kept: list[Blocks | None], writer: KeptWriter | None) -> bool:
    """Whether these modules' kept blocks can be one op: all kept, one bit width and block size, and kept as
    blocks by ``writer`` (8-bit below accuracy level 4 is float)."""
    if writer is None or any(b is None for b in kept):
        return False
    first = kept[0]
    same = all(b.bits == first.bits and b.block_size == first.block_size and b.k == first.k for b in kept)
    return same and not (first.bits == 8 and writer.levels[8] < 4)
