"""The Llama graph builder: KV-cache decoding equals full-sequence runs; numerics against numpy."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from lora_runtime.models.llama import LlamaShape, build_llama

SHAPE = LlamaShape(vocab=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq=32,
                   rms_eps=1e-6, rope_theta=500.0)


def _weights(seed: int = 0):
    rng = np.random.default_rng(seed)
    store: dict[str, np.ndarray] = {}

    def weights(name: str, shape: tuple[int, ...]) -> np.ndarray:
        w = (1 + 0.1 * rng.standard_normal(shape)) if len(shape) == 1 else rng.standard_normal(shape) / np.sqrt(
            shape[0])
        store[name] = w.astype(np.float32)
        return store[name]

    return weights, store


def _session(kv_cache: bool) -> tuple[ort.InferenceSession, dict[str, np.ndarray]]:
    weights, store = _weights()
    model = build_llama(SHAPE, weights, kv_cache=kv_cache)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]), store


def _numpy_forward(ids: np.ndarray, w: dict[str, np.ndarray], s: LlamaShape = SHAPE) -> np.ndarray:
    """Hugging Face Llama's forward pass, restated in float64 numpy."""
    hd = s.head_dim
    t = ids.shape[1]
    h = w["model.embed_tokens.weight"][ids[0]].astype(np.float64)  # (T, d)
    inv = 1.0 / (s.rope_theta ** (np.arange(0, hd, 2) / hd))
    ang = np.outer(np.arange(t), inv)
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))

    def norm(x, name):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + s.rms_eps) * w[f"{name}.weight"]

    def rope(x):  # (heads, T, hd)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + np.concatenate([-x2, x1], -1) * sin

    for i in range(s.n_layers):
        p = f"model.layers.{i}"
        n = norm(h, f"{p}.input_layernorm")
        q = (n @ w[f"{p}.self_attn.q_proj.weight"]).reshape(t, s.n_heads, hd).transpose(1, 0, 2)
        k = (n @ w[f"{p}.self_attn.k_proj.weight"]).reshape(t, s.n_kv_heads, hd).transpose(1, 0, 2)
        v = (n @ w[f"{p}.self_attn.v_proj.weight"]).reshape(t, s.n_kv_heads, hd).transpose(1, 0, 2)
        q, k = rope(q), rope(k)
        rep = s.n_heads // s.n_kv_heads
        k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
        sc = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + np.triu(np.full((t, t), -1e9), 1)
        a = np.exp(sc - sc.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ v).transpose(1, 0, 2).reshape(t, -1)
        h = h + o @ w[f"{p}.self_attn.o_proj.weight"]
        n = norm(h, f"{p}.post_attention_layernorm")
        g = n @ w[f"{p}.mlp.gate_proj.weight"]
        h = h + (g / (1 + np.exp(-g)) * (n @ w[f"{p}.mlp.up_proj.weight"])) @ w[f"{p}.mlp.down_proj.weight"]
    return (norm(h, "model.norm") @ w["lm_head.weight"])[None]


def test_graph_matches_numpy_reference():
    sess, w = _session(kv_cache=False)
    ids = np.random.default_rng(3).integers(0, SHAPE.vocab, (1, 9), dtype=np.int64)
    np.testing.assert_allclose(sess.run(None, {"input_ids": ids})[0], _numpy_forward(ids, w), atol=2e-4, rtol=1e-4)


def test_kv_cache_prefill_then_decode_equals_full_runs():
    full, _ = _session(kv_cache=False)
    cached, _ = _session(kv_cache=True)
    ids = np.random.default_rng(4).integers(0, SHAPE.vocab, (1, 12), dtype=np.int64)
    want = full.run(None, {"input_ids": ids})[0]
    names = [o.name for o in cached.get_outputs()]
    empty = np.zeros((1, SHAPE.n_kv_heads, 0, SHAPE.head_dim), np.float32)
    past = {i.name: empty for i in cached.get_inputs() if i.name.startswith("past_")}
    out = dict(zip(names, cached.run(None, {"input_ids": ids[:, :5]} | past)))  # prefill 5 tokens
    got = [out["logits"]]
    for t in range(5, 12):  # then decode one token at a time
        past = {n.replace("present_", "past_"): v for n, v in out.items() if n.startswith("present_")}
        out = dict(zip(names, cached.run(None, {"input_ids": ids[:, t:t + 1]} | past)))
        got.append(out["logits"])
    np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=1e-4, rtol=1e-4)
    assert out["present_key.0"].shape == (1, SHAPE.n_kv_heads, 12, SHAPE.head_dim)
