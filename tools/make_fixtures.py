"""Generate the golden test fixtures under ``tests/fixtures/`` (llama/ and gpt2/).

Reproduce (CPU only, no model hub access needed; run from the repository root):

    python3 -m venv /work/fxvenv
    /work/fxvenv/bin/pip install torch==2.13.0
    /work/fxvenv/bin/pip install -c <(echo torch==2.13.0) \\
        transformers peft onnxscript onnx onnxruntime safetensors numpy
    /work/fxvenv/bin/python tools/make_fixtures.py [--out tests/fixtures]

(the fixtures were made with torch 2.13.0+cpu, transformers 5.24.0, peft 0.21.2,
onnx 1.23.2, onnxscript 0.7.2, onnxruntime 1.32.0; the exact versions used are
recorded in every cases.json).

Nothing is downloaded: the two tiny models are built from configs with seeded
random weights.  For each model family the script writes ``<out>/<family>/``:

    dynamo.onnx          torch.onnx.export(..., dynamo=True), weights inside the file
    torchscript.onnx     torch.onnx.export(..., dynamo=False) (legacy TorchScript exporter)
    adapters/<name>/     real PEFT LoRA adapters (adapter_config.json +
                         adapter_model.safetensors, written by save_pretrained)
    inputs.npz           graph inputs (int64 input_ids (1, 7), attention_mask of ones);
                         keys are graph input names; a graph may declare only a
                         subset (see cases.json "models")
    expected.npz         use-case name -> float32 logits (1, 7, vocab) computed by
                         real PEFT in torch (adapters loaded back from the saved
                         folders, computed in float32)
    cases.json           output name, use-cases ({adapter: strength}), versions,
                         per-file graph inputs/outputs/opset, adapter summaries, notes

Semantics of a use-case {adapter_i: s_i}: for every targeted Linear/Conv1D,
y = W0 x + sum_i s_i * scaling_i * B_i A_i x, with scaling_i = alpha/r
(alpha/sqrt(r) for use_rslora), rank/alpha taken per module from
rank_pattern/alpha_pattern.  The script fails (non-zero exit) if an ONNX file
does not reproduce the torch base logits (max abs err 1e-4), if the PEFT
results disagree with an independent merged-weight computation (1e-5), or if an
adapter does not change the logits noticeably.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch

SEQ_LEN = 7
LORA_INIT_STD = 0.06  # default std of the random lora_A / lora_B values (per adapter below)
NORM_NOISE_STD = 0.1  # noise added to norm weights / biases (see notes)
ONNX_TOL = 1e-4
CROSS_TOL = 1e-5
TORCHSCRIPT_OPSET = 17
DYNAMO_OPSET = 20  # the torch 2.13 default

ALL_NOTES: dict[str, list[str]] = {}


def log(msg: str) -> None:
    print(msg, flush=True)


def fail(msg: str) -> None:
    print(f"FIXTURE CHECK FAILED: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import peft
    import safetensors
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }


# --------------------------------------------------------------------------- models


def perturb_1d_params(model: torch.nn.Module, seed: int) -> None:
    """Give norm weights/biases (init 1 / 0) seeded random values.

    Otherwise the exporters fold them: identical all-ones norm weights get
    deduplicated and GPT-2's all-zero Conv1D biases are dropped from the Gemm.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * NORM_NOISE_STD)


def build_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        use_cache=False,
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    perturb_1d_params(model, seed + 1)
    return model.eval()


def build_gpt2(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False)
    model = GPT2LMHeadModel(cfg).to(torch.float32)
    perturb_1d_params(model, seed + 1)
    return model.eval()


def make_inputs(seed: int, seq_len: int = SEQ_LEN) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 64, (1, seq_len), generator=g, dtype=torch.int64)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@torch.no_grad()
def run_torch(model, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
    return out.logits.detach().to(torch.float32).numpy().copy()


# --------------------------------------------------------------------------- ONNX


def export_dynamo(model, inputs, path: Path, with_mask: bool) -> None:
    m = copy.deepcopy(model).eval()
    seq = torch.export.Dim("seq", min=1, max=64)
    kwargs = {"attention_mask": inputs["attention_mask"]} if with_mask else None
    dyn = {"input_ids": {1: seq}}
    names = ["input_ids"]
    if with_mask:
        dyn["attention_mask"] = {1: seq}
        names.append("attention_mask")
    torch.onnx.export(
        m,
        (inputs["input_ids"],),
        str(path),
        kwargs=kwargs,
        input_names=names,
        output_names=["logits"],
        opset_version=DYNAMO_OPSET,
        dynamo=True,
        external_data=False,
        dynamic_shapes=dyn,
    )


def export_torchscript(model, inputs, path: Path) -> None:
    m = copy.deepcopy(model).eval()

    # The legacy exporter traces forward(*args).  Calling the HF forward with
    # positional (input_ids, attention_mask) turns the int default
    # `logits_to_keep` into a graph input, so pin the signature on the instance
    # (keeps the module scope names identical to the plain model:
    # /model/layers.0/self_attn/q_proj/MatMul).
    def forward(self, input_ids, attention_mask):
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    m.forward = types.MethodType(forward, m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            m,
            (inputs["input_ids"], inputs["attention_mask"]),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            opset_version=TORCHSCRIPT_OPSET,
            dynamo=False,
            dynamic_axes={"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}, "logits": {1: "seq"}},
        )


def describe_onnx(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path))
    if any(i.data_location == onnx.TensorProto.EXTERNAL for i in m.graph.initializer):
        fail(f"{path} uses external data")

    def shape(v):
        return [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]

    return {
        "opset": {(o.domain or "ai.onnx"): o.version for o in m.opset_import},
        "inputs": {i.name: shape(i) for i in m.graph.input},
        "outputs": {o.name: shape(o) for o in m.graph.output},
    }


def check_onnx(path: Path, model, inputs, base_logits: np.ndarray, extra_seq: int | None) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    outs = [o.name for o in sess.get_outputs()]
    if outs != ["logits"]:
        fail(f"{path}: outputs {outs}, expected ['logits']")
    feed = {n: inputs[n].numpy() for n in names}
    got = sess.run(["logits"], feed)[0]
    err = float(np.abs(got - base_logits).max())
    log(f"  {path.name}: inputs={names} max|onnx-torch|={err:.3e}")
    if got.shape != base_logits.shape or err > ONNX_TOL:
        fail(f"{path}: onnxruntime logits differ from torch (shape {got.shape}, err {err})")
    info = {"max_abs_err_vs_torch": err}
    if extra_seq is not None:  # dynamic sequence length really works
        other = make_inputs(777, extra_seq)
        ref = run_torch(model, other)
        got2 = sess.run(["logits"], {n: other[n].numpy() for n in names})[0]
        err2 = float(np.abs(got2 - ref).max())
        log(f"  {path.name}: seq_len={extra_seq} max|onnx-torch|={err2:.3e}")
        if got2.shape != ref.shape or err2 > ONNX_TOL:
            fail(f"{path}: dynamic sequence length check failed (err {err2})")
    return info


# --------------------------------------------------------------------------- adapters


def safetensors_dtypes(path: Path) -> dict[str, str]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def rel_change(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def make_adapter(base, name: str, lora_kwargs: dict, seed: int, std: float, dest: Path, inputs, base_logits,
                 save_dtype: torch.dtype | None = None) -> dict:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", **lora_kwargs)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(seed)
    lora_params = sorted(
        ((n, p) for n, p in pm.named_parameters() if ".lora_A." in n or ".lora_B." in n), key=lambda kv: kv[0]
    )
    if not lora_params:
        fail(f"adapter {name}: no LoRA parameters were created")
    with torch.no_grad():
        for _, p in lora_params:
            p.data = (torch.randn(p.shape, generator=g) * std).to(torch.float32)
    pm.eval()
    logits = run_torch(pm, inputs)
    change = rel_change(logits, base_logits)
    log(f"  adapter {name}: {len(lora_params)} LoRA tensors, relative logit change {change:.1%}")
    if not 0.01 <= change <= 1.0:
        fail(f"adapter {name}: relative logit change {change:.3f} outside [0.01, 1.0]")
    if save_dtype is not None:
        with torch.no_grad():
            for _, p in lora_params:
                p.data = p.data.to(save_dtype)
    out_dir = dest / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    pm.save_pretrained(str(out_dir), safe_serialization=True)
    # save_pretrained also writes a model card; keep only the two adapter files.
    for extra in out_dir.iterdir():
        if extra.name not in ("adapter_config.json", "adapter_model.safetensors"):
            extra.unlink() if extra.is_file() else shutil.rmtree(extra)
    # PEFT stores target_modules as a set, so the saved list order depends on PYTHONHASHSEED; sort it
    # (same serialisation as PeftConfig.save_pretrained) to make the fixture byte-for-byte reproducible.
    cfg_path = out_dir / "adapter_config.json"
    cfg_json = json.loads(cfg_path.read_text())
    if isinstance(cfg_json.get("target_modules"), list):
        cfg_json["target_modules"] = sorted(cfg_json["target_modules"])
    cfg_path.write_text(json.dumps(cfg_json, indent=2, sort_keys=True))
    st = out_dir / "adapter_model.safetensors"
    dtypes = safetensors_dtypes(st)
    want = {None: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[save_dtype]
    if set(dtypes.values()) != {want}:
        fail(f"adapter {name}: saved dtypes {set(dtypes.values())}, expected {want}")
    return {"seed": seed, "init_std": std, "relative_logit_change": round(change, 4), "tensor_dtype": want,
            "num_tensors": len(dtypes)}


def module_of_key(key: str) -> tuple[str, str]:
    """'base_model.model.X.lora_A.weight' -> ('X', 'A')."""
    prefix = "base_model.model."
    assert key.startswith(prefix), key
    body = key[len(prefix):]
    for ab in ("A", "B"):
        suffix = f".lora_{ab}.weight"
        if body.endswith(suffix):
            return body[: -len(suffix)], ab
    raise ValueError(f"unexpected adapter tensor key {key}")


def pattern_lookup(pattern: dict, module: str, default):
    """PEFT semantics: a pattern key matches a module name equal to it or ending in '.key'."""
    import re

    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(path: Path) -> tuple[dict, dict[str, dict]]:
    """Independent reader: config + per-module {A, B, r, alpha, scaling} in float32."""
    from safetensors.torch import load_file

    cfg = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(str(path / "adapter_model.safetensors"))
    mods: dict[str, dict] = {}
    for key, t in tensors.items():
        mod, ab = module_of_key(key)
        mods.setdefault(mod, {})[ab] = t.to(torch.float32)
    for mod, d in mods.items():
        r = d["A"].shape[0]
        if d["B"].shape[1] != r:
            fail(f"{path}: {mod} inconsistent rank")
        want_r = pattern_lookup(cfg.get("rank_pattern") or {}, mod, cfg["r"])
        if r != want_r:
            fail(f"{path}: {mod} has rank {r}, config says {want_r}")
        alpha = pattern_lookup(cfg.get("alpha_pattern") or {}, mod, cfg["lora_alpha"])
        d["r"], d["alpha"] = r, alpha
        d["scaling"] = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return cfg, mods


@torch.no_grad()
def direct_logits(base, adapters_dir: Path, case: dict[str, float], inputs) -> np.ndarray:
    """W' = W0 + sum_i s_i * scaling_i * B_i A_i, merged into a copy of the base model."""
    from transformers.pytorch_utils import Conv1D

    m = copy.deepcopy(base)
    for name, strength in case.items():
        cfg, mods = read_adapter(adapters_dir / name)
        for mod, d in mods.items():
            layer = m.get_submodule(mod)
            delta = strength * d["scaling"] * (d["B"] @ d["A"])  # (out, in)
            if isinstance(layer, Conv1D):
                if not cfg.get("fan_in_fan_out"):
                    fail(f"{name}: Conv1D target without fan_in_fan_out")
                layer.weight += delta.T  # Conv1D weight is (in, out)
            elif isinstance(layer, torch.nn.Linear):
                layer.weight += delta
            else:
                fail(f"{name}: unexpected target type {type(layer)}")
    return run_torch(m, inputs)


def lora_layers(pm):
    from peft.tuners.lora import LoraLayer

    return [mod for mod in pm.modules() if isinstance(mod, LoraLayer)]


@torch.no_grad()
def peft_logits(pm, case: dict[str, float], inputs) -> np.ndarray:
    if not case:
        with pm.disable_adapter():
            return run_torch(pm, inputs)
    pm.base_model.set_adapter(list(case), inference_mode=True)
    saved = []
    for layer in lora_layers(pm):
        for name, s in case.items():
            if name in layer.scaling:
                saved.append((layer, name, layer.scaling[name]))
                layer.scaling[name] = layer.scaling[name] * s
    try:
        return run_torch(pm, inputs)
    finally:
        for layer, name, value in saved:
            layer.scaling[name] = value


def load_peft(base, adapters_dir: Path, names: list[str]):
    from peft import PeftModel
    from safetensors.torch import load_file

    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(adapters_dir / names[0]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(adapters_dir / n), adapter_name=n)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".lora_" in n:
                p.data = p.data.to(torch.float32)
    pm.eval()
    # The values in use must be exactly the stored ones (incl. F16/BF16 ones).
    params = dict(pm.named_parameters())
    for n in names:
        for key, t in load_file(str(adapters_dir / n / "adapter_model.safetensors")).items():
            mod, ab = module_of_key(key)
            p = params[f"base_model.model.{mod}.lora_{ab}.{n}.weight"]
            if not torch.equal(p, t.to(torch.float32)):
                fail(f"adapter {n}: loaded value of {key} differs from the stored one")
    return pm


def cross_check_cat(pm, case_name: str, case: dict[str, float], order: list[str], expected: np.ndarray,
                    inputs) -> str:
    new = f"cat_{case_name}_{'_'.join(order)}"
    try:
        pm.base_model.add_weighted_adapter(order, [case[a] for a in order], adapter_name=new,
                                           combination_type="cat")
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        msg = f"add_weighted_adapter({order}, 'cat') not applicable: {type(e).__name__}: {e}".rstrip(".") + "."
        log(f"  {case_name}: {msg}")
        return msg
    explain = ""
    try:
        got = peft_logits(pm, {new: 1.0}, inputs)
        err = float(np.abs(got - expected).max())
        ok = err <= CROSS_TOL
        if not ok:
            # Diagnose: the merged adapter's config is a copy of adapters[0]'s with r = lora_alpha = sum of
            # ranks, so its scaling should be 1; anything else (e.g. use_rslora inherited) shows up here.
            new_cfg = pm.peft_config[new]
            scalings = sorted({layer.scaling[new] for layer in lora_layers(pm) if new in layer.scaling})
            explain = (f"; the merged adapter got r=lora_alpha={new_cfg.r}, use_rslora={new_cfg.use_rslora} "
                       f"(copied from '{order[0]}'), so its LoraLayer scaling is {scalings} instead of [1.0]")
            if len(scalings) == 1:
                fixed = peft_logits(pm, {new: 1.0 / scalings[0]}, inputs)
                err_fixed = float(np.abs(fixed - expected).max())
                explain += (f"; after dividing that scaling out it "
                            f"{'agrees' if err_fixed <= CROSS_TOL else 'still disagrees'} "
                            f"(max abs err {err_fixed:.2e})")
    finally:
        pm.base_model.set_adapter(order, inference_mode=True)
        pm.base_model.delete_adapter(new)
    msg = (f"add_weighted_adapter({order}, 'cat') {'agrees' if ok else 'DISAGREES'} with the direct result "
           f"(max abs err {err:.2e}){explain}.")
    log(f"  {case_name}: {msg}")
    return msg


def onnx_weight_map(model_proto, dynamo: bool) -> dict[str, tuple[str, str, int]]:
    """torch module name -> (weight initializer name, op type, transB) for every MatMul/Gemm with a constant
    weight.  dynamo.onnx: module from the node's pkg.torch.onnx.name_scopes metadata; torchscript.onnx: from
    the node name '/model/layers.0/self_attn/q_proj/MatMul'."""
    import ast

    inits = {i.name for i in model_proto.graph.initializer}
    out = {}
    for n in model_proto.graph.node:
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2 or n.input[1] not in inits:
            continue
        if dynamo:
            md = {p.key: p.value for p in n.metadata_props}
            module = ast.literal_eval(md["pkg.torch.onnx.name_scopes"])[-2]
        else:
            module = ".".join(n.name.strip("/").split("/")[:-1])
        trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
        out[module] = (n.input[1], n.op_type, trans_b)
    return out


def check_weight_patching(path: Path, adapters_dir: Path, use_cases: dict, inputs, expected: dict) -> float:
    """Consistency check of the fixture set: add s*scaling*B@A to the ONNX weight initializers and run
    onnxruntime; every use-case must reproduce expected.npz."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    base = onnx.load(str(path))
    wmap = onnx_weight_map(base, dynamo=path.name.startswith("dynamo"))
    worst = 0.0
    for case_name, case in use_cases.items():
        m = onnx.ModelProto()
        m.CopyFrom(base)
        inits = {i.name: i for i in m.graph.initializer}
        for name, strength in case.items():
            _, mods = read_adapter(adapters_dir / name)
            for mod, d in mods.items():
                if mod not in wmap:
                    fail(f"{path}: no MatMul/Gemm found for {mod}")
                wname, op, trans_b = wmap[mod]
                w = numpy_helper.to_array(inits[wname]).copy()
                delta = (strength * d["scaling"] * (d["B"] @ d["A"])).numpy()  # (out, in)
                w += delta if trans_b else delta.T  # MatMul / Gemm(transB=0) weights are (in, out)
                inits[wname].CopyFrom(numpy_helper.from_array(w.astype(np.float32), wname))
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        got = sess.run(["logits"], {i.name: inputs[i.name].numpy() for i in sess.get_inputs()})[0]
        err = float(np.abs(got - expected[case_name]).max())
        if err > ONNX_TOL:
            fail(f"{path}: patched-initializer run of {case_name} differs from expected.npz by {err}")
        worst = max(worst, err)
    log(f"  {path.name}: LoRA deltas patched into the ONNX initializers reproduce all use-cases "
        f"(max abs err {worst:.2e})")
    return worst


def build_family(family: str, out_root: Path, base, seed: int, adapters: list[tuple], use_cases: dict,
                 dynamo_with_mask: bool, cat_orders: dict[str, list[list[str]]]) -> None:
    t0 = time.time()
    out = out_root / family
    if out.exists():
        shutil.rmtree(out)
    (out / "adapters").mkdir(parents=True)
    notes = ALL_NOTES.setdefault(family, [])

    inputs = make_inputs(seed + 100)
    base_logits = run_torch(base, inputs)
    log(f"[{family}] base logits: shape {base_logits.shape}, std {base_logits.std():.4f}")
    np.savez(out / "inputs.npz", **{k: v.numpy() for k, v in inputs.items()})

    # ---- ONNX exports
    models_info = {}
    log(f"[{family}] exporting torchscript.onnx (dynamo=False, opset {TORCHSCRIPT_OPSET})")
    export_torchscript(base, inputs, out / "torchscript.onnx")
    log(f"[{family}] exporting dynamo.onnx (dynamo=True, opset {DYNAMO_OPSET})")
    try:
        export_dynamo(base, inputs, out / "dynamo.onnx", with_mask=dynamo_with_mask)
    except Exception as e:  # noqa: BLE001
        msg = f"dynamo export failed: {type(e).__name__}: {e}"
        log(f"  {msg}")
        notes.append(msg)
        (out / "dynamo.onnx").unlink(missing_ok=True)
    for fname in ("dynamo.onnx", "torchscript.onnx"):
        p = out / fname
        if not p.exists():
            continue
        info = describe_onnx(p)
        info.update(check_onnx(p, base, inputs, base_logits, extra_seq=5))
        info["bytes"] = p.stat().st_size
        models_info[fname] = info

    # ---- adapters
    adapters_dir = out / "adapters"
    adapter_info = {}
    for name, kwargs, aseed, std, dtype in adapters:
        adapter_info[name] = make_adapter(base, name, kwargs, aseed, std, adapters_dir, inputs, base_logits, dtype)
        cfg, mods = read_adapter(adapters_dir / name)
        adapter_info[name]["modules"] = {m: {"r": d["r"], "alpha": d["alpha"], "scaling": d["scaling"]}
                                         for m, d in sorted(mods.items())}

    # ---- expected logits with real PEFT, loaded back from disk
    pm = load_peft(base, adapters_dir, [a[0] for a in adapters])
    expected = {}
    cross = {}
    for case_name, case in use_cases.items():
        got = peft_logits(pm, case, inputs)
        direct = direct_logits(base, adapters_dir, case, inputs) if case else base_logits
        err = float(np.abs(got - direct).max())
        change = rel_change(got, base_logits)
        log(f"  case {case_name:7s} {json.dumps(case):32s} rel change {change:6.1%}  "
            f"max|peft-direct|={err:.2e}")
        if err > CROSS_TOL:
            fail(f"{family}/{case_name}: PEFT and direct merged-weight computation differ by {err}")
        if case and change < 0.01:
            fail(f"{family}/{case_name}: adapters barely change the logits ({change})")
        expected[case_name] = got.astype(np.float32)
        cross[case_name] = {"max_abs_err_peft_vs_direct": err, "relative_logit_change": round(change, 4)}
        for order in cat_orders.get(case_name, []):
            cross[case_name].setdefault("add_weighted_adapter_cat", []).append(
                cross_check_cat(pm, case_name, case, order, got, inputs))
    np.savez(out / "expected.npz", **expected)
    for fname in models_info:
        models_info[fname]["max_abs_err_weight_patched_vs_expected"] = check_weight_patching(
            out / fname, adapters_dir, use_cases, inputs, expected)

    for case_name, c in cross.items():
        for msg in c.get("add_weighted_adapter_cat", []):
            notes.append(f"{case_name}: {msg}")

    cases = {
        "output": "logits",
        "use_cases": use_cases,
        "versions": versions(),
        "notes": " ".join(notes),
        "models": models_info,
        "adapters": adapter_info,
        "checks": cross,
        "tolerances": {"onnx_vs_torch": ONNX_TOL, "peft_vs_direct": CROSS_TOL},
    }
    (out / "cases.json").write_text(json.dumps(cases, indent=2) + "\n")
    log(f"[{family}] done in {time.time() - t0:.1f}s")


# --------------------------------------------------------------------------- main


COMMON_NOTES = [
    "Base weights: HF random init from the config (torch.manual_seed), then every 1-D parameter (norm "
    f"weights/biases) got seeded N(0,{NORM_NOISE_STD}^2) noise so that exporters neither deduplicate all-ones "
    "norm weights nor drop all-zero biases.",
    "LoRA A/B: PEFT init then overwritten with seeded N(0,std^2) values (seed and std per adapter in "
    "adapters.<name>), lora_dropout=0.",
    "expected.npz: real PEFT forward (adapters loaded from adapters/<name>/ with PeftModel.from_pretrained/"
    "load_adapter, LoRA params cast to float32), active adapters = keys of the use-case "
    "(base_model.set_adapter(list)), each LoraLayer.scaling[adapter] multiplied by the strength; 'base' runs "
    "under disable_adapter(). Every case was cross-checked against W0 + sum_i s_i*scaling_i*B_i@A_i merged "
    f"into a copy of the base weights (max abs err <= {CROSS_TOL}).",
    "scaling = lora_alpha/r, or lora_alpha/sqrt(r) with use_rslora; rank_pattern/alpha_pattern keys match a "
    "module name equal to the key or ending with '.'+key (regex (.*\\.)?(key)$).",
    "inputs.npz holds input_ids and attention_mask; feed each graph only the inputs it declares "
    "(see models.<file>.inputs).",
    "Consistency check: adding s*scaling*(B@A).T to the (in, out) weight initializer of each targeted "
    "MatMul/Gemm in both ONNX files and running onnxruntime reproduces every expected.npz entry "
    f"(<= {ONNX_TOL}).",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"))
    args = ap.parse_args()
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # bit-for-bit reproducible CPU reductions
    warnings.filterwarnings("ignore", category=FutureWarning)
    t0 = time.time()
    log("versions: " + json.dumps(versions()))

    # ------------------------------------------------------------------ llama
    ALL_NOTES["llama"] = COMMON_NOTES + [
        "dynamo.onnx takes only input_ids (causal mask built inside); torchscript.onnx takes input_ids and "
        "attention_mask. Both have a dynamic sequence dimension 'seq'; batch is fixed to 1 (torchscript.onnx "
        "declares its logits batch dim as the symbol 'MatMullogits_dim_0').",
        "Adapter b: use_rslora, rank_pattern gives model.layers.1.self_attn.o_proj r=2, alpha_pattern gives "
        "down_proj alpha=4. Adapter c: target_modules is a regex string (full match). h16 / bf16 are stored "
        "as F16 / BF16 tensors.",
    ]
    llama = build_llama(seed=1000)
    llama_adapters = [
        ("a", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 11, LORA_INIT_STD, None),
        ("b", dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
                   rank_pattern={"model.layers.1.self_attn.o_proj": 2}, alpha_pattern={"down_proj": 4}),
         12, 0.045, None),
        ("c", dict(r=2, lora_alpha=2, target_modules=r".*\.mlp\.(gate|up)_proj"), 13, 0.12, None),
        ("h16", dict(r=4, lora_alpha=4, target_modules=["v_proj", "up_proj"]), 14, LORA_INIT_STD, torch.float16),
        ("bf16", dict(r=4, lora_alpha=4, target_modules=["v_proj", "up_proj"]), 15, LORA_INIT_STD, torch.bfloat16),
    ]
    llama_cases = {
        "base": {},
        "a": {"a": 1.0},
        "b": {"b": 1.0},
        "c_half": {"c": 0.5},
        "h16": {"h16": 1.0},
        "bf16": {"bf16": 1.0},
        "ab": {"a": 1.0, "b": 0.5},
        "abc": {"a": 0.7, "b": 1.0, "c": 0.3},
    }
    build_family("llama", out_root, llama, 1000, llama_adapters, llama_cases, dynamo_with_mask=False,
                 cat_orders={"ab": [["a", "b"], ["b", "a"]], "abc": [["a", "b", "c"]]})
    cfg_b = json.loads((out_root / "llama/adapters/b/adapter_config.json").read_text())
    _, mods_b = read_adapter(out_root / "llama/adapters/b")
    if mods_b["model.layers.1.self_attn.o_proj"]["r"] != 2 or cfg_b["rank_pattern"] != {
            "model.layers.1.self_attn.o_proj": 2}:
        fail("adapter b: rank_pattern was not applied")
    if mods_b["model.layers.0.mlp.down_proj"]["alpha"] != 4:
        fail("adapter b: alpha_pattern was not applied")
    _, mods_c = read_adapter(out_root / "llama/adapters/c")
    if sorted(mods_c) != sorted(f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("gate", "up")):
        fail(f"adapter c: regex matched {sorted(mods_c)}")

    # ------------------------------------------------------------------ gpt2
    ALL_NOTES["gpt2"] = COMMON_NOTES + [
        "GPT-2 uses transformers Conv1D (weight stored (in, out), y = x @ W + b); the adapters use "
        "fan_in_fan_out=True, so the merged delta is (B@A).T. lm_head is tied to wte.",
        "Both ONNX files take input_ids and attention_mask, dynamic sequence dimension 'seq', batch fixed to 1.",
        "Adapter q: target_modules ['c_fc', 'mlp.c_proj'] matches transformer.h.N.mlp.c_fc and "
        "transformer.h.N.mlp.c_proj only (not attn.c_proj: PEFT matches name == key or name ends with '.'+key).",
    ]
    gpt2 = build_gpt2(seed=2000)
    gpt2_adapters = [
        ("p", dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True), 21, 0.1, None),
        ("q", dict(r=2, lora_alpha=4, target_modules=["c_fc", "mlp.c_proj"], fan_in_fan_out=True), 22, 0.08, None),
    ]
    gpt2_cases = {"base": {}, "p": {"p": 1.0}, "q": {"q": 1.0}, "pq": {"p": 1.0, "q": 0.6}}
    build_family("gpt2", out_root, gpt2, 2000, gpt2_adapters, gpt2_cases, dynamo_with_mask=True,
                 cat_orders={"pq": [["p", "q"]]})
    _, mods_q = read_adapter(out_root / "gpt2/adapters/q")
    want_q = sorted(f"transformer.h.{i}.mlp.{p}" for i in (0, 1) for p in ("c_fc", "c_proj"))
    if sorted(mods_q) != want_q:
        fail(f"adapter q matched {sorted(mods_q)}")

    total = sum(f.stat().st_size for f in out_root.rglob("*") if f.is_file())
    log(f"total fixture size {total / 1e6:.3f} MB; finished in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
