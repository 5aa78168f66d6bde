"""Sessions on a bundle, the user's feeds checked against the graph, and the reference run path.

``make_session`` is the one place an ONNX Runtime session is created for a bundle. ``run_use_case`` is the
plain way to run a bundle: a session, the use-case's patch read from the bundle and fed next to the
user's inputs. :class:`lora_runtime.Runtime` (resident slots, hot and cold switches) gives the same
outputs without moving weights on every run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lora_runtime.bundle import Bundle, open_bundle
from lora_runtime.errors import InputError, TargetError, UseCaseError
from lora_runtime.names import BASE_PATH, STRENGTH
from lora_runtime.runtime import htp
from lora_runtime.tensorfile import TensorFile, read_header

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
              "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


DEVICES = ("cpu", "htp")
GRAPHS = ("main", "decode")
PREPACK_ENV = "LORA_RUNTIME_PREPACK"  # "0": float bundles open without prepacking their weights
PARALLEL_PREPACK = "session.prepack.enable_parallel"
DISABLE_PREPACK = "session.disable_prepacking"
X64_QUANT_PRECISION = "session.x64quantprecision"  # uint8 x int8 without 16-bit saturation on x86 without VNNI


def make_session(bundle: Bundle, *, device: str = "cpu", providers: list[str] | None = None,
                 session_options: ort.SessionOptions | None = None, graph: str = "main") -> ort.InferenceSession:
    """The one way a session is made for a bundle.

    ``graph``: "main" (``model.onnx``) or "decode" (the decode graph of a bundle compiled with
    ``--decode-shape``).

    On the CPU every session runs with ``session.x64quantprecision``: x86 CPUs without VNNI (AVX2, AVX-512 before
    VNNI) otherwise multiply a QDQ bundle's uint8 activations by int8 weights with 16-bit intermediate sums that
    saturate (the llama fixture's full-updatable bundle: 20.6 dB against PEFT on an AVX2 EPYC, 36.9 dB with it);
    ONNX Runtime applies it only on such CPUs, and only to integer matrix products.

    On the CPU a bundle prepacks its weights on all intra-op threads (2 cores, Xeon with AVX-512: SmolLM2's Q4_1
    blocks v3 bundle opens in 0.26 s instead of 0.30 s, its float32 one in 0.45 s instead of 0.61 s; the 1B default
    model 2.9 s instead of 5.1 s on an AVX2 EPYC, where SmolLM2-size bundles were 5-10 % slower in parallel: one
    rule, the bigger win). ``LORA_RUNTIME_PREPACK=0``
    opens a bundle of float weights without prepacking them (ONNX Runtime cannot save that work): the 1B default
    model then opens in ~0.2 s instead of ~3 s, but prefill runs up to 2x and decode up to 1.3x slower; bundles
    with quantized weights prepack regardless. Options set in ``session_options`` win over both.

    ``device="htp"``: on Qualcomm's HTP through QNN (every node, or a TargetError naming those that cannot),
    from the bundle's ahead-of-time context when it has one. A bundle compiled for the HTP runs on the CPU too,
    with ONNX Runtime's basic graph optimizations: its extended ones fuse DequantizeLinear + MatMul into
    MatMulNBits, whose int8 compute requantizes 16-bit activations (up to 160 steps off, measured), so the CPU
    run would not be the reference the HTP is compared with.
    """
    if device not in DEVICES:
        raise InputError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    m = bundle.manifest
    if graph not in GRAPHS:
        raise InputError(f"graph must be one of {', '.join(GRAPHS)}, got {graph!r}")
    decode = m.target.decode
    if graph == "decode" and decode is None:
        raise InputError(f"{bundle.path}: no decode graph (compile with --static-shape and --decode-shape)")
    path, context = (decode.graph, decode.context) if graph == "decode" and decode else (m.graph, m.target.context)
    so = session_options or ort.SessionOptions()
    # fatal only: a warning per initializer-input otherwise, and a run's error is raised (one line) anyway
    so.log_severity_level = max(so.log_severity_level, 4)
    if device == "htp":
        if m.target.name != "htp":
            raise TargetError(f"{bundle.path}: compiled for the {m.target.name.upper()}, not the HTP: compile with "
                              "--target htp (static shapes, full QDQ groups)")
        return htp.session(bundle.file(context or path), m.target.soc_model, m.target.htp_arch, session_options=so)
    if m.target.name == "htp":
        if so.graph_optimization_level != ort.GraphOptimizationLevel.ORT_DISABLE_ALL:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    _default_config(so, X64_QUANT_PRECISION, "1")
    _default_config(so, PARALLEL_PREPACK, "1")
    if os.environ.get(PREPACK_ENV, "").strip().lower() in ("0", "off", "no", "false") and not _quantized(m):
        _default_config(so, DISABLE_PREPACK, "1")
    return ort.InferenceSession(str(bundle.file(path)), so, providers=providers or ["CPUExecutionProvider"])


def _quantized(m) -> bool:  # noqa: ANN001  (a Manifest)
    """Base weights quantized (MatMulNBits, QDQ): their CPU kernels are ~10x slower without prepacked weights."""
    return m.weight_only is not None or bool(m.base.blocks) or m.quantization is not None


def _default_config(so: ort.SessionOptions, key: str, value: str) -> None:
    """Set a session config entry unless the caller already did."""
    try:
        so.get_session_config_entry(key)
    except Exception:  # noqa: BLE001  (ONNX Runtime raises for an entry never set)
        so.add_session_config_entry(key, value)


def slot_feeds(bundle: Bundle, strengths: Mapping[str, float], use_case: str | None = None) -> dict[str, np.ndarray]:
    """Every slot value for ``strengths``: the adapter's patch (v1/v2), ``lora_alpha``, updatable encodings (the
    use-case's, or for ad-hoc strengths the union set), and the saved modules of the adapters named."""
    m = bundle.manifest
    feeds: dict[str, np.ndarray] = {STRENGTH: m.strength_value(strengths)} | saved_feeds(bundle, strengths)
    if any(s.kind == "encoding" for s in m.slots):
        rel = m.use_case(use_case).encodings if use_case is not None else m.union_encodings
        tf = read_header(bundle.file(rel or ""))
        feeds |= {name: tf.read(name) for name in tf.entries}
    if m.generation == "v3":
        return feeds
    adapter = next(iter(strengths), None)
    if m.generation == "v2" and adapter in (None, m.default_adapter):
        return feeds  # the graph's parameters already hold it (or the strength is 0)
    if adapter is None:  # v1, base alone: any finite weights do, the strength is 0
        return feeds | {s.name: np.zeros(s.shape, s.numpy_dtype) for s in m.patched_slots}
    tf = read_header(bundle.file(m.adapter(adapter).patch or ""))
    return feeds | {name: tf.read(name) for name in tf.entries}


def saved_feeds(bundle: Bundle, adapters: Iterable[str]) -> dict[str, np.ndarray]:
    """The saved modules' slot values (``modules_to_save``) with these adapters active: each module from the one
    adapter that saves it, or the base's."""
    m = bundle.manifest
    headers: dict[str, TensorFile] = {}
    out = {}
    for s, source in zip(m.saved_modules, m.saved_sources(adapters)):
        rel = m.saved_patch_of(source)
        tf = headers.get(rel) or headers.setdefault(rel, read_header(bundle.file(rel)))
        out |= {name: tf.read(name) for name in (s.weight_slot, s.bias_slot) if name is not None}
    return out


def input_specs(session: ort.InferenceSession, reserved: set[str]) -> dict[str, ort.NodeArg]:
    """The graph's inputs a user feeds: all but the slots."""
    return {i.name: i for i in session.get_inputs() if i.name not in reserved}


def check_feeds(expected: Mapping[str, ort.NodeArg], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The user's inputs must be exactly the graph's non-LoRA inputs, with their dtypes and ranks."""
    unknown = sorted(set(feeds) - set(expected))
    missing = sorted(set(expected) - set(feeds))
    if unknown or missing:
        raise InputError(f"inputs: unknown {unknown}, missing {missing}; the graph takes {sorted(expected)}")
    out = {}
    for name, value in feeds.items():
        info = expected[name]
        a = np.asarray(value)
        want = _ORT_TYPES.get(info.type)
        if want is not None and a.dtype != want:
            raise InputError(f"input {name!r}: dtype {a.dtype}, the graph expects {np.dtype(want)}")
        if len(info.shape) != a.ndim or any(isinstance(d, int) and d != n for d, n in zip(info.shape, a.shape)):
            raise InputError(f"input {name!r}: shape {a.shape}, the graph expects {info.shape}")
        out[name] = a
    return out


def run_use_case(bundle: str | os.PathLike[str] | Bundle, use_case: str | None, feeds: Mapping[str, np.ndarray],
                 *, strengths: Mapping[str, float] | None = None,
                 session: ort.InferenceSession | None = None) -> dict[str, np.ndarray]:
    """Run ``use_case`` (or ad-hoc ``strengths``) once and return the outputs by name."""
    if not isinstance(bundle, Bundle):
        bundle = open_bundle(Path(bundle))
    m = bundle.manifest
    if strengths is None:
        if use_case is None:
            raise UseCaseError("give a use-case or strengths")
        strengths = m.use_case(use_case).strengths
    else:
        use_case = None  # ad-hoc strengths: not a calibrated use-case
    session = session or make_session(bundle)
    reserved = {s.name for s in m.slots}
    inputs = check_feeds(input_specs(session, reserved), feeds) | slot_feeds(bundle, strengths, use_case)
    names = [o.name for o in session.get_outputs()]
    try:
        return dict(zip(names, session.run(names, inputs)))
    except Exception as e:  # ONNX Runtime's: an index out of range, a shape the graph cannot take, ...
        raise InputError(f"ONNX Runtime rejected the inputs: {ort_message(e)}") from e


def ort_message(e: Exception) -> str:
    """ONNX Runtime's error in one line, without its status-code preamble, naming the node when it says which."""
    text = " ".join(str(e).split())
    # the innermost node: a node in a subgraph (a v3 bundle's base path runs the graph inside an If) fails its If too
    node = ([None] + list(re.finditer(r"running (\w+) node\. Name:'([^']*)'", text)))[-1]
    for marker in ("Status Message: ", "] : "):
        if marker in text:
            text = text.split(marker)[-1]
    name = node and node.group(2).removeprefix(BASE_PATH.branched).removeprefix(BASE_PATH.base)
    return (f"{node.group(1)} node {name!r}: " if node else "") + text[:400]
