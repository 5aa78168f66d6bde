"""What a compile is asked to do, as frozen dataclasses checked when they are made.

    CompileOptions(generation="v3", lora_dtype="float16",
                   quant=QuantOptions(mode="full", calibration="calib.npz", preset="w8a16"))

``weight_only`` (MatMulNBits base weights, LoRA float) and ``quant`` (QDQ with encodings) are exclusive:
the QDQ graph quantizes the base weights itself. Every bad value is a :class:`UseCaseError` naming the
option and its allowed values.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from lora_runtime.errors import UseCaseError

GENERATIONS = ("v1", "v2", "v3")
LORA_DTYPES = ("float32", "float16")
MODES = ("non-updatable", "adapter-only", "full")
CALIBRATION_METHODS = ("minmax", "percentile")
WEIGHT_ROUNDING = ("nearest", "gptq")
BASE_ENCODINGS = ("auto", "always", "never")
# QAIRT's table: which encodings mode each generation takes
MODES_OF = {"v1": ("non-updatable",), "v2": ("full",), "v3": MODES}


def _one_of(what: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise UseCaseError(f"{what} must be one of {', '.join(map(str, allowed))}, got {value!r}")


@dataclass(frozen=True)
class WeightOnlyOptions:
    """``--base-weights int8|int4``: every linear weight of the base as ``MatMulNBits``, LoRA branches float."""

    bits: int  # 8: per output channel; 4: blocks of ``block_size`` input features
    block_size: int | None = None  # None: 32 for int4, the whole input dim for int8
    encodings: str = "auto"  # write encodings/base_weights.encodings: auto (up to a million scales), always, never

    def __post_init__(self) -> None:
        _one_of("base weight bits", self.bits, (8, 4))
        _one_of("base_encodings", self.encodings, BASE_ENCODINGS)
        if self.block_size is not None and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise UseCaseError(f"block_size must be a power of two of at least 16, got {self.block_size}")

    @classmethod
    def of(cls, dtype: str, block_size: int | None = None, encodings: str = "auto") -> WeightOnlyOptions:
        """From the CLI's spelling: ``--base-weights int8|int4``."""
        bits = {"int8": 8, "int4": 4}.get(dtype)
        if bits is None:
            raise UseCaseError(f"base_weights must be one of int8, int4, got {dtype!r}")
        return cls(bits, block_size, encodings)

    @property
    def dtype(self) -> str:
        return f"int{self.bits}"


@dataclass(frozen=True)
class QuantOptions:
    """``--encodings MODE``: QDQ with AIMET/QAIRT encodings, calibrated on ``calibration``."""

    mode: str
    calibration: str | os.PathLike[str] | None  # an .npz: keys are graph inputs, arrays have a leading sample axis
    preset: str = "w8a8"
    method: str = "minmax"
    weight_rounding: str = "nearest"  # or "gptq": codes chosen from the calibration inputs, on the same grid
    encodings_file: str | os.PathLike[str] | None = None  # the user's entries override the calibrated ones
    sensitive_db: float | None = None  # mixed precision: activations below this per-token SQNR get 16 bits
    ort_reference: bool = True  # measure ONNX Runtime's quantize_static of each merged use-case too

    def __post_init__(self) -> None:
        _one_of("encodings", self.mode, MODES)
        if self.calibration is None:
            raise UseCaseError(f"encodings {self.mode} need calibration data: pass --calibration DATA.npz")
        _one_of("calibration method", self.method, CALIBRATION_METHODS)
        _one_of("weight rounding", self.weight_rounding, WEIGHT_ROUNDING)
        if self.sensitive_db is not None and not math.isfinite(self.sensitive_db):
            raise UseCaseError(f"sensitive_db must be a finite number of dB, got {self.sensitive_db!r}")


@dataclass(frozen=True)
class CompileOptions:
    """How to compile: the generation and every optional step."""

    generation: str
    lora_dtype: str = "float32"  # float16: half the bytes a cold switch moves and a preloaded use-case holds
    weight_only: WeightOnlyOptions | None = None
    quant: QuantOptions | None = None
    copy_base_data: bool = False  # copy the base's external data where it cannot be hard-linked
    measure_accuracy: bool = True  # float16 slots / quantized bases: SQNR against the float32 bundle

    def __post_init__(self) -> None:
        _one_of("generation", self.generation, GENERATIONS)
        _one_of("lora_dtype", self.lora_dtype, LORA_DTYPES)
        if self.quant is not None:
            allowed = MODES_OF[self.generation]
            if self.quant.mode not in allowed:
                hint = "; use --generation v3" if self.generation != "v3" else ""
                raise UseCaseError(f"{self.generation} takes encodings {' or '.join(allowed)} (QAIRT's table), not "
                                   f"{self.quant.mode!r}{hint}")
            if self.weight_only is not None:
                raise UseCaseError("--encodings with --base-weights int8/int4 is not supported yet: the QDQ graph "
                                   "quantizes the base weights itself (int8 per channel)")
