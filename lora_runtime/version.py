"""The package version, and the versions of what a bundle was built with (recorded in its manifest)."""

from __future__ import annotations

import platform
from importlib import metadata

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    """lora_runtime, onnx, onnxruntime, numpy and Python, as installed (``-`` for a package that is not)."""
    out = {"lora_runtime": __version__}
    for dist in ("onnx", "onnxruntime", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "-"
    out["python"] = platform.python_version()
    return out
