"""One thread's IO binding of one graph, and runs with caller-owned buffers bound (an in-place KV cache).

``Runtime.run(feeds, buffers=...)``: the graph inputs and outputs named in ``buffers`` are bound to the caller's
``OrtValue``s once and stay bound between this thread's runs (``past_key.<i>`` and ``present_key.<i>`` on one
buffer: ONNX Runtime's GroupQueryAttention then writes the new keys into it in place); per run only the small
inputs are bound, and the other outputs (the logits) are written into buffers of this thread's, kept per input
shapes (an LLM's logits have the shape its inputs give them) and copied out. Why kept: ``IOBinding.get_outputs``
wraps every bound output, the 60 KV buffers too, in a Python ``OrtValue`` on every call: 0.2-0.3 ms of a 10 ms
SmolLM2 token. Rebinding an output by name replaces it where it is, so the order of ``get_outputs`` stays the order
names were first bound in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from lora_runtime.errors import InputError
from lora_runtime.runtime.session import check_feeds, ort_message
from lora_runtime.runtime.slots import SlotSet


@dataclass(frozen=True)
class Graph:
    session: ort.InferenceSession
    inputs: dict[str, ort.NodeArg]
    outputs: list[str]


class Bound:
    """One thread's binding of one graph, and the state it was last bound to."""

    def __init__(self, binding: ort.IOBinding) -> None:
        self.binding = binding
        self.version: int | None = None
        self.slots: SlotSet | None = None
        self.encodings: SlotSet | None = None
        self.saved: SlotSet | None = None
        self.buffers: Mapping[str, ort.OrtValue] | None = None  # bound by a run with buffers, until another run
        self.outputs: list[str] = []  # the outputs bound while buffers are, in binding order
        self.held: dict[tuple, dict[str, ort.OrtValue]] = {}  # input shapes -> the other outputs' buffers (LRU, 2)


def run_bound(graph: Graph, bound: Bound, feeds: Mapping[str, np.ndarray], buffers: Mapping[str, ort.OrtValue]
              ) -> dict[str, np.ndarray]:
    """Run ``graph`` on ``bound`` (its use-case's slots already bound) with ``buffers`` bound (see the module
    docstring); returns the outputs not in ``buffers``."""
    inputs = check_feeds({k: v for k, v in graph.inputs.items() if k not in buffers}, feeds)
    binding = bound.binding
    if bound.buffers is not buffers:  # another cache (or none) was bound last: check it, bind it whole
        unknown = sorted(set(buffers) - set(graph.inputs) - set(graph.outputs))
        if unknown:
            raise InputError(f"buffers for {', '.join(unknown[:3])}: not inputs or outputs of the graph")
        binding.clear_binding_outputs()
        bound.outputs = []
        for name, value in buffers.items():
            if name in graph.inputs:
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_ortvalue_output(name, value)
                bound.outputs.append(name)
        bound.buffers = buffers
        bound.held = {}
    for name, value in inputs.items():
        binding.bind_cpu_input(name, value)
    key = tuple((name, value.shape) for name, value in inputs.items())
    held = bound.held.pop(key, None)
    for name in graph.outputs:  # rebinding a name replaces it in place: its shape may change between runs
        if name in buffers:
            continue
        if held is not None:
            binding.bind_ortvalue_output(name, held[name])
        else:
            binding.bind_output(name, "cpu")
        if name not in bound.outputs:
            bound.outputs.append(name)
    try:
        graph.session.run_with_iobinding(binding)
    except Exception as e:  # ONNX Runtime's: a shape the graph cannot take, ...
        raise InputError(f"ONNX Runtime rejected the inputs: {ort_message(e)}") from e
    if held is None:  # the first run at these shapes: keep the outputs ONNX Runtime allocated
        values = binding.get_outputs()
        held = {n: values[i] for i, n in enumerate(bound.outputs) if n not in buffers}
    bound.held[key] = held  # most recent last; two shapes kept (a prompt's chunk and the one-token step)
    while len(bound.held) > 2:
        del bound.held[next(iter(bound.held))]
    return {n: v.numpy().copy() for n, v in held.items()}  # (numpy() is a view of the buffer the next run writes)
