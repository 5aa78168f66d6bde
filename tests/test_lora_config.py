"""LoraConfig against PEFT's documented rules (peft 0.21.2, ``LoraModel._create_and_replace`` and
``check_target_module_exists``); every expected number below is worked out by hand in its comment."""

from __future__ import annotations

import math
import re

import pytest

from lora_runtime.errors import AdapterError
from lora_runtime.lora_config import LoraConfig, check_name, rank_and_scaling

Q0 = "model.layers.0.self_attn.q_proj"
Q1 = "model.layers.1.self_attn.q_proj"
O0 = "model.layers.0.self_attn.o_proj"
O1 = "model.layers.1.self_attn.o_proj"
DOWN0 = "model.layers.0.mlp.down_proj"


def _config(**fields) -> LoraConfig:
    data = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    data.update(fields)
    return LoraConfig.from_json(data)


# (id, config fields, module, rank, scaling)
RANK_AND_SCALING = [
    ("plain alpha/r", {}, Q0, 8, 2.0),  # 16 / 8
    ("fractional alpha", {"r": 4, "lora_alpha": 2.5}, Q0, 4, 0.625),  # 2.5 / 4
    ("alpha below r", {"r": 16, "lora_alpha": 4}, Q0, 16, 0.25),  # 4 / 16
    ("rslora", {"r": 4, "lora_alpha": 8, "use_rslora": True}, Q0, 4, 4.0),  # 8 / sqrt(4)
    ("rslora r16", {"r": 16, "lora_alpha": 8, "use_rslora": True}, Q0, 16, 2.0),  # 8 / sqrt(16)
    ("lora_alpha missing: PEFT default 8", {"r": 16, "lora_alpha": None}, Q0, 16, 0.5),  # 8 / 16
    ("rank_pattern full path, hit", {"rank_pattern": {O1: 2}}, O1, 2, 8.0),  # 16 / 2
    ("rank_pattern full path, other layer", {"rank_pattern": {O1: 2}}, O0, 8, 2.0),  # 16 / 8
    ("rank_pattern suffix key", {"rank_pattern": {"down_proj": 4}}, DOWN0, 4, 4.0),  # 16 / 4
    ("rank_pattern dotted suffix key", {"rank_pattern": {"mlp.down_proj": 4}}, DOWN0, 4, 4.0),
    ("alpha_pattern suffix key", {"alpha_pattern": {"down_proj": 4}}, DOWN0, 8, 0.5),  # 4 / 8
    ("alpha_pattern leaves others", {"alpha_pattern": {"down_proj": 4}}, Q0, 8, 2.0),
    ("rank and alpha patterns together", {"rank_pattern": {"q_proj": 4}, "alpha_pattern": {"q_proj": 2}},
     Q0, 4, 0.5),  # 2 / 4
    # fixture b: rslora r8 a16, rank_pattern layer-1 o_proj r2, alpha_pattern down_proj a4
    ("b: o_proj layer 1", {"use_rslora": True, "rank_pattern": {O1: 2}, "alpha_pattern": {"down_proj": 4}},
     O1, 2, 11.313708498984761),  # 16 / sqrt(2)
    ("b: o_proj layer 0", {"use_rslora": True, "rank_pattern": {O1: 2}, "alpha_pattern": {"down_proj": 4}},
     O0, 8, 5.656854249492381),  # 16 / sqrt(8)
    ("b: down_proj", {"use_rslora": True, "rank_pattern": {O1: 2}, "alpha_pattern": {"down_proj": 4}},
     DOWN0, 8, 1.4142135623730951),  # 4 / sqrt(8)
    # the first key that matches wins, in file order
    ("first key wins: regex first", {"rank_pattern": {r"layers\.0\..*": 2, "q_proj": 4}}, Q0, 2, 8.0),
    ("first key wins: suffix first", {"rank_pattern": {"q_proj": 4, r"layers\.0\..*": 2}}, Q0, 4, 4.0),
    ("first key wins: regex misses layer 1", {"rank_pattern": {r"layers\.0\..*": 2, "q_proj": 4}}, Q1, 4, 4.0),
    # re.match(rf"(.*\.)?({key})$", module): a key must cover a whole dotted suffix
    ("key matching only a name tail", {"rank_pattern": {"proj": 2}}, Q0, 8, 2.0),
    ("key matching only a middle part", {"rank_pattern": {"self_attn": 2}}, Q0, 8, 2.0),
    ("key matching only a prefix", {"rank_pattern": {"model.layers.0": 2}}, Q0, 8, 2.0),
    ("key matching a name head", {"rank_pattern": {"q": 2}}, Q0, 8, 2.0),
    ("regex key covering the tail", {"rank_pattern": {".*_proj": 2}}, Q0, 2, 8.0),
    ("anchored key, whole path", {"rank_pattern": {"^model.layers.0.self_attn.q_proj": 2}}, Q0, 2, 8.0),
    ("anchored key, suffix only", {"rank_pattern": {"^self_attn.q_proj": 2}}, Q0, 8, 2.0),
]


@pytest.mark.parametrize(("fields", "module", "rank", "scaling"), [c[1:] for c in RANK_AND_SCALING],
                         ids=[c[0] for c in RANK_AND_SCALING])
def test_rank_and_scaling_follow_peft(fields, module, rank, scaling):
    data = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], **fields}
    if data["lora_alpha"] is None:
        del data["lora_alpha"]
    got_rank, got_scaling = rank_and_scaling(LoraConfig.from_json(data), module)
    assert got_rank == rank
    assert isinstance(got_rank, int) and isinstance(got_scaling, float)
    assert got_scaling == pytest.approx(scaling, rel=1e-12)


# (id, target_modules, exclude_modules, module, selected)
TARGETS = [
    ("name equals last component", ["q_proj"], None, Q0, True),
    ("name equals whole path", ["q_proj"], None, "q_proj", True),
    ("name is a tail of the last component", ["q_proj"], None, "model.layers.0.self_attn.xq_proj", False),
    ("name is a middle component", ["self_attn"], None, Q0, False),
    ("name is a prefix", ["model"], None, Q0, False),
    ("module inside the target", ["q_proj"], None, Q0 + ".base_layer", False),
    ("dotted name as a suffix", ["self_attn.q_proj"], None, Q0, True),
    ("dotted name: mlp.c_proj selects the mlp one", ["c_fc", "mlp.c_proj"], None, "transformer.h.0.mlp.c_proj", True),
    ("dotted name: mlp.c_proj skips attn.c_proj", ["c_fc", "mlp.c_proj"], None, "transformer.h.0.attn.c_proj", False),
    ("full path listed", [Q1], None, Q1, True),
    ("full path listed, other layer", [Q1], None, Q0, False),
    ("regex fullmatch hit", r".*\.mlp\.(gate|up)_proj", None, "model.layers.0.mlp.gate_proj", True),
    ("regex fullmatch other branch", r".*\.mlp\.(gate|up)_proj", None, "model.layers.1.mlp.up_proj", True),
    ("regex fullmatch miss", r".*\.mlp\.(gate|up)_proj", None, DOWN0, False),
    ("regex needs the leading dot", r".*\.mlp\.(gate|up)_proj", None, "mlp.gate_proj", False),
    ("regex must reach the end", r".*\.mlp\.(gate|up)_proj", None, "model.layers.0.mlp.gate_proj.base_layer", False),
    ("regex string is not a suffix name", "q_proj", None, Q0, False),
    ("regex string is not a search", r"layers\.0", None, Q0, False),
    ("exclude list suffix", ["q_proj"], ["layers.1.self_attn.q_proj"], Q1, False),
    ("exclude list keeps the rest", ["q_proj"], ["layers.1.self_attn.q_proj"], Q0, True),
    ("exclude list exact", ["q_proj"], [Q0], Q0, False),
    ("exclude regex", ["q_proj"], r".*layers\.1\..*", Q1, False),
    ("exclude regex keeps the rest", ["q_proj"], r".*layers\.1\..*", Q0, True),
    ("exclude regex is fullmatch", ["q_proj"], r"layers\.1", Q1, True),
    ("exclude regex must reach the end", ["q_proj"], r"model\.layers\.1", Q1, True),
]


@pytest.mark.parametrize(("targets", "exclude", "module", "selected"), [c[1:] for c in TARGETS],
                         ids=[c[0] for c in TARGETS])
def test_targets_follow_peft(targets, exclude, module, selected):
    config = _config(target_modules=targets, exclude_modules=exclude)
    assert config.targets(module) is selected


def test_from_json_keeps_the_declared_fields():
    data = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": True, "fan_in_fan_out": True,
            "rank_pattern": {"b": 2, "a": 3}, "alpha_pattern": {"c": 1.5}, "target_modules": ["a", "b", "c"],
            "exclude_modules": ["d"], "task_type": "CAUSAL_LM", "lora_dropout": 0.1}
    c = LoraConfig.from_json(data)
    assert (c.r, c.lora_alpha, c.use_rslora, c.fan_in_fan_out) == (4, 8.0, True, True)
    assert c.rank_pattern == (("b", 2), ("a", 3))  # file order kept: the first match wins
    assert c.alpha_pattern == (("c", 1.5),)
    assert c.target_modules == ("a", "b", "c") and c.exclude_modules == ("d",)
    assert c.extra == {"task_type": "CAUSAL_LM", "lora_dropout": 0.1}
    assert LoraConfig.from_json(c.to_json()) == c


def test_lowercase_peft_type_and_false_flags_are_accepted():
    c = LoraConfig.from_json({"peft_type": "lora", "r": 2, "lora_alpha": 2, "target_modules": ["x"],
                              "use_dora": False, "lora_bias": False, "target_parameters": None})
    assert (c.r, c.lora_alpha) == (2, 2.0)


# (id, fields to override, what the message must say)
REJECTED = [
    ("LoHa", {"peft_type": "LOHA"}, r"peft_type is 'LOHA'; only LoRA"),
    ("prefix tuning", {"peft_type": "PREFIX_TUNING"}, r"peft_type is 'PREFIX_TUNING'"),
    ("DoRA", {"use_dora": True}, r"use_dora is true; DoRA adapters are not supported"),
    ("r zero", {"r": 0}, r"r must be a positive integer, got 0"),
    ("r negative", {"r": -4}, r"r must be a positive integer, got -4"),
    ("r float", {"r": 4.0}, r"r must be a positive integer, got 4\.0"),
    ("r string", {"r": "4"}, r"r must be a positive integer, got '4'"),
    ("r bool", {"r": True}, r"r must be a positive integer, got True"),
    ("r missing", {"r": None}, r"r must be a positive integer, got None"),
    ("alpha NaN", {"lora_alpha": float("nan")}, r"lora_alpha must be a finite number, got nan"),
    ("alpha inf", {"lora_alpha": float("inf")}, r"lora_alpha must be a finite number, got inf"),
    ("alpha string", {"lora_alpha": "16"}, r"lora_alpha must be a finite number, got '16'"),
    ("alpha bool", {"lora_alpha": False}, r"lora_alpha must be a finite number, got False"),
    ("target regex invalid", {"target_modules": "(q_proj"}, r"target_modules '\(q_proj' is not a valid regex"),
    ("target list with a number", {"target_modules": ["q_proj", 3]}, r"target_modules must be a list"),
    ("target list empty", {"target_modules": []}, r"target_modules is empty"),
    ("target missing", {"target_modules": None}, r"target_modules is empty"),
    ("target empty regex", {"target_modules": ""}, r"target_modules is empty"),
    ("exclude regex invalid", {"exclude_modules": "["}, r"exclude_modules '\[' is not a valid regex"),
    ("target_parameters", {"target_parameters": ["experts.gate_up_proj"]}, r"target_parameters .* not supported"),
    ("lora_bias", {"lora_bias": True}, r"lora_bias is true"),
    ("rank_pattern zero", {"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] = 0 is not a valid rank"),
    ("rank_pattern float", {"rank_pattern": {"q_proj": 2.5}}, r"rank_pattern\['q_proj'\] = 2\.5"),
    ("rank_pattern bad regex", {"rank_pattern": {"(": 2}}, r"rank_pattern key '\(' is not a valid regex"),
    ("rank_pattern not an object", {"rank_pattern": [["q_proj", 2]]}, r"rank_pattern must be an object"),
    ("alpha_pattern NaN", {"alpha_pattern": {"q_proj": float("nan")}}, r"alpha_pattern\['q_proj'\] = nan"),
    ("alpha_pattern string", {"alpha_pattern": {"q_proj": "4"}}, r"alpha_pattern\['q_proj'\] = '4'"),
]


@pytest.mark.parametrize(("fields", "message"), [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED])
def test_from_json_rejects(fields, message):
    data = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], **fields}
    with pytest.raises(AdapterError) as info:
        LoraConfig.from_json(data, source="some/adapter_config.json")
    text = str(info.value)
    assert text.startswith("some/adapter_config.json: "), text
    assert re.search(message, text), text


def test_from_json_rejects_a_non_object():
    with pytest.raises(AdapterError, match=r"x\.json: expected a JSON object"):
        LoraConfig.from_json([1, 2], source="x.json")  # type: ignore[arg-type]


def test_rslora_uses_the_pattern_rank_not_r():
    """rsLoRA divides by sqrt of the module's own rank (rank_pattern), as PEFT's update_layer does."""
    c = _config(r=16, lora_alpha=12, use_rslora=True, rank_pattern={"q_proj": 9})
    assert rank_and_scaling(c, Q0) == (9, 4.0)  # 12 / sqrt(9)
    assert math.isclose(rank_and_scaling(c, O0)[1], 3.0)  # 12 / sqrt(16)


NAMES = [
    ("my-adapter_1.v2", True),
    ("a", True),
    ("A+B", True),
    ("x" * 128, True),
    ("x" * 129, False),
    ("", False),
    ("../x", False),
    ("a/b", False),
    ("a\\b", False),
    ("..", False),
    ("a..b", False),
    (".hidden", False),
    ("-flag", False),
    ("with space", False),
    ("tab\t", False),
    ("ünïcode", False),
]


@pytest.mark.parametrize(("name", "ok"), NAMES)
def test_check_name(name, ok):
    if ok:
        assert check_name("adapter", name) == name
    else:
        with pytest.raises(ValueError, match=r"invalid adapter name"):
            check_name("adapter", name)


def test_check_name_rejects_a_non_string():
    with pytest.raises(ValueError, match="invalid use-case name 3"):
        check_name("use-case", 3)  # type: ignore[arg-type]


@pytest.mark.parametrize("key", ["alora_invocation_tokens", "arrow_config", "use_bdlora", "velora_config",
                                 "monteclora_config", "kasa_config", "layer_replication"])
def test_lora_variants_that_change_the_forward_pass_are_rejected(key):
    data = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], key: [[0, 1]]}
    with pytest.raises(AdapterError, match=key):
        LoraConfig.from_json(data, source="cfg.json")
    data[key] = None  # PEFT writes null for unset variants: those load
    assert LoraConfig.from_json(data).r == 4
