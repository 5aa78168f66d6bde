"""lora_runtime: compile a base ONNX model + PEFT LoRA adapters into v1/v2/v3 bundles and run them.

    from lora_runtime import compile_bundle, load_adapter, run_use_case

    bundle = compile_bundle("base.onnx", {"a": "peft/a", "b": "peft/b"}, "out/bundle",
                            generation="v3", use_cases=["mix=a:1.0,b:0.5", "base="])
    logits = run_use_case(bundle.path, "mix", {"input_ids": ids})["logits"]
"""

__version__ = "0.1.0"

from lora_runtime.bundle import Bundle, Manifest, open_bundle  # noqa: E402
from lora_runtime.compiler.adapter import Adapter, load_adapter  # noqa: E402
from lora_runtime.compiler.compile import UseCaseSpec, compile_bundle, parse_use_case  # noqa: E402
from lora_runtime.errors import (  # noqa: E402
    AdapterError,
    AttachmentError,
    BaseModelError,
    BundleError,
    InputError,
    LoraRuntimeError,
    TensorFileError,
    UseCaseError,
)
from lora_runtime.runtime.runtime import Runtime, SwitchReport  # noqa: E402
from lora_runtime.runtime.simple import run_use_case  # noqa: E402

__all__ = [
    "Adapter", "AdapterError", "AttachmentError", "BaseModelError", "Bundle", "BundleError", "InputError",
    "LoraRuntimeError", "Manifest", "Runtime", "SwitchReport", "TensorFileError", "UseCaseError", "UseCaseSpec",
    "compile_bundle", "load_adapter", "open_bundle", "parse_use_case", "run_use_case",
]
