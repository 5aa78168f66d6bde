"""What the QDQ pass is asked to do (``QdqPlan``), and the constants and inputs it creates (``Constants``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lora_runtime.quant.encodings import Encoding
from lora_runtime.quant.gptq import Hessians


@dataclass(frozen=True)
class QdqPlan:
    """What to quantize and how; names in ``updatable`` become graph inputs (slots), the rest constants."""

    activations: Mapping[str, Encoding]  # tensor -> asymmetric per-tensor encoding (or FLOAT 16: float16)
    lora_weights: Mapping[str, Encoding]  # LoRA slot name (A or B) -> per-row symmetric encoding
    weight_bw: int = 8
    updatable: frozenset[str] = frozenset()
    weight_overrides: Mapping[str, Encoding] = field(default_factory=dict)  # base weight -> user's encoding
    gram: Hessians = field(default_factory=Hessians)  # linear inputs' X^T X: GPTQ rounding of their weights
    weight_block: int | None = None  # PER_BLOCK base weights (int4): input features per block
    # Full QDQ groups (HTP): every op between DQ and Q. Then ``activations`` holds every float tensor, ``constants``
    # every other float constant (per-tensor), and the LoRA slots hold integer codes (``integer_slots``: the
    # slot's new declaration, a graph input or a v2/v3 initializer whose data is the integer patch).
    full: bool = False
    constants: Mapping[str, Encoding] = field(default_factory=dict)
    integer_slots: Mapping[str, TensorProto | onnx.ValueInfoProto] = field(default_factory=dict)
    norm_biases: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # int32 bias -> (input, scale tensor)
    # full groups: a MatMul's second operand read through one more Q/DQ at this (narrower) encoding
    requantize: Mapping[str, Encoding] = field(default_factory=dict)


class Constants:
    """Initializers and graph inputs a rewrite creates, collected for one ``GraphEdit``."""

    def __init__(self) -> None:
        self.tensors: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []

    def add(self, name: str, value: np.ndarray) -> str:
        self.tensors.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def input(self, name: str, elem_type: int, shape: list[int]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name
