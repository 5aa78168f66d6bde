"""The embedded default model: a small Llama-style decoder and three PEFT adapters, all from a seed.

Nothing is downloaded: ``build_default(preset, out_dir)`` writes ``base.onnx`` and
``adapters/<name>/`` (real PEFT folders, the same format ``save_pretrained`` writes) so the
demo, the tests and the bench exercise exactly the path a user's files take.

The decoder (per layer, pre-norm)::

    h = Gather(embed_tokens, input_ids)                                  # (1, T, d)
    h = h + o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))   n = RMSNorm(h)
    h = h + down_proj(silu(gate_proj(n)) * up_proj(n))                   n = RMSNorm(h)
    logits = lm_head(RMSNorm(h))                                         # (1, T, vocab)

Attention is causal with grouped-query heads (``n_kv_heads`` <= ``n_heads``) and rotary positions.
Weights are named after their module (``model.layers.0.self_attn.q_proj.weight``) and stored
(in, out) for MatMul. The recipes are in ``graphs/default-<preset>.json`` too (a test keeps them equal).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lora_runtime.tensorfile import save_tensors

DATA_FILE = "base.onnx.data"
DATA_ALIGN = 65536  # the largest mmap allocation granularity ONNX Runtime meets (Windows); Linux needs 4096


@dataclass(frozen=True)
class AdapterRecipe:
    """A seeded PEFT LoRA adapter: its config fields and the modules it targets."""

    name: str
    r: int
    lora_alpha: float
    target_modules: list[str] | str
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    seed: int = 1


@dataclass(frozen=True)
class ModelRecipe:
    """Sizes of the default decoder. ``d_model`` must divide by ``n_heads``; n_heads by n_kv_heads."""

    name: str
    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_seq: int = 128  # rotary and causal-mask tables are this long: the longest input
    seed: int = 0
    opset: int = 17
    external_data: bool = False  # write weights to base.onnx.data (as exporters do for big models)
    adapters: tuple[AdapterRecipe, ...] = ()
    seq_len: int = 16  # the demo/bench input length

    def to_json(self) -> dict:
        return asdict(self)


_DEMO_ADAPTERS = (
    AdapterRecipe("summarize", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], seed=11),
    AdapterRecipe("translate", r=16, lora_alpha=16, use_rslora=True,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], seed=12),
    AdapterRecipe("tone", r=4, lora_alpha=8, target_modules=r".*\.mlp\.(gate|up|down)_proj",
                  rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 2}, seed=13),
)

PRESETS: dict[str, ModelRecipe] = {
    "tiny": ModelRecipe("tiny", vocab=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                        max_seq=64, adapters=_DEMO_ADAPTERS, seq_len=8),
    "bench": ModelRecipe("bench", vocab=2048, d_model=1024, n_layers=8, n_heads=16, n_kv_heads=8, d_ff=2048,
                         max_seq=128, external_data=True, seq_len=32, adapters=(
                             AdapterRecipe("summarize", r=16, lora_alpha=32, seed=21,
                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                             AdapterRecipe("translate", r=16, lora_alpha=16, use_rslora=True, seed=22,
                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                             AdapterRecipe("tone", r=8, lora_alpha=16, seed=23, target_modules=["q_proj", "v_proj"]),
                         )),
    "1b": ModelRecipe("1b", vocab=32000, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
                      max_seq=256, external_data=True, seq_len=32, adapters=(
                          AdapterRecipe("summarize", r=32, lora_alpha=64, seed=31,  # ~27 MB: the cold-switch size
                                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
                          AdapterRecipe("translate", r=64, lora_alpha=64, use_rslora=True, seed=32,
                                        target_modules=["q_proj", "v_proj"]),
                          AdapterRecipe("tone", r=8, lora_alpha=16, seed=33,
                                        target_modules=["gate_proj", "up_proj", "down_proj"]),
                      )),
}


def recipe(preset: str) -> ModelRecipe:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[preset]


@dataclass(frozen=True)
class DefaultModel:
    recipe: ModelRecipe
    base: Path
    adapters: dict[str, Path]

    def inputs(self, seed: int = 0, seq_len: int | None = None) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        t = seq_len or self.recipe.seq_len
        return {"input_ids": rng.integers(0, self.recipe.vocab, size=(1, t), dtype=np.int64)}


def build_default(preset: str | ModelRecipe, out_dir: str | Path) -> DefaultModel:
    """Write the base model and its adapters under ``out_dir`` (reused if already built from the same recipe)."""
    r = recipe(preset) if isinstance(preset, str) else preset
    out = Path(out_dir)
    stamp = out / "recipe.json"
    text = json.dumps(r.to_json(), indent=1, sort_keys=True)
    adapters = {a.name: out / "adapters" / a.name for a in r.adapters}
    if stamp.is_file() and stamp.read_text() == text and (out / "base.onnx").is_file():
        return DefaultModel(r, out / "base.onnx", adapters)
    out.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    if r.external_data:  # streamed: each weight goes to the data file as it is generated
        with open(out / DATA_FILE, "wb") as data:
            model = build_model(r, data)
    else:
        model = build_model(r)
    onnx.save(model, str(out / "base.onnx"))
    for a in r.adapters:
        write_adapter(a, r, adapters[a.name])
    stamp.write_text(text)
    return DefaultModel(r, out / "base.onnx", adapters)


def module_shapes(r: ModelRecipe) -> dict[str, tuple[int, int]]:
    """(in, out) of every linear module, by PEFT module path."""
    hd = r.d_model // r.n_heads
    kv = r.n_kv_heads * hd
    shapes = {}
    for i in range(r.n_layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.self_attn.q_proj": (r.d_model, r.d_model), f"{p}.self_attn.k_proj": (r.d_model, kv),
                       f"{p}.self_attn.v_proj": (r.d_model, kv), f"{p}.self_attn.o_proj": (r.d_model, r.d_model),
                       f"{p}.mlp.gate_proj": (r.d_model, r.d_ff), f"{p}.mlp.up_proj": (r.d_model, r.d_ff),
                       f"{p}.mlp.down_proj": (r.d_ff, r.d_model)})
    shapes["lm_head"] = (r.d_model, r.vocab)
    return shapes


def write_adapter(a: AdapterRecipe, r: ModelRecipe, folder: Path) -> None:
    """A PEFT folder for recipe ``a``: the modules its target_modules select, seeded A/B, PEFT's key names."""
    from lora_runtime.lora_config import LoraConfig, rank_and_scaling

    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": f"lora_runtime/{r.name}",
              "r": a.r, "lora_alpha": a.lora_alpha, "target_modules": a.target_modules, "use_rslora": a.use_rslora,
              "rank_pattern": a.rank_pattern, "alpha_pattern": a.alpha_pattern, "fan_in_fan_out": False,
              "lora_dropout": 0.0, "bias": "none", "use_dora": False, "modules_to_save": None,
              "inference_mode": True}
    parsed = LoraConfig.from_json(config)
    rng = np.random.default_rng(a.seed)
    tensors = {}
    for module, (d_in, d_out) in module_shapes(r).items():
        if module == "lm_head" or not parsed.targets(module):
            continue
        rank, _ = rank_and_scaling(parsed, module)
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, d_in)) / np.sqrt(d_in)).astype(np.float32)
        tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((d_out, rank)) * 0.1 / np.sqrt(rank)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_tensors(folder / "adapter_model.safetensors", dict(sorted(tensors.items())), {"format": "pt"})


def build_model(r: ModelRecipe, data: BinaryIO | None = None) -> onnx.ModelProto:
    """The decoder graph with seeded weights (see the module docstring).

    With ``data`` (a file opened for writing, named ``base.onnx.data`` next to the model), every
    initializer of 1 KiB or more is written there as it is generated and referenced as external data,
    so a 1B-parameter model never exists twice, or even once, in memory.
    """
    g = _Graph(np.random.default_rng(r.seed), data)
    d, hd = r.d_model, r.d_model // r.n_heads
    rep = r.n_heads // r.n_kv_heads
    if d % r.n_heads or r.n_heads % r.n_kv_heads or hd % 2:
        raise ValueError(f"recipe {r.name!r}: d_model/n_heads/n_kv_heads do not divide evenly")
    inv = 1.0 / (10000.0 ** (np.arange(0, hd, 2) / hd))
    ang = np.outer(np.arange(r.max_seq), inv)
    g.const("rope.cos", np.concatenate([np.cos(ang)] * 2, axis=1).astype(np.float32))  # (S, hd)
    g.const("rope.sin", np.concatenate([np.sin(ang)] * 2, axis=1).astype(np.float32))
    g.const("causal_mask", np.triu(np.full((r.max_seq, r.max_seq), -1e9, np.float32), k=1))
    for name, value in {"c.zero": [0], "c.one": [1], "c.zero2": [0, 0], "c.axes01": [0, 1], "c.axes0": [0],
                        "c.heads": [0, 0, r.n_heads, hd], "c.kv": [0, 0, r.n_kv_heads, hd],
                        "c.rep": [1, 1, rep, 1, 1], "c.merge": [1, r.n_heads, -1, hd], "c.model": [0, 0, d],
                        "c.half": [hd // 2, hd // 2]}.items():
        g.const(name, np.array(value, np.int64))
    g.const("c.eps", np.array(1e-5, np.float32))
    g.const("c.inv_sqrt_hd", np.array(1.0 / np.sqrt(hd), np.float32))

    g.node("Shape", ["input_ids"], ["seq_shape"])
    g.node("Gather", ["seq_shape", "c.one"], ["seq_len"], axis=0)  # (1,)
    g.node("Concat", ["seq_len", "seq_len"], ["seq_len2"], axis=0)
    g.node("Slice", ["rope.cos", "c.zero", "seq_len", "c.axes0"], ["cos"])  # (T, hd)
    g.node("Slice", ["rope.sin", "c.zero", "seq_len", "c.axes0"], ["sin"])
    g.node("Slice", ["causal_mask", "c.zero2", "seq_len2", "c.axes01"], ["mask"])  # (T, T)
    g.weight("model.embed_tokens.weight", (r.vocab, d), scale=1.0)
    h = g.node("Gather", ["model.embed_tokens.weight", "input_ids"], ["h.embed"], axis=0)  # (1, T, d)
    for i in range(r.n_layers):
        p = f"model.layers.{i}"
        n = g.rms_norm(f"{p}.input_layernorm", h, d)
        q = g.heads(g.linear(f"{p}.self_attn.q_proj", n, d, d), "c.heads")  # (1, H, T, hd)
        k = g.heads(g.linear(f"{p}.self_attn.k_proj", n, d, r.n_kv_heads * hd), "c.kv")  # (1, KV, T, hd)
        v = g.heads(g.linear(f"{p}.self_attn.v_proj", n, d, r.n_kv_heads * hd), "c.kv")
        q, k = g.rope(q), g.rope(k)
        if rep > 1:
            k, v = g.repeat_kv(k), g.repeat_kv(v)
        kt = g.node("Transpose", [k], [g.fresh("kt")], perm=[0, 1, 3, 2])
        s = g.node("MatMul", [q, kt], [g.fresh("scores")])  # (1, H, T, T)
        s = g.node("Mul", [s, "c.inv_sqrt_hd"], [g.fresh("scaled")])
        s = g.node("Add", [s, "mask"], [g.fresh("masked")])
        a = g.node("Softmax", [s], [g.fresh("probs")], axis=-1)
        o = g.node("MatMul", [a, v], [g.fresh("attn")])  # (1, H, T, hd)
        o = g.node("Transpose", [o], [g.fresh("attn_t")], perm=[0, 2, 1, 3])
        o = g.node("Reshape", [o, "c.model"], [g.fresh("attn_m")])  # (1, T, d)
        h = g.node("Add", [h, g.linear(f"{p}.self_attn.o_proj", o, d, d)], [g.fresh("h")])
        n = g.rms_norm(f"{p}.post_attention_layernorm", h, d)
        gate = g.linear(f"{p}.mlp.gate_proj", n, d, r.d_ff)
        silu = g.node("Mul", [gate, g.node("Sigmoid", [gate], [g.fresh("sig")])], [g.fresh("silu")])
        up = g.linear(f"{p}.mlp.up_proj", n, d, r.d_ff)
        act = g.node("Mul", [silu, up], [g.fresh("act")])
        h = g.node("Add", [h, g.linear(f"{p}.mlp.down_proj", act, r.d_ff, d)], [g.fresh("h")])
    n = g.rms_norm("model.norm", h, d)
    g.linear("lm_head", n, d, r.vocab, out="logits")
    graph = helper.make_graph(
        g.nodes, f"lora_runtime_default_{r.name}",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "sequence", r.vocab])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", r.opset)],
                              producer_name="lora_runtime.default_model")
    model.ir_version = 8
    return model


class _Graph:
    """Tiny builder: nodes, initializers and fresh names."""

    def __init__(self, rng: np.random.Generator, data: BinaryIO | None = None) -> None:
        self.rng = rng
        self.data = data
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.count = 0

    def fresh(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def const(self, name: str, value: np.ndarray) -> str:
        if self.data is None or value.nbytes < 1024:
            self.inits.append(numpy_helper.from_array(value, name))
            return name
        offset = self.data.tell()
        # big tensors aligned, so ONNX Runtime can map them instead of copying; small ones packed
        offset += -offset % (DATA_ALIGN if value.nbytes >= DATA_ALIGN else 64)
        self.data.seek(offset)
        self.data.write(np.ascontiguousarray(value, value.dtype.newbyteorder("<")).tobytes())
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(value.dtype), dims=value.shape,
                        data_location=TensorProto.EXTERNAL)
        for key, v in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(value.nbytes))):
            t.external_data.add(key=key, value=v)
        self.inits.append(t)
        return name

    def weight(self, name: str, shape: tuple[int, ...], scale: float | None = None) -> str:
        std = scale if scale is not None else 1.0 / np.sqrt(shape[0])
        w = self.rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(std)
        return self.const(name, w)

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str | None = None, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name or outputs[0], **attrs))
        return outputs[0]

    def linear(self, module: str, x: str, d_in: int, d_out: int, out: str | None = None) -> str:
        w = self.weight(f"{module}.weight", (d_in, d_out))  # (in, out): MatMul layout
        return self.node("MatMul", [x, w], [out or f"{module}.out"], name=f"{module}.MatMul")

    def rms_norm(self, module: str, x: str, d: int) -> str:
        w = self.const(f"{module}.weight", (1.0 + 0.1 * self.rng.standard_normal(d)).astype(np.float32))
        sq = self.node("Mul", [x, x], [self.fresh("sq")])
        ms = self.node("ReduceMean", [sq], [self.fresh("ms")], axes=[-1], keepdims=1)
        rs = self.node("Sqrt", [self.node("Add", [ms, "c.eps"], [self.fresh("mse")])], [self.fresh("rms")])
        normed = self.node("Div", [x, rs], [self.fresh("normed")])
        return self.node("Mul", [normed, w], [f"{module}.out"])

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
