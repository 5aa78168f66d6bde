"""Careless use of the command line: every case one line on stderr naming the culprit, exit code 2, and nothing
written or changed (the bad-input catalogue's style: one case per row)."""

from __future__ import annotations

import errno
import json
import shutil

import numpy as np
import pytest

from lora_runtime import InputError, Runtime, compile_bundle
from lora_runtime.cli import _one_line, main


@pytest.fixture(scope="module")
def bundle(tiny, tmp_path_factory):
    return compile_bundle(tiny.base, tiny.adapters, tmp_path_factory.mktemp("b") / "b", generation="v3")


def _fails(capsys, argv: list[str], text: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert text in err and err.count("\n") == 1 and "Traceback" not in err, err


def _compile(tiny, out, *extra) -> list[str]:
    return ["compile", "--base", str(tiny.base), "--generation", "v3", "-o", str(out),
            *[a for n, p in tiny.adapters.items() for a in ("--adapter", f"{n}={p}")], *extra]


RUNS = [  # inputs -> what the one line says
    ({"input_ids": np.array([[300, 1, 2]])}, "Gather node 'h.embed': indices element out of data bounds, idx=300"),
    ({"input_ids": np.zeros((1, 80), np.int64)}, "idx=64 must be within the inclusive range [-64,63]"),
    ({"input_ids": np.zeros((1, 4), np.int32)}, "input 'input_ids': dtype int32, the graph expects int64"),
]


@pytest.mark.parametrize(("feeds", "message"), RUNS, ids=["token id >= vocab", "longer than the positions",
                                                          "int32 ids"])
def test_run_rejects_bad_inputs_in_one_line(bundle, tmp_path, capsys, feeds, message):
    np.savez(tmp_path / "in.npz", **feeds)
    _fails(capsys, ["run", str(bundle.path), "--use-case", "tone", "--inputs", str(tmp_path / "in.npz"),
                    "--outputs", str(tmp_path / "out.npz")], message)
    assert not (tmp_path / "out.npz").exists()


def test_unreadable_input_files(bundle, tiny, tmp_path, capsys):
    (tmp_path / "empty.npz").write_bytes(b"")
    np.save(tmp_path / "one.npy", np.zeros(3))
    run = ["run", str(bundle.path), "--use-case", "tone", "--outputs", str(tmp_path / "o.npz"), "--inputs"]
    _fails(capsys, [*run, str(tmp_path / "empty.npz")], "empty.npz: empty file; expected the graph's inputs as an .npz")
    _fails(capsys, [*run, str(tmp_path / "one.npy")], "one.npy: a single array (.npy)")
    for bad, text in (("empty.npz", "empty file; expected calibration data"), ("one.npy", "a single array (.npy)")):
        _fails(capsys, _compile(tiny, tmp_path / "b", "--encodings", "full", "--calibration", str(tmp_path / bad)),
               text)
    assert not (tmp_path / "b").exists() and not (tmp_path / "o.npz").exists()


def test_huge_strengths_are_refused_not_turned_into_nan(bundle, tiny, tmp_path, capsys):
    text = "strength 1e+39 of adapter 'tone' overflows float32"
    _fails(capsys, _compile(tiny, tmp_path / "b", "--use-case", "x=tone:1e39"), text)
    np.savez(tmp_path / "in.npz", **tiny.inputs(seed=1))
    _fails(capsys, ["run", str(bundle.path), "--strength", "tone=1e39", "--inputs", str(tmp_path / "in.npz"),
                    "--outputs", str(tmp_path / "o.npz")], text)
    rt = Runtime.open(bundle.path)
    before = rt.current
    with pytest.raises(InputError, match="overflows float32"):
        rt.set_strengths({"tone": 1e39})
    assert rt.current == before  # nothing changed
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--calibration", "c.npz"], "--calibration go with --encodings"),
    (["--preset", "w8a16", "--weight-rounding", "gptq"], "--preset, --weight-rounding go with --encodings"),
    (["--sensitive-db", "30"], "--sensitive-db go with --encodings"),
    (["--encodings", "full", "--calibration", "c.npz", "--sensitive-db", "nan"], "sensitive_db must be a finite"),
])
def test_options_that_would_be_ignored_or_are_not_numbers(tiny, tmp_path, capsys, extra, message):
    np.savez(tmp_path / "c.npz", input_ids=np.stack([tiny.inputs(seed=i)["input_ids"] for i in range(4)]))
    extra = [str(tmp_path / a) if a == "c.npz" else a for a in extra]
    _fails(capsys, _compile(tiny, tmp_path / "b", *extra), message)
    assert not (tmp_path / "b").exists()


def test_a_bundles_graph_is_not_a_base(bundle, tiny, tmp_path, capsys):
    _fails(capsys, ["compile", "--base", str(bundle.file("model.onnx")), "--generation", "v3", "-o",
                    str(tmp_path / "b"), "--adapter", f"tone={tiny.adapters['tone']}"],
           "a file of the bundle")
    assert not (tmp_path / "b").exists()


def test_an_adapter_trained_on_another_model_is_named_in_a_warning(tiny, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny.adapters["tone"], other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": "meta-llama/Llama-3.2-1B"}))
    assert main(["compile", "--base", str(tiny.base), "--generation", "v3", "-o", str(tmp_path / "b"),
                 "--adapter", f"other={other}", "--adapter", f"tone={tiny.adapters['tone']}"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "adapter 'other' was trained on 'meta-llama/Llama-3.2-1B'" in warnings[0]


def test_system_errors_are_one_line_with_the_path(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "b" / "base.qdq.data"))
    text = _one_line(full)
    assert text.startswith(f"{tmp_path / 'b' / 'base.qdq.data'}: No space left on device (")
    assert "bytes free there" in text and "\n" not in text


@pytest.mark.parametrize(("argv", "message"), [
    (["demo", "--size", "huge"], "unknown model preset 'huge'; choose from tiny, bench, 1b"),
    (["bench", "--size", "huge", "--quick"], "unknown model preset 'huge'"),
    (["import-model", "--max-seq", "0", "-o", "{tmp}/m"], "--max-seq 0: the model needs at least one position"),
])
def test_bad_sizes_are_one_line(tmp_path, capsys, argv, message):
    _fails(capsys, [a.format(tmp=tmp_path) for a in argv] + (["--out", str(tmp_path / "d")] if argv[0] == "demo"
                                                              else []), message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("argv", "message"), [
    (["--output-tensor-type", "q8_0"], "--output-tensor-type q8_0 needs --accuracy-level 4"),
    (["--output-tensor-type", "q4_0", "--weights", "float32"], "only with the file's blocks kept"),
])
def test_bad_output_tensor_types_are_one_line(tmp_path, capsys, argv, message):
    """Refused before anything is read or written (the installed SmolLM2 GGUF is never opened)."""
    _fails(capsys, ["import-model", *argv, "-o", str(tmp_path / "m")], message)
    assert list(tmp_path.iterdir()) == []
