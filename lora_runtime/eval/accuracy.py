"""Accuracy of a bundle: its outputs against a reference's, per use-case, on the same inputs.

Inputs are the user's (``sample_inputs``), held-out calibration samples, or synthesized from the graph's
input types: token ids below 32 for int64 inputs (ones for inputs named like masks), standard normal
for floats. The first output is what is compared (the logits; an LLM's other outputs are its KV caches,
whose error is intermediate: it reaches the logits of the next step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from lora_runtime.arrays import Spill
from lora_runtime.bundle import Bundle
from lora_runtime.errors import InputError
from lora_runtime.metrics import sqnr_db, sqnr_from
from lora_runtime.models.llama import SEQLENS_K, TOTAL_LENGTH
from lora_runtime.runtime.session import make_session, run_use_case

Outputs = Mapping[str, np.ndarray]


def synthesize_inputs(session: ort.InferenceSession, reserved: set[str], seed: int = 0,
                      seq_len: int = 16) -> dict[str, np.ndarray]:
    """Seeded inputs for a graph's non-LoRA inputs; dynamic dims become 1 (first) or ``seq_len``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        if i.name in reserved:
            continue
        shape = [d if isinstance(d, int) and d > 0 else (1 if j == 0 else seq_len) for j, d in enumerate(i.shape)]
        ints = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
        floats = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        if i.type in ints:
            feeds[i.name] = (np.ones(shape, ints[i.type]) if "mask" in i.name
                             else rng.integers(0, 32, size=shape).astype(ints[i.type]))
        elif i.type in floats:  # a float16 base's own inputs (pixel values of a half ViT) are float16
            feeds[i.name] = rng.standard_normal(shape).astype(floats[i.type])
        else:
            raise InputError(f"cannot synthesize input {i.name!r} of type {i.type}; pass sample inputs")
    if SEQLENS_K in feeds and TOTAL_LENGTH in feeds:  # GroupQueryAttention's lengths: the cache given, then the tokens
        past = next((v.shape[2] for k, v in feeds.items() if k.startswith("past_key.")), 0)
        total = past + feeds["input_ids"].shape[1]
        feeds[SEQLENS_K] = np.array([total - 1], np.int32)
        feeds[TOTAL_LENGTH] = np.array(total, np.int32)
    return feeds


def measuring_options() -> ort.SessionOptions:
    """Options of the sessions a compile measures with: ONNX Runtime's worker threads sleep between runs instead of
    spinning (numpy works between them, and on a shared machine spinning threads take the cores others need)."""
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def run_all(bundle: Bundle, use_cases: Sequence[str], samples: Sequence[Mapping[str, np.ndarray]], *,
            session: ort.InferenceSession | None = None) -> dict[str, list[dict[str, np.ndarray]]]:
    """Every sample under every use-case, through one session (``session``, or one made here)."""
    session = session or make_session(bundle)
    return {u: [run_use_case(bundle, u, s, session=session) for s in samples] for u in use_cases}


class LogitsScore:
    """SQNR and argmax agreement of the first output, accumulated one run at a time: the same numbers as
    :func:`logits_sqnr` and :func:`logits_agreement` on the whole lists, without holding them."""

    def __init__(self) -> None:
        self.signal = self.noise = 0.0
        self.same = self.positions = 0

    def add(self, reference: np.ndarray, test: np.ndarray) -> None:
        ref = np.asarray(reference, np.float64)
        self.signal += float(np.sum(ref ** 2))
        self.noise += float(np.sum((ref - np.asarray(test, np.float64)) ** 2))
        same = np.argmax(reference, -1) == np.argmax(test, -1)
        self.same += int(np.count_nonzero(same))
        self.positions += same.size

    @property
    def sqnr_db(self) -> float:
        return sqnr_from(self.signal, self.noise)

    @property
    def agreement(self) -> float:
        return self.same / self.positions if self.positions else float("nan")


def _scored(reference: Sequence[Outputs], test: Sequence[Outputs]) -> LogitsScore:
    key = next(iter(reference[0]))
    score = LogitsScore()
    for r, t in zip(reference, test, strict=True):
        score.add(r[key], t[key])
    return score


def logits_sqnr(reference: Sequence[Outputs], test: Sequence[Outputs]) -> float:
    """SQNR of the first output over all samples together."""
    return _scored(reference, test).sqnr_db


def logits_agreement(reference: Sequence[Outputs], test: Sequence[Outputs]) -> float:
    """Share of positions whose argmax of the first output agrees."""
    return _scored(reference, test).agreement


class FirstOutputs(Mapping[str, list[dict[str, np.ndarray]]]):
    """Per use-case, the first output (``key``) of each run, parked in a :class:`Spill` and read back on access:
    what :func:`run_all` gives when only the first output is compared, in no memory meanwhile."""

    def __init__(self, spill: Spill, key: str) -> None:
        self.spill, self.key = spill, key

    def __getitem__(self, use_case: str) -> list[dict[str, np.ndarray]]:
        return [{self.key: a} for a in self.spill[use_case]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.spill)

    def __len__(self) -> int:
        return len(self.spill)


def park_first_outputs(bundle: Bundle, use_cases: Sequence[str], samples: Sequence[Mapping[str, np.ndarray]],
                       session: ort.InferenceSession, spill: Spill, step: Callable[[str], None] | None = None
                       ) -> FirstOutputs:
    """Every sample under every use-case (as :func:`run_all`), the first output of each parked in ``spill``;
    ``step`` is told the use-case after each run."""
    key = session.get_outputs()[0].name
    for u in use_cases:
        for s in samples:
            spill.add(u, run_use_case(bundle, u, s, session=session)[key])
            if step:
                step(u)
    return FirstOutputs(spill, key)


def score_against(bundle: Bundle, use_cases: Sequence[str], samples: Sequence[Mapping[str, np.ndarray]],
                  session: ort.InferenceSession, reference: Mapping[str, Sequence[Outputs]],
                  step: Callable[[str], None] | None = None) -> dict[str, LogitsScore]:
    """Per use-case, ``bundle``'s first output on ``samples`` scored against ``reference`` (as :func:`run_all`
    gives it), one run at a time; ``step`` is told the use-case after each run."""
    out = {}
    for u in use_cases:
        ref = reference[u]
        key = next(iter(ref[0]))
        score = LogitsScore()
        for r, s in zip(ref, samples, strict=True):
            score.add(r[key], run_use_case(bundle, u, s, session=session)[key])
            if step:
                step(u)
        out[u] = score
    return out


def compare_bundles(test: Bundle, reference: Bundle,
                    inputs: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
    """SQNR (dB) of ``test`` against ``reference`` for every use-case, on the same inputs (the worst output)."""
    t_sess, r_sess = make_session(test), make_session(reference)
    feeds = dict(inputs) if inputs is not None else synthesize_inputs(t_sess, {s.name for s in test.manifest.slots})
    out = {}
    for u in test.manifest.use_cases:
        a = run_use_case(test, u.name, feeds, session=t_sess)
        b = run_use_case(reference, u.name, feeds, session=r_sess)
        out[u.name] = min(sqnr_db(b[k], a[k]) for k in b)
    return out
