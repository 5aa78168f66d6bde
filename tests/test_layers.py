"""The house is one-way: the layer contracts in pyproject.toml hold, and no module grows into a mixed room."""

from __future__ import annotations

from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 400


def test_layer_contracts_hold(capsys):
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml")) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "3 kept, 0 broken" in out  # every contract was read and checked


def test_no_module_over_the_size_of_one_room():
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines())
             for p in (ROOT / "lora_runtime").rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > MAX_LINES} == {}
