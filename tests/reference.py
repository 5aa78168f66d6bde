"""Independent references for the tests: PEFT's math written out in numpy, read with the real
``safetensors`` package, merged into the base weights and run as a plain ONNX graph.

Nothing here imports lora_runtime's compiler: a bug there cannot hide in the expected values.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from safetensors.numpy import load_file


def peft_scaling(config: dict, module: str) -> tuple[int, float]:
    """PEFT's rank/alpha resolution and scaling, restated."""
    def pick(pattern: dict, default: float) -> float:
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    r = pick(config.get("rank_pattern") or {}, config["r"])
    alpha = pick(config.get("alpha_pattern") or {}, config["lora_alpha"])
    return int(r), alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def peft_deltas(folder: str | Path) -> dict[str, np.ndarray]:
    """module -> scaling * B @ A, shape (out, in), from a PEFT folder."""
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        b = tensors[key.replace("lora_A", "lora_B")]
        _, scaling = peft_scaling(config, module)
        out[module] = scaling * (b.astype(np.float64) @ a.astype(np.float64))
    return out


def load_with_data(path: str | Path) -> onnx.ModelProto:
    """onnx.load with external data read by hand: onnx refuses data files that have several hard links."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            with open(path.parent / info["location"], "rb") as f:
                f.seek(int(info.get("offset", 0)))
                t.raw_data = f.read(int(info["length"]))
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
    return model


def merged_outputs(base: str | Path, mix: dict[str, float], adapters: dict[str, Path],
                   feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``base`` with W0 + sum_i s_i * delta_i merged into weights named ``<module>.weight`` (in, out)."""
    model = load_with_data(base)
    inits = {t.name: t for t in model.graph.initializer}
    total: dict[str, np.ndarray] = {}
    for name, s in mix.items():
        for module, delta in peft_deltas(adapters[name]).items():
            total[module] = total.get(module, 0) + s * delta
    for module, delta in total.items():
        t = inits[f"{module}.weight"]
        w = numpy_helper.to_array(t).astype(np.float64) + delta.T  # MatMul weights are (in, out)
        t.CopyFrom(numpy_helper.from_array(w.astype(np.float32), t.name))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))
