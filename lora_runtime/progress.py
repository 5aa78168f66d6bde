"""A small progress bar on stderr: quiet for work under a second, one line per update otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``with Progress("compile", total=5) as p: p.step("resolving points")``."""

    def __init__(self, label: str, total: int, *, stream: TextIO | None = None, enabled: bool = True,
                 delay_s: float = 1.0) -> None:
        self.label, self.total, self.done = label, max(total, 1), 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.delay_s = delay_s
        self.t0 = time.perf_counter()
        self._shown = False
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def step(self, what: str = "", n: int = 1) -> None:
        self.done += n
        self.total = max(self.total, self.done)  # work discovered on the way (calibration samples) grows it
        elapsed = time.perf_counter() - self.t0
        if not self.enabled or (elapsed < self.delay_s and self.done < self.total and not self._shown):
            return
        if elapsed < self.delay_s and not self._shown:
            return  # finished quickly: say nothing
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
