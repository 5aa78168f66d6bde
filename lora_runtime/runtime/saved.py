"""Saved-module sets: the resident values of the modules adapters save whole (PEFT's ``modules_to_save``).

A use-case's saved modules are a combination of sources, one per saved module: the one adapter of the use-case
that saves it, or the base (``Manifest.saved_sources``). Their slots live in arenas laid out as a saved-module
patch's data section, separate from the LoRA slot sets, so the LoRA weights (v3: the group) never move when only
a head changes::

    arena:   [<m_0>.modules_to_save.weight | <m_0>...bias | <m_1>...weight | ...]     one byte range per module
    patches: patches/saved/_base.safetensors (the base's values), patches/saved/<adapter>.safetensors (an
             adapter's copies, the base's values elsewhere): one layout, module i's bytes at one offset in every file

Sets, as for the adapters: one per preloaded combination, and two scratch sets. A switch to a combination a set
holds is hot; otherwise the scratch set that no published state uses is refilled, once its last reader is done,
module by module from each module's source (only the modules whose source differs from what the set held), and
published with the rest of the state by the runtime. A failed fill leaves the set marked unknown, never in use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from lora_runtime.bundle import Bundle
from lora_runtime.runtime.slots import Layout, PatchSource, SlotSet

Sources = tuple[str | None, ...]  # per saved module: the adapter whose copy is in force, None for the base's


class SavedSets:
    """The saved modules' slot sets of one runtime; ``lock`` is the runtime's (it guards the readers counts)."""

    def __init__(self, bundle: Bundle, lock: threading.Condition) -> None:
        m = bundle.manifest
        self.layout = Layout.of(m.saved_slots)
        self.lock = lock
        offsets = {s.name: (o, o + s.nbytes) for s, o in zip(self.layout.slots, self.layout.offsets)}
        self.ranges = []  # per saved module: its bytes in the arena (weight, then bias)
        for s in m.saved_modules:
            names = [n for n in (s.weight_slot, s.bias_slot) if n is not None]
            self.ranges.append((offsets[names[0]][0], offsets[names[-1]][1]))
        sources: list[str | None] = [None, *(a.name for a in m.adapters if a.saved_patch)]
        self.sources = {src: PatchSource(bundle.header(m.saved_patch_of(src)), self.layout) for src in sources}
        self.base: Sources = tuple(None for _ in m.saved_modules)
        self.scratch = [SlotSet(self.layout), SlotSet(self.layout)]
        self.resident: dict[Sources, SlotSet] = {}

    @property
    def nbytes(self) -> int:
        with self.lock:
            return sum(s.nbytes for s in [*self.scratch, *self.resident.values()])

    def initial(self) -> SlotSet:
        """The first scratch set holding the base's values: the state before any use-case."""
        first = self.scratch[0]
        first.fill_from(self.sources[None])
        first.holds = self.base
        return first

    def preload(self, want: Sources) -> None:
        if want in self.resident:
            return
        s = SlotSet(self.layout)
        self._fill(s, None, want)
        with self.lock:
            self.resident[want] = s

    def evict(self, want: Sources) -> None:
        with self.lock:
            self.resident.pop(want, None)

    def find_or_fill(self, want: Sources, current: SlotSet,
                     hook: Callable[[str], None] | None = None) -> tuple[SlotSet, int]:
        """A set holding ``want`` and the bytes copied to make it (0: hot). Called under the switch lock."""
        if current.holds == want:
            return current, 0
        with self.lock:
            held = self.resident.get(want) or next((s for s in self.scratch if s.holds == want), None)
        if held is not None:
            return held, 0
        target = next(s for s in self.scratch if s is not current)
        with self.lock:
            while target.readers:  # runs that started on it before the previous switch
                self.lock.wait()
            old, target.holds = target.holds, None  # from here until it is full, its content is unknown
        return target, self._fill(target, old, want, hook)

    def _fill(self, target: SlotSet, old: object, want: Sources, hook: Callable[[str], None] | None = None) -> int:
        moved = 0
        for i, (start, stop) in enumerate(self.ranges):
            if isinstance(old, tuple) and old[i] == want[i]:
                continue  # this module's bytes are already the wanted source's
            moved += target.fill_from(self.sources[want[i]], hook, start, stop)
        target.holds = want
        return moved
