"""A Llama-family decoder as an ONNX graph, from any source of weights.

One builder serves the embedded default model (seeded weights) and real checkpoints (GGUF, Hugging Face
safetensors). Per layer, pre-norm, as Hugging Face's ``LlamaForCausalLM`` computes it::

    h = Gather(embed_tokens, input_ids)                                          # (1, T, d)
    h = h + o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))       n = RMSNorm(h)
                                                   (q/k/v with biases: Qwen2)
    h = h + down_proj(silu(gate_proj(n)) * up_proj(n))                           n = RMSNorm(h)
    logits = lm_head(RMSNorm(h))                                                 # (1, T, vocab)

Attention is causal with grouped-query heads and rotary positions (``rotate_half``, base ``rope_theta``).
Linear weights are named after their PEFT module path (``model.layers.0.self_attn.q_proj.weight``) and
stored (in, out) for MatMul, so PEFT adapters attach unchanged. With ``kv_cache=True`` the graph takes
``past_key.<i>`` / ``past_value.<i>`` (1, kv_heads, past, head_dim) and returns ``present_key.<i>`` /
``present_value.<i>`` (1, kv_heads, past + T, head_dim): positions and the causal mask start at ``past``,
so one graph does both prefill (past = 0) and decode (T = 1).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper

from lora_runtime.errors import BaseModelError, InputError
from lora_runtime.models.blocks import MS_DOMAIN, KeptWriter
from lora_runtime.models.llama_graph import DATA_FILE, GraphWriter, KeptBlocks, Weights
from lora_runtime.models.packing import pack_qkv
from lora_runtime.names import CACHE_SLOTS, KV_PAIRS
from lora_runtime.progress import Stage

MASK = -50.0  # an empty cache slot's past_bias: far below real scores, and within a quantized encoding's reach

__all__ = ["DATA_FILE", "FLAVOUR", "FLAVOURS", "MASK", "SEQLENS_K", "TOTAL_LENGTH", "KeptBlocks", "LlamaShape",
           "Weights", "build_llama", "linear_shapes", "ort_flavour_refusal", "tensor_names"]
FLAVOURS = ("standard", "ort")  # plain ONNX ops / ONNX Runtime's fused attention (GroupQueryAttention)
SEQLENS_K, TOTAL_LENGTH = "seqlens_k", "total_sequence_length"  # the ort flavour's length inputs
FLAVOUR = "lora_runtime.graph"  # metadata_props: the flavour a model was built in


@dataclass(frozen=True)
class LlamaShape:
    """Sizes and constants of a Llama-family decoder."""

    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_seq: int = 128  # the rotary table's length: the longest past + input
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    opset: int = 17
    qkv_bias: bool = False  # q/k/v projections with biases (Qwen2)
    head_size: int | None = None  # head_dim when it is not d_model / n_heads (Qwen3, Gemma)
    qk_norm: bool = False  # RMSNorm of each head's queries and keys before the rotary (Qwen3)
    act: str = "silu"  # the gated MLP's activation: silu, gelu_tanh (Gemma's gelu_pytorch_tanh) or gelu (erf)
    embed_scale: float | None = None  # the embeddings multiplied by this (Gemma: sqrt(d_model))
    fused: bool = False  # q/k/v as one qkv_proj and gate/up as one gate_up_proj (Phi-3), split after
    sandwich: bool = False  # Gemma 2: the attention and MLP outputs normed too, the MLP input by its own norm
    attn_scale: float | None = None  # the scores' scale when not 1/sqrt(head_dim) (Gemma 2's query_pre_attn_scalar)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the mask (Gemma 2)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.n_heads

    def check(self) -> None:
        if min(self.d_model, self.n_heads, self.n_kv_heads, self.n_layers, self.vocab, self.d_ff) < 1 or \
                (self.head_size is None and self.d_model % self.n_heads) or self.n_heads % self.n_kv_heads or \
                self.head_dim % 2:
            raise BaseModelError(f"d_model {self.d_model}, n_heads {self.n_heads} and n_kv_heads {self.n_kv_heads} "
                                 "must be positive and divide evenly (and every other size positive)")
        if self.max_seq < 1:
            raise InputError(f"max_seq {self.max_seq}: the model needs at least one position")


def linear_shapes(s: LlamaShape) -> dict[str, tuple[int, int]]:
    """(in, out) of every linear module, by PEFT module path."""
    d, q, kv = s.d_model, s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    shapes = {}
    for i in range(s.n_layers):
        p = f"model.layers.{i}"
        if s.fused:
            shapes.update({f"{p}.self_attn.qkv_proj": (d, q + 2 * kv), f"{p}.mlp.gate_up_proj": (d, 2 * s.d_ff)})
        else:
            shapes.update({f"{p}.self_attn.q_proj": (d, q), f"{p}.self_attn.k_proj": (d, kv),
                           f"{p}.self_attn.v_proj": (d, kv), f"{p}.mlp.gate_proj": (d, s.d_ff),
                           f"{p}.mlp.up_proj": (d, s.d_ff)})
        shapes.update({f"{p}.self_attn.o_proj": (q, d), f"{p}.mlp.down_proj": (s.d_ff, d)})
    shapes["lm_head"] = (d, s.vocab)
    return shapes


def tensor_names(s: LlamaShape) -> set[str]:
    """Every weight the builder asks for, by its Hugging Face name (``lm_head.weight`` included)."""
    names = {f"{m}.weight" for m in linear_shapes(s)} | {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(s.n_layers):
        names |= {f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"}
        if s.qkv_bias:
            names |= {f"model.layers.{i}.self_attn.{x}_proj.bias" for x in "qkv"}
        if s.qk_norm:
            names |= {f"model.layers.{i}.self_attn.{x}_norm.weight" for x in "qk"}
        if s.sandwich:
            names |= {f"model.layers.{i}.{x}_feedforward_layernorm.weight" for x in ("pre", "post")}
    return names


def build_llama(s: LlamaShape, weights: Weights, *, data: BinaryIO | None = None, kv_cache: bool = False,
                static_cache: int | None = None, name: str = "llama", report: Callable[[str], None] | None = None,
                blocks: KeptBlocks | None = None, accuracy_level: int = 0, flavour: str = "standard",
                pack: bool = True) -> onnx.ModelProto:
    """The decoder graph; weights are asked for one at a time, in graph order.

    With ``data`` (a file opened for writing, named ``base.onnx.data`` next to the model), every
    initializer of 1 KiB or more is written there as soon as it is produced and referenced as external
    data, so a model of billions of parameters never exists whole in memory.

    ``static_cache=C``: the fixed-size KV cache accelerators deploy (QAIRT's Genie shape), static in everything
    but ``sequence``: the caller keeps C cache slots per layer and feeds them whole with ``past_bias``
    (1, 1, 1, C) (0 for a filled slot, ``MASK`` for an empty one) and the new tokens' ``position_ids``; the graph
    attends to the cache and, causally, to the new tokens, and returns only the new tokens' keys and values
    (``present_key.<i>`` (1, kv_heads, T, head_dim)), which the caller writes into their slots. The model's
    ``metadata_props`` pair every ``past_*`` input with its ``present_*`` output (``KV_PAIRS``).

    ``report``: told after each weight (``converting 57/273 tensors, 12 s, ETA 31 s: <name>``).

    ``flavour="ort"`` (with ``kv_cache``; ``"auto"``: where the model allows it, else standard): attention as
    ONNX Runtime's ``GroupQueryAttention`` (rotary, causal mask and grouped heads inside one op; see
    ``ort_flavour_refusal`` for the shapes it takes), with the inputs ``seqlens_k`` (1,) int32 (the tokens held
    after this run, minus one) and ``total_sequence_length`` () int32; ``past_key.<i>`` may be a buffer of any
    length bound as ``present_key.<i>`` too (the KV cache updated in place). ``"standard"``: plain ONNX ops only
    (what other targets and the QDQ passes take). The ort flavour packs q/k/v and gate/up into one op each
    (``pack``; ``GraphWriter.packed_linear``), split back per module, where LoRA attaches to each module's slice;
    each attention then reads its q/k/v packed (``models.packing``: the Split is recorded on it, and a compile
    puts it back).

    ``blocks`` (with ``data``): a weight the source holds as quantized blocks it can keep (``models.blocks``)
    becomes ``MatMulNBits`` (``accuracy_level`` 0: float compute) or ``GatherBlockQuantized`` over those
    blocks, never dequantized; the others are asked of ``weights``.
    """
    s.check()
    if static_cache is not None and not 1 <= static_cache <= s.max_seq:
        raise InputError(f"static_cache {static_cache}: between 1 and the model's {s.max_seq} positions")
    if flavour not in (*FLAVOURS, "auto"):
        raise InputError(f"graph flavour {flavour!r}: one of {', '.join(FLAVOURS)} or auto")
    why = ort_flavour_refusal(s, kv_cache, static_cache) if flavour != "standard" else None
    if why and flavour == "ort":
        raise BaseModelError(f"the ort graph flavour {why}; build the standard graph")
    ort_flavour = flavour != "standard" and why is None
    work = s.vocab * s.d_model + sum(i * o for i, o in linear_shapes(s).values())  # (norms and biases: ~0)
    stage = Stage(report, "converting", len(tensor_names(s)), "tensors", work=work) if report else None
    g = GraphWriter(weights, data, stage)
    if blocks is not None and g.data is not None:
        g.blocks, g.kept = blocks, KeptWriter(g.data, accuracy_level)
    d, hd = s.d_model, s.head_dim
    rep = s.n_heads // s.n_kv_heads
    inv = 1.0 / (s.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    ang = np.outer(np.arange(s.max_seq, dtype=np.float64), inv)
    qw, kvw = s.n_heads * hd, s.n_kv_heads * hd
    g.const("c.eps", np.array(s.rms_eps, np.float32))
    g.eps = s.rms_eps
    g.const("c.two_f", np.array(2.0, np.float32))
    if ort_flavour:  # GroupQueryAttention: its rotary tables (max_seq, hd / 2); no positions or mask of ours
        g.const("rope.cos_half", np.cos(ang).astype(np.float32))
        g.const("rope.sin_half", np.sin(ang).astype(np.float32))
    else:
        g.const("rope.cos", np.concatenate([np.cos(ang)] * 2, axis=1).astype(np.float32))  # (S, hd)
        g.const("rope.sin", np.concatenate([np.sin(ang)] * 2, axis=1).astype(np.float32))
        for cname, value in {"c.zero": 0, "c.one": 1, "c.axes1": [1],
                             "c.heads": [0, 0, s.n_heads, hd], "c.kv": [0, 0, s.n_kv_heads, hd],
                             "c.rep": [1, 1, rep, 1, 1], "c.merge": [1, s.n_heads, -1, hd],
                             "c.model": [0, 0, qw], "c.half": [hd // 2, hd // 2]}.items():
            g.const(cname, np.array(value, np.int64))
        g.const("c.inv_sqrt_hd", np.array(s.attn_scale or 1.0 / np.sqrt(hd), np.float32))
        g.const("c.masked", np.array(-1e9, np.float32))
        g.const("c.open", np.array(0.0, np.float32))
        g.node("Shape", ["input_ids"], ["ids_shape"])
        g.node("Gather", ["ids_shape", "c.one"], ["seq_len"], axis=0)  # scalar T
        if static_cache:
            _static_positions(g, static_cache)
        else:
            _positions(g, kv_cache)

    h = g.embedding("model.embed_tokens.weight", (s.vocab, d), "h.embed")  # (1, T, d)
    if s.embed_scale is not None:
        h = g.node("Mul", [h, g.const("c.embed_scale", np.array(s.embed_scale, np.float32))], ["h.scaled"])
    kv_io: list[tuple[str, str]] = []
    pending: str | None = None  # the last branch's output, added to the residual stream by the next norm
    for i in range(s.n_layers):
        p = f"model.layers.{i}"
        n, h = g.add_norm(f"{p}.input_layernorm", pending, h, d, ort_flavour)
        if s.fused:
            q, k, v = g.fresh("q"), g.fresh("k"), g.fresh("v")
            sizes = g.shared("c.qkv", np.array([qw, kvw, kvw], np.int64))
            g.node("Split", [g.linear(f"{p}.self_attn.qkv_proj", n, d, qw + 2 * kvw), sizes], [q, k, v], axis=-1)
        elif ort_flavour and pack:
            q, k, v = g.packed_linear(f"{p}.self_attn.qkv_packed", [f"{p}.self_attn.{m}_proj" for m in "qkv"], n, d,
                                      [qw, kvw, kvw], bias=s.qkv_bias)
        else:
            b = s.qkv_bias
            q = g.linear(f"{p}.self_attn.q_proj", n, d, qw, bias=b)
            k = g.linear(f"{p}.self_attn.k_proj", n, d, kvw, bias=b)
            v = g.linear(f"{p}.self_attn.v_proj", n, d, kvw, bias=b)
        if ort_flavour:
            o = g.group_query_attention(i, q, k, v, s, f"{p}.self_attn")
            kv_io.append((f"key.{i}", f"value.{i}"))
        else:
            o = _attention(g, s, i, q, k, v, p, static_cache, kv_cache, kv_io, rep)
        o = g.linear(f"{p}.self_attn.o_proj", o, qw, d)
        if s.sandwich:  # Gemma 2: post_attention_layernorm norms the attention's output; the MLP has its own pair
            o = g.rms_norm(f"{p}.post_attention_layernorm", o, d)
        mlp_norm = f"{p}.{'pre_feedforward' if s.sandwich else 'post_attention'}_layernorm"
        n, h = g.add_norm(mlp_norm, o, h, d, ort_flavour)
        if s.fused:
            gate, up = g.fresh("gate"), g.fresh("up")
            sizes = g.shared("c.gate_up", np.array([s.d_ff, s.d_ff], np.int64))
            g.node("Split", [g.linear(f"{p}.mlp.gate_up_proj", n, d, 2 * s.d_ff), sizes], [gate, up], axis=-1)
        elif ort_flavour and pack:
            gate, up = g.packed_linear(f"{p}.mlp.gate_up_packed", [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], n, d,
                                       [s.d_ff, s.d_ff])
        else:
            gate, up = g.linear(f"{p}.mlp.gate_proj", n, d, s.d_ff), g.linear(f"{p}.mlp.up_proj", n, d, s.d_ff)
        act = g.node("Mul", [g.activation(gate, s.act), up], [g.fresh("act")])
        down = g.linear(f"{p}.mlp.down_proj", act, s.d_ff, d)
        if s.sandwich:
            down = g.rms_norm(f"{p}.post_feedforward_layernorm", down, d)
        pending = down
    n, h = g.add_norm("model.norm", pending, h, d, ort_flavour)
    if s.final_softcap is None:
        g.linear("lm_head", n, d, s.vocab, out="logits")
    else:
        g.softcap(g.linear("lm_head", n, d, s.vocab), s.final_softcap, "final", out="logits")

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence"])]
    if ort_flavour:
        inputs += [helper.make_tensor_value_info(SEQLENS_K, TensorProto.INT32, [1]),
                   helper.make_tensor_value_info(TOTAL_LENGTH, TensorProto.INT32, [])]
    if static_cache:
        inputs += [helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "sequence"]),
                   helper.make_tensor_value_info("past_bias", TensorProto.FLOAT, [1, 1, 1, static_cache])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "sequence", s.vocab])]
    past, present = (static_cache, "sequence") if static_cache else ("past", "total")
    for key, value in kv_io:
        for kind in (key, value):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}", TensorProto.FLOAT,
                                                        [1, s.n_kv_heads, past, hd]))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}", TensorProto.FLOAT,
                                                         [1, s.n_kv_heads, present, hd]))
    if ort_flavour and pack:  # attentions read q/k/v packed, as bundles do (a compile splits them again)
        split = {n.input[1] for n in g.nodes if n.op_type == "Split" and len(n.input) > 1}
        g.nodes = pack_qkv(g.nodes, {t.name: t for t in g.inits})
        read = {i for n in g.nodes for i in n.input}
        g.inits = [t for t in g.inits if t.name in read or t.name not in split]  # the dropped Splits' sizes
    graph = helper.make_graph(g.nodes, name, inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", s.opset)] + ([helper.make_opsetid(MS_DOMAIN, 1)] if g.kept or ort_flavour else [])
    model = helper.make_model(graph, opset_imports=opsets,
                              producer_name="lora_runtime.models.llama")
    model.ir_version = 8
    props = {FLAVOUR: "ort" if ort_flavour else "standard"}
    if static_cache:
        pairs = [[f"past_{kind}", f"present_{kind}"] for pair in kv_io for kind in pair]
        props |= {KV_PAIRS: json.dumps(pairs), CACHE_SLOTS: str(static_cache)}
    helper.set_model_props(model, props)
    return model


def ort_flavour_refusal(s: LlamaShape, kv_cache: bool, static_cache: int | None) -> str | None:
    """Why the ort flavour cannot build this model (None: it can)."""
    if not kv_cache or static_cache:
        return "builds the growing (or in-place) KV cache only; a static cache or none is the standard graph's"
    if s.head_dim % 16:
        return f"needs a head size that is a multiple of 16 (GroupQueryAttention on CPU); this one is {s.head_dim}"
    if s.attn_softcap is not None:
        return "does not build soft-capped attention scores (Gemma 2)"
    return None


def _attention(g: GraphWriter, s: LlamaShape, i: int, q: str, k: str, v: str, p: str, static_cache: int | None,
               kv_cache: bool, kv_io: list[tuple[str, str]], rep: int) -> str:
    """Standard-ONNX attention of layer ``i``: heads, rotary, the cache (growing or static), causal softmax; its
    output (1, T, heads * hd)."""
    hd = s.head_dim
    q, k, v = g.heads(q, "c.heads"), g.heads(k, "c.kv"), g.heads(v, "c.kv")  # (1, H or KV, T, hd)
    if s.qk_norm:
        q, k = g.rms_norm(f"{p}.self_attn.q_norm", q, hd), g.rms_norm(f"{p}.self_attn.k_norm", k, hd)
    q, k = g.rope(q), g.rope(k)
    if static_cache:  # the new tokens' own keys and values out; attention over the cache and them
        k = g.node("Identity", [k], [f"present_key.{i}"])  # (1, KV, T, hd)
        v = g.node("Identity", [v], [f"present_value.{i}"])
        k = g.node("Concat", [f"past_key.{i}", k], [g.fresh("keys")], axis=2)  # (1, KV, C+T, hd)
        v = g.node("Concat", [f"past_value.{i}", v], [g.fresh("values")], axis=2)
        kv_io.append((f"key.{i}", f"value.{i}"))
    elif kv_cache:
        k = g.node("Concat", [f"past_key.{i}", k], [f"present_key.{i}"], axis=2)  # (1, KV, past+T, hd)
        v = g.node("Concat", [f"past_value.{i}", v], [f"present_value.{i}"], axis=2)
        kv_io.append((f"key.{i}", f"value.{i}"))
    if rep > 1:
        k, v = g.repeat_kv(k), g.repeat_kv(v)
    kt = g.node("Transpose", [k], [g.fresh("kt")], perm=[0, 1, 3, 2])
    sc = g.node("MatMul", [q, kt], [g.fresh("scores")])  # (1, H, T, past+T)
    sc = g.node("Mul", [sc, "c.inv_sqrt_hd"], [g.fresh("scaled")])
    if s.attn_softcap is not None:
        sc = g.softcap(sc, s.attn_softcap, "attn")
    sc = g.node("Add", [sc, "mask"], [g.fresh("masked")])
    a = g.node("Softmax", [sc], [g.fresh("probs")], axis=-1)
    o = g.node("MatMul", [a, v], [g.fresh("attn")])  # (1, H, T, hd)
    o = g.node("Transpose", [o], [g.fresh("attn_t")], perm=[0, 2, 1, 3])
    o = g.node("Reshape", [o, "c.model"], [g.fresh("attn_m")])  # (1, T, d)
    return o


def _positions(g: GraphWriter, kv_cache: bool) -> None:
    """Positions past .. past+T-1 and the causal mask (T, past+T): key j is visible from query i if j <= past+i."""
    if kv_cache:
        g.node("Shape", ["past_key.0"], ["past_shape"])
        g.node("Gather", ["past_shape", g.const("c.two", np.array(2, np.int64))], ["past_len"], axis=0)  # past
    else:
        g.node("Identity", ["c.zero"], ["past_len"])
    g.node("Add", ["past_len", "seq_len"], ["total_len"])
    g.node("Range", ["past_len", "total_len", "c.one"], ["positions"])  # (T,)
    g.node("Gather", ["rope.cos", "positions"], ["cos"], axis=0)  # (T, hd)
    g.node("Gather", ["rope.sin", "positions"], ["sin"], axis=0)
    g.node("Unsqueeze", ["positions", "c.axes1"], ["query_pos"])  # (T, 1)
    g.node("Range", ["c.zero", "total_len", "c.one"], ["key_pos"])  # (past+T,)
    g.node("LessOrEqual", ["key_pos", "query_pos"], ["visible"])  # (T, past+T)
    g.node("Where", ["visible", "c.open", "c.masked"], ["mask"])


def _static_positions(g: GraphWriter, slots: int) -> None:
    """The caller's positions, and the mask (1, 1, T, C+T): the cache slots by ``past_bias``, the new tokens
    causally among themselves."""
    g.node("Squeeze", ["position_ids", g.const("c.axes0", np.array([0], np.int64))], ["positions"])  # (T,)
    g.node("Gather", ["rope.cos", "positions"], ["cos"], axis=0)  # (T, hd)
    g.node("Gather", ["rope.sin", "positions"], ["sin"], axis=0)
    g.node("Range", ["c.zero", "seq_len", "c.one"], ["new_pos"])  # (T,)
    g.node("Unsqueeze", ["new_pos", "c.axes1"], ["query_pos"])  # (T, 1)
    g.node("LessOrEqual", ["new_pos", "query_pos"], ["visible"])  # (T, T)
    g.node("Where", ["visible", "c.open", "c.masked"], ["new_mask"])
    g.node("Unsqueeze", ["new_mask", g.const("c.axes01", np.array([0, 1], np.int64))], ["new_mask4"])  # (1,1,T,T)
    g.node("Unsqueeze", ["seq_len", "c.axes0"], ["seq_len1"])
    g.node("Concat", [g.const("c.one_one", np.array([1, 1], np.int64)), "seq_len1",
                      g.const("c.slots", np.array([slots], np.int64))], ["past_mask_shape"], axis=0)
    g.node("Expand", ["past_bias", "past_mask_shape"], ["past_mask"])  # (1, 1, T, C)
    g.node("Concat", ["past_mask", "new_mask4"], ["mask"], axis=-1)  # (1, 1, T, C+T)
