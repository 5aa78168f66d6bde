"""What the user declares: adapters by name, and use-cases (``NAME=ADAPTER[:STRENGTH][,...]``), checked."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_runtime.compiler.adapter import Adapter, load_adapter
from lora_runtime.errors import UseCaseError
from lora_runtime.lora_config import check_name
from lora_runtime.manifest import saved_holder


@dataclass(frozen=True)
class UseCaseSpec:
    """A use-case as the user declares it: a name and the enabled adapters with their strengths."""

    name: str
    strengths: tuple[tuple[str, float], ...]


def parse_use_case(text: str) -> UseCaseSpec:
    """``NAME=ADAPTER[:STRENGTH][,ADAPTER[:STRENGTH]...]``; ``NAME=`` is the base model alone."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise UseCaseError(f"use-case {text!r}: expected NAME=ADAPTER[:STRENGTH][,...] (NAME= for the base model)")
    strengths = []
    for item in filter(None, (s.strip() for s in rest.split(","))):
        adapter, _, s = item.partition(":")
        try:
            value = float(s) if s else 1.0
        except ValueError:
            raise UseCaseError(f"use-case {name!r}: strength {s!r} of adapter {adapter!r} is not a number") from None
        strengths.append((adapter, value))
    return UseCaseSpec(name, tuple(strengths))


SHIPPED = Path(__file__).resolve().parents[1] / "data" / "adapters"  # package data: the trained SmolLM2 adapters


def parse_adapter_arg(text: str) -> tuple[str, str]:
    """``NAME=PEFT_DIR`` or ``NAME=FILE.gguf`` (or just the path: the folder name or file stem is the adapter name);
    ``@smollm2/caps`` names an adapter shipped with lora_runtime."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).stem if Path(text).suffix.lower() == ".gguf" else Path(text).name, text
    return name, str(shipped_adapter(path[1:])) if path.startswith("@") else path


def shipped_adapter(ref: str) -> Path:
    """A shipped adapter by its short name, ``<model>/<adapter>`` (e.g. ``smollm2/caps``)."""
    folder = SHIPPED / ref
    if ".." in Path(ref).parts or not (folder / "adapter_config.json").is_file():
        known = sorted(f"@{p.parent.parent.name}/{p.parent.name}" for p in SHIPPED.glob("*/*/adapter_config.json"))
        raise UseCaseError(f"@{ref}: no adapter of that name ships with lora_runtime; shipped: {', '.join(known)}")
    return folder


def load_adapters(adapters: Mapping[str, str | os.PathLike[str] | Adapter] | Sequence[Adapter],
                  base: str | os.PathLike[str] | None = None) -> list[Adapter]:
    """Folders or GGUF files (or already loaded adapters) by name, each loaded and validated; names must be unique.
    ``base``: the base model they are compiled against (a GGUF adapter's q/k rows need its head size)."""
    items = adapters.items() if isinstance(adapters, Mapping) else [(a.name, a) for a in adapters]
    loaded: list[Adapter] = []
    for name, a in items:
        if not isinstance(a, Adapter):
            a = load_adapter(a, name, base=base)
        elif a.name != name:
            raise UseCaseError(f"adapter {a.name!r} given under the name {name!r}")
        if any(b.name == a.name for b in loaded):
            raise UseCaseError(f"adapter name {a.name!r} is given twice")
        loaded.append(a)
    if not loaded:
        raise UseCaseError("no adapters given; pass at least one --adapter NAME=PEFT_DIR")
    return loaded


def check_use_cases(use_cases: Sequence[UseCaseSpec | str] | None, adapters: Sequence[Adapter],
                    generation: str) -> list[UseCaseSpec]:
    """The use-cases, parsed and checked; by default one per adapter at strength 1.0."""
    if use_cases is None:
        use_cases = [UseCaseSpec(a.name, ((a.name, 1.0),)) for a in adapters]
    specs = [parse_use_case(u) if isinstance(u, str) else u for u in use_cases]
    if not specs:
        raise UseCaseError("no use-cases given; pass at least one --use-case NAME=ADAPTER[:STRENGTH]")
    known = {a.name for a in adapters}
    seen: set[str] = set()
    for s in specs:
        try:
            check_name("use-case", s.name)
        except ValueError as e:
            raise UseCaseError(str(e)) from None
        if s.name in seen:
            raise UseCaseError(f"use-case {s.name!r} is given twice")
        seen.add(s.name)
        names = [a for a, _ in s.strengths]
        for a, v in s.strengths:
            if a not in known:
                raise UseCaseError(f"use-case {s.name!r}: unknown adapter {a!r} (known: {', '.join(sorted(known))})")
            if not math.isfinite(v):
                raise UseCaseError(f"use-case {s.name!r}: strength {v!r} of adapter {a!r} is not finite")
        if len(set(names)) != len(names):
            raise UseCaseError(f"use-case {s.name!r} names an adapter twice")
        if generation != "v3" and len(names) > 1:
            raise UseCaseError(f"use-case {s.name!r} enables {len(names)} adapters; {generation} holds one adapter "
                               "per use-case: compile with --generation v3 for multi-adapter use-cases")
        _check_saved_mix(s, [a for a in adapters if a.name in names])
    return specs


def _check_saved_mix(spec: UseCaseSpec, adapters: Sequence[Adapter]) -> None:
    """PEFT's rule for saved modules (``modules_to_save``): at most one adapter of a mix may hold a given module."""
    holders: dict[str, list[str]] = {}
    for a in adapters:
        for s in a.saved:
            holders.setdefault(s.module, []).append(a.name)
    for module, names in holders.items():
        try:
            saved_holder(module, names)
        except UseCaseError as e:
            raise UseCaseError(f"use-case {spec.name!r}: {e}") from None


def default_adapter(specs: Sequence[UseCaseSpec], adapters: Sequence[Adapter]) -> str:
    """v2's parameters hold the adapter of the first use-case that has one."""
    return next((s.strengths[0][0] for s in specs if s.strengths), adapters[0].name)
