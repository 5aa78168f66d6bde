"""The AIMET/QAIRT encodings 1.0.0 format: byte-stable round trips, a table of malformed files that must each be
refused naming the file and tensor, the AIMET rules for computing scale/offset, the AIMET -> ONNX QDQ mapping
checked through ONNX Runtime, check_fits, and the presets."""

from __future__ import annotations

import copy
import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from lora_runtime.errors import LoraRuntimeError
from lora_runtime.quant.encodings import (
    Encoding,
    EncodingsError,
    EncodingsFile,
    check_fits,
    dumps_encodings,
    write_encodings,
)
from lora_runtime.quant.presets import PRESET_DIR, load_preset, preset_names
from lora_runtime.quant.reader import read_encodings
from lora_runtime.quant.rules import asymmetric_per_tensor, symmetric_per_channel, to_qdq

ROOT = pathlib.Path(__file__).resolve().parent.parent

# A file as AIMET-ONNX 1.0.0 lays it out (sorted keys, indent 4), with one entry of each kind we support.
GOOD = {
    "version": "1.0.0",
    "activation_encodings": [
        {"name": "x", "dtype": "INT", "enc_type": "PER_TENSOR", "bw": 8, "is_sym": False,
         "scale": [0.015686275], "offset": [-64]},
        {"name": "h", "dtype": "INT", "enc_type": "PER_TENSOR", "bw": 16, "is_sym": False,
         "scale": [3.0517578125e-05], "offset": [-32768]},
        {"name": "logits", "dtype": "FLOAT", "enc_type": "PER_TENSOR", "bw": 16},
    ],
    "param_encodings": [
        {"name": "w", "dtype": "INT", "enc_type": "PER_CHANNEL", "bw": 8, "is_sym": True,
         "scale": [0.007874016, 0.031496063], "offset": [-128, -128]},
        {"name": "q_proj.lora_A.weight", "dtype": "INT", "enc_type": "PER_TENSOR", "bw": 16, "is_sym": True,
         "scale": [1.52587890625e-05], "offset": [-32768]},
        {"name": "wb", "dtype": "INT", "enc_type": "PER_BLOCK", "bw": 4, "is_sym": True, "block_size": 2,
         "scale": [0.1, 0.2, 0.3, 0.4], "offset": [-8, -8, -8, -8]},
    ],
    "quantizer_args": {"activation_bitwidth": 8, "dtype": "int", "is_symmetric": True, "param_bitwidth": 8,
                       "per_channel_quantization": True, "quant_scheme": "post_training_tf"},
}


def _write_json(path: pathlib.Path, data: object) -> pathlib.Path:
    path.write_text(json.dumps(data, sort_keys=True, indent=4) + "\n")
    return path


def test_round_trip_is_byte_stable(tmp_path):
    src = _write_json(tmp_path / "a.encodings", GOOD)
    f = read_encodings(src)
    out = tmp_path / "b.encodings"
    write_encodings(out, f)
    assert out.read_bytes() == src.read_bytes()
    assert read_encodings(out) == f
    assert out.read_text().endswith("}\n")


def test_read_write_read_equals_for_computed_values(tmp_path):
    rng = np.random.default_rng(0)
    encs = tuple(symmetric_per_channel(f"w{i}", rng.normal(size=(5, 7)) * 10.0 ** rng.integers(-6, 3), 0)
                 for i in range(4))
    acts = tuple(asymmetric_per_tensor(f"a{i}", float(-rng.random()), float(rng.random() * 100), bw)
                 for i, bw in enumerate((8, 16)))
    f = EncodingsFile("1.0.0", acts, encs)
    write_encodings(tmp_path / "c.encodings", f)
    g = read_encodings(tmp_path / "c.encodings")
    assert g == f  # floats survive bit-exactly through repr
    assert dumps_encodings(g) == (tmp_path / "c.encodings").read_text()


def test_aimet_float_offsets_are_accepted_and_lookup_works(tmp_path):
    data = copy.deepcopy(GOOD)
    data["param_encodings"][0]["offset"] = [-128.0, -128.0]  # aimet_onnx writes libpymo's double offsets
    f = read_encodings(_write_json(tmp_path / "f.encodings", data))
    assert f["w"].offset == (-128, -128)
    assert f.find("x").scale == (0.015686275,)
    assert f.find("nope") is None
    assert "q_proj.lora_A.weight" in f
    with pytest.raises(EncodingsError, match="nope"):
        f["nope"]


def _act(**changes):
    data = copy.deepcopy(GOOD)
    data["activation_encodings"][0].update(changes)
    return data


def _param(index=0, drop=(), **changes):
    data = copy.deepcopy(GOOD)
    data["param_encodings"][index].update(changes)
    for key in drop:
        del data["param_encodings"][index][key]
    return data


def _top(drop=(), **changes):
    data = copy.deepcopy(GOOD)
    data.update(changes)
    for key in drop:
        del data[key]
    return data


BAD_FILES = [
    ("version_0.6.1", _top(version="0.6.1"), r"version '0\.6\.1'"),
    ("no_version", _top(drop=("version",)), "missing key 'version'"),
    ("no_param_encodings", _top(drop=("param_encodings",)), r"missing key\(s\) \['param_encodings'\]"),
    ("encodings_not_list", _top(param_encodings={}), "param_encodings is a dict"),
    ("missing_scale", _param(drop=("scale",)), r"'w'.*missing key\(s\) \['scale'\]"),
    ("missing_is_sym", _param(drop=("is_sym",)), r"'w'.*is_sym"),
    ("unknown_entry_key", _param(min=-1.0), r"'w'.*unknown key\(s\) \['min'\]"),
    ("no_name", _param(drop=("name",)), "no usable 'name'"),
    ("bad_dtype", _param(dtype="int"), r"'w'.*dtype 'int'"),
    ("bad_enc_type", _param(enc_type="PER_AXIS"), r"'w'.*enc_type 'PER_AXIS'"),
    ("lpbq", _param(enc_type="LPBQ", block_size=64, compressed_bw=4, per_block_int_scale=[1, 2]),
     r"'w'.*'LPBQ' is valid AIMET but not supported"),
    ("bw_1", _param(bw=1), r"'w'.*bw 1 is outside 2\.\.32"),
    ("bw_33", _param(bw=33), r"'w'.*bw 33 is outside"),
    ("bw_float", _param(bw=8.0), r"'w'.*bw 8\.0 is not an integer"),
    ("bw_bool", _param(bw=True), r"'w'.*bw True is not an integer"),
    ("is_sym_string", _param(is_sym="True"), r"'w'.*is_sym 'True'"),
    ("scale_zero", _param(scale=[0.0, 1.0]), r"'w'.*scale\[0\] = 0\.0"),
    ("scale_negative", _param(scale=[1.0, -1.0]), r"'w'.*scale\[1\] = -1\.0"),
    ("scale_string", _param(scale=["1", 1.0]), r"'w'.*scale\[0\] = '1'"),
    ("scale_empty", _param(scale=[], offset=[]), r"'w'.*scale is empty"),
    ("offset_positive", _act(offset=[1]), r"'x'.*offset\[0\] = 1 is outside \[-255, 0\]"),
    ("offset_below_range", _act(offset=[-256]), r"'x'.*offset\[0\] = -256"),
    ("offset_fraction", _act(offset=[-64.5]), r"'x'.*offset\[0\] = -64\.5"),
    ("offset_not_symmetric", _param(offset=[-128, -100]), r"'w'.*offset\[1\] = -100 is not symmetric"),
    ("per_tensor_two_scales", _act(scale=[0.1, 0.2], offset=[-1, -2]), r"'x'.*PER_TENSOR with 2 scales"),
    ("length_mismatch", _param(offset=[-128]), r"'w'.*2 scales but 1 offsets"),
    ("per_block_no_block_size", _param(2, drop=("block_size",)), r"'wb'.*PER_BLOCK needs a positive"),
    ("block_size_on_channel", _param(block_size=4), r"'w'.*block_size is only meaningful"),
    ("float_bw_8", _top(activation_encodings=[{"name": "f", "dtype": "FLOAT", "enc_type": "PER_TENSOR", "bw": 8}]),
     r"'f'.*FLOAT bw 8 is not one of \[16, 32\]"),
    ("float_with_scale", _top(activation_encodings=[{"name": "f", "dtype": "FLOAT", "enc_type": "PER_TENSOR",
                                                      "bw": 16, "scale": [1.0]}]),
     r"'f'.*unknown key\(s\) \['scale'\]"),
    ("duplicate_name", _param(1, name="x"), r"tensor 'x' has more than one encoding"),
]


@pytest.mark.parametrize("data, pattern", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_files_are_refused_naming_file_and_tensor(tmp_path, data, pattern):
    path = _write_json(tmp_path / "bad.encodings", data)
    with pytest.raises(EncodingsError, match=pattern) as info:
        read_encodings(path)
    message = str(info.value)
    assert message.startswith(str(path) + ":")
    assert "\n" not in message
    assert isinstance(info.value, LoraRuntimeError)


@pytest.mark.parametrize("text", ["", "{", "[]", "null"], ids=["empty", "truncated", "list", "null"])
def test_unreadable_files_are_refused(tmp_path, text):
    path = tmp_path / "x.encodings"
    path.write_text(text)
    with pytest.raises(EncodingsError, match=str(path)):
        read_encodings(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(EncodingsError, match="no such encodings file"):
        read_encodings(tmp_path / "absent.encodings")


def test_write_refuses_invalid_values(tmp_path):
    bad = EncodingsFile("1.0.0", (Encoding("x", "INT", "PER_TENSOR", 8, False, (float("nan"),), (0,)),), ())
    with pytest.raises(EncodingsError, match=r"'x'.*scale\[0\] = nan"):
        write_encodings(tmp_path / "n.encodings", bad)
    assert not (tmp_path / "n.encodings").exists()


def test_written_files_match_the_schema(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "encodings" / "schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    write_encodings(tmp_path / "g.encodings", read_encodings(_write_json(tmp_path / "in.encodings", GOOD)))
    validator.validate(json.loads((tmp_path / "g.encodings").read_text()))
    code_only = {"bw_float", "offset_below_range", "offset_not_symmetric", "length_mismatch", "duplicate_name"}
    for name, data, _ in BAD_FILES:  # everything else the reader refuses, the schema refuses too
        assert validator.is_valid(data) == (name in code_only), name


# --- computing encodings ------------------------------------------------------------------------------------------

SYMMETRIC_CASES = [
    # weight, axis, bw, expected absmax per channel
    ([[-1.0, 0.5], [2.0, -4.0]], 0, 8, [1.0, 4.0]),
    ([[-1.0, 0.5], [2.0, -4.0]], 1, 8, [2.0, 4.0]),
    ([[-1.0, 0.5], [2.0, -4.0]], -1, 4, [2.0, 4.0]),
    ([[-1.0, 0.5], [2.0, -4.0]], 0, 16, [1.0, 4.0]),
]


@pytest.mark.parametrize("weight, axis, bw, absmax", SYMMETRIC_CASES)
def test_symmetric_per_channel_hand_values(weight, axis, bw, absmax):
    enc = symmetric_per_channel("w", np.array(weight), axis, bw)
    steps = 2 ** (bw - 1) - 1  # 127 for 8 bits: AIMET delta = max / floor((2^bw - 1) / 2)
    assert enc.enc_type == "PER_CHANNEL" and enc.is_sym and enc.bw == bw
    assert enc.scale == tuple(float(np.float32(a / steps)) for a in absmax)
    assert enc.offset == (-(2 ** (bw - 1)),) * 2  # -128 for 8 bits: AIMET offset = -ceil((2^bw - 1) / 2)
    enc.validate()


def test_symmetric_zero_channel_keeps_a_positive_scale():
    enc = symmetric_per_channel("lora_B", np.zeros((3, 2)), 0, 8)
    assert all(s > 0 for s in enc.scale)


ASYMMETRIC_CASES = [
    # min, max, bw, scale, offset (hand computed: scale = (max - min) / (2^bw - 1), offset = -round(-min / scale))
    (-1.0, 3.0, 8, 4.0 / 255, -64),  # -min / scale = 63.75
    (0.0, 2.55, 8, 0.01, 0),
    (-2.55, 0.0, 8, 0.01, -255),
    (0.5, 2.55, 8, 0.01, 0),  # min widened to 0: 0.0 must be representable
    (-3.0, -1.0, 8, 3.0 / 255, -255),  # max widened to 0
    (-1.0, 1.0, 16, 2.0 / 65535, -32768),  # 32767.5 rounds away from zero, as C round does
]


@pytest.mark.parametrize("lo, hi, bw, scale, offset", ASYMMETRIC_CASES)
def test_asymmetric_per_tensor_hand_values(lo, hi, bw, scale, offset):
    enc = asymmetric_per_tensor("a", lo, hi, bw)
    assert enc.scale[0] == pytest.approx(scale, rel=1e-6)
    assert enc.scale[0] == float(np.float32(enc.scale[0]))  # stored exactly as ONNX will use it
    assert enc.offset == (offset,)
    assert not enc.is_sym and enc.enc_type == "PER_TENSOR"
    enc.validate()


@pytest.mark.parametrize("lo, hi", [(1.0, -1.0), (float("nan"), 1.0), (0.0, float("inf"))])
def test_asymmetric_refuses_bad_ranges(lo, hi):
    with pytest.raises(EncodingsError, match="'a'"):
        asymmetric_per_tensor("a", lo, hi, 8)


# --- AIMET -> ONNX QDQ ----------------------------------------------------------------------------------------

QDQ_CASES = [
    ("asym8", Encoding("t", "INT", "PER_TENSOR", 8, False, (0.05,), (-64,)), None, np.uint8, 64),
    ("asym16", Encoding("t", "INT", "PER_TENSOR", 16, False, (0.001,), (-30000,)), None, np.uint16, 30000),
    ("sym8", Encoding("t", "INT", "PER_TENSOR", 8, True, (0.1,), (-128,)), None, np.int8, 0),
    ("sym8_strict", Encoding("t", "INT", "PER_TENSOR", 8, True, (0.1,), (-127,)), None, np.int8, -1),
    ("sym16", Encoding("t", "INT", "PER_TENSOR", 16, True, (0.001,), (-32768,)), None, np.int16, 0),
    ("sym8_channels", Encoding("t", "INT", "PER_CHANNEL", 8, True, (0.1, 0.25, 2.0), (-128,) * 3), 1, np.int8, 0),
]


def _dequantize_with_ort(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None) -> np.ndarray:
    onnx_type = helper.np_dtype_to_tensor_dtype(q.dtype)
    attrs = {} if axis is None else {"axis": axis}
    node = helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], **attrs)
    graph = helper.make_graph(
        [node], "dq", [helper.make_tensor_value_info("q", onnx_type, list(q.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(q.shape))],
        [onnx.numpy_helper.from_array(scale, "s"), onnx.numpy_helper.from_array(zp, "zp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"q": q})[0]


@pytest.mark.parametrize("enc, axis, zp_type, zp_value", [c[1:] for c in QDQ_CASES], ids=[c[0] for c in QDQ_CASES])
def test_to_qdq_dequantizes_like_aimet(enc, axis, zp_type, zp_value):
    scale, zp, out_axis = to_qdq(enc, axis)
    assert scale.dtype == np.float32 and zp.dtype == zp_type and out_axis == axis
    assert np.all(zp == zp_value)
    channels = len(enc.scale)
    q_u = np.arange(0, 2**enc.bw, max(1, 2**enc.bw // 997), dtype=np.int64)  # AIMET's unsigned grid
    q_u = np.append(q_u, 2**enc.bw - 1)
    grid = np.tile(q_u[:, None], (1, channels))  # (N, C): channels on axis 1
    shift = 2 ** (enc.bw - 1) if enc.is_sym else 0
    q = (grid - shift).astype(zp_type)
    aimet = ((grid + np.array(enc.offset)) * np.array(enc.scale, dtype=np.float32)).astype(np.float32)
    got = _dequantize_with_ort(q, scale, zp, axis)
    np.testing.assert_array_equal(got, aimet)


def test_to_qdq_of_computed_encodings_round_trips_values():
    weight = np.array([[-1.0, 0.5], [2.0, -4.0]], dtype=np.float32)
    enc = symmetric_per_channel("w", weight, 0, 8)
    scale, zp, axis = to_qdq(enc, 0)
    q = np.clip(np.rint(weight / scale[:, None]) + zp[:, None], -128, 127).astype(np.int8)
    np.testing.assert_allclose(_dequantize_with_ort(q, scale, zp, axis), weight, atol=float(scale.max()) / 2)
    assert q[1, 1] == -127 and q[0, 0] == -127  # absmax lands on the last symmetric step


@pytest.mark.parametrize("enc, axis, pattern", [
    (Encoding("w4", "INT", "PER_TENSOR", 4, True, (0.1,), (-8,)), None, "'w4'.*bw 4"),
    (Encoding("f", "FLOAT", "PER_TENSOR", 16, False, (), ()), None, "'f'.*FLOAT"),
    (Encoding("c", "INT", "PER_CHANNEL", 8, True, (0.1, 0.2), (-128, -128)), None, "'c'.*channel axis"),
    (Encoding("b", "INT", "PER_BLOCK", 8, True, (0.1, 0.2), (-128, -128), 4), None, "'b'.*PER_BLOCK"),
], ids=["int4", "float", "no_axis", "per_block"])
def test_to_qdq_refusals(enc, axis, pattern):
    with pytest.raises(EncodingsError, match=pattern):
        to_qdq(enc, axis)


# --- check_fits ---------------------------------------------------------------------------------------------------

GRAPH = {"x": [1, None, 2], "h": None, "logits": [1, 4], "w": [2, 3], "q_proj.lora_A.weight": [4, 2],
         "wb": [2, 4]}

FIT_CASES = [
    ("missing_tensor", {k: v for k, v in GRAPH.items() if k != "h"}, None, r"tensor 'h' is not in the graph"),
    ("channels_vs_shape", {**GRAPH, "w": [3, 5]}, None, r"'w' of shape \[3, 5\] has no dimension of size 2"),
    ("channels_vs_axis", GRAPH, {"w": 1}, r"'w' of shape \[2, 3\] has no axis 1 of size 2"),
    ("blocks_vs_shape", {**GRAPH, "wb": [2, 6]}, None, r"'wb' of shape \[2, 6\] does not split into 4 blocks"),
]


def test_check_fits_accepts_a_fitting_graph(tmp_path):
    f = read_encodings(_write_json(tmp_path / "g.encodings", GOOD))
    check_fits(f, GRAPH)
    check_fits(f, GRAPH, {"w": 0})
    check_fits(f, {**GRAPH, "w": [None, 3]})  # unknown dims are not judged


@pytest.mark.parametrize("tensors, axes, pattern", [c[1:] for c in FIT_CASES], ids=[c[0] for c in FIT_CASES])
def test_check_fits_names_the_tensor(tmp_path, tensors, axes, pattern):
    path = _write_json(tmp_path / "g.encodings", GOOD)
    f = read_encodings(path)
    with pytest.raises(EncodingsError, match=pattern) as info:
        check_fits(f, tensors, axes)
    assert str(info.value).startswith(str(path))


# --- presets --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", preset_names())
def test_presets_are_read_from_the_one_copy(name):
    """The package's data files are the presets; the repository's encodings/presets is that same folder."""
    assert (ROOT / "encodings" / "presets").resolve() == PRESET_DIR
    on_disk = json.loads((PRESET_DIR / f"{name}.json").read_text())
    preset = load_preset(name)
    assert preset.name == name == on_disk["name"]
    for role in ("activations", "weights", "lora_activations", "lora_weights"):
        spec = getattr(preset, role)
        assert (spec.bw, spec.is_sym, spec.enc_type, spec.block_size) == (
            on_disk[role]["bw"], on_disk[role]["is_sym"], on_disk[role]["enc_type"], on_disk[role].get("block_size"))
        assert 2 <= spec.bw <= 32 and spec.enc_type in ("PER_TENSOR", "PER_CHANNEL", "PER_BLOCK")
        assert (spec.block_size is not None) == (spec.enc_type == "PER_BLOCK")


def test_the_shipped_presets():
    assert preset_names() == ["lora_a16w16", "w4a16", "w8a16", "w8a8"]


def test_lora_preset_uses_16_bit_lora_weights():
    assert load_preset("lora_a16w16").lora_weights.bw == 16
    with pytest.raises(EncodingsError, match="'w2a2'"):
        load_preset("w2a2")
