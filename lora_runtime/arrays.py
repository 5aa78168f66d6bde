"""Arrays from the user's .npz files, read without pickle, every failure one line naming the file; for long numeric
jobs, arrays parked on disk (:class:`Spill`), the C heap's free pages given back and numpy's BLAS threads set."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lora_runtime.errors import InputError


def read_npz(path: str | os.PathLike[str], what: str = "arrays") -> dict[str, np.ndarray]:
    """Every array of an .npz (``np.savez``); ``what`` says what the file was meant to hold, for messages."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise InputError(f"{path}: cannot read {what} ({e.strerror or e})") from e
    if size == 0:
        raise InputError(f"{path}: empty file; expected {what} as an .npz (numpy.savez)")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: cannot read {what} as an .npz ({e})") from e
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise InputError(f"{path}: a single array (.npy); expected {what} as an .npz of named arrays "
                         "(numpy.savez(path, name=array, ...))")
    try:
        with loaded as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: cannot read {what} as an .npz ({e})") from e


class Spill(Mapping[str, list[np.ndarray]]):
    """Arrays parked in a scratch file while a long job runs: appended under a key as they come, read back per key
    (a list, in the order added). Memory holds only where they are; :meth:`close` removes the file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._f = open(self.path, "w+b")  # closed by close()
        self._where: dict[str, list[tuple[int, tuple[int, ...], np.dtype]]] = {}

    def add(self, key: str, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array)
        self._where.setdefault(key, []).append((self._f.tell(), a.shape, a.dtype))
        self._f.write(a.tobytes())

    def __getitem__(self, key: str) -> list[np.ndarray]:
        self._f.flush()
        fd = self._f.fileno()
        return [np.frombuffer(os.pread(fd, int(np.prod(shape)) * dtype.itemsize, offset), dtype).reshape(shape)
                for offset, shape, dtype in self._where[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        self._f.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def give_back_memory(collect: bool = True) -> None:
    """Collect garbage now (an ONNX Runtime session held in a reference cycle, e.g. by a runtime's locks, would wait
    for the collector) and return the free pages of the C heap to the OS (glibc's ``malloc_trim``; elsewhere only
    the collection). Blocks below glibc's mmap threshold, which it raises as big blocks are freed, stay in the
    process when freed: after a session goes, hundreds of MB of its weights would still count in a long job's RSS.
    ``collect=False``: only the trim (milliseconds), for loops that free big arrays as they go."""
    if collect:
        gc.collect()
    c = libc()
    if c is not None and hasattr(c, "malloc_trim"):  # glibc's
        c.malloc_trim(0)


@functools.cache
def libc():  # noqa: ANN201  (the C library as a ctypes.CDLL with errno, or None; looked up once: find_library runs ldconfig)
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


@contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """numpy's OpenBLAS on ``n`` threads inside the block (restored after; a no-op for another BLAS). Measured on
    2 shared cores: GPTQ's factorizations and row updates and calibration's Gram products, thousands of small and
    medium BLAS calls, ran 2-7x faster on one thread than on two (the threads' hand-offs cost more than the
    second core gives back, and ONNX Runtime's own threads are idle while numpy works)."""
    calls = _openblas_threads()
    if calls is None:
        yield
        return
    get, set_ = calls
    before = get()
    set_(n)
    try:
        yield
    finally:
        set_(before)


def _openblas_threads() -> tuple | None:
    """The get/set thread-count functions of the OpenBLAS numpy ships with, or None."""
    here = Path(np.__file__).parent
    for lib in sorted([*here.parent.glob("numpy.libs/*openblas*"), *here.glob(".dylibs/*openblas*")]):
        try:
            dll = ctypes.CDLL(str(lib))
        except OSError:
            continue
        for prefix in ("scipy_openblas_", "openblas_"):
            for suffix in ("64_", ""):
                get = getattr(dll, f"{prefix}get_num_threads{suffix}", None)
                set_ = getattr(dll, f"{prefix}set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    set_.argtypes = [ctypes.c_int]
                    return get, set_
    return None
