"""Runtime: open a bundle once, switch use-cases in place, run from many threads.

State model (one mechanism for v1, v2 and v3)::

    published state  = (slot set, strength OrtValue, use-case)      immutable; replaced, never edited
    slot sets        = preloaded adapters ("RAM", one each)  +  2 scratch sets for adapters read on demand
    run              = snapshot the state and count itself as a reader of its set (under the lock),
                       bind the set's OrtValues (only when the state changed since this thread's last run)
    hot switch       = the target adapter is already in a set (v3 group, preloaded, or a scratch set
                       that still holds it): publish (that set, new strength). No weight byte moves.
    cold switch      = copy the patch from the bundle ("ROM") into a scratch set no state uses, once
                       its last reader is done, then publish. Runs go on with the old state meanwhile.
    saved modules    = (modules_to_save) a second set in the state, chosen the same way (``runtime.saved``):
                       a switch that changes a saved module's source copies that module only (cold for that
                       part), published with the LoRA set and the strength as one state.

A switch validates everything first (use-case, strengths, patch header against the slot table), and
a failure at any step leaves the published state as it was: the scratch set written is not in use.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lora_runtime.bundle import Bundle, manifest_stamp, open_bundle
from lora_runtime.errors import BundleError, InputError, LoraRuntimeError
from lora_runtime.runtime.bound import Bound, Graph, run_bound
from lora_runtime.runtime.saved import SavedSets, Sources
from lora_runtime.runtime.session import check_feeds, input_specs, make_session, ort_message
from lora_runtime.runtime.slots import Layout, PatchSource, SlotSet
from lora_runtime.staging import path_lock

GROUP = "group"
OPEN_ATTEMPTS = 3


@dataclass(frozen=True)
class SwitchReport:
    """What the last switch did: ``kind`` is "hot" (no weight bytes moved) or "cold"."""

    use_case: str | None
    kind: str
    bytes_moved: int
    seconds: float
    source: str  # "resident" (a set already held it) or "rom" (copied from the bundle's patch file)


@dataclass(frozen=True)
class _State:
    version: int
    slots: SlotSet
    strength: ort.OrtValue  # shares memory with strength_array; never written after publishing
    strength_array: np.ndarray
    strengths: dict[str, float]
    use_case: str | None
    encodings: SlotSet | None = None  # updatable encodings of the use-case (resident, never written)
    saved: SlotSet | None = None  # the saved modules (modules_to_save) of the use-case's adapters


class Runtime:
    """An opened bundle with resident slots. Use :meth:`open`."""

    def __init__(self, bundle: Bundle, session: ort.InferenceSession, preload: Iterable[str] = (),
                 decode: ort.InferenceSession | None = None) -> None:
        self.bundle = bundle
        self.manifest = m = bundle.manifest
        self.session = session
        self.layout = Layout.of(m.patched_slots)
        self._strength_name = next(s.name for s in m.slots if s.kind == "strength")
        # v3 on the CPU: the graph's own initializers hold the group (the compiler wrote them from the group patch,
        # and a v3 switch never changes it), so its LoRA slots are never bound and the set is never filled: ONNX
        # Runtime takes no ~2 inputs per point on every run (SmolLM2 with 3 adapters on 180 points: ~1 ms of a
        # 9-12 ms token) and the weights are in memory once
        group_in_graph = m.generation == "v3" and all(
            s.get_providers() == ["CPUExecutionProvider"] for s in (session, decode) if s is not None)
        reserved = {s.name for s in m.slots}
        # the bundle's graphs (a static-shape LLM bundle: prefill and decode), one slot set bound to both
        self._graphs = [Graph(s, input_specs(s, reserved), [o.name for o in s.get_outputs()])
                        for s in (session, decode) if s is not None]
        self._inputs = self._graphs[0].inputs
        self._lock = threading.Condition()
        self._switch_lock = threading.Lock()
        self._local = threading.local()
        self._resident: dict[str, SlotSet] = {}  # preloaded adapter (or the v3 group) -> its set
        self._scratch: list[SlotSet] = []
        self.fault_hook: Callable[[str], None] | None = None  # tests: called at every step of a cold switch
        self.last_switch: SwitchReport | None = None
        # open_bundle validated every patch header; a switch only re-checks its file stamp.
        if m.generation == "v3":
            self._sources = {GROUP: PatchSource(bundle.header(m.group_patch or ""), self.layout)}
        else:
            self._sources = {a.name: PatchSource(bundle.header(a.patch or ""), self.layout) for a in m.adapters}
        # Updatable encodings are a few scales and zero points per use-case: all resident from the start,
        # so a switch binds its use-case's set, atomically with the weights and the strength.
        self._encodings: dict[str, SlotSet] = {}  # use-case -> its encodings set
        self._union_encodings: SlotSet | None = None  # ad-hoc strengths: calibrated over every use-case
        enc_layout = Layout.of(m.encoding_slots)
        if enc_layout.slots:
            for u in m.use_cases:
                self._encodings[u.name] = SlotSet.filled(enc_layout, bundle.header(u.encodings or ""), u.name)
            self._union_encodings = SlotSet.filled(enc_layout, bundle.header(m.union_encodings or ""), "union")
        # Each use-case's adapter (v3: the group) and strength value, built once: a hot switch allocates nothing.
        self._saved = SavedSets(bundle, self._lock) if m.saved_modules else None
        self._targets = {u.name: (GROUP if m.generation == "v3" else next(iter(u.strengths), None),
                                  self._strength_value(u.strengths), self._encodings.get(u.name),
                                  m.saved_sources(u.strengths))
                         for u in m.use_cases}
        first_adapter = GROUP if m.generation == "v3" else (m.default_adapter or m.adapters[0].name)
        first = SlotSet(self.layout, first_adapter, in_graph=group_in_graph)
        if not first.in_graph:
            first.fill_from(self._sources[first_adapter])
        if m.generation == "v3":
            self._resident[GROUP] = first
        else:
            self._scratch = [first, SlotSet(self.layout)]
        self._state = _State(0, first, *self._strength_value({}), None, self._union_encodings,
                             self._saved.initial() if self._saved is not None else None)
        self.preload(preload)
        if m.use_cases:
            self.switch(m.use_cases[0].name)

    # ---- opening -------------------------------------------------------------------------------------

    @classmethod
    def open(cls, bundle_dir: str | os.PathLike[str], *, preload: Iterable[str] | str = (), device: str = "cpu",
             providers: list[str] | None = None, session_options: ort.SessionOptions | None = None,
             verify_base: bool = False, base: str | os.PathLike[str] | None = None) -> Runtime:
        """Validate the bundle, create the session once, fill the slots, make the first use-case current.

        ``preload``: use-case names whose adapters stay resident (hot switches), or "all".
        ``device``: "cpu" (ONNX Runtime's CPU provider) or "htp" (Qualcomm's HTP through QNN, for a bundle
        compiled with ``--target htp``; switches work the same: slots are bound once, written in place).
        A bundle with a decode graph (``--decode-shape``) gets a session for each graph; :meth:`run` takes the
        one whose input shapes the feeds have, and both read the same resident slots.
        ``verify_base``: also hash the base model's external data (else its size is checked).
        The runtime is pinned to the bundle it validated: it holds the patch files open, so a ``compile --force``
        that replaces the bundle later changes nothing for it (open again to use the new one); a replacement
        while it opens is noticed (the manifest's inode) and the open starts over.
        ``base``: refuse the bundle unless it was compiled from this base model file.
        """
        root = Path(bundle_dir)
        for _ in range(OPEN_ATTEMPTS):  # a compile --force may swap the bundle while it is being opened
            with path_lock(root, exclusive=False):  # a compile --force publishing here waits for this
                stamp = manifest_stamp(root)
                try:
                    bundle = open_bundle(root, verify_base=verify_base, base=base)
                    session = make_session(bundle, device=device, providers=providers,
                                           session_options=session_options)
                    decode = make_session(bundle, device=device, providers=providers, session_options=session_options,
                                          graph="decode") if bundle.manifest.target.decode is not None else None
                    names = bundle.manifest.use_case_names if preload == "all" else list(preload)
                    rt = cls(bundle, session, names, decode)
                except LoraRuntimeError:
                    if manifest_stamp(root) == stamp:
                        raise
                    continue
                except Exception as e:  # ONNX Runtime's own exceptions: a file went away under it, or a broken graph
                    if manifest_stamp(root) == stamp:
                        raise BundleError(f"{root}: ONNX Runtime cannot load the bundle: {str(e).splitlines()[0]}") \
                            from e
                    continue
                if manifest_stamp(root) == stamp:  # nothing was swapped in while it opened: one bundle throughout
                    return rt
        raise BundleError(f"{root}: replaced while it was being opened, {OPEN_ATTEMPTS} times in a row; open it again")

    # ---- what is where -------------------------------------------------------------------------------

    @property
    def use_cases(self) -> list[str]:
        return self.manifest.use_case_names

    @property
    def input_names(self) -> list[str]:
        """The graph inputs a caller feeds (the slots are the runtime's own)."""
        return list(self._inputs)

    @property
    def input_shapes(self) -> list[dict[str, list[int | str | None]]]:
        """Per graph (the main one first, then a decode graph), each input's shape (a name for a free dim)."""
        return [{n: list(a.shape) for n, a in g.inputs.items()} for g in self._graphs]

    @property
    def current(self) -> str | None:
        """The current use-case, or None after :meth:`set_strengths` made an ad-hoc mix current."""
        return self._state.use_case

    @property
    def strengths(self) -> dict[str, float]:
        return dict(self._state.strengths)

    def memory(self) -> dict[str, object]:
        """Resident bytes: scratch sets, preloaded sets (per adapter), encodings sets and the total. (v3 on the CPU:
        the group's bytes are the session's own initializers, counted here as its preloaded set.)"""
        with self._lock:
            preloaded = {k: s.nbytes for k, s in self._resident.items()}
            scratch = sum(s.nbytes for s in self._scratch)
        encodings = sum(s.nbytes for s in [*self._encodings.values(), self._union_encodings] if s is not None)
        saved = self._saved.nbytes if self._saved is not None else 0  # saved modules: scratch and preloaded sets
        return {"patch_bytes": self.layout.nbytes, "scratch_bytes": scratch, "preloaded_bytes": preloaded,
                "encodings_bytes": encodings, "saved_bytes": saved,
                "resident_bytes": scratch + sum(preloaded.values()) + encodings + saved}

    # ---- residency -----------------------------------------------------------------------------------

    def preload(self, use_cases: Iterable[str]) -> None:
        """Keep the adapters (and saved modules) of these use-cases resident, so switching to them moves no weight
        bytes."""
        for name in use_cases:
            self.manifest.use_case(name)  # v3's group is always resident; still reject unknown names
            if self._saved is not None:
                self._saved.preload(self._targets[name][3])
            if self.manifest.generation == "v3":
                continue
            for adapter in self.manifest.use_case(name).strengths:
                if adapter in self._resident:
                    continue
                s = SlotSet(self.layout, adapter)
                s.fill_from(self._sources[adapter])
                with self._lock:
                    self._resident[adapter] = s

    def evict(self, use_cases: Iterable[str]) -> None:
        """Drop resident copies; a set in use stays alive until its last run ends."""
        for name in use_cases:
            self.manifest.use_case(name)
            if self._saved is not None:
                self._saved.evict(self._targets[name][3])
            if self.manifest.generation == "v3":
                continue
            for adapter in self.manifest.use_case(name).strengths:
                with self._lock:
                    self._resident.pop(adapter, None)

    # ---- switching -----------------------------------------------------------------------------------

    def switch(self, use_case: str) -> SwitchReport:
        """Make ``use_case`` current. Hot when its adapter is resident, cold (one patch copy) otherwise."""
        t0 = time.perf_counter()
        target = self._targets.get(use_case)
        if target is None:
            self.manifest.use_case(use_case)  # raises UseCaseError naming the known use-cases
        adapter, strength, encodings, saved = target
        return self._publish(adapter, strength, use_case, t0, encodings, saved)

    def set_strengths(self, strengths: Mapping[str, float]) -> SwitchReport:
        """An ad-hoc mix: v3 any adapters, v1/v2 one adapter (or none: the base model)."""
        t0 = time.perf_counter()
        strengths = dict(strengths)
        value = self._strength_value(strengths)  # validates names, values, and v1/v2's one adapter
        adapter = GROUP if self.manifest.generation == "v3" else next(iter(strengths), None)
        saved = self.manifest.saved_sources(strengths)  # the adapters named (at any strength) bring their modules
        # an ad-hoc mix has no calibration of its own: updatable encodings use the union of all use-cases
        return self._publish(adapter, value, None, t0, self._union_encodings, saved)

    def _strength_value(self, strengths: Mapping[str, float]) -> tuple[ort.OrtValue, np.ndarray, dict[str, float]]:
        arr = self.manifest.strength_value(strengths)
        return ort.OrtValue.ortvalue_from_numpy(arr), arr, dict(strengths)

    def _publish(self, adapter: str | None, strength: tuple[ort.OrtValue, np.ndarray, dict[str, float]],
                 label: str | None, t0: float, encodings: SlotSet | None = None, sources: Sources = ()) -> SwitchReport:
        with self._switch_lock:
            target, kind, moved, source = self._find_or_fill(adapter)
            saved = self._state.saved
            if self._saved is not None and saved is not None:  # modules_to_save: cold for the modules that change
                saved, copied = self._saved.find_or_fill(sources, saved, self.fault_hook)
                if copied:
                    kind, moved, source = "cold", moved + copied, "rom"
            with self._lock:
                self._state = _State(self._state.version + 1, target, *strength, label, encodings, saved)
            report = SwitchReport(label, kind, moved, time.perf_counter() - t0, source)
            self.last_switch = report
            return report

    def _find_or_fill(self, adapter: str | None) -> tuple[SlotSet, str, int, str]:
        current = self._state.slots
        if adapter is None:  # the base model: strength 0, any weights do
            return current, "hot", 0, "resident"
        if current.holds == adapter:
            return current, "hot", 0, "resident"
        with self._lock:
            held = self._resident.get(adapter) or next((s for s in self._scratch if s.holds == adapter), None)
        if held is not None:
            return held, "hot", 0, "resident"
        target = next(s for s in self._scratch if s is not current)
        with self._lock:
            while target.readers:  # runs that started on it before the previous switch
                self._lock.wait()
            target.holds = None  # from here until it is full, its content is unknown
        moved = target.fill_from(self._sources[adapter], self.fault_hook)
        if self.fault_hook:
            self.fault_hook("publish")
        target.holds = adapter
        return target, "cold", moved, "rom"

    # ---- running -------------------------------------------------------------------------------------

    def run(self, feeds: Mapping[str, np.ndarray], buffers: Mapping[str, ort.OrtValue] | None = None
            ) -> dict[str, np.ndarray]:
        """Run the current use-case. Safe from several threads, also while another thread switches.

        ``buffers``: graph inputs and outputs bound to the caller's own ``OrtValue``s, kept bound between runs
        of this thread (an in-place KV cache: ``past_key.<i>`` and ``present_key.<i>`` on one buffer); outputs
        written there are not returned."""
        with self._reading() as state:
            if buffers:  # one graph (an ort-flavour LLM): its KV cache bound in place
                self._binding(state, 0)
                return run_bound(self._graphs[0], self._local.graphs[0], feeds, buffers)
            index, inputs = self._pick(feeds)
            graph = self._graphs[index]
            binding = self._binding(state, index)
            for name, value in inputs.items():
                binding.bind_cpu_input(name, value)
            # Outputs are bound afresh each run: a bound output keeps its last shape, and shapes change with
            # the input (sequence length, KV-cache length).
            binding.clear_binding_outputs()
            self._local.graphs[index].buffers = None  # (a later run with buffers binds them again)
            for name in graph.outputs:
                binding.bind_output(name, "cpu")
            try:
                graph.session.run_with_iobinding(binding)
            except Exception as e:  # ONNX Runtime's: an index out of range, a shape the graph cannot take, ...
                raise InputError(f"ONNX Runtime rejected the inputs: {ort_message(e)}") from e
            return dict(zip(graph.outputs, binding.copy_outputs_to_cpu()))

    @contextmanager
    def _reading(self) -> Iterator[_State]:
        """The published state, held for a run: a switch waits until no run reads the slot set it would refill."""
        with self._lock:
            state = self._state
            state.slots.readers += 1
            if state.saved is not None:
                state.saved.readers += 1
        try:
            yield state
        finally:
            with self._lock:
                state.slots.readers -= 1
                if state.saved is not None:
                    state.saved.readers -= 1
                self._lock.notify_all()

    def _pick(self, feeds: Mapping[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
        """The first graph whose inputs the feeds fit, and the feeds checked against it."""
        errors = []
        for i, g in enumerate(self._graphs):
            try:
                return i, check_feeds(g.inputs, feeds)
            except InputError as e:
                errors.append(str(e))
        if len(errors) == 1:
            raise InputError(errors[0])
        raise InputError(f"{errors[0]} (prefill graph); {errors[1]} (decode graph)")

    def _binding(self, state: _State, index: int) -> ort.IOBinding:
        local = self._local
        if getattr(local, "graphs", None) is None:
            local.graphs = [Bound(g.session.io_binding()) for g in self._graphs]
        bound = local.graphs[index]
        b = bound.binding
        if bound.version != state.version:
            for have, want in (("slots", None if state.slots.in_graph else state.slots),
                               ("encodings", state.encodings), ("saved", state.saved)):
                if want is not None and getattr(bound, have) is not want:
                    for name, value in want.values.items():
                        b.bind_ortvalue_input(name, value)
                    setattr(bound, have, want)
            b.bind_ortvalue_input(self._strength_name, state.strength)
            bound.version = state.version
        return b
