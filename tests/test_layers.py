"""The house is one-way: the layer contracts in pyproject.toml hold, and no module grows into a mixed room."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 400
# import-linter configures logging for the whole process and caches in the working directory: its own process
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")


def test_layer_contracts_hold():
    done = subprocess.run([sys.executable, "-c", LINT], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 kept, 0 broken" in done.stdout  # every contract was read and checked


def test_no_module_over_the_size_of_one_room():
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines())
             for p in (ROOT / "lora_runtime").rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > MAX_LINES} == {}
