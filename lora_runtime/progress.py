"""A small progress bar on stderr: quiet for work under a second, one line per update otherwise.

Long stages with a known amount of work (import per tensor, calibration per sample and use-case, GPTQ per layer,
ONNX Runtime's reference per use-case) count it with a :class:`Stage`, whose messages carry the real total and an
estimate of the time left: ``GPTQ 57/211 layers, 12 s, ETA 31 s: model.layers.9.mlp.up_proj.weight``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


class Progress:
    """``with Progress("compile", total=5) as p: p.step("resolving points")``; ``total=None``: open-ended work
    (no bar: the elapsed time and what is being done, whose own counts a :class:`Stage` gives)."""

    def __init__(self, label: str, total: int | None, *, stream: TextIO | None = None, enabled: bool = True,
                 delay_s: float = 1.0) -> None:
        self.label, self.total, self.done = label, max(total, 1) if total is not None else None, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.delay_s = delay_s
        self.t0 = time.perf_counter()
        self._shown = False
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def step(self, what: str = "", n: int = 1) -> None:
        self.done += n
        if self.total is not None:
            self.total = max(self.total, self.done)  # work discovered on the way grows it
        elapsed = time.perf_counter() - self.t0
        finished = self.total is not None and self.done >= self.total
        if not self.enabled or (elapsed < self.delay_s and not finished and not self._shown):
            return
        if elapsed < self.delay_s and not self._shown:
            return  # finished quickly: say nothing
        if self.total is None:
            line = f"{self.label} {elapsed:5.1f}s {what}"
        else:
            width = 24
            fill = int(width * self.done / self.total)
            line = f"{self.label} [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {elapsed:5.1f}s {what}"
        if self._tty:
            self.stream.write("\r" + line[:120].ljust(120))
        else:
            self.stream.write(line + "\n")
        self._shown = True
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._shown and self._tty:
            self.stream.write("\n")
            self.stream.flush()


class Stage:
    """A counted stage of a longer job, told through ``say`` (a :class:`Progress`'s ``step``, or any callable):
    each :meth:`step` reports ``<label> <done>/<total> <unit>, <elapsed> s, ETA <left> s[: what]``. The pace is taken
    from the first step on (what came before it, a session to load, is not the work's pace: ``ETA ?`` until the
    second step). With ``work`` (e.g. the weights of all the units, when units differ in size), the ETA follows the
    work done, not the count: an import's first tensor, the embedding, is not 1/273 of it."""

    def __init__(self, say: Callable[[str], None] | None, label: str, total: int, unit: str, *,
                 work: float | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.say = say or (lambda _m: None)
        self.label, self.total, self.unit, self.done = label, total, unit, 0
        self.work, self.work_done = work, 0.0
        self.clock = clock
        self.t0 = clock()
        self._first: tuple[float, float] | None = None  # (time, share done) at the first step

    def step(self, what: str = "", n: int = 1, work: float = 0.0) -> None:
        """``n`` more units done (``what``: the one just done), ``work`` of the stage's ``work`` with them."""
        self.done += n
        self.work_done += work
        if self._first is None:
            self._first = (self.clock(), self.share)
        self.say(self.text(what))

    @property
    def share(self) -> float:
        """How much of the stage is done, 0 to 1."""
        return min(1.0, self.work_done / self.work if self.work else self.done / max(self.total, 1))

    def text(self, what: str = "") -> str:
        now = self.clock()
        share = self.share
        if share >= 1.0:
            eta = "ETA 0 s"
        elif self._first is None or share <= self._first[1]:
            eta = "ETA ?"
        else:
            t1, s1 = self._first
            eta = eta_text((share - s1) / (1.0 - s1), now - t1)
        head = f"{self.label} {self.done}/{self.total} {self.unit}, {now - self.t0:.0f} s, {eta}"
        return f"{head}: {what}" if what else head


def eta_text(share: float, elapsed: float) -> str:
    """``ETA 31 s`` (``ETA 2 min 5 s`` from two minutes on): the time left at the pace so far, ``share`` (0 to 1) of
    the work being done in ``elapsed`` seconds; ``ETA ?`` before any is done."""
    if share <= 0:
        return "ETA ?"
    left = max(0.0, elapsed * (1.0 - min(share, 1.0)) / share)
    if left < 120:
        return f"ETA {left:.0f} s"
    return f"ETA {int(left // 60)} min {left % 60:.0f} s"
