"""Nothing lost, nothing torn: what the commands write, what they refuse to overwrite, and runtimes that keep
using the bundle they validated while a ``compile --force`` replaces it (also from other processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lora_runtime import BundleError, Runtime, compile_bundle
from lora_runtime.cli import main
from lora_runtime.llm.importer import import_gguf
from lora_runtime.models.default import build_default, recipe

ROOT = Path(__file__).resolve().parents[1]


def _args(tiny, out, *extra):
    return ["compile", "--base", str(tiny.base), "--generation", "v3", "-o", str(out),
            *[a for n, p in tiny.adapters.items() for a in ("--adapter", f"{n}={p}")], *extra]


# ---- publication never replaces what appeared meanwhile -------------------------------------------------


def test_a_folder_made_at_the_output_while_compiling_is_kept(tiny, tmp_path):
    out = tmp_path / "b"

    def someone_writes(msg: str) -> None:
        if msg.startswith("hashing") and not out.exists():
            out.mkdir()
            (out / "notes.txt").write_text("mine")

    with pytest.raises(BundleError, match="appeared while this compile ran.*nothing was replaced"):
        compile_bundle(tiny.base, tiny.adapters, out, generation="v3", report=someone_writes)
    assert (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no staging left


def test_of_two_compiles_to_one_path_the_second_to_finish_fails(tiny, tmp_path):
    out = tmp_path / "b"
    done = []

    def race(msg: str) -> None:
        if msg.startswith("hashing") and not done:
            done.append(compile_bundle(tiny.base, tiny.adapters, out, generation="v1"))  # finishes first

    with pytest.raises(BundleError, match="appeared while this compile ran"):
        compile_bundle(tiny.base, tiny.adapters, out, generation="v3", report=race)
    assert Runtime.open(out).manifest.generation == "v1"  # the winner's bundle, whole


def test_sigterm_cleans_up_like_ctrl_c(tiny, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=np.stack([tiny.inputs(seed=i, seq_len=8)["input_ids"] for i in range(64)]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "lora_runtime.cli", *_args(
        tiny, tmp_path / "b", "--encodings", "full", "--calibration", str(calib), "--preset", "w8a16")],
        env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".b.*.partial")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the compile ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "terminated" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz"]


# ---- files the commands write ---------------------------------------------------------------------------


@pytest.fixture
def bundle(tiny, tmp_path):
    return compile_bundle(tiny.base, tiny.adapters, tmp_path / "b", generation="v2")


def _one_line(capsys, text: str) -> None:
    err = capsys.readouterr().err
    assert text in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_run_writes_exactly_the_path_named_and_never_over_a_file(tiny, bundle, tmp_path, capsys):
    np.savez(tmp_path / "in.npz", **tiny.inputs(seed=1))
    run = ["run", str(bundle.path), "--use-case", "tone", "--inputs", str(tmp_path / "in.npz"), "--outputs"]
    assert main([*run, str(tmp_path / "out")]) == 0
    assert (tmp_path / "out").is_file() and not (tmp_path / "out.npz").exists()
    capsys.readouterr()
    (tmp_path / "keep").write_text("mine")
    assert main([*run, str(tmp_path / "keep")]) == 2
    _one_line(capsys, "keep: already exists; pass --force")
    assert (tmp_path / "keep").read_text() == "mine"
    assert main([*run, str(tmp_path / "keep"), "--force"]) == 0
    assert "logits" in np.load(tmp_path / "keep")
    capsys.readouterr()
    assert main([*run, str(tmp_path / "missing" / "o.npz")]) == 2
    _one_line(capsys, "does not exist")
    assert main([*run, str(bundle.path / "o.npz")]) == 2  # never inside a bundle
    _one_line(capsys, "inside the bundle")
    assert "o.npz" not in os.listdir(bundle.path)


def test_merge_refuses_a_bundles_graph_and_existing_files(bundle, tmp_path, capsys):
    graph = bundle.file("model.onnx").read_bytes()
    assert main(["merge", str(bundle.path), "--use-case", "tone", "-o", str(bundle.file("model.onnx"))]) == 2
    _one_line(capsys, "inside the bundle")
    assert bundle.file("model.onnx").read_bytes() == graph and Runtime.open(bundle.path)
    (tmp_path / "m.onnx").write_text("mine")
    assert main(["merge", str(bundle.path), "--use-case", "tone", "-o", str(tmp_path / "m.onnx")]) == 2
    _one_line(capsys, "already exists")
    assert (tmp_path / "m.onnx").read_text() == "mine"
    assert main(["merge", str(bundle.path), "--use-case", "tone", "-o", str(tmp_path / "m.onnx"), "--force"]) == 0


def test_export_ort_adapter_refuses_an_existing_file(bundle, tmp_path, capsys):
    (tmp_path / "a.onnx_adapter").write_text("mine")
    assert main(["export-ort-adapter", str(bundle.path), "--adapter", "tone", "-o",
                 str(tmp_path / "a.onnx_adapter")]) == 2
    _one_line(capsys, "already exists")
    assert (tmp_path / "a.onnx_adapter").read_text() == "mine"


def test_import_model_refuses_an_existing_model_folder_before_any_work(tmp_path, capsys):
    model = tmp_path / "m"
    model.mkdir()
    for name in ("base.onnx", "chat.json", "base.onnx.data"):
        (model / name).write_text("old")
    assert main(["import-model", str(tmp_path / "nothing.gguf"), "-o", str(model)]) == 2
    _one_line(capsys, "already exists; pass --force")
    assert (model / "base.onnx.data").read_text() == "old"
    with pytest.raises(BundleError, match="is not a model folder"):  # --force replaces only a model folder
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "x").write_text("mine")
        import_gguf(tmp_path / "nothing.gguf", tmp_path / "other", force=True)
    assert (tmp_path / "other" / "x").read_text() == "mine"


def test_rebuilding_a_base_writes_a_new_data_file_and_old_bundles_keep_theirs(tmp_path):
    r = recipe("tiny")
    big = type(r)(**{**r.__dict__, "external_data": True})
    m = build_default(big, tmp_path / "model")
    b = compile_bundle(m.base, m.adapters, tmp_path / "b", generation="v3")
    feeds = m.inputs(seed=3)
    before = Runtime.open(b.path).run(feeds)["logits"]
    build_default(type(r)(**{**big.__dict__, "seed": big.seed + 1}), tmp_path / "model")  # rebuilt in place
    after = Runtime.open(b.path).run(feeds)["logits"]  # still opens: its hard link kept the old bytes
    np.testing.assert_array_equal(before, after)


# ---- runtimes pinned to the bundle they validated ----------------------------------------------------------


def test_an_open_runtime_keeps_its_bundle_through_a_forced_recompile(tiny, tmp_path):
    out = tmp_path / "b"
    feeds = tiny.inputs(seed=4)
    compile_bundle(tiny.base, tiny.adapters, out, generation="v1", use_cases=["a=summarize", "b=tone", "c=translate"])
    rt = Runtime.open(out)
    old = {}
    for u in ("a", "b", "c"):
        rt.switch(u)
        old[u] = rt.run(feeds)["logits"]
    # the same names, other adapters behind them
    compile_bundle(tiny.base, tiny.adapters, out, generation="v1",
                   use_cases=["a=translate", "b=summarize", "c=tone"], force=True)
    for u in ("a", "b", "c", "a"):  # three adapters, two slot sets: every switch copies a patch: the old ones
        assert rt.switch(u).kind == "cold"
        np.testing.assert_array_equal(rt.run(feeds)["logits"], old[u])
    fresh = Runtime.open(out)
    fresh.switch("b")
    np.testing.assert_array_equal(fresh.run(feeds)["logits"], old["a"])  # "b" is now summarize: the old "a"


RUNNER = r"""
import json, sys, traceback
import numpy as np
from lora_runtime import Runtime
from lora_runtime.errors import LoraRuntimeError
args = json.loads(sys.argv[1])
feeds = {"input_ids": np.array(args["ids"], np.int64)}
refs = {k: np.load(v) for k, v in args["refs"].items()}
counts = {"ok": 0, "error": 0, "torn": 0, "traceback": 0}
for i in range(args["runs"]):
    try:
        rt = Runtime.open(args["bundle"])
        rt.switch("x")
        out = rt.run(feeds)["logits"]
        counts["ok" if any(np.array_equal(out, r) for r in refs.values()) else "torn"] += 1
    except LoraRuntimeError as e:
        counts["error"] += 1
        assert "\n" not in str(e)
        print(e, file=sys.stderr)
    except Exception:
        counts["traceback"] += 1
        traceback.print_exc()
print(json.dumps(counts))
"""

RECOMPILER = r"""
import json, sys
from lora_runtime import compile_bundle
args = json.loads(sys.argv[1])
i = 0
while True:
    use_case = args["use_cases"][i % 2]
    compile_bundle(args["base"], args["adapters"], args["bundle"], generation="v1", use_cases=[use_case], force=True)
    i += 1
    print(i, flush=True)
"""


def test_runs_racing_forced_recompiles_see_one_bundle_or_one_line(tiny, tmp_path):
    """Two processes open, switch and run 150 times each while a third recompiles the bundle with --force in a
    loop (two bundles whose use-case "x" differs): every output is one bundle's, no traceback."""
    out = tmp_path / "b"
    feeds = tiny.inputs(seed=5)
    use_cases = ["x=summarize", "x=tone:0.5"]
    refs = {}
    for i, u in enumerate(use_cases):
        b = compile_bundle(tiny.base, tiny.adapters, tmp_path / f"ref{i}", generation="v1", use_cases=[u])
        rt = Runtime.open(b.path)
        rt.switch("x")
        np.save(tmp_path / f"ref{i}.npy", rt.run(feeds)["logits"])
        refs[u] = str(tmp_path / f"ref{i}.npy")
    compile_bundle(tiny.base, tiny.adapters, out, generation="v1", use_cases=[use_cases[0]])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    common = {"bundle": str(out), "base": str(tiny.base), "adapters": {k: str(v) for k, v in tiny.adapters.items()}}
    recompiler = subprocess.Popen([sys.executable, "-c", RECOMPILER, json.dumps(common | {"use_cases": use_cases})],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert recompiler.stdout.readline().strip() == "1"  # it is recompiling
        runners = [subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(
            common | {"ids": feeds["input_ids"].tolist(), "refs": refs, "runs": 150})], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [r.communicate(timeout=600) for r in runners]
    finally:
        recompiler.kill()
        recompiler.communicate()
    total = {"ok": 0, "error": 0, "torn": 0, "traceback": 0}
    for stdout, stderr in results:
        assert "Traceback" not in stderr, stderr
        for k, v in json.loads(stdout.strip().splitlines()[-1]).items():
            total[k] += v
    assert total["torn"] == 0 and total["traceback"] == 0, total
    # an open holds a shared lock on the path that a publishing compile takes exclusively: none has to give up
    assert total["ok"] == 300, (total, [r[1] for r in results])
