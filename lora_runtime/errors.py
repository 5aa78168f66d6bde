"""One exception hierarchy for everything lora_runtime rejects.

Every message names the file, tensor, module or use-case at fault and what was expected, in one line.
The CLI prints it to stderr and exits with code 2.
"""

from __future__ import annotations


class LoraRuntimeError(Exception):
    """Base class: bad input or a state the user can fix. Never a bug in lora_runtime."""


class AdapterError(LoraRuntimeError):
    """A PEFT adapter folder, its config or its tensors are unusable."""


class BaseModelError(LoraRuntimeError):
    """The base ONNX model is missing, unreadable or has no usable attachment points."""


class AttachmentError(LoraRuntimeError):
    """An adapter's module does not resolve to exactly one attachment point, or its shapes do not fit."""


class BundleError(LoraRuntimeError):
    """A bundle directory is missing, tampered with, or does not fit this machine's base model."""


class UseCaseError(LoraRuntimeError):
    """A use-case is unknown, duplicated or invalid for the bundle's generation."""


class InputError(LoraRuntimeError):
    """Run-time inputs (feeds, strengths) have wrong names, dtypes, shapes or values."""


class TensorFileError(LoraRuntimeError):
    """A safetensors file is truncated, corrupt or holds an unsupported dtype."""


class TargetError(LoraRuntimeError):
    """A bundle cannot be built or run for the requested target (a free dimension, an op or option the HTP
    cannot take, a missing execution provider)."""


class BaseMismatchWarning(UserWarning):
    """An adapter's ``base_model_name_or_path`` does not look like the base model it is compiled onto."""
