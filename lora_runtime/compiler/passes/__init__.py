"""Graph passes, one rewrite per module, one contract.

A pass is a function ``pass(model, options) -> result``: it takes an ``onnx.ModelProto`` and a frozen options
dataclass, edits the model in place through :class:`lora_runtime.graph.GraphEdit`, and returns a frozen
result holding the model and every name it created that a later pass needs. Later passes read those
names; no pass finds a node by parsing a name.

=================  ==========================================================================================
``branch``         the LoRA branch at every attachment point (v1 / v2 / v3); creates ``BranchTensors``
``saved``          whole-module slots for PEFT's ``modules_to_save`` (classifier heads); creates their slot names
``weight_only``    base linear weights to ``MatMulNBits`` (``--base-weights``); creates ``QuantizedWeight``
``qdq``            QDQ with encodings (``--encodings``): base weights int8, activations Q/DQ, LoRA weights
=================  ==========================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx


@dataclass(frozen=True)
class PassResult:
    """What every pass returns: the model it rewrote (the same object, edited in place)."""

    model: onnx.ModelProto
