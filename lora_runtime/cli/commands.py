"""What each command does, given its parsed arguments (``parser`` makes them)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from lora_runtime.errors import InputError


def cmd_compile(args: argparse.Namespace) -> int:
    from lora_runtime.compiler.compile import compile_bundle
    from lora_runtime.compiler.options import CompileOptions, HtpOptions, QuantOptions, WeightOnlyOptions
    from lora_runtime.compiler.use_cases import parse_adapter_arg
    from lora_runtime.describe import encodings_report, target_report, weight_only_report
    from lora_runtime.progress import Progress

    adapters = dict(parse_adapter_arg(a) for a in args.adapter)
    if len(adapters) != len(args.adapter):
        raise InputError("an adapter name is given twice in --adapter")
    weight_only = quant = None
    if args.base_weights != "float32":
        weight_only = WeightOnlyOptions.of(args.base_weights, args.block_size, args.base_encodings,
                                           grid=args.weight_grid, calibration=args.calibration,
                                           rounding=args.weight_rounding, int8_modules=args.int8_modules or ())
    elif args.weight_grid is not None:
        raise InputError("--weight-grid goes with --base-weights int8|int4")
    elif args.int8_modules:
        raise InputError("--int8-modules goes with --base-weights int4")
    quant_flags = {"--calibration": args.calibration, "--preset": args.preset,
                   "--calibration-method": args.calibration_method, "--weight-rounding": args.weight_rounding,
                   "--encodings-file": args.encodings_file, "--sensitive-db": args.sensitive_db,
                   "--no-ort-reference": args.no_ort_reference or None}
    if weight_only is not None:  # --calibration and --weight-rounding serve the weight-only pass too
        quant_flags.pop("--calibration")
        quant_flags.pop("--weight-rounding")
    if args.encodings == "none":
        given = [flag for flag, value in quant_flags.items() if value is not None]
        if given:
            raise InputError(f"{', '.join(given)} go with --encodings non-updatable|adapter-only|full"
                             + (" (--calibration and --weight-rounding with --base-weights too)"
                                if weight_only is None else "")
                             + "; without it the bundle would be float and the option ignored")
    else:
        shared, own = parse_encodings_files(args.encodings_file or [])
        quant = QuantOptions(args.encodings, args.calibration, args.preset or "w8a8",
                             args.calibration_method or "minmax", args.weight_rounding or "nearest",
                             shared, args.sensitive_db, not args.no_ort_reference, encodings_per_use_case=own)
    htp = HtpOptions(args.soc_model or "60", args.htp_arch, args.htp_context)
    if args.target != "htp" and (args.soc_model or args.htp_arch or args.htp_context):
        raise InputError("--soc-model, --htp-arch and --htp-context go with --target htp")
    options = CompileOptions(args.generation, args.lora_dtype, weight_only, quant, args.copy_base_data,
                             target=args.target, htp=htp if args.target == "htp" else HtpOptions(),
                             static_shapes=parse_dims(args.static_shape),
                             decode_shapes=parse_dims(args.decode_shape, "--decode-shape"),
                             base_path=not args.no_base_path)
    t0 = time.perf_counter()
    # silent unless compiling takes over a second; its long stages count their own work (calibration runs, GPTQ
    # layers, ...) with a total and an ETA
    with Progress("compile", total=None) as bar:
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
    if m.weight_only:
        print("\n".join(weight_only_report(m)))
    if m.target.name == "htp":
        print("\n".join(target_report(m)))
    return 0


def parse_encodings_files(items: list[str]) -> tuple[str | None, dict[str, str]]:
    """``--encodings-file F`` (at most one: every use-case) and ``--encodings-file USE_CASE=F`` (one per use-case);
    an existing file whose name holds '=' is taken whole."""
    shared, own = None, {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or Path(item).is_file():
            if shared is not None:
                raise InputError(f"--encodings-file {item!r}: a file for every use-case is already given ({shared!r}); "
                                 "give one, or USE_CASE=F per use-case")
            shared = item
        elif not name or not path:
            raise InputError(f"--encodings-file {item!r}: expected F or USE_CASE=F")
        elif name in own:
            raise InputError(f"--encodings-file gives use-case {name!r} twice")
        else:
            own[name] = path
    return shared, own


def parse_dims(items: list[str], flag: str = "--static-shape") -> dict[str, int]:
    """``DIM=N`` pairs (``--static-shape``, ``--decode-shape``)."""
    dims = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.strip().isdigit() or int(value) < 1:
            raise InputError(f"{flag} {item!r}: expected DIM=N with a positive integer N")
        if name in dims:
            raise InputError(f"{flag} gives {name!r} twice")
        dims[name] = int(value)
    return dims


def save_npz(path: str, arrays: dict[str, np.ndarray], *, force: bool = False) -> Path:
    """An .npz at exactly ``path`` (numpy would append ".npz"), never over a file without ``force``."""
    from lora_runtime.staging import new_file

    with new_file(path, force=force) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return Path(path).absolute()


def load_npz(path: str) -> dict[str, np.ndarray]:
    from lora_runtime.arrays import read_npz

    return read_npz(path, "the graph's inputs")


def cmd_run(args: argparse.Namespace) -> int:
    from lora_runtime.runtime.switcher import Runtime

    if bool(args.use_case) == bool(args.strength):
        raise InputError("give --use-case NAME (repeatable) or --strength ADAPTER=S (repeatable), not both")
    from lora_runtime.staging import check_new_file

    check_new_file(args.outputs, force=args.force)  # refused before anything runs
    feeds = load_npz(args.inputs)
    rt = Runtime.open(args.bundle, base=args.base, device=args.device)
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
        print(f"{mix_text(mix)}: {report.kind} switch {report.seconds * 1e6:.0f} us", file=sys.stderr)
    else:
        for name in args.use_case:
            report = rt.switch(name)
            out = rt.run(feeds)
            print(f"{name}: {report.kind} switch {report.seconds * 1e6:.0f} us, {report.bytes_moved} bytes moved",
                  file=sys.stderr)
            prefix = f"{name}/" if len(args.use_case) > 1 else ""
            results.update({prefix + k: v for k, v in out.items()})
    path = save_npz(args.outputs, results, force=args.force)
    print(f"wrote {', '.join(f'{k} {v.shape}' for k, v in results.items())} to {path}")
    return 0


def mix_text(strengths: dict[str, float]) -> str:
    return ", ".join(f"{k}:{v:g}" for k, v in strengths.items()) or "base"


def cmd_inspect(args: argparse.Namespace) -> int:
    from lora_runtime.bundle import open_bundle
    from lora_runtime.describe import describe, summary

    bundle = open_bundle(args.bundle)
    if args.json:
        print(json.dumps(summary(bundle), indent=1))
    else:
        print(describe(bundle))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from lora_runtime.bundle import open_bundle
    from lora_runtime.export import merge_use_case

    path = merge_use_case(open_bundle(args.bundle), args.out, use_case=args.use_case, force=args.force)
    print(f"wrote {path} ({args.use_case} merged into the base weights)")
    return 0


def cmd_export_ort_adapter(args: argparse.Namespace) -> int:
    from lora_runtime.bundle import open_bundle
    from lora_runtime.export import export_ort_adapter

    path = export_ort_adapter(open_bundle(args.bundle), args.adapter, args.out, force=args.force)
    print(f"wrote {path} (load with onnxruntime.LoraAdapter, activate with RunOptions.add_active_adapter)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from lora_runtime.bench.report import format_table, plot
    from lora_runtime.staging import check_new_file, new_file

    work = Path(args.work) if args.work else None
    for path in (args.json, args.plot):  # refused now, not after minutes of measuring
        if path:
            check_new_file(path, force=args.force)
    if args.device == "htp":
        from lora_runtime.bench.htp import run_bench_htp, run_bench_htp_smollm2

        if args.bundle is not None:
            raise InputError("bench BUNDLE --device htp is not supported: bench --device htp builds its own bundles")
        report = run_bench_htp_smollm2(work, args.quick) if args.model == "smollm2" else \
            run_bench_htp(args.size or "tiny", work, args.quick)
    elif args.bundle is not None:
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

        report = run_bench(args.size or "bench", work, args.quick)
    print(format_table(report))
    if args.json:
        with new_file(args.json, force=args.force) as tmp:
            tmp.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {args.json}", file=sys.stderr)
    if args.plot:
        with new_file(args.plot, force=args.force) as tmp:
            plot(report, tmp)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.model == "smollm2":
        from lora_runtime.demo_llm import run_smollm2_demo

        run_smollm2_demo(Path(args.out) / "smollm2")  # the demo's own folders, apart from the README's commands
        return 0
    from lora_runtime.demo import run_demo

    run_demo(args.size, Path(args.out))
    return 0


def cmd_import_gguf(args: argparse.Namespace) -> int:
    from lora_runtime.llm import find_smollm2, import_model
    from lora_runtime.progress import Progress

    if args.max_seq < 1:
        raise InputError(f"--max-seq {args.max_seq}: the model needs at least one position")
    if args.static_cache is not None and not 1 <= args.static_cache <= args.max_seq:
        raise InputError(f"--static-cache {args.static_cache}: between 1 and --max-seq ({args.max_seq}) slots")
    src = Path(args.gguf) if args.gguf else find_smollm2()
    t0 = time.perf_counter()
    with Progress("import", total=None) as bar:  # per tensor, with the count and an ETA
        path = import_model(src, args.out, max_seq=args.max_seq, static_cache=args.static_cache, force=args.force,
                            report=bar.step, weights=args.weights, accuracy_level=args.accuracy_level,
                            graph=args.graph, output_type=args.output_tensor_type)
    beside = [f for f in ("base.onnx.data", "tokenizer.json", "chat.json") if (path.parent / f).is_file()]
    note = "" if (path.parent / "tokenizer.json").is_file() else \
        "; no tokenizer.json in the source: bundles of it run, but cannot generate text"
    made = json.loads((path.parent / "chat.json").read_text()) if (path.parent / "chat.json").is_file() else {}
    kind = f"{made.get('graph', 'standard')} graph, {made.get('weights', 'float32')} weights"
    if made.get("output_tensor_type"):
        kind += f", lm_head {made['output_tensor_type']}"
    print(f"wrote {path} ({kind}; + {', '.join(beside)}) from {src.name} in {time.perf_counter() - t0:.1f}s{note}")
    return 0


def cmd_calibration_data(args: argparse.Namespace) -> int:
    from lora_runtime.llm import calibration_data

    path = calibration_data(args.model, args.out, samples=args.samples, seq_len=args.seq_len, force=args.force)
    print(f"wrote {path}: {args.samples} chat prompts of {args.seq_len} tokens with empty KV caches")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lora_runtime.llm import generate, open_llm

    if bool(args.bundle) == bool(args.model):
        raise InputError("name the bundle once: as the first argument or with -m/--model")
    if args.file is not None:
        try:
            text = Path(args.file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{args.file}: cannot read the prompt file ({e})") from e
    else:
        text = args.prompt
    rt, chat = open_llm(args.bundle or args.model, args.device)
    if args.use_case:
        rt.switch(args.use_case)
    system = [{"role": "system", "content": args.system}] if args.system else []
    prompt = text if args.raw else [*system, {"role": "user", "content": text}]
    g = generate(rt, chat, prompt, on_text=lambda t: print(t, end="", flush=True), **sampling(args))
    print()
    print(f"[{rt.current}: {g.prompt_tokens} prompt tokens, prefill {g.prefill_ms:.0f} ms, "
          f"{len(g.ids)} new tokens at {g.decode_ms_per_token:.1f} ms/token]", file=sys.stderr)
    return 0


def sampling(args: argparse.Namespace) -> dict:
    """generate()'s options from the llama.cpp-style flags."""
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "repeat_penalty": args.repeat_penalty, "repeat_last_n": args.repeat_last_n,
            "seed": args.seed, "stop": args.stop}


def cmd_chat(args: argparse.Namespace) -> int:
    from lora_runtime.cli.chat import run_chat
    from lora_runtime.llm import open_llm

    rt, chat = open_llm(args.bundle, "cpu")
    return run_chat(rt, chat, options=sampling(args), system=args.system)



def cmd_serve(args: argparse.Namespace) -> int:
    from lora_runtime.serve import serve

    print(f"serving {args.bundle} on http://{args.host}:{args.port}/v1 (Ctrl-C stops)", file=sys.stderr)
    serve(args.bundle, host=args.host, port=args.port, device=args.device, api_key=args.api_key,
          defaults=sampling(args), system=args.system)
    return 0
