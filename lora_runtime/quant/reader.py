"""Reading an encodings file, whichever layout AIMET wrote: 1.0.0 (:mod:`lora_runtime.quant.encodings`, what
lora_runtime writes), 2.0.0 and aimet_onnx's per-adapter LoRA files (:mod:`lora_runtime.quant.aimet_formats`),
all into the 1.0.0 form."""

from __future__ import annotations

import json
import os
from typing import Any

from lora_runtime.quant import aimet_formats
from lora_runtime.quant.encodings import EncodingsError, EncodingsFile


def parse_encodings(data: Any, source: str = "<memory>") -> EncodingsFile:
    """A decoded JSON document of any layout, parsed and validated."""
    if isinstance(data, dict) and (data.get("version") == aimet_formats.V2 or aimet_formats.is_per_adapter(data)):
        return aimet_formats.from_json(data, source)
    return EncodingsFile.from_json(data, source)


def read_encodings(path: str | os.PathLike[str]) -> EncodingsFile:
    """Read and validate an encodings JSON file; every failure is an EncodingsError naming the file."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise EncodingsError(f"{source}: no such encodings file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EncodingsError(f"{source}: not readable JSON ({exc})") from None
    return parse_encodings(data, source)
