"""How sessions prepack weights: in parallel, not at all for float bundles under
LORA_RUNTIME_PREPACK=0 (quantized ones always), the caller's own options first; outputs unchanged."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from lora_runtime import compile_bundle
from lora_runtime.compiler.options import CompileOptions, WeightOnlyOptions
from lora_runtime.runtime import session as S


def _entry(sess: ort.InferenceSession, key: str) -> str | None:
    try:
        return sess.get_session_options().get_session_config_entry(key)
    except Exception:  # noqa: BLE001  (never set)
        return None


def test_prepack_options_follow_the_bundle_and_the_environment(tiny, tmp_path, monkeypatch):
    f = compile_bundle(tiny.base, tiny.adapters, tmp_path / "f", generation="v3")
    q = compile_bundle(tiny.base, tiny.adapters, tmp_path / "q",
                       CompileOptions("v3", weight_only=WeightOnlyOptions.of("int4"), measure_accuracy=False))
    feeds = tiny.inputs()
    use_case = f.manifest.use_case_names[0]
    want = S.run_use_case(f, use_case, feeds)["logits"]
    monkeypatch.delenv(S.PREPACK_ENV, raising=False)
    plain = S.make_session(f)
    assert _entry(plain, S.DISABLE_PREPACK) is None and _entry(plain, S.PARALLEL_PREPACK) == "1"
    monkeypatch.setenv(S.PREPACK_ENV, "0")
    unpacked = S.make_session(f)
    assert _entry(unpacked, S.DISABLE_PREPACK) == "1"
    assert _entry(S.make_session(q), S.DISABLE_PREPACK) is None  # MatMulNBits needs its packed weights
    np.testing.assert_allclose(S.run_use_case(f, use_case, feeds, session=unpacked)["logits"], want, atol=1e-4,
                               rtol=1e-4)
    so = ort.SessionOptions()
    so.add_session_config_entry(S.DISABLE_PREPACK, "0")  # the caller's choice wins
    so.add_session_config_entry(S.PARALLEL_PREPACK, "0")
    theirs = S.make_session(f, session_options=so)
    assert _entry(theirs, S.DISABLE_PREPACK) == "0" and _entry(theirs, S.PARALLEL_PREPACK) == "0"


def test_sessions_ask_for_unsaturated_integer_products(tiny, tmp_path):
    """session.x64quantprecision on every CPU session (ONNX Runtime's U8U8 products where u8s8 would saturate 16-bit
    sums: x86 without VNNI), unless the caller set it."""
    f = compile_bundle(tiny.base, tiny.adapters, tmp_path / "f", generation="v3")
    assert _entry(S.make_session(f), S.X64_QUANT_PRECISION) == "1"
    so = ort.SessionOptions()
    so.add_session_config_entry(S.X64_QUANT_PRECISION, "0")
    assert _entry(S.make_session(f, session_options=so), S.X64_QUANT_PRECISION) == "0"
