"""The CLI contract: compile / run / inspect / demo, one-line errors with exit code 2, nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import FIXTURES
from reference import merged_outputs

from lora_runtime.cli import main
from lora_runtime.errors import UseCaseError


def _compile_args(tiny, out, *extra):
    args = ["compile", "--base", str(tiny.base), "--generation", "v3", "-o", str(out)]
    for name, path in tiny.adapters.items():
        args += ["--adapter", f"{name}={path}"]
    return args + list(extra)


def test_compile_run_inspect(tiny, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(_compile_args(tiny, out, "--use-case", "mix=summarize:0.5,tone", "--use-case", "base=")) == 0
    np.savez(tmp_path / "in.npz", **tiny.inputs(seed=2))
    assert main(["run", str(out), "--use-case", "mix", "--inputs", str(tmp_path / "in.npz"),
                 "--outputs", str(tmp_path / "out.npz")]) == 0
    got = np.load(tmp_path / "out.npz")["logits"]
    want = merged_outputs(tiny.base, {"summarize": 0.5, "tone": 1.0}, tiny.adapters, tiny.inputs(seed=2))["logits"]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

    assert main(["run", str(out), "--use-case", "mix", "--use-case", "base", "--inputs", str(tmp_path / "in.npz"),
                 "--outputs", str(tmp_path / "two.npz")]) == 0
    two = np.load(tmp_path / "two.npz")
    assert sorted(two.files) == ["base/logits", "mix/logits"]
    np.testing.assert_array_equal(two["mix/logits"], got)

    assert main(["run", str(out), "--strength", "summarize=0.5", "--strength", "tone=1", "--inputs",
                 str(tmp_path / "in.npz"), "--outputs", str(tmp_path / "adhoc.npz")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "adhoc.npz")["logits"], got, atol=1e-6, rtol=0)

    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["generation"] == "v3" and [u["name"] for u in info["manifest"]["use_cases"]] == ["mix", "base"]
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in text and "mix" in text


BAD_COMPILES = [
    # (extra args or replacements, text the one-line error must contain)
    (["--use-case", "x=nope"], "unknown adapter 'nope'"),
    (["--use-case", "x=summarize:abc"], "is not a number"),
    (["--use-case", "x=summarize:nan"], "not finite"),
    (["--use-case", "a=summarize", "--use-case", "a=tone"], "given twice"),
    (["--use-case", "../evil=summarize"], "invalid use-case name"),
    (["--decode-shape", "sequence=1"], "--decode-shape changes dims of a static-shape graph: give --static-shape"),
    (["--static-shape", "sequence=8", "--decode-shape", "batch=1"], "--decode-shape batch=...: not a --static-shape"),
    (["--static-shape", "sequence=8", "--decode-shape", "sequence=0"], "--decode-shape 'sequence=0': expected DIM=N"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_COMPILES)
def test_bad_compile_exits_2_with_one_line_and_writes_nothing(tiny, tmp_path, capsys, extra, message):
    out = tmp_path / "b"
    assert main(_compile_args(tiny, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("change", "message"), [
    ({"--base": "missing.onnx"}, "base model not found"),
    ({"--adapter": "x=does/not/exist"}, "adapter folder not found"),
    ({"--generation": "v2", "--use-case": "m=summarize,tone"}, "--generation v3"),
])
def test_bad_inputs_name_the_culprit(tiny, tmp_path, capsys, change, message):
    args = ["compile", "--base", change.get("--base", str(tiny.base)),
            "--adapter", change.get("--adapter", f"summarize={tiny.adapters['summarize']}"),
            "--adapter", f"tone={tiny.adapters['tone']}", "--generation", change.get("--generation", "v3"),
            "-o", str(tmp_path / "b")]
    if "--use-case" in change:
        args += ["--use-case", change["--use-case"]]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "b").exists()


def test_existing_output_needs_force(tiny, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(_compile_args(tiny, out)) == 0
    assert main(_compile_args(tiny, out)) == 2
    assert "--force" in capsys.readouterr().err
    assert main(_compile_args(tiny, out, "--force")) == 0


def test_run_errors(tiny, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(_compile_args(tiny, out)) == 0
    np.savez(tmp_path / "bad.npz", input_ids=np.zeros((1, 4), np.int32))
    capsys.readouterr()
    assert main(["run", str(out), "--use-case", "summarize", "--inputs", str(tmp_path / "bad.npz"),
                 "--outputs", str(tmp_path / "o.npz")]) == 2
    assert "input 'input_ids': dtype int32" in capsys.readouterr().err
    assert main(["run", str(out), "--use-case", "nope", "--inputs", str(tmp_path / "bad.npz"),
                 "--outputs", str(tmp_path / "o.npz")]) == 2
    assert "unknown use-case 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "o.npz").exists()


def test_console_script_and_fixture_adapters(tmp_path):
    """The installed entry point, on a real dynamo export with real PEFT adapters."""
    root = FIXTURES / "llama"
    cmd = [sys.executable, "-m", "lora_runtime.cli", "compile", "--base", str(root / "dynamo.onnx"),
           "--adapter", f"a={root / 'adapters/a'}", "--adapter", f"b={root / 'adapters/b'}",
           "--generation", "v3", "--use-case", "ab=a:1,b:0.5", "-o", str(tmp_path / "b")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(cmd[:5] + [str(root / "nope.onnx")] + cmd[6:], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nope.onnx: base model not found" in r.stderr


def test_merge_and_export_commands(tiny, tmp_path, capsys):
    out = tmp_path / "b"
    args = ["compile", "--base", str(tiny.base), "--generation", "v2", "-o", str(out)]
    for name, path in tiny.adapters.items():
        args += ["--adapter", f"{name}={path}"]
    assert main(args) == 0
    assert main(["merge", str(out), "--use-case", "tone", "-o", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").is_file()
    assert main(["export-ort-adapter", str(out), "--adapter", "tone", "-o", str(tmp_path / "t.onnx_adapter")]) == 0
    assert (tmp_path / "t.onnx_adapter").stat().st_size > 0
    assert main(["merge", str(out), "--use-case", "nope", "-o", str(tmp_path / "n.onnx")]) == 2
    assert "unknown use-case 'nope'" in capsys.readouterr().err and not (tmp_path / "n.onnx").exists()


def test_import_model_refuses_a_static_cache_without_slots(tmp_path, capsys):
    assert main(["import-model", "-o", str(tmp_path / "m"), "--static-cache", "0"]) == 2
    assert "--static-cache 0: between 1 and --max-seq (2048) slots" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_every_option_is_documented_and_help_shows_defaults():
    from lora_runtime.cli.parser import parser

    p = parser()
    subparsers = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
    undocumented = [f"{name} {'/'.join(a.option_strings) or a.dest}"
                    for name, sp in subparsers.choices.items() for a in sp._actions
                    if a.dest != "help" and not (a.help or "").strip()]
    assert undocumented == []
    assert "(default: 64)" in subparsers.choices["generate"].format_help()


def test_llama_cpp_habits_parse():
    from lora_runtime.cli.parser import parser

    a = parser().parse_args(["generate", "-m", "b", "-p", "hi", "-n", "5", "--temp", "0.7", "--top-k", "40",
                             "--repeat-penalty", "1.1", "--stop", "END", "--stop", "\n\n", "--system", "Be brief.",
                             "--seed", "-1", "--debug"])
    assert (a.model, a.prompt, a.max_new_tokens, a.temperature, a.top_k, a.repeat_penalty, a.stop, a.system,
            a.seed, a.debug) == ("b", "hi", 5, 0.7, 40, 1.1, ["END", "\n\n"], "Be brief.", -1, True)
    assert parser().parse_args(["--debug", "inspect", "x"]).debug
    assert not parser().parse_args(["inspect", "x"]).debug


def test_shipped_adapters_have_a_short_name():
    from lora_runtime.compiler.use_cases import SHIPPED, parse_adapter_arg

    assert parse_adapter_arg("caps=@smollm2/caps") == ("caps", str(SHIPPED / "smollm2" / "caps"))
    assert parse_adapter_arg("@smollm2/listify") == ("listify", str(SHIPPED / "smollm2" / "listify"))
    with pytest.raises(UseCaseError, match="@smollm2/nope: no adapter of that name ships with lora_runtime; "
                                           "shipped: @smollm2/caps, @smollm2/listify, @smollm2/signoff"):
        parse_adapter_arg("x=@smollm2/nope")
