"""Timing: p50/p99 of callables, taken alone or round-robin, and the physical limits a switch is held against.

Rows are ``Row(name, p50_us, p99_us, runs, bytes)``. Run rows are taken round-robin in blocks so slow drift hits
them alike; the disk rows drop the file's pages (``posix_fadvise DONTNEED``) and take the cold switch and the
plain read in turns on the same file, so both see the same storage.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lora_runtime.runtime.switcher import Runtime


@dataclass(frozen=True)
class Row:
    name: str
    p50_us: float | None
    p99_us: float | None
    runs: int
    bytes: int | None


def measure(name: str, fn: Callable[[], object], runs: int, *, warmup: int = 2,
            setup: Callable[[], object] | None = None, nbytes: int | None = None) -> Row:
    """p50/p99 of ``fn`` over ``runs`` calls; ``setup`` runs before each call, untimed."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = np.empty(runs)
    for i in range(runs):
        if setup:
            setup()
        t = time.perf_counter_ns()
        fn()
        times[i] = time.perf_counter_ns() - t
    return Row(name, float(np.percentile(times, 50) / 1e3), float(np.percentile(times, 99) / 1e3), runs, nbytes)


def measure_interleaved(fns: dict[str, Callable[[], object]], runs: int, block: int = 5) -> list[Row]:
    """Like :func:`measure` for several callables, in round-robin blocks so slow drift hits all alike.

    Each block starts with an untimed call: ONNX Runtime's worker threads of the session that ran
    before keep spinning for a moment after its run, and would be billed to whoever runs next.
    """
    times: dict[str, list[int]] = {name: [] for name in fns}
    while min(len(t) for t in times.values()) < runs:
        for name, fn in fns.items():
            fn()
            for _ in range(block):
                t = time.perf_counter_ns()
                fn()
                times[name].append(time.perf_counter_ns() - t)
    return [Row(name, float(np.percentile(t, 50) / 1e3), float(np.percentile(t, 99) / 1e3), len(t), None)
            for name, t in times.items()]


def drop_pages(path: Path) -> None:
    """Evict a file from the page cache (clean pages only; ours are)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_file(path: Path, buf: bytearray) -> None:
    with open(path, "rb", buffering=0) as f:
        f.readinto(buf)


def disk_rows(cycle: Callable[[], object], nxt: Callable[[], Path], nbytes: int, runs: int,
              warmup: int = 2) -> list[Row]:
    """``cold_switch_disk`` and ``file_read_disk``, taken in turns on the same file: each round drops the
    pages of the patch the next switch reads, reads it plainly, drops them again, then switches. Storage
    on these machines drifts a lot; in turns, both rows see the same device."""
    switch, read = [], []
    for i in range(runs + warmup):
        p = nxt()
        buf = bytearray(p.stat().st_size)
        drop_pages(p)
        t = time.perf_counter_ns()
        read_file(p, buf)
        r = time.perf_counter_ns() - t
        drop_pages(p)
        t = time.perf_counter_ns()
        cycle()
        w = time.perf_counter_ns() - t
        if i >= warmup:
            read.append(r)
            switch.append(w)
    return [Row(name, float(np.percentile(v, 50) / 1e3), float(np.percentile(v, 99) / 1e3), runs, size)
            for name, v, size in (("cold_switch_disk", switch, nbytes), ("file_read_disk", read, len(buf)))]


def limit_rows(patch: Path, nbytes: int, runs: int, disk_runs: int | None = None) -> list[Row]:
    """The physical limits for a patch: memcpy of its slot bytes, and reads of its file.

    ``file_read`` reads into one buffer again and again, which the CPU caches favour; a double-buffered
    switch must write the buffer it did not write last time, so ``file_read_2buf`` alternates between
    two buffers: the honest limit for a cold switch.
    """
    src, dst = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
    size = patch.stat().st_size
    bufs = [bytearray(size), bytearray(size)]
    turn = [0]

    def read_alternating() -> None:
        turn[0] ^= 1
        read_file(patch, bufs[turn[0]])

    rows = [measure("memcpy", lambda: np.copyto(dst, src), runs, nbytes=nbytes),
            measure("file_read", lambda: read_file(patch, bufs[0]), runs, nbytes=size),
            measure("file_read_2buf", read_alternating, runs, nbytes=size)]
    if disk_runs:  # without a cold switch to pair it with (see disk_rows)
        rows.append(measure("file_read_disk", lambda: read_file(patch, bufs[0]), disk_runs,
                            setup=lambda: drop_pages(patch), nbytes=size))
    return rows


def alternate(rt: Runtime, names: list[str], expect: str | None = None) -> Callable[[], object]:
    """A callable that switches to the next use-case in turn (and checks the switch kind)."""
    state = {"i": 0}

    def step() -> None:
        state["i"] = (state["i"] + 1) % len(names)
        report = rt.switch(names[state["i"]])
        if expect and report.kind != expect:
            raise RuntimeError(f"bench expected a {expect} switch to {names[state['i']]}, got {report.kind}")

    return step


def next_patch(rt: Runtime, names: list[str]) -> Callable[[], Path]:
    """The patch the next ``_alternate`` step will read (to drop its pages first)."""
    def nxt() -> Path:
        current = names.index(rt.current) if rt.current in names else -1
        name = names[(current + 1) % len(names)]
        return rt.bundle.file(rt.manifest.adapter(name).patch or "")
    return nxt


def rss() -> int:
    """This process's resident memory now, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def quiet_options() -> ort.SessionOptions:
    """Sessions for interleaved rows, without spinning threads: ONNX Runtime's intra-op threads spin after each
    run, and an idle session's spinning stole the 2 cores from whichever session ran next. Measured on the AMD EPYC
    machine, three sessions interleaved in one process: GenAI's int4 decode 14.5 ms next to two spinning sessions of
    ours, 6.4-8.4 ms next to quiet ones, 6.8-7.2 ms alone. GenAI's sessions cannot be made quiet (its config takes
    no session config entries), so ours still run next to its spinning threads: our rows read slow, never fast."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so
