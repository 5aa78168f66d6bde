"""Generate the classifier fixtures under ``tests/fixtures/cls/`` (bert/, vit/): PEFT adapters with ``modules_to_save``.

Reproduce (the fixture venv of ``tools/make_fixtures.py``; run from the repository root):

    /work/fxvenv/bin/python tools/make_cls_fixtures.py [--out tests/fixtures/cls]     # ~25 s, deterministic

Nothing is downloaded: two tiny classifiers are built from configs with seeded random weights (every 1-D
parameter gets seeded noise, ``make_fixtures.perturb_1d_params``, so no exporter drops a zero bias):

    bert: BertForSequenceClassification (vocab 64, hidden 32, 2 layers, 4 heads, num_labels 3); inputs input_ids,
          attention_mask (the second row padded by 2), token_type_ids, all (2, 7); the sequence axis is dynamic
    vit:  ViTForImageClassification (16x16 images, patch 8, hidden 32, 2 layers, num_labels 3); pixel_values
          (2, 3, 16, 16)

For each ``<out>/<family>/``:

    dynamo.onnx, torchscript.onnx   torch.onnx.export(dynamo=True, opset 20) and (dynamo=False, opset 17), checked
                                    against torch (max abs err 1e-4, make_fixtures.check_onnx)
    adapters/<name>/                real PEFT adapters (save_pretrained): LoRA weights and the saved modules'
                                    copies given seeded random values, so every saved module differs from the base
    inputs.npz                      the graph inputs by name
    expected.npz                    use-case -> float32 logits (2, 3) from real PEFT
    cases.json                      use-cases, refused mixes (with PEFT's own error), adapters (LoRA modules, saved
                                    modules and their tensor keys), graph facts, versions

PEFT's rules the expected values follow (peft 0.21.2, ``utils/other.py: ModulesToSaveWrapper``):

- A saved module replaces the whole module with the adapter's copy (weights and bias); strengths scale the LoRA
  branches only (``LoraLayer.scaling``), never a saved module.
- With several active adapters (``set_adapter([...])``) each wrapper uses the one active adapter that holds a
  copy; none: the base module; two or more: ``ValueError`` ("Only one adapter can be set at a time").
- ``PeftModelForSequenceClassification.add_adapter`` adds ``classifier``/``score`` to the ``modules_to_save`` of
  *every* adapter loaded into it, so an adapter saved without a classifier does not load into that class at all
  (``KeyError`` on the classifier's key), and two classification adapters always clash. The mixes here are
  computed on the generic ``PeftModel`` (the adapters without a task type are loaded first), where only the
  adapters whose files hold a module carry it; single adapters are checked on both classes, and ``cases.json``
  records the sequence-classification class's load error.

The script fails (non-zero exit) if an export drifts from torch, if PEFT disagrees with an independent computation
(LoRA deltas merged into a copy of the base, saved modules copied in from the safetensors file; 1e-5), if the base
(adapters disabled) is not the plain model, or if an adapter or a saved module does not move the logits.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import torch

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))

import make_fixtures as mf  # noqa: E402  (export checks, 1-D noise, versions, logging)

LORA_STD = 0.1  # seeded random lora_A / lora_B values
SAVED_STD = 0.3  # seeded noise added to an adapter's copy of a saved module (weights and bias)
CROSS_TOL = 1e-5
PREFIX = "base_model.model."

# name -> (LoraConfig kwargs, seed); the adapters without a task type come first (see the docstring)
BERT_ADAPTERS = {
    "plain": (dict(r=2, lora_alpha=16, target_modules=["query", "key"]), 11),
    "pool": (dict(r=4, lora_alpha=4, target_modules=["value"], modules_to_save=["pooler.dense"]), 12),
    "cls_a": (dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]), 13),
    "cls_b": (dict(task_type="SEQ_CLS", r=2, lora_alpha=2, use_rslora=True, target_modules=["key", "value"],
                   modules_to_save=["pooler.dense"]), 14),
}
BERT_CASES = {
    "base": {}, "plain": {"plain": 1.0}, "pool": {"pool": 1.0}, "cls_a": {"cls_a": 1.0}, "cls_b": {"cls_b": 1.0},
    "cls_a_half": {"cls_a": 0.5},  # the LoRA at half strength, the classifier whole
    "a_plain": {"cls_a": 1.0, "plain": 0.5},  # classifier from cls_a
    "a_pool": {"cls_a": 0.8, "pool": 1.0},  # classifier from cls_a, pooler.dense from pool
    "b_plain": {"cls_b": 1.0, "plain": 1.0},  # classifier and pooler.dense from cls_b
}
BERT_REFUSED = {"a_b": {"cls_a": 1.0, "cls_b": 1.0},  # both hold classifier
                "b_pool": {"cls_b": 1.0, "pool": 1.0}}  # both hold bert.pooler.dense
VIT_ADAPTERS = {
    "vit_a": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]), 21),
    "vit_b": (dict(r=2, lora_alpha=4, target_modules=["fc1"], modules_to_save=["classifier", "vit.layers.1.mlp.fc2"]),
              22),
}
VIT_CASES = {"base": {}, "vit_a": {"vit_a": 1.0}, "vit_b": {"vit_b": 1.0}, "vit_a_half": {"vit_a": 0.5}}
VIT_REFUSED = {"ab": {"vit_a": 1.0, "vit_b": 1.0}}


# --------------------------------------------------------------------------- models and inputs


def build_bert(seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, type_vocab_size=2, num_labels=3, initializer_range=0.2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg).to(torch.float32)
    mf.perturb_1d_params(model, seed + 1)
    return model.eval()


def build_vit(seed: int):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, num_labels=3, initializer_range=0.2,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = ViTForImageClassification(cfg).to(torch.float32)
    mf.perturb_1d_params(model, seed + 1)
    return model.eval()


def bert_inputs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 7), generator=g, dtype=torch.int64)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # the second sequence is padded
    types_ = torch.zeros_like(ids)
    types_[:, 4:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types_}


def vit_inputs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn((2, 3, 16, 16), generator=g)}


@torch.no_grad()
def run(model, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    return model(**inputs).logits.detach().to(torch.float32).numpy().copy()


# --------------------------------------------------------------------------- ONNX


def export_dynamo(model, inputs: dict[str, torch.Tensor], path: Path, dynamic_seq: bool) -> None:
    names = list(inputs)
    first, rest = names[0], {k: inputs[k] for k in names[1:]}
    dyn = None
    if dynamic_seq:
        seq = torch.export.Dim("seq", min=1, max=64)
        dyn = {k: {1: seq} for k in names}
    torch.onnx.export(copy.deepcopy(model).eval(), (inputs[first],), str(path), kwargs=rest or None,
                      input_names=names, output_names=["logits"], opset_version=mf.DYNAMO_OPSET, dynamo=True,
                      external_data=False, dynamic_shapes=dyn)


def export_torchscript(model, inputs: dict[str, torch.Tensor], path: Path, dynamic_seq: bool) -> None:
    m = copy.deepcopy(model).eval()
    names = list(inputs)

    def forward(self, *args):  # positional inputs in a fixed order, logits only
        return type(self).forward(self, **dict(zip(names, args))).logits

    m.forward = types.MethodType(forward, m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, tuple(inputs[k] for k in names), str(path), input_names=names, output_names=["logits"],
                          opset_version=mf.TORCHSCRIPT_OPSET, dynamo=False,
                          dynamic_axes={k: {1: "seq"} for k in names} if dynamic_seq else None)


def saved_module_ops(path: Path, modules: list[str]) -> dict[str, dict]:
    """How each saved module looks in the export: its MatMul/Gemm, the weight and the bias (Gemm C or an Add)."""
    import ast

    import onnx

    g = onnx.load(str(path)).graph
    inits = {i.name: list(i.dims) for i in g.initializer}
    out = {}
    for n in g.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        md = {p.key: p.value for p in n.metadata_props}
        scope = ast.literal_eval(md["pkg.torch.onnx.name_scopes"])[-2] if md else ".".join(
            n.name.strip("/").split("/")[:-1])
        if scope not in modules:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        bias = n.input[2] if len(n.input) > 2 else next(
            (i for c in g.node if c.op_type == "Add" and n.output[0] in c.input for i in c.input if i in inits), None)
        out[scope] = {"node": n.name, "op": n.op_type, "weight": n.input[1], "weight_shape": inits.get(n.input[1]),
                      "transB": attrs.get("transB", 0), "bias": bias, "bias_shape": inits.get(bias)}
    return out


# --------------------------------------------------------------------------- adapters


def make_adapter(base, name: str, kwargs: dict, seed: int, dest: Path, inputs, base_logits) -> dict:
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(base), LoraConfig(lora_dropout=0.0, bias="none", init_lora_weights=False,
                                                        **kwargs))
    g = torch.Generator().manual_seed(seed)
    lora = saved = 0
    with torch.no_grad():
        for n, p in sorted(pm.named_parameters(), key=lambda kv: kv[0]):
            if ".lora_A." in n or ".lora_B." in n:
                p.data = (torch.randn(p.shape, generator=g) * LORA_STD).to(torch.float32)
                lora += 1
            elif ".modules_to_save." in n:  # the adapter's copy: moved away from the base module
                p.data = p.data + torch.randn(p.shape, generator=g) * SAVED_STD
                saved += 1
    pm.eval()
    change = mf.rel_change(run(pm, inputs), base_logits)
    mf.log(f"  adapter {name}: {lora} LoRA tensors, {saved} saved-module tensors, relative logit change {change:.1%}")
    if not 0.02 <= change <= 3.0:
        mf.fail(f"adapter {name}: relative logit change {change:.3f} outside [0.02, 3.0]")
    out = dest / name
    if out.exists():
        shutil.rmtree(out)
    pm.save_pretrained(str(out), safe_serialization=True)
    for extra in out.iterdir():
        if extra.name not in ("adapter_config.json", "adapter_model.safetensors"):
            extra.unlink() if extra.is_file() else shutil.rmtree(extra)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("target_modules", "modules_to_save"):  # sets in PEFT: sorted for byte-identical re-runs
        if isinstance(cfg.get(key), list):
            cfg[key] = sorted(cfg[key])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return {"seed": seed, "relative_logit_change": round(change, 4), "modules_to_save": cfg.get("modules_to_save"),
            "task_type": cfg.get("task_type")}


def read_file(path: Path) -> tuple[dict, dict[str, dict], dict[str, dict[str, torch.Tensor]]]:
    """Independent reader: config, LoRA modules {A, B, scaling} and saved modules {tensor name: value}."""
    from safetensors.torch import load_file

    cfg = json.loads((path / "adapter_config.json").read_text())
    lora: dict[str, dict] = {}
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(path / "adapter_model.safetensors")).items():
        body = key.removeprefix(PREFIX)
        for ab in ("A", "B"):
            if body.endswith(f".lora_{ab}.weight"):
                lora.setdefault(body[: -len(f".lora_{ab}.weight")], {})[ab] = t
                break
        else:
            module, _, tensor = body.rpartition(".")
            saved.setdefault(module, {})[tensor] = t
    for d in lora.values():
        r = d["A"].shape[0]
        d["scaling"] = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    return cfg, lora, saved


@torch.no_grad()
def direct_logits(base, adapters_dir: Path, case: dict[str, float], inputs) -> np.ndarray:
    """W' = W0 + sum_i s_i * scaling_i * B_i A_i, and each saved module's tensors copied in from the file."""
    m = copy.deepcopy(base)
    for name, strength in case.items():
        _, lora, saved = read_file(adapters_dir / name)
        for module, d in lora.items():
            m.get_submodule(module).weight += strength * d["scaling"] * (d["B"] @ d["A"])
        for module, tensors in saved.items():
            layer = m.get_submodule(module)
            for tensor, value in tensors.items():
                getattr(layer, tensor).copy_(value)
    return run(m, inputs)


def load_peft(base, adapters_dir: Path, names: list[str]):
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(adapters_dir / names[0]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(adapters_dir / n), adapter_name=n)
    return pm.eval()


@torch.no_grad()
def peft_logits(pm, case: dict[str, float], inputs) -> np.ndarray:
    from peft.tuners.lora import LoraLayer

    if not case:
        with pm.disable_adapter():
            return run(pm, inputs)
    pm.base_model.set_adapter(list(case), inference_mode=True)  # also picks each saved module's copy
    layers = [mod for mod in pm.modules() if isinstance(mod, LoraLayer)]
    saved = []
    for layer in layers:
        for name, s in case.items():
            if name in layer.scaling:
                saved.append((layer, name, layer.scaling[name]))
                layer.scaling[name] = layer.scaling[name] * s
    try:
        return run(pm, inputs)
    finally:
        for layer, name, value in saved:
            layer.scaling[name] = value


def peft_error(pm, case: dict[str, float]) -> str:
    try:
        pm.base_model.set_adapter(list(case), inference_mode=True)
    except ValueError as e:
        return " ".join(str(e).split())
    mf.fail(f"PEFT accepted the mix {case}, expected a ValueError")
    return ""


# --------------------------------------------------------------------------- one family


def build_family(family: str, out_root: Path, base, inputs, adapters: dict, cases: dict, refused: dict,
                 dynamic_seq: bool) -> None:
    out = out_root / family
    if out.exists():
        shutil.rmtree(out)
    (out / "adapters").mkdir(parents=True)
    base_logits = run(base, inputs)
    mf.log(f"[{family}] base logits {base_logits.shape}")
    files = {}
    for fname, export in (("dynamo.onnx", export_dynamo), ("torchscript.onnx", export_torchscript)):
        mf.log(f"exporting {fname}")
        export(base, inputs, out / fname, dynamic_seq)
        files[fname] = {**mf.describe_onnx(out / fname), **mf.check_onnx(out / fname, base, inputs, base_logits, None)}
    info = {name: make_adapter(base, name, kw, seed, out / "adapters", inputs, base_logits)
            for name, (kw, seed) in adapters.items()}
    saved_modules = set()
    for name in adapters:
        _, lora, saved = read_file(out / "adapters" / name)
        info[name]["modules"] = sorted(lora)
        info[name]["saved_modules"] = {m: sorted(f"{PREFIX}{m}.{t}" for t in ts) for m, ts in sorted(saved.items())}
        saved_modules |= set(saved)
    for fname in files:
        files[fname]["saved_module_ops"] = saved_module_ops(out / fname, sorted(saved_modules))

    pm = load_peft(base, out / "adapters", list(adapters))
    expected, checks = {}, {}
    for case, mix in cases.items():
        got = peft_logits(pm, mix, inputs)
        direct = direct_logits(base, out / "adapters", mix, inputs)
        err = float(np.abs(got - direct).max())
        if err > CROSS_TOL:
            mf.fail(f"{family} {case}: PEFT and the direct computation differ by {err}")
        if not mix and not np.array_equal(got, base_logits):
            mf.fail(f"{family}: PEFT with adapters disabled is not the base model")
        if mix and mf.rel_change(got, base_logits) < 0.02:
            mf.fail(f"{family} {case}: hardly moves the logits")
        expected[case] = got
        checks[case] = {"max_abs_peft_vs_direct": err,
                        "relative_logit_change": round(mf.rel_change(got, base_logits), 4)}
        mf.log(f"  case {case:10s} {json.dumps(mix):40s} |peft - direct| {err:.1e}")
    errors = {case: {"adapters": mix, "peft_error": peft_error(pm, mix)} for case, mix in refused.items()}
    seq_cls = {}
    cls_names = [n for n, (kw, _) in adapters.items() if kw.get("task_type") == "SEQ_CLS"]
    if cls_names:  # PeftModelForSequenceClassification: see the docstring
        cls_pm = load_peft(base, out / "adapters", cls_names)
        for case, mix in cases.items():
            if len(mix) == 1 and set(mix) <= set(cls_names):  # one adapter: the same on both classes
                if not np.allclose(peft_logits(cls_pm, mix, inputs), expected[case], atol=CROSS_TOL, rtol=0):
                    mf.fail(f"{family} {case}: PeftModelForSequenceClassification differs from PeftModel")
        for n in adapters:
            if n not in cls_names:
                try:
                    cls_pm.load_adapter(str(out / "adapters" / n), adapter_name=n)
                except Exception as e:  # noqa: BLE001 - recorded, not hidden
                    seq_cls[f"load {n}"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                else:
                    mf.fail(f"{family}: PeftModelForSequenceClassification loaded {n} without a classifier")
    with torch.no_grad():
        np.savez(out / "inputs.npz", **{k: v.numpy() for k, v in inputs.items()})
    np.savez(out / "expected.npz", **expected)
    doc = {
        "output": "logits", "use_cases": cases, "refused": errors, "adapters": info, "models": files,
        "sequence_classification_class_errors": seq_cls, "checks": checks, "versions": mf.versions(),
        "notes": ("expected.npz: real PEFT (PeftModel.from_pretrained + load_adapter in the order of 'adapters', "
                  "set_adapter(list), strengths scale LoraLayer.scaling only), checked against LoRA deltas merged "
                  "into a copy of the base with the saved modules copied in from each adapter's safetensors. A saved "
                  "module is the whole module of the one active adapter that holds it (PEFT's ModulesToSaveWrapper); "
                  "'refused': mixes in which two adapters hold one module, with PEFT's ValueError. "
                  "sequence_classification_class_errors: PeftModelForSequenceClassification adds classifier/score "
                  "to the modules_to_save of every adapter loaded into it (add_adapter), so an adapter saved without "
                  "a classifier does not even load into that class (its file lacks the classifier's keys)."),
    }
    (out / "cases.json").write_text(json.dumps(doc, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "cls"))
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # bit-for-bit reproducible CPU reductions
    warnings.filterwarnings("ignore")
    build_family("bert", out, build_bert(2000), bert_inputs(2100), BERT_ADAPTERS, BERT_CASES, BERT_REFUSED, True)
    build_family("vit", out, build_vit(3000), vit_inputs(3100), VIT_ADAPTERS, VIT_CASES, VIT_REFUSED, False)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    mf.log(f"wrote {out}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
