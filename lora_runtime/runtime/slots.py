"""Slot sets: the resident buffers ("RAM") a session reads its LoRA tensors from.

A slot set is one contiguous arena whose byte layout is the data section of a patch file, with
every patched slot a numpy view (and an ``OrtValue`` sharing that memory) into it::

    patch file:  [8-byte length][JSON header][A_0 | B_0 | A_1 | B_1 | ... | lora_scaling]
    arena:                                   [A_0 | B_0 | A_1 | B_1 | ... | lora_scaling]
                                              ^ views, bound to the session as OrtValues

so filling a set from storage is one ``readinto`` and costs what reading the file costs.
A set is never written while a run reads it: the runtime counts readers per set.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from lora_runtime.errors import BundleError, TensorFileError
from lora_runtime.manifest import Slot
from lora_runtime.tensorfile import TensorFile, read_header


@dataclass(frozen=True)
class Layout:
    """Where every patched slot sits in a patch's data section (identical for all patches of a bundle)."""

    slots: tuple[Slot, ...]
    offsets: tuple[int, ...]  # byte offset of each slot in the data section
    nbytes: int

    @classmethod
    def of(cls, slots: list[Slot]) -> Layout:
        offsets, n = [], 0
        for s in slots:
            offsets.append(n)
            n += s.nbytes
        return cls(tuple(slots), tuple(offsets), n)

    def check(self, tf: TensorFile) -> None:
        """The file must hold exactly these slots at these offsets, and nothing else."""
        got = [(e.name, e.shape, e.begin - tf.data_start) for e in tf.entries.values()]
        want = [(s.name, s.shape, o) for s, o in zip(self.slots, self.offsets)]
        if got != want or tf.file_size - tf.data_start != self.nbytes:
            raise BundleError(f"{tf.path}: patch layout does not match the bundle's slot table")


class PatchSource:
    """A patch file ("ROM") whose header matches the layout, held open: the runtime reads the file it validated
    even after a ``compile --force`` replaced the bundle (the old inode lives as long as the descriptor)."""

    def __init__(self, header: TensorFile, layout: Layout) -> None:
        """``header``: the patch's header as :func:`lora_runtime.bundle.open_bundle` validated it."""
        layout.check(header)
        self.path = header.path
        self.data_start, self.stamp = header.data_start, header.stamp
        self.fd: int | None = None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise BundleError(f"{self.path}: cannot open the patch ({e.strerror or e}); was the bundle replaced "
                              "or removed? open it again") from e
        st = os.fstat(fd)
        if header.stamp != (-1, -1, -1) and (st.st_ino, st.st_size, st.st_mtime_ns) != header.stamp:
            os.close(fd)
            raise BundleError(f"{self.path}: changed after the bundle was validated (replaced by a compile --force?); "
                              "open the bundle again")
        self.fd = fd

    def __del__(self) -> None:
        fd, self.fd = getattr(self, "fd", None), None
        if fd is not None:
            os.close(fd)

    def revalidate(self, layout: Layout) -> None:
        """Parse and check the header again only if the file was changed in place since it was checked."""
        st = os.fstat(self.fd)
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self.stamp:
            return
        pinned = f"/proc/self/fd/{self.fd}"  # the file this descriptor holds, whatever the path names now
        try:
            tf = read_header(pinned if os.path.isdir("/proc/self/fd") else self.path)
        except TensorFileError as e:
            raise BundleError(str(e).replace(pinned, str(self.path))) from e
        try:
            layout.check(tf)
        except BundleError as e:
            raise BundleError(str(e).replace(pinned, str(self.path))) from None
        self.data_start, self.stamp = tf.data_start, stamp


class SlotSet:
    """One arena of slot values and the OrtValues bound to the session."""

    def __init__(self, layout: Layout, holds: str | tuple[str | None, ...] | None = None, *,
                 in_graph: bool = False) -> None:
        """``in_graph``: the values are the graph's own initializers (a v3 group on the CPU): no arena, nothing to
        bind or fill; the set still counts its readers and its bytes."""
        self.layout = layout
        self.in_graph = in_graph
        self.arena = np.empty(0 if in_graph else layout.nbytes, np.uint8)
        self.views: dict[str, np.ndarray] = {}
        self.values: dict[str, ort.OrtValue] = {}
        for s, o in zip(() if in_graph else layout.slots, layout.offsets):
            view = self.arena[o:o + s.nbytes].view(s.numpy_dtype).reshape(s.shape)
            self.views[s.name] = view
            self.values[s.name] = ort.OrtValue.ortvalue_from_numpy(view)
        # the adapter (v1/v2) or "group" (v3) whose values the arena holds (saved modules: the source of each, a
        # tuple); None: unknown
        self.holds = holds
        self.readers = 0  # runs in flight on this set (guarded by the runtime's lock)

    @classmethod
    def filled(cls, layout: Layout, patch: TensorFile, holds: str | tuple[str | None, ...] | None = None) -> SlotSet:
        """A new set holding the values of the patch whose validated header is ``patch``."""
        s = cls(layout, holds)
        s.fill_from(PatchSource(patch, layout))
        return s

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def fill_from(self, source: PatchSource, hook: Callable[[str], None] | None = None, start: int = 0,
                  stop: int | None = None) -> int:
        """Copy a patch file's data section (or its bytes [start, stop), the same bytes of the arena) into the arena
        with one positioned read.

        The header was validated when the source was opened; if the file changed since (inode, size
        or mtime differ), it is validated again before a byte is copied.
        """
        if self.in_graph:
            raise ValueError("a set held by the graph's initializers is never filled")
        hook = hook or (lambda _step: None)
        path, fd = source.path, source.fd
        stop = self.nbytes if stop is None else stop
        try:
            hook("open")
            hook("read_header")
            source.revalidate(self.layout)
            hook("read")
            view = memoryview(self.arena)
            done = start
            while done < stop:
                n = os.preadv(fd, [view[done:stop]], source.data_start + done)
                if not n:
                    raise BundleError(f"{path}: ended after {done} of {stop} patch bytes")
                done += n
        except TensorFileError as e:
            raise BundleError(str(e)) from e
        except OSError as e:
            raise BundleError(f"{path}: I/O error while copying the patch ({e.strerror or e})") from e
        hook("filled")
        return done - start
