"""lora_runtime: compile a base ONNX model + PEFT LoRA adapters into v1/v2/v3 bundles, and run them.

    from lora_runtime import CompileOptions, Runtime, compile_bundle

    bundle = compile_bundle("base.onnx", {"a": "peft/a", "b": "peft/b"}, "out/bundle",
                            generation="v3", use_cases=["mix=a:1.0,b:0.5", "a=a", "base="])
    rt = Runtime.open(bundle.path)
    rt.switch("mix")
    logits = rt.run({"input_ids": ids})["logits"]
"""

from lora_runtime.bundle import Bundle, open_bundle
from lora_runtime.compiler.adapter import Adapter, load_adapter
from lora_runtime.compiler.compile import compile_bundle
from lora_runtime.compiler.options import CompileOptions, HtpOptions, QuantOptions, WeightOnlyOptions
from lora_runtime.compiler.use_cases import UseCaseSpec, parse_use_case
from lora_runtime.errors import (
    AdapterError,
    AttachmentError,
    BaseModelError,
    BundleError,
    InputError,
    LoraRuntimeError,
    TargetError,
    TensorFileError,
    UseCaseError,
)
from lora_runtime.manifest import Manifest
from lora_runtime.runtime.session import run_use_case
from lora_runtime.runtime.switcher import Runtime, SwitchReport
from lora_runtime.version import __version__

__all__ = [
    "Adapter", "AdapterError", "AttachmentError", "BaseModelError", "Bundle", "BundleError", "CompileOptions",
    "HtpOptions", "InputError", "LoraRuntimeError", "Manifest", "QuantOptions", "Runtime", "SwitchReport",
    "TargetError", "TensorFileError", "UseCaseError", "UseCaseSpec", "WeightOnlyOptions", "__version__",
    "compile_bundle", "load_adapter", "open_bundle", "parse_use_case", "run_use_case",
]
