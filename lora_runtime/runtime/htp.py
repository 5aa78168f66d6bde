"""Qualcomm's HTP through ONNX Runtime's QNN execution provider (``pip install 'lora_runtime[qnn]'``).

``onnxruntime-qnn`` is a plugin EP: its library is registered with ONNX Runtime once per process, and a
session adds it for the QNN devices it reports. On x86 Linux its ``libQnnHtp.so`` is the HTP simulator::

    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")   # every node on the HTP, or an error
    so.add_provider_for_devices(qnn_devices, {"backend_path": libQnnHtp.so, "soc_model": "60"})

``soc_model`` is required (without it float Gather fails to finalize and u16 x s8 layers are silently wrong).
A session that would leave nodes on the CPU is refused, and the error names those nodes and their ops
(found by a second, permissive session that records where each node went). ``dump_dir`` asks QNN for its
graph as JSON: :func:`qnn_ops` reads the QNN op types and tensor dtypes from it.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import onnxruntime as ort

from lora_runtime.errors import TargetError

QNN_EP = "QNNExecutionProvider"
QNN_INSTALL = "pip install 'lora_runtime[qnn]' (onnxruntime-qnn: Linux x86-64 or Windows ARM64, Python >= 3.11)"
_lock = threading.Lock()
_registered = False
# QNN's Qnn_DataType_t, as its JSON graph dump writes them
QNN_DTYPES = {0x008: "int8", 0x016: "int16", 0x032: "int32", 0x064: "int64", 0x108: "uint8", 0x116: "uint16",
              0x132: "uint32", 0x216: "float16", 0x232: "float32", 0x308: "sfixed8", 0x316: "sfixed16",
              0x332: "sfixed32", 0x408: "ufixed8", 0x416: "ufixed16", 0x432: "ufixed32", 0x508: "bool"}


def missing() -> str | None:
    """Why the HTP cannot be used in this process, or None when it can."""
    try:
        import onnxruntime_qnn  # noqa: F401
    except ImportError:
        return f"the HTP needs ONNX Runtime's QNN execution provider: {QNN_INSTALL}"
    return None


def _devices() -> list:  # list[ort.OrtEpDevice]
    global _registered
    reason = missing()
    if reason is not None:
        raise TargetError(reason)
    import onnxruntime_qnn as qnn

    with _lock:
        if not _registered:
            ort.register_execution_provider_library(QNN_EP, qnn.get_library_path())
            _registered = True
    devices = [d for d in ort.get_ep_devices() if d.ep_name == QNN_EP]
    if not devices:
        raise TargetError("onnxruntime-qnn is installed but reports no QNN device on this machine")
    return devices


def provider_options(soc_model: str | None, htp_arch: str | None = None, dump_dir: Path | None = None
                     ) -> dict[str, str]:
    import onnxruntime_qnn as qnn

    options = {"backend_path": qnn.get_qnn_htp_path(), "soc_model": soc_model or "60"}
    if htp_arch:
        options["htp_arch"] = htp_arch
    if dump_dir is not None:
        options |= {"dump_json_qnn_graph": "1", "json_qnn_graph_dir": str(dump_dir)}
    return options


def session(path: Path, soc_model: str | None, htp_arch: str | None = None, *,
            session_options: ort.SessionOptions | None = None, dump_dir: Path | None = None,
            config: Mapping[str, str] | None = None) -> ort.InferenceSession:
    """A session with every node on the HTP (or a TargetError naming the nodes that would not be)."""
    devices = _devices()
    so = session_options or ort.SessionOptions()
    so.log_severity_level = max(so.log_severity_level, 4)
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    so.add_provider_for_devices(devices, provider_options(soc_model, htp_arch, dump_dir))
    try:
        return ort.InferenceSession(str(path), so)
    except Exception as e:  # ORT raises Fail / RuntimeException with a long text; name what fell back instead
        cpu = _cpu_nodes(path, devices, soc_model, htp_arch)
        if cpu:
            shown = ", ".join(f"{op} {name!r}" for name, op in cpu[:5]) + (f" and {len(cpu) - 5} more"
                                                                            if len(cpu) > 5 else "")
            raise TargetError(f"{path}: {len(cpu)} node(s) cannot run on the HTP (QNN refuses them): {shown}") from e
        raise TargetError(f"{path}: the QNN execution provider refused the graph: {str(e).splitlines()[0]}") from e


def _cpu_nodes(path: Path, devices: list, soc_model: str | None, htp_arch: str | None) -> list[tuple[str, str]]:
    """(name, op type) of the nodes a permissive session leaves on the CPU."""
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    so.add_provider_for_devices(devices, provider_options(soc_model, htp_arch))
    try:
        s = ort.InferenceSession(str(path), so)
    except Exception:  # noqa: BLE001  (the graph is broken in a way a permissive session finds too)
        return []
    return [(n.name, n.op_type) for sub in s.get_provider_graph_assignment_info() if sub.ep_name != QNN_EP
            for n in sub.get_nodes()]


def placement(s: ort.InferenceSession) -> str:
    """Where a session's nodes run, in words (needs ``session.record_ep_graph_assignment_info``)."""
    counts = Counter()
    for sub in s.get_provider_graph_assignment_info():
        counts[sub.ep_name] += len(sub.get_nodes())
    return ", ".join(f"{n} nodes on {ep}" for ep, n in counts.most_common())


def qnn_ops(dump_dir: Path) -> dict[str, int]:
    """QNN op type with its input dtypes and output dtype -> count, from QNN's JSON graph dump, e.g.
    ``"FullyConnected ufixed16 x sfixed8 -> ufixed16": 14``."""
    counts: Counter[str] = Counter()
    for p in sorted(dump_dir.glob("*.json")):
        if p.name.endswith("_tensor_log.json"):
            continue
        graph = json.loads(p.read_text())["graph"]
        dtypes = {name: QNN_DTYPES.get(t.get("data_type"), "?") for name, t in graph["tensors"].items()}
        for node in graph["nodes"].values():
            ins = " x ".join(dtypes.get(t, "?") for t in node.get("input_names", [])[:2])
            outs = ",".join(dtypes.get(t, "?") for t in node.get("output_names", []))
            counts[f"{node['type']} {ins} -> {outs}"] += 1
    return dict(counts.most_common())
