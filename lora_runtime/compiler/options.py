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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from lora_runtime.errors import TargetError, UseCaseError

GENERATIONS = ("v1", "v2", "v3")
LORA_DTYPES = ("float32", "float16")
MODES = ("non-updatable", "adapter-only", "full")
CALIBRATION_METHODS = ("minmax", "percentile")
WEIGHT_ROUNDING = ("nearest", "gptq")
GRIDS = ("symmetric", "asymmetric")
BASE_ENCODINGS = ("auto", "always", "never")
TARGETS = ("cpu", "htp")
# QAIRT's table: which encodings mode each generation takes
MODES_OF = {"v1": ("non-updatable",), "v2": ("full",), "v3": MODES}
# The HTP runs encodings compiled into its graph: one set for every use-case, in every generation. Per-use-case
# sets need a graph per use-case sharing one weights binary (ONNX Runtime's EP-context weight sharing); the
# simulator here cannot load such binaries (QNN_COMMON_ERROR_NOT_SUPPORTED), so they are not offered.
HTP_MODES = ("non-updatable",)
HTP_NO_UPDATABLE = ("the HTP takes encodings compiled into the graph: scales fed as graph inputs are refused "
                    "(QNN: 'Failed to get initializer value') or silently ignored; per-use-case encodings need one "
                    "graph per use-case in a weight-shared QNN context, which this machine's HTP simulator cannot "
                    "load: use --encodings non-updatable")


def _one_of(what: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise UseCaseError(f"{what} must be one of {', '.join(map(str, allowed))}, got {value!r}")


@dataclass(frozen=True)
class WeightOnlyOptions:
    """``--base-weights int8|int4``: every linear weight of the base as ``MatMulNBits``, LoRA branches float.

    ``symmetric`` None: int8 symmetric, int4 asymmetric (a zero point per block, its clip searched). With
    ``calibration`` (samples of the base's inputs), ``rounding="gptq"`` chooses the codes on that grid from the
    layers' inputs and the clip search weighs each input feature by its mean square. ``int8_modules`` (int4 only):
    the linear layers of these modules (PEFT's ``target_modules`` matching: the module path or its last parts,
    e.g. ``v_proj``) get 8-bit codes in the same blocks and grid, as llama.cpp's ``Q4_K_M`` keeps
    ``attn_v`` and ``ffn_down`` wider."""

    bits: int  # 8 or 4, in blocks of ``block_size`` input features
    block_size: int | None = None  # None: 32 (a block >= the input dim: one scale per output channel)
    encodings: str = "auto"  # write encodings/base_weights.encodings: auto (up to a million scales), always, never
    symmetric: bool | None = None
    calibration: str | os.PathLike[str] | None = None
    rounding: str = "nearest"
    accuracy_level: int = 4  # MatMulNBits' compute: 4 = int8 activations (fast), 0 = float32 (exact, slower)
    int8_modules: tuple[str, ...] = ()  # int4 only: these modules' weights at 8 bits

    def __post_init__(self) -> None:
        _one_of("base weight bits", self.bits, (8, 4))
        if self.int8_modules and self.bits != 4:
            raise UseCaseError("--int8-modules goes with --base-weights int4 (int8 quantizes every weight to 8 bits)")
        bad = [m for m in self.int8_modules if not m or m != m.strip(".") or any(c.isspace() for c in m)]
        if bad:
            raise UseCaseError(f"--int8-modules {bad[0]!r}: not a module name (e.g. v_proj, mlp.down_proj)")
        _one_of("accuracy level", self.accuracy_level, (0, 4))
        _one_of("base_encodings", self.encodings, BASE_ENCODINGS)
        _one_of("weight rounding", self.rounding, WEIGHT_ROUNDING)
        if self.block_size is not None and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise UseCaseError(f"block_size must be a power of two of at least 16, got {self.block_size}")
        if self.rounding == "gptq" and self.calibration is None:
            raise UseCaseError("--weight-rounding gptq needs calibration data: pass --calibration DATA.npz")
        if self.rounding == "nearest" and self.calibration is not None:
            raise UseCaseError("--calibration with --base-weights is read by GPTQ only: drop --weight-rounding nearest "
                               "or the calibration data")

    @classmethod
    def of(cls, dtype: str, block_size: int | None = None, encodings: str = "auto", *, grid: str | None = None,
           calibration: str | os.PathLike[str] | None = None, rounding: str | None = None,
           accuracy_level: int = 4, int8_modules: Sequence[str] = ()) -> WeightOnlyOptions:
        """From the CLI's spelling: ``--base-weights int8|int4``, ``--weight-grid symmetric|asymmetric``;
        ``--weight-rounding`` defaults to gptq when calibration data is given."""
        bits = {"int8": 8, "int4": 4}.get(dtype)
        if bits is None:
            raise UseCaseError(f"base_weights must be one of int8, int4, got {dtype!r}")
        if grid is not None:
            _one_of("weight grid", grid, GRIDS)
        return cls(bits, block_size, encodings, None if grid is None else grid == "symmetric", calibration,
                   rounding or ("gptq" if calibration is not None else "nearest"), accuracy_level,
                   tuple(dict.fromkeys(int8_modules)))

    @property
    def dtype(self) -> str:
        return f"int{self.bits}"

    @property
    def is_symmetric(self) -> bool:
        return self.bits == 8 if self.symmetric is None else self.symmetric

    @property
    def grid(self) -> str:
        return "symmetric" if self.is_symmetric else "asymmetric"


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
    # --encodings-file USE_CASE=F: that use-case's own entries (adapter-only and full: the tensors that change per
    # use-case), e.g. aimet_onnx's per-adapter LoRA encodings
    encodings_per_use_case: Mapping[str, str | os.PathLike[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _one_of("encodings", self.mode, MODES)
        if self.calibration is None:
            raise UseCaseError(f"encodings {self.mode} need calibration data: pass --calibration DATA.npz")
        _one_of("calibration method", self.method, CALIBRATION_METHODS)
        _one_of("weight rounding", self.weight_rounding, WEIGHT_ROUNDING)
        if self.encodings_per_use_case and self.mode == "non-updatable":
            raise UseCaseError("--encodings-file USE_CASE=F gives one use-case its own encodings: non-updatable has "
                               "one set for every use-case; use --encodings adapter-only or full, or a file for all")
        if any(not isinstance(u, str) or not u for u in self.encodings_per_use_case):
            raise UseCaseError("--encodings-file USE_CASE=F needs a use-case name before '='")
        if self.sensitive_db is not None and not math.isfinite(self.sensitive_db):
            raise UseCaseError(f"sensitive_db must be a finite number of dB, got {self.sensitive_db!r}")


@dataclass(frozen=True)
class HtpOptions:
    """``--target htp``: Qualcomm's HTP through ONNX Runtime's QNN execution provider."""

    soc_model: str = "60"  # QNN's soc_model: required (without it float Gather fails, u16 x s8 layers are wrong)
    htp_arch: str | None = None  # QNN's htp_arch (e.g. "75"); None: what the soc_model implies
    context: bool = False  # write the EPContext model and its QNN context binary into the bundle

    def __post_init__(self) -> None:
        for what, v in (("soc_model", self.soc_model), ("htp_arch", self.htp_arch)):
            if v is not None and not (isinstance(v, str) and v.isdigit()):
                raise UseCaseError(f"{what} is a number (QNN's own numbering, e.g. 60), got {v!r}")


@dataclass(frozen=True)
class CompileOptions:
    """How to compile: the generation and every optional step."""

    generation: str
    lora_dtype: str = "float32"  # float16: half the bytes a cold switch moves and a preloaded use-case holds
    weight_only: WeightOnlyOptions | None = None
    quant: QuantOptions | None = None
    copy_base_data: bool = False  # copy the base's external data where it cannot be hard-linked
    measure_accuracy: bool = True  # float16 slots / quantized bases: SQNR against the float32 bundle
    target: str = "cpu"  # "htp": static shapes, full QDQ groups, integer LoRA slots (see HtpOptions)
    htp: HtpOptions = field(default_factory=HtpOptions)
    static_shapes: Mapping[str, int] = field(default_factory=dict)  # dim_param -> value (required for the HTP)
    # a second graph (model_decode.onnx) at these dims instead (e.g. {"sequence": 1}: an LLM's decode step next
    # to its prefill graph), sharing the weights and the encodings
    decode_shapes: Mapping[str, int] = field(default_factory=dict)
    # v3 on the CPU without encodings: with every strength 0 the graph runs its base path, its LoRA branches
    # skipped (compiler.passes.base_path); False keeps the graph flat
    base_path: bool = True

    def __post_init__(self) -> None:
        _one_of("generation", self.generation, GENERATIONS)
        _one_of("lora_dtype", self.lora_dtype, LORA_DTYPES)
        _one_of("target", self.target, TARGETS)
        for what, dims in (("static shape", self.static_shapes), ("decode shape", self.decode_shapes)):
            for dim, n in dims.items():
                if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                    raise UseCaseError(f"{what} {dim}={n!r}: the value must be a positive integer")
        if self.decode_shapes and self.weight_only is not None:
            raise UseCaseError("--decode-shape with --base-weights is not supported: quantize with --encodings")
        if self.decode_shapes and not self.static_shapes:
            raise UseCaseError("--decode-shape changes dims of a static-shape graph: give --static-shape too")
        if self.target == "htp":
            self._check_htp()
        elif self.htp != HtpOptions():
            raise UseCaseError("--soc-model, --htp-arch and --htp-context go with --target htp")
        if self.quant is not None and self.target == "cpu":
            allowed = MODES_OF[self.generation]
            if self.quant.mode not in allowed:
                hint = "; use --generation v3" if self.generation != "v3" else ""
                raise UseCaseError(f"{self.generation} takes encodings {' or '.join(allowed)} (QAIRT's table), not "
                                   f"{self.quant.mode!r}{hint}")
        if self.quant is not None and self.weight_only is not None:
            raise UseCaseError("--encodings with --base-weights int8/int4 is not supported yet: the QDQ graph "
                               "quantizes the base weights itself (int8 per channel)")

    @property
    def packed_branches(self) -> bool:
        """A packed linear op's modules (the ort flavour's q/k/v, gate/up) as one point: v3 on the CPU without QDQ
        (whose encodings are per module, as AIMET names them)."""
        return self.generation == "v3" and self.target == "cpu" and self.quant is None

    def _check_htp(self) -> None:
        if self.weight_only is not None:
            raise TargetError("--base-weights makes ONNX Runtime's MatMulNBits, which the HTP does not run: quantize "
                              "with --encodings non-updatable")
        q = self.quant
        if q is None:
            return
        if q.mode not in HTP_MODES:
            raise TargetError(f"encodings {q.mode!r} on the HTP: {HTP_NO_UPDATABLE}")
        if q.sensitive_db is not None:
            raise TargetError("--sensitive-db mixes activation bitwidths, and the HTP runs a QDQ group whose inputs "
                              "and output differ in width in float: choose one width with --preset (w8a16)")
        if self.lora_dtype != "float32":
            raise TargetError("--lora-dtype float16 with --encodings on the HTP: the LoRA slots hold integer codes "
                              "(the preset's LoRA weight bitwidth); leave --lora-dtype at float32")
