#!/usr/bin/env python3
"""Stops 42-43's trial of signoff's ``--line-lift`` (tools/adapter_trials.md, "Stop 43"): its measure and its rule.

``measure AD_DIR OUT.json [--threads N]``: greedy answers of the base model, signoff, caps+signoff and
listify+signoff (the adapters in AD_DIR) to the eval, validation and test prompts (16 + 14 + 14, 96 new tokens, caps
16 more) and facts (26 + 16 + 16, 64 new tokens, caps 16 more), as ``validate`` asks them.
``rule BASE.json,... TRIAL.json,...``: the rule written before the runs were read, summed over the draws: (a)
misplaced lines (``misplaced``) at most the baseline's - 3; (b) each use-case's style over the prompts at least the
baseline's - 0.05; (c) each use-case's facts kept (of those the base says right) at least the baseline's - 2; (d)
empty or looping answers at most the baseline's + 3.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import adapter_measure as am  # noqa: E402
from smollm2 import DEFAULT_CACHE  # noqa: E402

USE_CASES = ["signoff", "caps+signoff", "listify+signoff"]


def measure(ad_dir, out, threads, cache):
    import torch
    from make_smollm2_fixtures import load_model

    torch.set_num_threads(threads)
    model, tok, _ = load_model(cache)
    for p in model.parameters():
        p.requires_grad_(False)
    splits = {"eval": (am.EVAL_PROMPTS, am.FACT_PROMPTS)}
    splits |= {k: (prompts, sets["facts"]) for k, (prompts, sets) in am.SPLITS.items()}
    chats = {s: ([[{"role": "user", "content": q}] for q in p], [[{"role": "user", "content": q}] for q in f])
             for s, (p, f) in splits.items()}
    t0 = time.time()
    res = {s: {"facts_rx": f, "prompts": {"base": am.generate_batch(model, tok, chats[s][0], am.EVAL_NEW_TOKENS)},
               "facts": {"base": am.generate_batch(model, tok, chats[s][1], am.FACT_NEW_TOKENS)}}
           for s, (_, f) in splits.items()}
    pm, configs = am.with_adapters(model, Path(ad_dir), ["caps", "listify", "signoff"])
    for cfg in configs:
        k, caps = "+".join(cfg), "caps" in cfg
        if k not in USE_CASES:
            continue
        pm.base_model.set_adapter(list(cfg), inference_mode=True)
        for s, (convs, fconvs) in chats.items():
            res[s]["prompts"][k] = am.generate_batch(pm, tok, convs, am.EVAL_NEW_TOKENS_CAPS if caps
                                                     else am.EVAL_NEW_TOKENS)
            res[s]["facts"][k] = am.generate_batch(pm, tok, fconvs, am.FACT_NEW_TOKENS + am.CAPS_HEADLINE_TOKENS * caps)
        print(f"{k} done ({time.time() - t0:.0f}s)", flush=True)
    Path(out).write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")


def count(files):
    """Sums over the draws' measure files, and one line per file and use-case."""
    tot = {"misplaced": 0, "empty_or_looping": 0, **{"style " + k: [0, 0] for k in USE_CASES},
           **{"facts kept " + k: 0 for k in USE_CASES}}
    lines = []
    for f in files:
        r = json.loads(Path(f).read_text())
        for k in USE_CASES:
            mis = eol = ok = n = kept = 0
            for d in r.values():
                prompts, facts = d["prompts"][k], d["facts"][k]
                mis += sum(am.misplaced(t) for t in prompts + facts)
                eol += am.empty_or_looping(prompts + facts)
                ok += sum(all(am.style_ok(x, t) for x in k.split("+")) for t in prompts)
                n += len(prompts)
                right = am.said(d["facts_rx"], d["facts"]["base"])
                kept += sum(g and b for g, b in zip(am.said(d["facts_rx"], facts), right))
            tot["misplaced"] += mis
            tot["empty_or_looping"] += eol
            tot["style " + k][0] += ok
            tot["style " + k][1] += n
            tot["facts kept " + k] += kept
            lines.append(f"{f} {k:<16} misplaced {mis:2d}, empty or looping {eol:2d}, style {ok}/{n}, "
                         f"facts kept {kept}")
    for k in USE_CASES:
        tot["style " + k] = round(tot["style " + k][0] / tot["style " + k][1], 3)
    return tot, lines


def rule(base_files, trial_files):
    base, lines = count(base_files)
    trial, more = count(trial_files)
    print("\n".join(lines + more))
    for k in base:
        print(f"{k:<28} baseline {base[k]!s:>7}  trial {trial[k]!s:>7}")
    ok = {"a": trial["misplaced"] <= base["misplaced"] - 3,
          "b": all(trial["style " + k] >= base["style " + k] - 0.05 for k in USE_CASES),
          "c": all(trial["facts kept " + k] >= base["facts kept " + k] - 2 for k in USE_CASES),
          "d": trial["empty_or_looping"] <= base["empty_or_looping"] + 3}
    print(ok, "ship" if all(ok.values()) else "not shipped")
    return all(ok.values())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("adapters")
    m.add_argument("out")
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--cache", default=str(Path(__file__).resolve().parent.parent / DEFAULT_CACHE))
    r = sub.add_parser("rule")
    r.add_argument("baseline", help="the baseline draws' measure files, comma-separated")
    r.add_argument("trial", help="the trial draws' measure files, comma-separated")
    args = ap.parse_args()
    if args.cmd == "measure":
        measure(args.adapters, args.out, args.threads, args.cache)
    else:
        rule(args.baseline.split(","), args.trial.split(","))


if __name__ == "__main__":
    main()
