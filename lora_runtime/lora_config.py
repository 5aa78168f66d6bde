"""What a PEFT ``adapter_config.json`` declares, and the one function that turns it into numbers.

Per-module rank and scaling are resolved here and nowhere else (the builder, the bundle and the
switcher all call :func:`rank_and_scaling`), following PEFT's ``LoraModel._create_and_replace``:

    r     = rank_pattern[first key k with re.match(rf"(.*\\.)?({k})$", module)]  else r
    alpha = alpha_pattern[same rule]                                               else lora_alpha
    scaling = alpha / sqrt(r) if use_rslora else alpha / r
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from lora_runtime.errors import AdapterError

# PEFT 0.21 LoRA variants whose forward pass is not W0 x + scaling * B A x, and layer_replication.
_VARIANTS = ("alora_invocation_tokens", "arrow_config", "use_bdlora", "velora_config", "monteclora_config",
             "kasa_config", "layer_replication")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")


def check_name(kind: str, name: str) -> str:
    """Adapter and use-case names become file names inside a bundle: no separators, no '..'."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"invalid {kind} name {name!r}: use letters, digits and _ . + - "
                         "(no path separators, no '..', at most 128 characters)")
    return name


@dataclass(frozen=True)
class LoraConfig:
    """The LoRA fields of a PEFT ``adapter_config.json`` that change the math or the wiring."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    # Ordered (pattern, value) pairs: PEFT takes the first pattern that matches.
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    # Describes the base weight's layout in PyTorch (GPT-2 Conv1D stores (in, out)). LoRA A/B keep
    # (r, in) / (out, r) either way, and in ONNX the op decides orientation, so it changes no math here.
    fan_in_fan_out: bool = False
    target_modules: tuple[str, ...] | str = ()  # a list of names, or one regex matched with fullmatch
    exclude_modules: tuple[str, ...] | str = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # the rest of the file, kept as is

    def targets(self, module: str) -> bool:
        """Whether PEFT would attach this config to ``module`` (``check_target_module_exists``)."""
        if _matches(self.exclude_modules, module):
            return False
        return _matches(self.target_modules, module)

    @property
    def modules_to_save(self) -> tuple[str, ...]:
        """Modules the adapter saves whole (PEFT's ``modules_to_save``; kept in ``extra``, validated)."""
        names = self.extra.get("modules_to_save")
        return tuple(names) if isinstance(names, list) else ()

    def saves(self, module: str) -> bool:
        """Whether ``modules_to_save`` selects ``module``: PEFT's ``_set_trainable`` rule, a plain suffix match."""
        return any(module.endswith(name) for name in self.modules_to_save)

    def to_json(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update(peft_type="LORA", r=self.r, lora_alpha=self.lora_alpha, use_rslora=self.use_rslora,
                   rank_pattern=dict(self.rank_pattern), alpha_pattern=dict(self.alpha_pattern),
                   fan_in_fan_out=self.fan_in_fan_out,
                   target_modules=self.target_modules if isinstance(self.target_modules, str)
                   else list(self.target_modules),
                   exclude_modules=self.exclude_modules if isinstance(self.exclude_modules, str)
                   else list(self.exclude_modules) or None)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "adapter_config.json") -> LoraConfig:
        """Validate a parsed ``adapter_config.json``; reject what is not plain LoRA."""
        if not isinstance(data, dict):
            raise AdapterError(f"{source}: expected a JSON object")
        peft_type = str(data.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise AdapterError(f"{source}: peft_type is {data.get('peft_type')!r}; only LoRA adapters are supported")
        if data.get("use_dora"):
            raise AdapterError(f"{source}: use_dora is true; DoRA adapters are not supported "
                               "(retrain with use_dora=False)")
        if data.get("target_parameters"):
            raise AdapterError(f"{source}: target_parameters (LoRA on raw parameters) is not supported")
        if data.get("lora_bias"):
            raise AdapterError(f"{source}: lora_bias is true; LoRA with a bias on lora_B is not supported")
        for key in _VARIANTS:  # each changes PEFT's forward pass; loading them as plain LoRA would be wrong
            if data.get(key):
                raise AdapterError(f"{source}: {key} is set; this LoRA variant changes the forward pass and is "
                                   "not supported (plain LoRA only)")
        saved = data.get("modules_to_save")
        if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) and m for m in saved)):
            raise AdapterError(f"{source}: modules_to_save must be a list of module names, got {saved!r}")
        r = data.get("r")
        alpha = data.get("lora_alpha", 8)  # PEFT LoraConfig default (not r): what PEFT loads for a missing key
        if not _is_int(r) or r <= 0:
            raise AdapterError(f"{source}: r must be a positive integer, got {r!r}")
        if not _is_number(alpha):
            raise AdapterError(f"{source}: lora_alpha must be a finite number, got {alpha!r}")
        rank_pattern = _pattern(source, "rank_pattern", data.get("rank_pattern"), integer=True)
        alpha_pattern = _pattern(source, "alpha_pattern", data.get("alpha_pattern"), integer=False)
        targets = _targets(source, "target_modules", data.get("target_modules"))
        if not targets:
            raise AdapterError(f"{source}: target_modules is empty")
        known = {"peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out",
                 "target_modules", "exclude_modules"}
        return cls(r=int(r), lora_alpha=float(alpha), use_rslora=bool(data.get("use_rslora", False)),
                   rank_pattern=tuple((k, int(v)) for k, v in rank_pattern),
                   alpha_pattern=tuple((k, float(v)) for k, v in alpha_pattern),
                   fan_in_fan_out=bool(data.get("fan_in_fan_out", False)), target_modules=targets,
                   exclude_modules=_targets(source, "exclude_modules", data.get("exclude_modules")),
                   extra={k: v for k, v in data.items() if k not in known})


def rank_and_scaling(config: LoraConfig, module: str) -> tuple[int, float]:
    """The rank and the PEFT scaling of ``module`` under ``config``: the only place this is computed."""
    r = _pattern_value(config.rank_pattern, module, config.r)
    alpha = _pattern_value(config.alpha_pattern, module, config.lora_alpha)
    return int(r), float(alpha / math.sqrt(r) if config.use_rslora else alpha / r)


def _pattern_value(pattern: tuple[tuple[str, Any], ...], module: str, default: Any) -> Any:
    # PEFT's get_pattern_key: the first key that matches a whole dotted suffix wins.
    for key, value in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _matches(targets: tuple[str, ...] | str, module: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return module in targets or any(module.endswith("." + t) for t in targets)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _pattern(source: str, key: str, value: object, *, integer: bool) -> list[tuple[str, float]]:
    if value is None:
        return []
    if not isinstance(value, dict):
        raise AdapterError(f"{source}: {key} must be an object mapping module patterns to numbers")
    out = []
    for k, v in value.items():
        ok = _is_int(v) and v > 0 if integer else _is_number(v)
        if not ok:
            raise AdapterError(f"{source}: {key}[{k!r}] = {v!r} is not a valid {'rank' if integer else 'alpha'}")
        try:
            re.compile(k)
        except re.error as e:
            raise AdapterError(f"{source}: {key} key {k!r} is not a valid regex ({e})") from e
        out.append((k, v))
    return out


def _targets(source: str, key: str, value: object) -> tuple[str, ...] | str:
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            raise AdapterError(f"{source}: {key} {value!r} is not a valid regex ({e})") from e
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise AdapterError(f"{source}: {key} must be a list of module names or a regex string, got {value!r}")
