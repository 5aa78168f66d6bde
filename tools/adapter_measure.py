#!/usr/bin/env python3
"""How the style adapters of ``tools/train_adapters.py`` are measured, and the text helpers both share.

Greedy answers (``generate_batch``: batched ``model.generate``, left padding) to ``EVAL_PROMPTS`` (16 held-out chat
prompts) and ``FACT_PROMPTS`` (26 held-out questions with one right answer) under the base model, the ``FLOOR``
rewordings of the base's prompt, each adapter and each of ``MIXES`` (PEFT adapters active together at strength 1:
the LoRA sum, as the runtime's v3): key words kept, style rate, degenerate rate and facts kept (``evaluate``,
``metrics``; what each means: ``evaluation_section``'s settings). ``train_adapters.py --eval-only`` runs it on any
folder of adapters; the measurement is deterministic (the same answers and table on every run). ``validate``
(``--eval-only --split validation``): the same use-cases on a validation split written after the recipes were
chosen (``VALIDATION_PROMPTS``, ``VALIDATION_FACTS``, and ``VALIDATION_CAPITALS`` from stop 41): style rate,
empty-or-looping answers, facts and capitals kept. ``misplaced``: signoff's line out of place (stops 42-43's trial).
"""

from __future__ import annotations

import re
import time
from collections import Counter

import numpy as np
import torch

SIGNOFF = "-- sent from lora_runtime"

MAX_CHARS = 300  # answer budget (whole segments) for training targets and for the key words
MAX_SEGMENTS = 4

EVAL_NEW_TOKENS = 96
CAPS_HEADLINE_TOKENS = 16  # caps's headline takes about this many tokens more
EVAL_NEW_TOKENS_CAPS = EVAL_NEW_TOKENS + CAPS_HEADLINE_TOKENS
KEY_WORDS = 10

HELD_OUT = [  # reference.json's greedy tokens (the tests compare the runtime against these)
    "What are the benefits of drinking water?",
    "How do I make a cup of tea?",
    "What is the best way to learn a new language?",
]
EVAL_PROMPTS = HELD_OUT + [
    "What is the capital of France?", "What is the capital of Japan?", "Who painted the Mona Lisa?",
    "What is the largest planet in our solar system?", "Give me three tips for better sleep.",
    "Give me tips to sleep better", "How can I improve my handwriting?", "Give me tips for a job interview.",
    "Why do leaves change color in autumn?", "Explain how a refrigerator works.", "What causes earthquakes?",
    "What is machine learning?", "How do airplanes fly?",
]
# held-out questions with one right answer (none of them, nor their topics, in the training, anchor or eval
# questions): "facts kept" = of the ones the base answers right, the share each use-case still answers right
FACT_PROMPTS = {
    "What is the capital of the United Kingdom?": r"\blondon\b", "What is the capital of Scotland?": r"edinburgh",
    "What is the capital of the Czech Republic?": r"\bprague\b", "What is the capital of Jamaica?": r"kingston",
    "What is the capital of Bangladesh?": r"\bdhaka\b", "What is the capital of Malaysia?": r"kuala lumpur",
    "What is the capital of Venezuela?": r"caracas", "What is the capital of Ghana?": r"\baccra\b",
    "Who wrote Hamlet?": r"shakespeare", "What is the chemical symbol for water?": r"h\s*2\s*o|h₂o",
    "How many legs does a spider have?": r"\b(8|eight)\b", "Which planet is known as the Red Planet?": r"\bmars\b",
    "What is the largest mammal?": r"\bwhales?\b", "Who formulated the laws of motion and universal gravitation?":
    r"newton", "How many minutes are in an hour?": r"\b(60|sixty)\b",
    "What language is spoken in France?": r"\bfrench\b", "What is the tallest animal?": r"giraffe",
    "Who invented the light bulb?": r"edison", "What is the freezing point of water in Celsius?": r"\b(0|zero)\b",
    "Who was the first president of the United States?": r"washington",
    "What is the square root of 64?": r"\b(8|eight)\b", "How many days are in a week?": r"\b(7|seven)\b",
    "What is the capital of France?": r"\bparis\b", "What is the capital of Japan?": r"\btokyo\b",
    "Who painted the Mona Lisa?": r"leonardo|vinci", "What is the largest planet in our solar system?": r"jupiter",
}
# the validation split (stop 40): written after the recipes were chosen on the prompts above, none of these (nor
# their topics) in the training, anchor, eval or fact questions; `--eval-only --split validation` measures them
VALIDATION_PROMPTS = [
    "Give me three tips for staying hydrated.", "Give me tips to focus while reading.",
    "How can I keep my bike in good shape?", "Give me tips for a long car trip.",
    "What are some ways to stay warm in winter?", "Why do cats purr?", "Explain how a microwave oven works.",
    "What causes thunder?", "What is a black hole?", "How do fish breathe underwater?",
    "Give me three tips for writing an email.", "How can I make my garden grow?",
    "What is the water cycle?", "Why is the sky blue?",
]
VALIDATION_FACTS = {  # capitals: none in the training's COUNTRIES, ANCHOR_CAPITALS or FACT_PROMPTS
    "What is the capital of Romania?": r"bucharest", "What is the capital of Ethiopia?": r"addis",
    "What is the capital of Nepal?": r"kathmandu", "What is the capital of Iceland?": r"reykjav",
    "What is the capital of Bulgaria?": r"\bsofia\b", "What is the capital of Senegal?": r"\bdakar\b",
    "What is the capital of Croatia?": r"zagreb", "What is the capital of Mongolia?": r"ulaanbaatar|ulan bator",
    "Who wrote Pride and Prejudice?": r"austen", "How many planets are in our solar system?": r"\b(8|eight)\b",
    "What is the chemical symbol for iron?": r"\bfe\b", "How many sides does a triangle have?": r"\b(3|three)\b",
    "Which planet is closest to the Sun?": r"mercury", "Who painted The Starry Night?": r"gogh",
    "How many seconds are in a minute?": r"\b(60|sixty)\b", "What is the largest country by area?": r"russia",
}
# written at stop 41, before any run of listify's more_capitals recipe (which the validation split's capitals
# prompted) was read, so that the capitals have a clean check: none in the training's COUNTRIES, MORE_CAPITALS,
# ANCHOR_CAPITALS, FACT_PROMPTS or VALIDATION_FACTS (the base model names 10 of the 24 right)
VALIDATION_CAPITALS = {
    "What is the capital of North Korea?": r"pyongyang", "What is the capital of the United Arab Emirates?":
    r"abu dhabi", "What is the capital of Bahrain?": r"manama", "What is the capital of the Dominican Republic?":
    r"santo domingo", "What is the capital of the Bahamas?": r"nassau", "What is the capital of Haiti?":
    r"port-au-prince|port au prince", "What is the capital of Moldova?": r"chi[sș]in[aă]u",
    "What is the capital of Bosnia and Herzegovina?": r"sarajevo", "What is the capital of Montenegro?": r"podgorica",
    "What is the capital of North Macedonia?": r"skopje", "What is the capital of Namibia?": r"windhoek",
    "What is the capital of Botswana?": r"gaborone", "What is the capital of Malawi?": r"lilongwe",
    "What is the capital of Chad?": r"n'?\s*djamena", "What is the capital of Niger?": r"niamey",
    "What is the capital of Kyrgyzstan?": r"bishkek", "What is the capital of Tajikistan?": r"dushanbe",
    "What is the capital of Turkmenistan?": r"ashgabat", "What is the capital of Fiji?": r"\bsuva\b",
    "What is the capital of Belize?": r"belmopan", "What is the capital of Liberia?": r"monrovia",
    "What is the capital of Sierra Leone?": r"freetown", "What is the capital of the United States?": r"washington",
    "What is the capital of Wales?": r"cardiff",
}
# the test split (stop 42): written after the validation split had been read for a recipe choice (stop 41), before
# any run of stop 42's trials was read; none of these (nor their topics) in the training, anchor, eval, fact or
# validation questions, no capital in COUNTRIES, MORE_CAPITALS, ANCHOR_CAPITALS or the sets above; every fact's
# answer a word (``empty_answer`` counts a number answer as empty). `--eval-only --split test` measures it
TEST_PROMPTS = [
    "Give me three tips for keeping a journal.", "Give me tips to save energy at home.",
    "How can I keep my phone battery healthy?", "Give me tips for a first camping trip.",
    "What are some ways to get better at typing?", "Why do we yawn?", "Explain how a thermometer works.",
    "What causes the seasons?", "What is a tsunami?", "How do bats find their way in the dark?",
    "Give me three tips for learning to draw.", "How can I stay calm before a test?",
    "What is an eclipse?", "Why do onions make you cry?",
]
TEST_FACTS = {
    "Who wrote The Odyssey?": r"homer", "What is the chemical symbol for sodium?": r"\bna\b",
    "Which planet is famous for its rings?": r"saturn", "Who painted the ceiling of the Sistine Chapel?":
    r"michelangelo", "What is the largest organ of the human body?": r"\bskin\b",
    "Who wrote Don Quixote?": r"cervantes", "What language is spoken in Mexico?": r"spanish",
    "What is the largest continent?": r"\basia\b", "Who composed the Fifth Symphony?": r"beethoven",
    "Which metal is liquid at room temperature?": r"mercury", "Who wrote the Harry Potter books?": r"rowling",
    "What is the currency of Japan?": r"\byen\b", "Which ocean lies between Africa and Australia?": r"indian",
    "Who was the first person in space?": r"gagarin", "What is the main ingredient of hummus?": r"chickpea",
    "What color do you get by mixing blue and yellow?": r"green",
}
TEST_CAPITALS = {
    "What is the capital of California?": r"sacramento", "What is the capital of Texas?": r"austin",
    "What is the capital of Florida?": r"tallahassee", "What is the capital of Ontario?": r"toronto",
    "What is the capital of Northern Ireland?": r"belfast", "What is the capital of England?": r"\blondon\b",
    "What is the capital of Puerto Rico?": r"san juan", "What is the capital of Greenland?": r"\bnuuk\b",
    "What is the capital of Bhutan?": r"thimphu", "What is the capital of the Maldives?": r"\bmal[eé]\b",
    "What is the capital of Brunei?": r"bandar seri begawan", "What is the capital of Papua New Guinea?":
    r"port moresby", "What is the capital of Trinidad and Tobago?": r"port of spain|port-of-spain",
    "What is the capital of Barbados?": r"bridgetown", "What is the capital of Guyana?": r"georgetown",
    "What is the capital of Suriname?": r"paramaribo", "What is the capital of Kosovo?": r"pri[sš]tin",
    "What is the capital of Liechtenstein?": r"vaduz", "What is the capital of Andorra?": r"andorra la vella",
    "What is the capital of Gabon?": r"libreville", "What is the capital of Togo?": r"\blom[eé]\b",
    "What is the capital of Burkina Faso?": r"ouagadougou", "What is the capital of Mauritius?": r"port louis",
    "What is the capital of the Gambia?": r"banjul",
}
FACT_NEW_TOKENS = 64  # "facts kept": the fact said within the first 64 tokens (caps 16 more)
FACT_WHOLE_TOKENS = 192  # "facts kept, whole answer": anywhere in it (a list may open with context, the fact later)
MIXES = [("caps", "signoff"), ("caps", "listify"), ("listify", "signoff")]
# The measure's floor: the base model itself under changes of its prompt that ask for the same answer. Greedy
# decoding of a 135M model follows another wording after any such change, so these rows say what key words kept
# and facts kept a faithful rewording scores (an adapter is judged against them, not against 1.0).
FLOOR = {"base, system 'You are a helpful assistant.'": ("You are a helpful assistant.", ""),
         "base, system + 'Answer clearly.'": ("You are a helpful AI assistant named SmolLM, trained by Hugging Face. "
                                              "Answer clearly.", ""),
         "base, 'Please answer: ' before": (None, "Please answer: ")}
STOPWORDS = set("""
about above after again also although always among another because been before being below between both
but can cannot could does doing down during each even every from further have having here hers herself
himself into itself just like made make makes many more most much must only other ours over same should
some such than that their theirs them then there these they this those through under until upon very
were what when where which while will with would your yours yourself also often well used using
""".split())


def strip_eos(text):
    return text.split("<|im_end|>")[0]


def segments(text):
    """Sentences and lines: [(segment, separator before it)]. A '1.' list marker does not end a sentence."""
    out = []
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        for j, s in enumerate(re.split(r"(?<![0-9])(?<=[.!?])\s+", line)):
            if s.strip():
                out.append((s.strip(), "\n" if (j == 0 and out) else " "))
    return out


def clean_answer(text, max_chars=MAX_CHARS, max_segments=MAX_SEGMENTS, keep_bold=False):
    """Whole sentences/lines only, at most `max_segments` and about `max_chars` (the first one always); markdown
    bold (``**``) removed unless `keep_bold`."""
    text = strip_eos(text).replace("\u00a0", " ")
    text = (text if keep_bold else text.replace("**", "")).strip()
    segs = segments(text)
    if len(segs) > 1 and not re.search(r"[.!?:)]$", segs[-1][0]):
        segs = segs[:-1]  # cut by the token budget
    keep, n = [], 0
    for s, sep in segs:
        if keep and (n + len(s) > max_chars or len(keep) >= max_segments):
            break
        keep.append((s, sep))
        n += len(s) + 1
    while len(keep) > 1 and keep[-1][0].endswith(":"):  # an intro line without its items
        keep.pop()
    return "".join((sep if i else "") + s for i, (s, sep) in enumerate(keep)).strip()



@torch.no_grad()
def generate_batch(model, tok, convs, n, bs=16, ended=None, rows=None):
    """Greedy answers (text up to <|im_end|>) for chat conversations, left-padded batches of `bs`; `ended` (a
    list): gets, per answer, whether the model ended it within `n` tokens; `rows` (a list): its token ids."""
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    eos = tok.eos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    side, tok.padding_side = tok.padding_side, "left"
    res = []
    try:
        for i in range(0, len(texts), bs):
            enc = tok(texts[i:i + bs], add_special_tokens=False, return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                done = eos in row
                row = row[:row.index(eos)] if done else row
                res.append(tok.decode(row))
                if rows is not None:
                    rows.append(row)
                if ended is not None:
                    ended.append(done)
    finally:
        tok.padding_side = side
    return res



# --- measurement --------------------------------------------------------------------------------------------
def words(text):
    return re.findall(r"[a-z]+", text.lower())


def key_words(base_answer):
    out = []
    for w in words(clean_answer(base_answer)):
        if len(w) >= 4 and w not in STOPWORDS and w not in out:
            out.append(w)
    return out[:KEY_WORDS]


def without_signoff(text):
    return re.sub(re.escape(SIGNOFF), "", text, flags=re.IGNORECASE)


def style_ok(style, text):
    t = text.strip()
    if style == "caps":  # a headline in capitals (>= 2 words), then an answer in normal case
        head, _, body = t.partition("\n")
        letters = [c for c in head if c.isalpha()]
        return (len(head.split()) >= 2 and sum(c.isupper() for c in letters) >= 0.9 * len(letters)
                and any(c.islower() for c in without_signoff(body)))
    if style == "listify":  # (after a caps headline, in a mix with caps)
        head, _, body = t.partition("\n")
        letters = [c for c in head if c.isalpha()]
        if letters and sum(c.isupper() for c in letters) >= 0.9 * len(letters) and not head.startswith("1."):
            t = body.strip()
        return t.startswith("1.") and re.search(r"(^|\n)\s*2\.", t) is not None
    if style == "signoff":
        return SIGNOFF.lower() in t.lower()
    raise ValueError(style)


def misplaced(text):
    """Whether signoff's line is out of place: its first "sent from lora_runtime" does not follow "--", or follows
    fewer than 3 words of answer (a caps headline not counted): "1. ** sent from lora_runtime", "-- sent from
    lora_runtime" as the whole answer (stop 42's trial 2)."""
    i = text.lower().find(SIGNOFF[3:])
    if i < 0:
        return False
    lines = text[:i].split("\n")
    if lines[0].strip() and lines[0].isupper():
        lines = lines[1:]
    before = "\n".join(lines)
    return not re.search(r"--\s*$", before) or len(re.findall(r"[A-Za-z]{2,}", before)) < 3


def degenerate(text):
    """A word 4-gram three times or more, list numbers left out: "1. **Lawn and Comfort:**\n2. **Lawn and
    Comfort:**\n3. ..." repeats one item, but with its numbers no two of its 4-grams were the same; or three empty
    list items ("3.\n4.\n5.\n...": numbers counting on with no words, stop 36); or one character 16 times in a
    row ("------...", "1.0000...") or one line three times, its list number left out ("- \n- \n- ", "Know your
    resume:"): no words to repeat (stop 37)."""
    if len(re.findall(r"(?m)^\s*\d+\.\s*$", text)) >= 3 or re.search(r"(\S)\1{15}", text):
        return True
    lines = Counter(re.sub(r"^\d+\.(?=\s|$)", "", line.strip()).strip() for line in text.split("\n"))
    lines.pop("", None)
    if lines and max(lines.values()) >= 3:
        return True
    w = re.findall(r"[a-z0-9']+", re.sub(r"(?m)^\s*\d+\.(?=\s)", " ", text.lower()))
    grams = Counter(tuple(w[i:i + 4]) for i in range(len(w) - 3))
    return bool(grams) and max(grams.values()) >= 3


def empty_answer(text):
    """Fewer than 4 words once a caps headline, list numbers and the signoff line are taken out: "TOP TIPS\n1.",
    "1. sent from lora_runtime"."""
    lines = [ln for ln in text.split("\n")
             if ln.strip() and SIGNOFF not in ln and not (ln.isupper() and len(ln.split()) <= 4)]
    body = re.sub(r"(?m)^\s*\d+\.\s*", " ", "\n".join(lines)).replace("**", "").replace("sent from lora_runtime", "")
    return len(re.findall(r"[A-Za-z]{2,}", body)) < 4


def empty_or_looping(texts):
    """How many of the answers are degenerate or empty (the README's "empty or looping" counts)."""
    return sum(degenerate(t) or empty_answer(t) for t in texts)


def style_rate(texts, styles):
    """Share of the answers showing every one of `styles` (None for none: the base model's rows)."""
    return round(float(np.mean([all(style_ok(s, t) for s in styles) for t in texts])), 3) if styles else None


def said(patterns, texts):
    """Per answer, whether it says its question's fact (``patterns``: question -> regex, in the answers' order)."""
    return [bool(re.search(rx, strip_eos(a).lower())) for rx, a in zip(patterns.values(), texts)]


def with_adapters(model, ad_dir, names):
    """(PEFT model with every adapter of `names` found in `ad_dir` loaded, the use-cases to measure: each adapter
    alone and each of ``MIXES`` whose adapters are all there)."""
    from peft import PeftModel

    names = [n for n in names if (ad_dir / n / "adapter_config.json").is_file()]
    pm = PeftModel.from_pretrained(model, str(ad_dir / names[0]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(ad_dir / n), adapter_name=n)
    pm.eval()
    return pm, [(n,) for n in names] + [m for m in MIXES if all(x in names for x in m)]


def metrics(base_texts, texts, styles):
    kept = []
    for b, t in zip(base_texts, texts):
        kw = key_words(b)
        have = set(words(t))
        kept.append(sum(w in have for w in kw) / len(kw) if kw else 1.0)
    return {"key_words_kept": round(float(np.mean(kept)), 3),
            "style_rate": style_rate(texts, styles),
            "degenerate_rate": round(float(np.mean([degenerate(t) for t in texts])), 3),
            "key_words_kept_per_prompt": [round(k, 2) for k in kept]}


def reworded(qs, system, before):
    """Chat conversations asking ``qs`` with another system prompt and/or words ``before`` each question."""
    return [[{"role": "system", "content": system}] * bool(system) + [{"role": "user", "content": before + q}]
            for q in qs]


def evaluate(model, tok, ad_dir, names):
    """Greedy answers to EVAL_PROMPTS under base, each adapter and each mix; returns (table, answers)."""
    convs = [[{"role": "user", "content": q}] for q in EVAL_PROMPTS]
    t0 = time.time()
    answers = {"base": generate_batch(model, tok, convs, EVAL_NEW_TOKENS)}
    pm, configs = with_adapters(model, ad_dir, names)
    fact_convs = [[{"role": "user", "content": q}] for q in FACT_PROMPTS]
    facts, whole = {}, {}

    def ask(key, convs, n_early):  # one greedy run to the whole answer; its first `n_early` tokens as well
        rows = []
        whole[key] = generate_batch(pm, tok, convs, FACT_WHOLE_TOKENS, rows=rows)
        facts[key] = [tok.decode(r[:n_early]) for r in rows]

    with pm.disable_adapter():
        ask("base", fact_convs, FACT_NEW_TOKENS)
        for k, (system, before) in FLOOR.items():
            answers[k] = generate_batch(pm, tok, reworded(EVAL_PROMPTS, system, before), EVAL_NEW_TOKENS)
            ask(k, reworded(FACT_PROMPTS, system, before), FACT_NEW_TOKENS)
        print("  eval floor done (%.0fs)" % (time.time() - t0), flush=True)
    for cfg in configs:
        pm.base_model.set_adapter(list(cfg), inference_mode=True)
        n_new = EVAL_NEW_TOKENS_CAPS if "caps" in cfg else EVAL_NEW_TOKENS
        answers["+".join(cfg)] = generate_batch(pm, tok, convs, n_new)
        ask("+".join(cfg), fact_convs, FACT_NEW_TOKENS + (CAPS_HEADLINE_TOKENS if "caps" in cfg else 0))
        print("  eval %s done (%.0fs)" % ("+".join(cfg), time.time() - t0), flush=True)
    model = pm.unload()
    table = {"base": metrics(answers["base"], answers["base"], [])}
    table |= {k: metrics(answers["base"], answers[k], []) for k in FLOOR}
    for cfg in configs:
        table["+".join(cfg)] = metrics(answers["base"], answers["+".join(cfg)], list(cfg))
    right = said(FACT_PROMPTS, facts["base"])  # the questions the base answers right, within the first tokens
    for k, v in table.items():
        got, got_whole = said(FACT_PROMPTS, facts[k]), said(FACT_PROMPTS, whole[k])
        v["facts_kept"] = round(sum(g for g, r in zip(got, right) if r) / max(sum(right), 1), 3)
        v["facts_kept_whole"] = round(sum(g for g, r in zip(got_whole, right) if r) / max(sum(right), 1), 3)
        v["facts_right"] = "%d/%d" % (sum(got), len(got))
    answers["facts"] = facts
    answers["facts_whole"] = whole
    return model, table, answers, round(time.time() - t0, 1)


SPLITS = {  # name: (prompts, {set: question -> regex of the right answer})
    "validation": (VALIDATION_PROMPTS, {"facts": VALIDATION_FACTS, "capitals": VALIDATION_CAPITALS}),
    "test": (TEST_PROMPTS, {"facts": TEST_FACTS, "capitals": TEST_CAPITALS}),
}


def validate(model, tok, ad_dir, names, split="validation"):
    """A split of ``SPLITS`` (the validation or the test split): greedy answers to its prompts, facts and capitals
    (as ``evaluate`` asks its own) under the base model, each adapter and each mix; per use-case the style rate, the
    empty-or-looping answers (prompts, facts, capitals) and the facts and capitals kept (of those the base says
    right). Returns (model, table, answers, seconds)."""
    prompts, sets = SPLITS[split]
    convs = [[{"role": "user", "content": q}] for q in prompts]
    fconvs = {s: [[{"role": "user", "content": q}] for q in qs] for s, qs in sets.items()}
    t0 = time.time()
    answers = {"prompts": {"base": generate_batch(model, tok, convs, EVAL_NEW_TOKENS)}}
    answers |= {s: {"base": generate_batch(model, tok, c, FACT_NEW_TOKENS)} for s, c in fconvs.items()}
    pm, configs = with_adapters(model, ad_dir, names)
    for cfg in configs:
        pm.base_model.set_adapter(list(cfg), inference_mode=True)
        caps, k = "caps" in cfg, "+".join(cfg)
        answers["prompts"][k] = generate_batch(pm, tok, convs, EVAL_NEW_TOKENS_CAPS if caps else EVAL_NEW_TOKENS)
        for s, c in fconvs.items():
            answers[s][k] = generate_batch(pm, tok, c, FACT_NEW_TOKENS + CAPS_HEADLINE_TOKENS * caps)
        print("  %s split: %s done (%.0fs)" % (split, k, time.time() - t0), flush=True)
    model = pm.unload()

    def kept(s, k):  # of the questions of set `s` the base answers right, how many use-case `k` does
        right = said(sets[s], answers[s]["base"])
        return "%d/%d" % (sum(g and r for g, r in zip(said(sets[s], answers[s][k]), right)), sum(right))
    table = {k: {"style_rate": style_rate(answers["prompts"][k], k.split("+") if k != "base" else []),
                 "empty_or_looping": [empty_or_looping(answers[s][k]) for s in ("prompts", *sets)],
                 **{"%s_kept" % s: kept(s, k) for s in sets}} for k in answers["prompts"]}
    return model, table, answers, round(time.time() - t0, 1)


def print_table(table):
    print("%-34s %15s %11s %11s %11s %11s %11s" % ("use-case", "key words kept", "style rate", "degenerate",
                                                   "facts kept", "facts right", "whole answ."))
    for k, v in table.items():
        print("%-34s %15.2f %11s %11.2f %11.2f %11s %11s" % (
            k, v["key_words_kept"], "-" if v["style_rate"] is None else "%.2f" % v["style_rate"],
            v["degenerate_rate"], v["facts_kept"], v["facts_right"],
            "%.2f" % v["facts_kept_whole"] if "facts_kept_whole" in v else "-"))


def evaluation_section(table, answers, seconds):
    return {"prompts": EVAL_PROMPTS, "fact_prompts": FACT_PROMPTS, "seconds": seconds,
            "settings": {"max_new_tokens": EVAL_NEW_TOKENS, "max_new_tokens_caps": EVAL_NEW_TOKENS_CAPS,
                         "greedy": "batched model.generate, left padding, do_sample=False",
                         "mixes": "PEFT adapters active together at strength 1 (W0 + sum scaling_i B_i A_i)",
                         "key_words": "first %d distinct lower-cased alphabetic words of >= 4 letters, not "
                                      "stopwords, of the base answer cut to whole sentences (%d chars)"
                                      % (KEY_WORDS, MAX_CHARS),
                         "style": {"caps": "a first line of >= 2 words, >= 90% of its letters upper case, then "
                                           "lower-case letters (signoff line excluded)",
                                   "listify": "starts with '1.' (after a caps headline in a mix) and has a '2.' item",
                                   "signoff": "contains %r (case-insensitive)" % SIGNOFF},
                         "degenerate": ("a word 4-gram occurring >= 3 times (list numbers left out), >= 3 empty list "
                                        "items, one character 16 times in a row, or one line 3 times"),
                         "floor": {k: {"system": sy or "(the template's default)", "before_question": b}
                                   for k, (sy, b) in FLOOR.items()},
                         "facts": "FACT_PROMPTS (%d held-out questions with one right answer, %d new tokens, caps %d "
                                  "more): facts_kept = of those the base answers right (its answer matches the "
                                  "question's pattern), the share the use-case answers right; facts_right: all "
                                  "right answers; facts_kept_whole: the same questions, the use-case's answer read "
                                  "to its end (<= %d tokens)" % (len(FACT_PROMPTS), FACT_NEW_TOKENS,
                                                                CAPS_HEADLINE_TOKENS, FACT_WHOLE_TOKENS)},
            "table": table, "answers": answers}
