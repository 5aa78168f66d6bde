"""AIMET's own encodings files in: real aimet-onnx 2.42 exports of bundles' float graphs (tests/fixtures/aimet, made
by tools/make_aimet_fixtures.py in AIMET's venv; these tests do not import AIMET).

1.0.0 with ``producer`` / ``quantizer_args``, 2.0.0, and aimet_onnx's per-adapter LoRA files are read; every entry
for a tensor the bundle encodes is used as written (carried across Reshape/Transpose where AIMET quantized the
other side); entries for tensors the bundle does not encode are counted in one warning line; per-use-case files;
the refusals; and AIMET's symmetric scale rule."""

from __future__ import annotations

import gzip
import json
import warnings

import numpy as np
import onnx
import pytest
from conftest import FIXTURES
from onnx import TensorProto, helper, numpy_helper

from lora_runtime import Runtime, UseCaseError, compile_bundle
from lora_runtime.cli import main
from lora_runtime.compiler.options import CompileOptions, QuantOptions
from lora_runtime.compiler.points import find_candidates
from lora_runtime.export import flatten
from lora_runtime.quant import presets
from lora_runtime.quant.encodings import EncodingsError, EncodingsWarning
from lora_runtime.quant.overrides import GraphTensors, Targets, match
from lora_runtime.quant.reader import parse_encodings, read_encodings
from lora_runtime.quant.rules import symmetric_per_block, symmetric_per_channel

AIMET = FIXTURES / "aimet"
META = json.loads((AIMET / "aimet.json").read_text())
GPT2 = FIXTURES / "gpt2"
TINY_USE_CASES = META["graphs"]["tiny"]["use_cases"]
GPT2_USE_CASES = META["graphs"]["gpt2"]["use_cases"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The fixture exports, unpacked (AIMET's bytes)."""
    d = tmp_path_factory.mktemp("aimet")
    for f in AIMET.glob("*.encodings.gz"):
        (d / f.name[:-3]).write_bytes(gzip.decompress(f.read_bytes()))
    return d


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory):
    """(base, adapters, use-cases, calibration, float graph) of the graphs AIMET saw."""
    d = tmp_path_factory.mktemp("models")
    rng = np.random.default_rng(3)
    np.savez(d / "tiny.npz", input_ids=rng.integers(0, 256, (8, 1, 8), dtype=np.int64))
    np.savez(d / "gpt2.npz", input_ids=rng.integers(0, 64, (8, 1, 8), dtype=np.int64),
             attention_mask=np.ones((8, 1, 8), np.int64))
    gpt2 = (GPT2 / "dynamo.onnx", {a: GPT2 / "adapters" / a for a in ("p", "q")}, GPT2_USE_CASES, d / "gpt2.npz")
    out = {"tiny": (tiny.base, tiny.adapters, TINY_USE_CASES, d / "tiny.npz"), "gpt2": gpt2}
    for name, (base, adapters, use_cases, _c) in out.items():
        b = compile_bundle(base, adapters, d / f"{name}_float", generation="v3", use_cases=use_cases)
        out[name] += (flatten(onnx.load(str(b.file("model.onnx")), load_external_data=False)).graph,)
    return out


def _compile(models, name, out, mode="non-updatable", shared=None, own=None):
    base, adapters, use_cases, calib, _g = models[name]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        b = compile_bundle(base, adapters, out, CompileOptions("v3", quant=QuantOptions(
            mode, calib, ort_reference=False, encodings_file=shared, encodings_per_use_case=own or {})),
            use_cases=use_cases)
    return b, [str(w.message) for w in seen if issubclass(w.category, EncodingsWarning)]


def _moved_from(graph: onnx.GraphProto, t: str, named) -> str | None:
    """The tensor AIMET named for ``t``: ``t`` itself, or what a Reshape/Transpose chain computed it from."""
    up = {n.output[0]: n.input[0] for n in graph.node if n.op_type in ("Reshape", "Transpose")}
    while t not in named and t in up:
        t = up[t]
    return t if t in named else None


# --- reading ------------------------------------------------------------------------------------------------------


def test_aimet_exports_are_read_without_a_word(files):
    assert META["versions"]["aimet-onnx"] == "2.42.0"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # producer, quantizer_args: known keys, ignored quietly
        for name, note in META["files"].items():
            f = read_encodings(files / name[:-3])
            assert f.from_aimet, name
            expected = {"1.0.0": "1.0.0", "2.0.0": "2.0.0"}.get(note["encoding_version"], "per-adapter")
            assert f.read_as == expected, name
    v1 = read_encodings(files / "tiny_w8a8.encodings")
    assert v1.producer == {"package": "aimet-onnx", "version": "2.42.0"} and v1.quantizer_args
    raw = json.loads((files / "tiny_w8a8.encodings").read_text())
    assert len(v1.names()) == len(raw["activation_encodings"]) + len(raw["param_encodings"]) == 227


@pytest.mark.parametrize("model", ["tiny", "gpt2"])
def test_2_0_0_says_what_1_0_0_says(files, model):
    """The same QuantSim exported both ways: every 1.0.0 entry has its 2.0.0 twin on the same grid. (2.0.0 writes
    activations unsigned: a symmetric one, is_sym with offset -128 in 1.0.0, is uint8 with zero point 128.)"""
    v1 = read_encodings(files / f"{model}_w8a8.encodings")
    v2 = read_encodings(files / f"{model}_w8a8_v2.encodings")
    assert set(v1.names()) <= set(v2.names())
    for n in v1.names():
        a, b = v1[n], v2[n]
        assert (a.scale, a.offset, a.bw, a.enc_type) == (b.scale, b.offset, b.bw, b.enc_type), n
        assert a.is_sym == b.is_sym or (a in v1.activation_encodings and a.offset == (-(2 ** (a.bw - 1)),)), n
    extra = [v2[n] for n in v2.names() if n not in v1]  # data-movement outputs, int32 biases
    biases = [e for e in extra if e.bw == 32]
    assert all(e.is_sym and set(e.offset) == {-(2**31)} for e in biases)
    assert (len(biases) > 0) == (model == "gpt2")


def test_unknown_top_level_keys_are_one_warning_line(files, tmp_path):
    data = json.loads((files / "tiny_w8a8.encodings").read_text()) | {"metadata": {}, "extra": 1}
    (tmp_path / "x.encodings").write_text(json.dumps(data))
    with pytest.warns(EncodingsWarning, match=r"x\.encodings: unknown top-level key\(s\) \['extra', 'metadata'\] "
                                              "ignored") as seen:
        f = read_encodings(tmp_path / "x.encodings")
    assert len(seen) == 1 and len(f.names()) == 227


def test_per_adapter_files_name_lora_tensors(files):
    f = read_encodings(files / "tiny_lora_tone.encodings")
    assert f.read_as == "per-adapter" and len(f.names()) == 70
    a = f["model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert a.bw == 16 and a.enc_type == "PER_CHANNEL" and a.is_sym and set(a.offset) == {-32768}


# --- compiling with them ------------------------------------------------------------------------------------------

CASES = [("tiny", "tiny_w8a8"), ("tiny", "tiny_w8a8_v2"), ("gpt2", "gpt2_w8a8"), ("gpt2", "gpt2_w8a8_v2")]


@pytest.mark.parametrize(("model", "export"), CASES, ids=[c[1] for c in CASES])
def test_every_entry_for_an_encoded_tensor_is_used_as_written(files, models, tmp_path, model, export):
    src = files / f"{export}.encodings"
    mine = read_encodings(src)
    b, said = _compile(models, model, tmp_path / "b", shared=src)
    got = read_encodings(b.path / "encodings/all.encodings")
    graph = models[model][4]
    used = set()
    for n in got.names():
        origin = _moved_from(graph, n, set(mine.names()))
        assert origin is not None, f"{n}: AIMET encoded it (or a Reshape/Transpose input of it)"
        e = mine[origin]
        assert (got[n].scale, got[n].offset, got[n].bw, got[n].is_sym, got[n].enc_type) == \
            (e.scale, e.offset, e.bw, e.is_sym, e.enc_type), n
        used.add(origin)
    ignored = len(mine.names()) - len(used)
    # the exports predate v3's shared gains: their per-point gain tensors (<m>.lora/strength, <m>.lora/gain and the
    # constant <m>.lora_column_scaling) are names this graph no longer has, reported as such (AIMET's entries for
    # them were never used either: this bundle does not quantize a gain)
    names = {t for n in graph.node for t in (*n.input, *n.output)} | {i.name for i in graph.initializer}
    absent = [t for t in mine.names() if t not in names]
    assert all(t.endswith(("lora/strength", "lora/gain", "lora_column_scaling")) for t in absent), absent
    note = f"; {len(absent)} not in this graph" if absent else ""
    assert len(said) == 1 and said[0].startswith(f"{src}: {ignored} entries for tensors this bundle does not "
                                                 f"quantize were ignored ({len(used)} used{note}): e.g. "), said
    assert "\n" not in said[0]
    if export == "tiny_w8a8":  # the numbers: 163 of 227 unmatched by name, 2 of them carried
        assert (ignored, len(used)) == (161, 66)


def test_carried_across_reshape_and_transpose(files, models, tmp_path):
    """1.0.0 names a Transpose/Reshape input where the bundle quantizes the output (o_proj's input in the tiny
    model: Reshape(Transpose(attention)); GPT-2's Conv1D input: a Reshape of the LayerNorm); 2.0.0 names both."""
    for model in ("tiny", "gpt2"):
        v1 = read_encodings(files / f"{model}_w8a8.encodings")
        graph = models[model][4]
        carried = [c.x for c in find_candidates(graph) if "lora" not in c.weight and c.x not in v1]
        assert carried, model
        b, _ = _compile(models, model, tmp_path / model, shared=files / f"{model}_w8a8.encodings")
        got = read_encodings(b.path / "encodings/all.encodings")
        for x in carried:
            origin = _moved_from(graph, x, set(v1.names()))
            assert origin != x and got[x].scale == v1[origin].scale and got[x].offset == v1[origin].offset


def test_aimet_lora_workflow_per_use_case(files, models, tmp_path):
    """aimet_onnx's LoRA flow: the base file for every use-case, each adapter's file for its use-case."""
    own = {a: files / f"tiny_lora_{a}.encodings" for a in ("summarize", "translate", "tone")}
    for mode in ("adapter-only", "full"):
        b, said = _compile(models, "tiny", tmp_path / mode, mode, files / "tiny_lora.encodings", own)
        assert len(said) == 4 and all(s.count("\n") == 0 for s in said)  # one line per file
        assert any(s.startswith(f"{own['tone']}: 28 entries") and "(42 used)" in s for s in said), said
        shared = read_encodings(files / "tiny_lora.encodings")
        for u in TINY_USE_CASES:
            name = u.split("=")[0]
            got = read_encodings(b.path / f"encodings/use-cases/{name}.encodings")
            want = read_encodings(own[name]) if name in own else shared
            lora = [n for n in got.names() if "lora" in n]
            assert len(lora) == 28 + 14
            for n in lora:
                assert got[n] == want[n], (mode, name, n)
        rt = Runtime.open(b.path)
        rt.switch("tone")
        out = rt.run({"input_ids": np.arange(8, dtype=np.int64)[None]})["logits"]
        assert np.all(np.isfinite(out)) and min(b.manifest.accuracy[0].sqnr_db.values()) > 10


def test_per_use_case_through_the_cli(files, tiny, tmp_path, capsys, models):
    args = ["compile", "--base", str(tiny.base), "--generation", "v3", "--encodings", "adapter-only",
            "--calibration", str(models["tiny"][3]), "--no-ort-reference", "-o", str(tmp_path / "b")]
    for name, path in tiny.adapters.items():
        args += ["--adapter", f"{name}={path}"]
    for u in TINY_USE_CASES:
        args += ["--use-case", u]
    args += ["--encodings-file", str(files / "tiny_lora.encodings"),
             "--encodings-file", f"tone={files / 'tiny_lora_tone.encodings'}"]
    capsys.readouterr()
    assert main(args) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(err) == 2 and all(line.startswith("lora-runtime compile: warning: ") for line in err), err
    tone = read_encodings(tmp_path / "b/encodings/use-cases/tone.encodings")
    assert tone["model.layers.0.mlp.up_proj.lora/scaled"] == \
        read_encodings(files / "tiny_lora_tone.encodings")["model.layers.0.mlp.up_proj.lora/scaled"]
    # a use-case the bundle does not have: one line, exit 2, nothing written
    bad = args[:-1] + [f"nope={files / 'tiny_lora_tone.encodings'}", "-o", str(tmp_path / "c")]
    assert main(bad) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no use-case 'nope'" in line and "tiny_lora_tone.encodings" in line
    assert not (tmp_path / "c").exists()


# --- refusals -----------------------------------------------------------------------------------------------------


def _entry(name, **kw):
    return {"name": name, "dtype": "INT", "enc_type": "PER_TENSOR", "bw": 8, "is_sym": False, "scale": [0.1],
            "offset": [-3]} | kw


def _file(path, acts, params=(), **top):
    path.write_text(json.dumps({"version": "1.0.0", "activation_encodings": list(acts),
                                "param_encodings": list(params)} | top))
    return path


def test_names_not_in_the_graph(models, tmp_path):
    x = models["tiny"][4].node[20].output[0]  # some tensor of the graph
    hand = _file(tmp_path / "hand.encodings", [_entry(x), _entry("model.layers.0.input_layrnorm.out")])
    with pytest.raises(EncodingsError, match=r"hand\.encodings: tensor 'model\.layers\.0\.input_layrnorm\.out' is "
                                             r"not in the graph") as info:
        _compile(models, "tiny", tmp_path / "b1", shared=hand)
    assert "\n" not in str(info.value) and not (tmp_path / "b1").exists()
    made = _file(tmp_path / "aimet.encodings", [_entry(x), _entry("/model/lora_A/default/MatMul_output_0")],
                 producer={"package": "aimet-onnx", "version": "2.42.0"})
    _b, said = _compile(models, "tiny", tmp_path / "b2", shared=made)  # AIMET may have seen another graph
    assert len(said) == 1 and "2 entries" in said[0] and "1 not in this graph" in said[0]
    other = _file(tmp_path / "other.encodings", [_entry("/a/b")], producer={"package": "aimet-onnx"})
    with pytest.raises(EncodingsError, match="none of its 1 entries names a tensor of this graph"):
        _compile(models, "tiny", tmp_path / "b3", shared=other)


@pytest.mark.parametrize(("entry", "pattern"), [
    ({"output_dtype": "int4", "per_block_int_scale": [[1]], "per_channel_float_scale": [1.0], "axis": 0,
      "block_size": 32}, "LPBQ"),
    ({"output_dtype": "float8e4m3fn", "y_scale": 0.1}, "output_dtype 'float8e4m3fn' is not supported"),
    ({"output_dtype": "bfloat16"}, "output_dtype 'bfloat16' is not supported"),
    ({"output_dtype": "uint8", "y_scale": [0.1, 0.2]}, "2 scales but no axis"),
    ({"output_dtype": "uint8", "y_scale": 0.1, "min": 0}, r"unknown key\(s\) \['min'\]"),
    ({"output_dtype": "uint8", "y_scale": -0.1}, r"scale\[0\] = -0\.1"),
], ids=["lpbq", "fp8", "bf16", "no-axis", "unknown-key", "negative"])
def test_bad_2_0_0_entries(tmp_path, entry, pattern):
    path = tmp_path / "v2.encodings"
    path.write_text(json.dumps({"version": "2.0.0", "encodings": [{"name": "w"} | entry]}))
    with pytest.raises(EncodingsError, match=pattern) as info:
        read_encodings(path)
    assert str(info.value).startswith(f"{path}: encoding of tensor 'w'") and "\n" not in str(info.value)


def test_2_0_0_zero_points_and_shift(tmp_path):
    path = tmp_path / "v2.encodings"
    path.write_text(json.dumps({"version": "2.0.0", "encodings": [
        {"name": "a", "output_dtype": "uint8", "y_scale": 0.5, "y_zero_point": 131},
        {"name": "s", "output_dtype": "int8", "y_scale": 0.5, "y_zero_point": 3},
        {"name": "h", "output_dtype": "int8", "y_scale": 0.5, "y_zero_point": -0.5},
        {"name": "f", "output_dtype": "float16"}]}))
    f = read_encodings(path)
    assert (f["a"].offset, f["a"].is_sym) == ((-131,), False)
    assert (f["s"].offset, f["s"].is_sym) == ((-131,), False)  # signed, zero point 3: the same grid unsigned
    assert (f["h"].offset, f["h"].zero_point_shift) == ((-128,), (0.5,))  # x = (q - 128 + 0.5) * s
    assert f["f"].dtype == "FLOAT" and f["f"].bw == 16
    text = json.dumps(f.to_json())
    assert '"zero_point_shift": [0.5]' in text


def test_shift_is_refused_where_it_would_run(models, tmp_path):
    x = models["tiny"][4].node[20].output[0]
    shifted = _entry("model.layers.0.input_layernorm.out", zero_point_shift=[0.5])
    with pytest.raises(EncodingsError, match=r"'model\.layers\.0\.input_layernorm\.out': zero_point_shift 0\.5"):
        _compile(models, "tiny", tmp_path / "b", shared=_file(tmp_path / "s.encodings", [shifted]))
    assert not (tmp_path / "b").exists()
    _b, said = _compile(models, "tiny", tmp_path / "ok", shared=_file(tmp_path / "n.encodings",
                                                                     [_entry(x, zero_point_shift=[0.5])]))
    assert len(said) == 1  # not executed here: read, counted, ignored


def test_per_use_case_refusals(files, models, tmp_path):
    own = {"tone": files / "tiny_lora_tone.encodings"}
    with pytest.raises(UseCaseError, match="non-updatable has one set for every use-case"):
        QuantOptions("non-updatable", "c.npz", encodings_per_use_case=own)
    # 16-bit LoRA weights per use-case over a shared file with 8-bit ones: the graph has one form per tensor
    with pytest.raises(EncodingsError, match=r"tiny_lora_tone\.encodings: tensor '.*lora.*': use-case 'tone' gets "
                                             r"INT16 .* but the graph is built with INT8"):
        _compile(models, "tiny", tmp_path / "b", "full", files / "tiny_w8a8.encodings", own)
    assert not (tmp_path / "b").exists()


def test_2_0_0_axis_is_checked(models, tmp_path):
    w = "model.layers.0.self_attn.q_proj.weight"  # 64 x 64: only the axis tells the channels apart
    path = tmp_path / "v2.encodings"
    path.write_text(json.dumps({"version": "2.0.0", "encodings": [
        {"name": w, "output_dtype": "int8", "y_scale": [0.01] * 64, "axis": 0}]}))
    with pytest.raises(EncodingsError, match=rf"tensor '{w}' is encoded per channel along axis 0, but this bundle "
                                             "quantizes it per output channel, axis 1"):
        _compile(models, "tiny", tmp_path / "b", shared=path)


def test_per_channel_carry_follows_the_transpose():
    """A weight AIMET encodes before a Transpose, quantized after it: the channel axis moves with the permutation;
    across a Reshape only per-tensor encodings travel."""
    g = helper.make_graph(
        [helper.make_node("Transpose", ["w_raw"], ["w_t"], perm=[1, 0]),
         helper.make_node("MatMul", ["x", "w_t"], ["y"]),
         helper.make_node("Reshape", ["y", "shape"], ["y2"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [8])],
        [numpy_helper.from_array(np.ones((4, 3), np.float32), "w_raw"),
         numpy_helper.from_array(np.array([8], np.int64), "shape")])
    f = parse_encodings({"version": "2.0.0", "producer": {"package": "aimet-onnx"}, "encodings": [
        {"name": "w_raw", "output_dtype": "int8", "y_scale": [0.1, 0.2, 0.3, 0.4], "axis": 0},
        {"name": "y", "output_dtype": "uint8", "y_scale": 0.5, "y_zero_point": 7},
        {"name": "x", "output_dtype": "uint8", "y_scale": [0.1, 0.2], "axis": 1}]})
    t = Targets({"w_t": (3, 4), "y2": None, "x": None}, {"w_t": 1}, {"w_t": 1}, frozenset(), "non-updatable")
    m = match(f, t, GraphTensors.of(g))
    assert m.entries["w_t"].scale == (0.1, 0.2, 0.3, 0.4) and m.entries["w_t"].axis == 1
    assert m.entries["y2"].scale == (0.5,) and m.entries["y2"].offset == (-7,)
    assert m.entries["x"].axis == 1 and m.unused == ()


# --- the scale rule -----------------------------------------------------------------------------------------------


def _aimet_scale(lo, hi, bw):
    """AIMET's symmetric scale, as measured on aimet-onnx 2.42's exports."""
    return np.maximum(-np.minimum(lo, 0) / 2 ** (bw - 1), np.maximum(hi, 0) / (2 ** (bw - 1) - 1))


@pytest.mark.parametrize("bw", [4, 8, 16])
def test_aimet_symmetric_rule(bw):
    w = np.array([[-1.0, 0.5], [2.0, -4.0], [3.0, -1.0]])
    enc = symmetric_per_channel("w", w, 0, bw, rule="aimet")
    want = _aimet_scale(w.min(1), w.max(1), bw).astype(np.float32)
    assert enc.scale == tuple(float(s) for s in want) and enc.offset == (-(2 ** (bw - 1)),) * 3
    codes = np.rint(w / np.array(enc.scale)[:, None])
    assert codes.min() == -(2 ** (bw - 1)) and codes.max() <= 2 ** (bw - 1) - 1  # -4 lands on the lowest code
    absmax = symmetric_per_channel("w", w, 0, bw)
    assert all(a <= b for a, b in zip(enc.scale, absmax.scale))  # never coarser than absmax
    blocks = symmetric_per_block("w", np.tile(w.T, (2, 1)), 2, bw, rule="aimet")  # (in 4, out 3), blocks of 2
    assert blocks.scale == tuple(float(s) for s in np.repeat(want, 2).astype(np.float32))


def test_compiled_weights_match_aimet(files, models, tmp_path):
    """Without a file, the base and LoRA weights' scales are AIMET's own (within one float32 rounding)."""
    mine = read_encodings(files / "tiny_w8a8.encodings")
    b, _ = _compile(models, "tiny", tmp_path / "b")
    got = read_encodings(b.path / "encodings/all.encodings")
    weights = [e for e in got.param_encodings if e.enc_type == "PER_CHANNEL"]
    assert len(weights) == 15
    for e in weights:
        np.testing.assert_allclose(e.scale, mine[e.name].scale, rtol=1.2e-7, atol=0, err_msg=e.name)


def test_preset_picks_the_rule(tmp_path, monkeypatch):
    assert all(presets.load_preset(n).symmetric_scale == "aimet" for n in presets.preset_names())
    raw = json.loads((presets.PRESET_DIR / "w8a8.json").read_text())
    monkeypatch.setattr(presets, "PRESET_DIR", tmp_path)
    (tmp_path / "old.json").write_text(json.dumps(raw | {"symmetric_scale": "absmax"}))
    (tmp_path / "bad.json").write_text(json.dumps(raw | {"symmetric_scale": "max"}))
    assert presets.load_preset("old").symmetric_scale == "absmax"
    with pytest.raises(EncodingsError, match="symmetric_scale 'max'"):
        presets.load_preset("bad")
