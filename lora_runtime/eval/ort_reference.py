"""The peer for INT8: ONNX Runtime's own ``quantize_static`` of each use-case merged into the base weights.

QDQ, per-channel int8 weights, uint8 activations, MatMul/Gemm quantized: what an ONNX Runtime user gets
for one use-case by merging it and quantizing, the ideal fully-updatable reference.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from lora_runtime.bundle import Bundle
from lora_runtime.eval.accuracy import logits_sqnr
from lora_runtime.export import merge_use_case
from lora_runtime.progress import Stage
from lora_runtime.runtime.session import X64_QUANT_PRECISION


class _Reader(CalibrationDataReader):
    def __init__(self, samples: Sequence[Mapping[str, np.ndarray]]) -> None:
        self.it = iter(samples)

    def get_next(self) -> dict[str, np.ndarray] | None:
        s = next(self.it, None)
        return None if s is None else dict(s)


def quantize_static_sqnr(bundle: Bundle, use_cases: Sequence[str], calib: Sequence[Mapping[str, np.ndarray]],
                         held: Sequence[Mapping[str, np.ndarray]], fp32: Mapping[str, list],
                         say: Callable[[str], None] = lambda _m: None) -> dict[str, float]:
    """Per use-case, the logits SQNR of ONNX Runtime's quantized merged model against ``fp32`` (the float
    bundle's outputs on ``held``), calibrated on ``calib``. ``bundle`` must have float32 base weights."""
    out = {}
    stage = Stage(say, "ONNX Runtime quantize_static reference", len(use_cases), "use-cases")
    with tempfile.TemporaryDirectory(prefix=".lora_runtime-ort-reference-", dir=bundle.path.parent) as tmp:
        for u in use_cases:
            say(stage.text(f"merging and quantizing {u}"))
            merged = merge_use_case(bundle, Path(tmp) / f"{u}.onnx", use_case=u)
            q = Path(tmp) / f"{u}.int8.onnx"
            logging.disable(logging.WARNING)  # its "consider pre-processing" advice, on the root logger, per call
            ort.set_default_logger_severity(3)  # its calibration sessions log every initializer a fusion left unused
            try:
                quantize_static(str(merged), str(q), _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=True)
            finally:
                logging.disable(logging.NOTSET)
                ort.set_default_logger_severity(2)  # ONNX Runtime's default
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.add_session_config_entry(X64_QUANT_PRECISION, "1")  # as make_session: no u8s8 saturation
            sess = ort.InferenceSession(str(q), so, providers=["CPUExecutionProvider"])
            names = [o.name for o in sess.get_outputs()]
            runs = [dict(zip(names, sess.run(names, dict(s)))) for s in held]
            out[u] = logits_sqnr(fp32[u], runs)
            del sess, runs
            stage.step(f"{u}: {out[u]:.1f} dB")
    return out
