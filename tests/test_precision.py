"""16-bit LoRA slots: half the bytes, outputs equal to float32 math over the float16-rounded weights."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import FIXTURES
from reference import merged_outputs
from safetensors.numpy import load_file, save_file

from lora_runtime import AdapterError, Runtime, compile_bundle, run_use_case
from lora_runtime.cli import main
from lora_runtime.compiler.options import CompileOptions, WeightOnlyOptions
from lora_runtime.demo import demo_use_cases
from lora_runtime.export import flatten


def _rounded_adapters(adapters, tmp_path):
    """Copies of the adapters with A/B rounded to float16 and stored back as float32 (the independent twin)."""
    out = {}
    for name, path in adapters.items():
        out[name] = tmp_path / "rounded" / name
        shutil.copytree(path, out[name])
        t = load_file(str(path / "adapter_model.safetensors"))
        save_file({k: v.astype(np.float16).astype(np.float32) for k, v in t.items()},
                  str(out[name] / "adapter_model.safetensors"))
    return out


@pytest.mark.parametrize("generation", ["v1", "v2", "v3"])
def test_float16_slots(tiny, tmp_path, generation):
    cases = demo_use_cases(generation, list(tiny.adapters))
    f32 = compile_bundle(tiny.base, tiny.adapters, tmp_path / "f32", generation=generation, use_cases=cases)
    f16 = compile_bundle(tiny.base, tiny.adapters, tmp_path / "f16", CompileOptions(generation, lora_dtype="float16"),
                         use_cases=cases)
    patches = lambda b: sum(f.nbytes for k, f in b.manifest.files.items() if k.startswith("patches/"))  # noqa: E731
    assert 0.45 < patches(f16) / patches(f32) < 0.55
    assert {s.dtype for s in f16.manifest.slots if s.kind in ("lora_A", "lora_B")} == {"float16"}

    rounded = _rounded_adapters(tiny.adapters, tmp_path)
    feeds = tiny.inputs(seed=8)
    rt = Runtime.open(f16.path)
    sqnr = f16.manifest.accuracy_of("float32_bundle").sqnr_db
    for u in f16.manifest.use_cases:
        want = merged_outputs(tiny.base, u.strengths, rounded, feeds)["logits"]
        np.testing.assert_allclose(run_use_case(f16, u.name, feeds)["logits"], want, atol=1e-4, rtol=0)
        rt.switch(u.name)
        np.testing.assert_allclose(rt.run(feeds)["logits"], want, atol=1e-4, rtol=0)
        exact = run_use_case(f32, u.name, feeds)["logits"]
        if u.strengths:
            assert 50.0 <= sqnr[u.name] < 200.0  # measured and recorded: some loss, and small
            noise = np.sum((exact - want) ** 2)
            assert noise > 0  # rounding did change something, so the check above is not vacuous
        else:
            assert sqnr[u.name] == float("inf")


@pytest.mark.parametrize("generation", ["v1", "v2", "v3"])
def test_float16_peft_adapter_is_exact_in_float16_slots(tmp_path, generation):
    root = FIXTURES / "llama"
    b = compile_bundle(root / "dynamo.onnx", {"h16": root / "adapters/h16"}, tmp_path / "b",
                       CompileOptions(generation, lora_dtype="float16"), use_cases=["h16=h16"])
    with np.load(root / "inputs.npz") as z:
        feeds = {"input_ids": z["input_ids"]}
    got = run_use_case(b, "h16", feeds)["logits"]
    np.testing.assert_allclose(got, np.load(root / "expected.npz")["h16"], atol=1e-4, rtol=0)


def test_values_beyond_float16_are_refused(tiny, tmp_path):
    folder = tmp_path / "big"
    shutil.copytree(tiny.adapters["tone"], folder)
    t = load_file(str(folder / "adapter_model.safetensors"))
    key = sorted(k for k in t if "lora_B" in k)[0]
    t[key][0, 0] = 1e6
    save_file(t, str(folder / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="beyond float16"):
        compile_bundle(tiny.base, {"big": folder}, tmp_path / "b", CompileOptions("v2", lora_dtype="float16"))
    assert not (tmp_path / "b").exists()
    compile_bundle(tiny.base, {"big": folder}, tmp_path / "b", generation="v2")  # float32 slots hold it


def test_cli_lora_dtype_and_inspect(tiny, tmp_path, capsys):
    args = ["compile", "--base", str(tiny.base), "--generation", "v3", "-o", str(tmp_path / "b"),
            "--lora-dtype", "float16"] + [a for n, p in tiny.adapters.items() for a in ("--adapter", f"{n}={p}")]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "b")]) == 0
    text = capsys.readouterr().out
    assert "LoRA slots float16" in text and " dB" in text
    assert main(["inspect", str(tmp_path / "b"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    (twin,) = [a for a in info["manifest"]["accuracy"] if a["key"] == "float32_bundle"]
    assert set(twin["sqnr_db"]) == {"summarize", "translate", "tone"}


# ---- quantized base weights -----------------------------------------------------------------------

def _dequantized(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Independent reference: symmetric round-to-nearest per block of `block` input rows of W (in, out)."""
    k = w.shape[0]
    pad = -k % block
    wp = np.concatenate([w, np.zeros((pad, w.shape[1]), w.dtype)]) if pad else w
    g = wp.reshape(-1, block, w.shape[1])  # (blocks, block, out)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(g).max(axis=1, keepdims=True) / qmax
    scale[scale == 0] = 1
    q = np.clip(np.rint(g / scale), -qmax - 1, qmax)
    return (q * scale).reshape(-1, w.shape[1])[:k].astype(np.float32)


def _sqnr(ref, test):
    return 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - test).astype(np.float64) ** 2))


@pytest.mark.parametrize(("bits", "block"), [(4, 32), (4, 16), (8, None), (8, 128)])
@pytest.mark.parametrize("generation", ["v1", "v2", "v3"])
def test_quantized_base(tiny, tmp_path, bits, block, generation):
    import onnx
    from onnx import numpy_helper
    from reference import load_with_data

    kind = f"int{bits}"
    b = compile_bundle(tiny.base, tiny.adapters, tmp_path / "b",
                       CompileOptions(generation, weight_only=WeightOnlyOptions.of(kind, block_size=block,
                                                                                   grid="symmetric")),
                       use_cases=demo_use_cases(generation, list(tiny.adapters)))
    g = flatten(onnx.load(str(b.file("model.onnx")), load_external_data=False))
    base = load_with_data(tiny.base)
    linear = {t.name: numpy_helper.to_array(t) for t in base.graph.initializer
              if t.name.endswith("_proj.weight") or t.name == "lm_head.weight"}
    ops = [n for n in g.graph.node if n.op_type == "MatMulNBits"]
    assert len(ops) == len(linear) == 7 * 2 + 1
    assert not {t.name for t in g.graph.initializer} & set(linear)  # no float copy of a quantized weight
    assert b.manifest.base.data_files == ()  # the float32 weights are not needed, so not linked
    on_disk = {p.relative_to(b.path).as_posix() for p in b.path.rglob("*") if p.is_file()}
    assert on_disk == set(b.manifest.files) | {"manifest.json"}  # every file hashed, nothing else
    q_bytes = sum(int({e.key: e.value for e in t.external_data}["length"])
                  for t in g.graph.initializer if t.name.endswith((f".q{bits}", ".scales")) and EMBED not in t.name)
    eff = block or 32  # codes of `bits` bits plus one float32 scale per block; a column padded to whole blocks
    padded = sum(-(-w.shape[0] // eff) * eff * w.shape[1] for w in linear.values())
    assert q_bytes <= padded * (bits / 8 + 4 / eff) * 1.1

    # the encodings file holds the same scales, computed here independently (absmax / qmax per block)
    from lora_runtime.quant.reader import read_encodings

    enc = read_encodings(b.path / "encodings/base_weights.encodings")
    assert sorted(enc.names()) == sorted([*linear, EMBED]) and not enc.activation_encodings
    for name, w in linear.items():
        e = enc[name]
        eff = block or 32
        pad = -w.shape[0] % eff
        g = np.concatenate([w, np.zeros((pad, w.shape[1]), w.dtype)]).reshape(-1, eff, w.shape[1])
        want = (np.abs(g).max(axis=1) / (2 ** (bits - 1) - 1)).T.reshape(-1)  # (out, blocks) order
        np.testing.assert_allclose(np.array(e.scale), want, rtol=1e-6)
        assert e.bw == bits and e.is_sym and set(e.offset) == {-(2 ** (bits - 1))}
        assert e.enc_type == ("PER_CHANNEL" if eff >= w.shape[0] else "PER_BLOCK")

    # reference: the float model with every linear weight replaced by its dequantized twin
    deq = {name: _dequantized(w, bits, block or 32)
           for name, w in linear.items()}
    for u, (to_deq, to_exact) in _against_dequantized(tiny, b, base, deq, tmp_path).items():
        # accuracy_level 4 quantizes activations to int8 inside MatMulNBits, so the match is not exact:
        # close to the dequantized reference, and for int4 (where weight noise dominates) clearly closer
        # to it than to the float32 model, so wrong scales or packing cannot pass
        assert to_deq > 30.0, u
        if bits == 4:
            assert to_deq > to_exact + 10.0, u
        assert 5.0 < b.manifest.accuracy_of("float32_bundle").sqnr_db[u] < 60.0  # recorded, and lossy


def _graph_weights(bundle, names):
    """Each quantized weight as the graph holds it, unpacked here independently of the compiler: (codes (N, K),
    scales (N, blocks), zero points (N, blocks) or None, block size)."""
    from onnx import helper, numpy_helper
    from reference import load_with_data

    g = flatten(load_with_data(bundle.file("model.onnx"))).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    out = {}
    for node in g.node:
        weight = node.input[1].removesuffix(".q4").removesuffix(".q8") if node.op_type == "MatMulNBits" else ""
        if weight not in names:
            continue
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        n, k, bs, bits = a["N"], a["K"], a["block_size"], a["bits"]
        blob = inits[node.input[1]].reshape(n, -1)
        codes = (np.stack([blob & 15, blob >> 4], axis=-1).reshape(n, -1) if bits == 4 else blob)[:, :k]  # low first
        blocks = -(-k // bs)
        zp = None
        if len(node.input) > 3 and node.input[3]:
            z = inits[node.input[3]].reshape(n, -1)
            zp = (np.stack([z & 15, z >> 4], axis=-1).reshape(n, -1) if bits == 4 else z)[:, :blocks]
        out[weight] = (codes, inits[node.input[2]].reshape(n, blocks), zp, bs)
    return out


def _dequantize(codes, scales, zeros, bs, bits=4):
    """(K, N) from the unpacked form of _graph_weights (symmetric: zero 2^(bits-1))."""
    z = np.full(scales.shape, 2.0 ** (bits - 1)) if zeros is None else zeros.astype(np.float64)
    idx = np.arange(codes.shape[1]) // bs
    return ((codes - z[:, idx]) * scales[:, idx]).T.astype(np.float32)


def test_int4_asymmetric_blocks(tiny, tmp_path):
    """int4's default grid: a zero point per block, each block's range searched; the graph computes exactly its own
    codes and zero points, and holds each weight closer to the float one than the symmetric grid does."""
    from onnx import numpy_helper
    from reference import load_with_data

    from lora_runtime.quant.reader import read_encodings

    b = compile_bundle(tiny.base, tiny.adapters, tmp_path / "b", CompileOptions("v3", weight_only=WeightOnlyOptions.of(
        "int4")), use_cases=demo_use_cases("v3", list(tiny.adapters)))
    base = load_with_data(tiny.base)
    linear = {t.name: numpy_helper.to_array(t) for t in base.graph.initializer
              if t.name.endswith("_proj.weight") or t.name == "lm_head.weight"}
    held = _graph_weights(b, set(linear))
    assert set(held) == set(linear)
    enc = read_encodings(b.path / "encodings/base_weights.encodings")
    gains = []
    for name, w in linear.items():
        codes, scales, zeros, bs = held[name]
        assert zeros is not None and zeros.max() <= 15 and codes.max() <= 15
        deq = _dequantize(codes, scales, zeros, bs)
        e = enc[name]  # the encodings file says the same: offset = -zero point, per (out, block)
        assert not e.is_sym and e.bw == 4 and e.block_size == bs
        np.testing.assert_array_equal(np.array(e.offset), -zeros.reshape(-1).astype(int))
        np.testing.assert_allclose(np.array(e.scale), scales.reshape(-1), rtol=1e-6)
        gains.append(_sqnr(w, deq) - _sqnr(w, _dequantized(w, 4, bs)))
    assert np.mean(gains) > 1.0, gains  # dB over the symmetric grid's nearest codes, weight by weight
    deq = {name: _dequantize(*held[name]) for name in linear}
    for u, (to_deq, to_exact) in _against_dequantized(tiny, b, base, deq, tmp_path).items():
        assert to_deq > 30.0 and to_deq > to_exact + 10.0, u


EMBED = "model.embed_tokens.weight"


def _graph_embedding(bundle):
    """The embedding table as the graph's GatherBlockQuantized holds it, dequantized here: (codes - 128) * scale per
    block along the row; with the codes and scales."""
    from onnx import helper, numpy_helper
    from reference import load_with_data

    g = flatten(load_with_data(bundle.file("model.onnx"))).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    (node,) = [n for n in g.node if n.op_type == "GatherBlockQuantized"]
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    assert (a["gather_axis"], a["quantize_axis"], a["bits"]) == (0, 1, 8) and len(node.input) == 3
    codes, scales, bs = inits[node.input[0]], inits[node.input[2]], a["block_size"]
    assert EMBED not in inits  # no float copy left
    deq = (codes.astype(np.float64) - 128) * np.repeat(scales, bs, axis=1)
    return deq.astype(np.float32), codes, scales, bs


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_embedding_table_is_8bit_blocks(tiny, tmp_path, kind):
    """--base-weights also holds the token embedding table as 8-bit symmetric blocks of 32 along each row, read by
    GatherBlockQuantized: every code within a block's absmax/127 grid, the lookup what the dequantized table gives;
    the rotary tables (gathered by positions, not token ids) stay float."""
    from onnx import numpy_helper
    from reference import load_with_data

    b = compile_bundle(tiny.base, tiny.adapters, tmp_path / "b", CompileOptions("v3", weight_only=WeightOnlyOptions.of(
        kind)), use_cases=demo_use_cases("v3", list(tiny.adapters)))
    assert b.manifest.weight_only.embeddings == (EMBED,)
    base = load_with_data(tiny.base)
    floats = {t.name: numpy_helper.to_array(t) for t in base.graph.initializer}
    table = floats[EMBED]
    deq, codes, scales, bs = _graph_embedding(b)
    assert bs == 32 and codes.shape == table.shape and scales.shape == (table.shape[0], table.shape[1] // 32)
    want = np.abs(table.reshape(table.shape[0], -1, 32)).max(axis=-1) / 127
    np.testing.assert_allclose(scales, want, rtol=1e-6)
    assert np.all(np.abs(deq - table) <= np.repeat(scales, 32, axis=1) / 2 * (1 + 1e-5) + 1e-12)
    assert _sqnr(table, deq) > 40.0
    kept = {t.name for t in flatten(load_with_data(b.file("model.onnx"))).graph.initializer}
    rope = [n for n in floats if "rope" in n or "cos" in n or "sin" in n]
    assert rope and set(rope) <= kept  # the rotary tables are not token embeddings
    held = _graph_weights(b, set(floats))
    deqs = {name: _dequantize(*w, bits=int(kind[3:])) for name, w in held.items()} | {EMBED: deq}
    for u, (to_deq, _exact) in _against_dequantized(tiny, b, base, deqs, tmp_path).items():
        assert to_deq > 30.0, u


def test_int8_modules_in_an_int4_base(tiny, tmp_path, capsys):
    """``--int8-modules v_proj``: every v_proj at 8 bits in the same blocks (codes up to 255, a zero point per
    block), the rest at 4; the graph computes its own codes, the manifest and the encodings file say which."""
    from onnx import numpy_helper
    from reference import load_with_data

    from lora_runtime.quant.reader import read_encodings

    wo = WeightOnlyOptions.of("int4", int8_modules=["v_proj"])
    b = compile_bundle(tiny.base, tiny.adapters, tmp_path / "b", CompileOptions("v3", weight_only=wo),
                       use_cases=demo_use_cases("v3", list(tiny.adapters)))
    base = load_with_data(tiny.base)
    linear = {t.name: numpy_helper.to_array(t) for t in base.graph.initializer
              if t.name.endswith("_proj.weight") or t.name == "lm_head.weight"}
    wide = {n for n in linear if n.endswith(".self_attn.v_proj.weight")}
    assert wide and b.manifest.weight_only.int8_weights == len(wide)
    assert b.manifest.weight_only.int8_modules == ("v_proj",)
    held = _graph_weights(b, set(linear))
    enc = read_encodings(b.path / "encodings/base_weights.encodings")
    assert set(held) == set(linear)
    sq = {}
    for name, w in linear.items():
        codes, scales, zeros, bs = held[name]
        top = 255 if name in wide else 15
        assert bs == 32 and zeros is not None and zeros.max() <= top and codes.max() <= top
        assert enc[name].bw == (8 if name in wide else 4)
        np.testing.assert_array_equal(np.array(enc[name].offset), -zeros.reshape(-1).astype(int))
        sq[name] = _sqnr(w, _dequantize(codes, scales, zeros, bs))
    assert all(codes.max() > 15 for n, (codes, *_r) in held.items() if n in wide)
    assert min(sq[n] for n in wide) > max(sq[n] for n in linear if n not in wide) + 15.0, sq
    deq = {name: _dequantize(*held[name]) for name in linear}
    for u, (to_deq, _exact) in _against_dequantized(tiny, b, base, deq, tmp_path).items():
        assert to_deq > 30.0, u
    main(["inspect", str(b.path)])
    assert "int4 (v_proj: int8)" in capsys.readouterr().out


def test_int8_modules_are_checked(tiny, tmp_path, capsys):
    from lora_runtime.errors import UseCaseError

    with pytest.raises(UseCaseError, match="'nope': no float linear layer of .*base.onnx"):
        compile_bundle(tiny.base, tiny.adapters, tmp_path / "b", CompileOptions(
            "v3", weight_only=WeightOnlyOptions.of("int4", int8_modules=["v_proj", "nope"])), use_cases=["base="])
    assert not (tmp_path / "b").exists()
    with pytest.raises(UseCaseError, match="goes with --base-weights int4"):
        WeightOnlyOptions.of("int8", int8_modules=["v_proj"])
    common = ["compile", "--base", str(tiny.base), "--generation", "v3", "--adapter", f"tone={tiny.adapters['tone']}"]
    assert main([*common, "-o", str(tmp_path / "c"), "--int8-modules", "v_proj"]) == 2
    assert "--int8-modules goes with --base-weights int4" in capsys.readouterr().err
    assert main([*common, "-o", str(tmp_path / "d"), "--base-weights", "int8", "--int8-modules", "v_proj"]) == 2
    assert "goes with --base-weights int4" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
    assert main([*common, "-o", str(tmp_path / "e"), "--base-weights", "int4", "--int8-modules", "mlp.down_proj"]) == 0
    out = capsys.readouterr().out
    assert "base weights int4 (mlp.down_proj: int8), block size 32" in out
    assert "vs the float32 bundle on synthesized inputs: output SQNR" in out and " dB" in out


def _against_dequantized(tiny, bundle, base, deq, tmp_path):
    """Per use-case, the SQNR of the bundle's logits against the float model whose linear weights are ``deq``
    (what the graph should compute), and against the float model itself."""
    import onnx
    from onnx import numpy_helper

    deq_dir = tmp_path / "deq"
    deq_dir.mkdir()
    for t in base.graph.initializer:
        if t.name in deq:
            t.CopyFrom(numpy_helper.from_array(deq[t.name], t.name))
    onnx.save(base, str(deq_dir / "base.onnx"))
    feeds = tiny.inputs(seed=12)
    rt = Runtime.open(bundle.path)
    out = {}
    for u in bundle.manifest.use_cases:
        want = merged_outputs(deq_dir / "base.onnx", u.strengths, tiny.adapters, feeds)["logits"]
        exact = merged_outputs(tiny.base, u.strengths, tiny.adapters, feeds)["logits"]
        rt.switch(u.name)
        got = rt.run(feeds)["logits"]
        out[u.name] = (_sqnr(want, got), _sqnr(exact, got))
    return out


def _calibration(tiny, path, n, seed=0):
    samples = [tiny.inputs(seed=seed + i) for i in range(n)]
    np.savez(path, **{k: np.stack([s[k] for s in samples]) for k in samples[0]})
    return path


def test_int4_gptq_beats_nearest_on_held_out_inputs(tiny, tmp_path):
    """GPTQ codes on the same asymmetric grid, from the base's linear inputs on 64 calibration samples: logits closer
    to the float model's on inputs it never saw than the nearest codes are."""
    calib = _calibration(tiny, tmp_path / "calib.npz", 64)
    made = {}
    for rounding in ("nearest", "gptq"):
        wo = WeightOnlyOptions.of("int4", calibration=calib if rounding == "gptq" else None)
        made[rounding] = compile_bundle(tiny.base, tiny.adapters, tmp_path / rounding,
                                        CompileOptions("v3", weight_only=wo), use_cases=["base="])
    assert "gptq codes" in made["gptq"].manifest.weight_only.op
    assert "nearest codes" in made["nearest"].manifest.weight_only.op
    sq = {k: [] for k in made}
    for seed in range(1000, 1008):
        feeds = tiny.inputs(seed=seed)
        want = merged_outputs(tiny.base, {}, tiny.adapters, feeds)["logits"]
        for k, b in made.items():
            sq[k].append(_sqnr(want, run_use_case(b, "base", feeds)["logits"]))
    assert np.mean(sq["gptq"]) > np.mean(sq["nearest"]) + 0.3, sq


@pytest.mark.filterwarnings("ignore:.*calibration tokens")
def test_int4_gptq_accuracy_is_measured_on_samples_it_did_not_see(tiny, tmp_path):
    """With --calibration, GPTQ reads the first 3/4 of the samples and the manifest's accuracy is the logits' SQNR
    and argmax agreement on the last 1/4, against the float model (computed here by the reference implementation)."""
    calib = _calibration(tiny, tmp_path / "calib.npz", 16, seed=40)
    wo = WeightOnlyOptions.of("int4", calibration=calib)
    b = compile_bundle(tiny.base, tiny.adapters, tmp_path / "b", CompileOptions("v3", weight_only=wo),
                       use_cases=["base=", "tone=tone"])
    acc = b.manifest.accuracy_of("float32_bundle")
    assert acc.inputs == "4 held-out calibration samples"
    for u in b.manifest.use_cases:
        signal = noise = same = n = 0
        for seed in range(52, 56):  # the last 4 of the 16 samples
            feeds = tiny.inputs(seed=seed)
            want = merged_outputs(tiny.base, u.strengths, tiny.adapters, feeds)["logits"].astype(np.float64)
            got = run_use_case(b, u.name, feeds)["logits"]
            signal, noise = signal + np.sum(want ** 2), noise + np.sum((want - got) ** 2)
            same, n = same + np.sum(want.argmax(-1) == got.argmax(-1)), n + want.argmax(-1).size
        assert abs(acc.sqnr_db[u.name] - 10 * np.log10(signal / noise)) < 0.05, u.name
        assert abs(acc.argmax_agreement[u.name] - same / n) < 1e-9, u.name


def test_int4_gptq_with_too_few_tokens_warns(tiny, tmp_path):
    calib = _calibration(tiny, tmp_path / "calib.npz", 2)
    with pytest.warns(UserWarning, match="calibration tokens"):
        compile_bundle(tiny.base, tiny.adapters, tmp_path / "b",
                       CompileOptions("v3", weight_only=WeightOnlyOptions.of("int4", calibration=calib)),
                       use_cases=["base="])


def test_cli_weight_grid_and_gptq_flags(tiny, tmp_path, capsys):
    common = ["compile", "--base", str(tiny.base), "--generation", "v3", "--adapter", f"tone={tiny.adapters['tone']}"]
    assert main([*common, "-o", str(tmp_path / "a"), "--weight-grid", "symmetric"]) == 2
    assert "--weight-grid goes with --base-weights" in capsys.readouterr().err
    assert main([*common, "-o", str(tmp_path / "b"), "--base-weights", "int4", "--weight-rounding", "gptq"]) == 2
    assert "needs calibration data" in capsys.readouterr().err
    calib = _calibration(tiny, tmp_path / "calib.npz", 32)
    assert main([*common, "-o", str(tmp_path / "d"), "--base-weights", "int4", "--weight-rounding", "nearest",
                 "--calibration", str(calib)]) == 2
    assert "read by GPTQ only" in capsys.readouterr().err
    assert not any((tmp_path / x).exists() for x in "abd")
    assert main([*common, "-o", str(tmp_path / "c"), "--base-weights", "int4", "--weight-grid", "symmetric",
                 "--calibration", str(calib)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "c"), "--json"]) == 0
    op = json.loads(capsys.readouterr().out)["manifest"]["weight_only"]["op"]
    assert "symmetric" in op and "gptq codes" in op


def test_quantized_gemm_with_bias_gpt2(tmp_path):
    """GPT-2 (Gemm, transB=0, bias) from the TorchScript export, int8 base, against PEFT's float outputs."""
    root = FIXTURES / "gpt2"
    b = compile_bundle(root / "torchscript.onnx", {"p": root / "adapters/p"}, tmp_path / "b",
                       CompileOptions("v2", weight_only=WeightOnlyOptions.of("int8")), use_cases=["p=p"])
    with np.load(root / "inputs.npz") as z:
        feeds = {k: z[k] for k in z.files}
    got = run_use_case(b, "p", feeds)["logits"]
    assert _sqnr(np.load(root / "expected.npz")["p"], got) > 25.0


def test_bad_block_size_is_refused(tiny, tmp_path):
    from lora_runtime import UseCaseError

    with pytest.raises(UseCaseError, match="power of two"):
        compile_bundle(tiny.base, tiny.adapters, tmp_path / "b",
                       CompileOptions("v3", weight_only=WeightOnlyOptions.of("int4", block_size=24)))
    assert not (tmp_path / "b").exists()


def test_base_encodings_file_can_be_left_out(tiny, tmp_path):
    b = compile_bundle(tiny.base, tiny.adapters, tmp_path / "b",
                       CompileOptions("v3", measure_accuracy=False,
                                      weight_only=WeightOnlyOptions.of("int4", encodings="never")))
    assert not (b.path / "encodings").exists()
    assert b.manifest.weight_only.encodings is None
    assert b.manifest.weight_only.encodings_note.startswith("not written")
    b = compile_bundle(tiny.base, tiny.adapters, tmp_path / "c",  # auto: a small model's scales are written
                       CompileOptions("v3", measure_accuracy=False, weight_only=WeightOnlyOptions.of("int4")))
    assert b.manifest.weight_only.encodings == "encodings/base_weights.encodings"


@pytest.mark.parametrize(("k", "block"), [(96, 32), (80, 16), (64, 32)])
def test_zero_points_of_an_odd_number_of_blocks_pack_as_onnx_runtime_reads_them(k, block):
    """MatMulNBits' 4-bit zero points: two blocks per byte, each row's last odd block alone in its byte."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from lora_runtime.compiler.passes.weight_only import quantize_grid
    from lora_runtime.models.blocks import matmul_nbits

    class Inline:  # a DataWriter stand-in: initializers inline
        def tensor(self, name, data, _type, shape):
            return numpy_helper.from_array(np.asarray(data).reshape(shape), name)

    rng = np.random.default_rng(k)
    w = (rng.standard_normal((k, 7)) + 0.5).astype(np.float32)  # off-centre: zero points far from 8
    q = quantize_grid(w, 4, block, symmetric=False)
    node, inits = matmul_nbits(Inline(), "w", "x", ["y"], "mm", q.codes, q.scales, k, 4, 0, zero_points=q.zeros)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 7])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((2, k)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    idx = np.arange(k) // block  # the grid's own arithmetic, here: (code - zero) * scale per block
    deq = ((q.codes.reshape(7, -1)[:, :k] - q.zeros[:, idx].astype(np.float32)) * q.scales[:, idx]).T
    assert len(set(q.zeros.reshape(-1).tolist())) > 1
    np.testing.assert_allclose(got, x @ deq, atol=1e-4, rtol=0)


def test_an_embedding_table_read_twice_is_written_once(tmp_path):
    """Two Gathers of one table by the token ids: one set of 8-bit codes, both lookups through it."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from lora_runtime.compiler.passes.weight_only import WeightOnlyPassOptions, quantize_weights

    table = np.random.default_rng(5).normal(size=(64, 32)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["a"]), helper.make_node("Gather", ["table", "ids"], ["b"]),
         helper.make_node("Add", ["a", "b"], ["out"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [3, 32])],
        [numpy_helper.from_array(table, "table")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    done = quantize_weights(model, WeightOnlyPassOptions(tmp_path, tmp_path, "w.data", 4))
    assert len(done.embeddings) == 1 and not done.weights
    assert [t.name for t in model.graph.initializer] == ["table.q8", "table.scales"]
    assert [n.op_type for n in model.graph.node] == ["GatherBlockQuantized", "GatherBlockQuantized", "Add"]
    onnx.save(model, str(tmp_path / "m.onnx"))
    ids = np.array([0, 63, 7], np.int64)
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    scale = np.abs(table[ids].reshape(3, 1, 32)).max(axis=-1) / 127
    assert np.all(np.abs(got - 2 * table[ids]) <= 2 * scale / 2 * (1 + 1e-5))
