"""Our safetensors reader/writer against the real ``safetensors`` package, exact BF16/F16 widening, and a
table of corrupt files that must each be refused with a message naming the file."""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest
import safetensors
import safetensors.numpy

from lora_runtime.errors import TensorFileError
from lora_runtime.tensorfile import read_header, save_tensors


def load_tensors(path, float32: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of a file through the reader under test (``TensorFile.read``), in data order."""
    tf = read_header(path)
    return {name: tf.read(name, float32=float32) for name in tf.entries}


def _write_raw(path, header: dict | bytes | str, data: bytes = b"", *, length: int | None = None) -> None:
    """A safetensors file built by hand: u64 header length, header bytes, data bytes."""
    blob = header if isinstance(header, bytes) else (header if isinstance(header, str)
                                                      else json.dumps(header)).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob) if length is None else length))
        f.write(blob)
        f.write(data)


def _f32(shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


# --- round trips through the real safetensors package ------------------------------------------------------------

ROUND_TRIP = {
    "f32 2-D": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "f16 1-D": np.array([1.0, -2.5, 65504.0, 2.0**-24], dtype=np.float16),
    "f64 scalar": np.array(3.25, dtype=np.float64),
    "i64": np.array([-(2**40), 0, 2**40], dtype=np.int64),
    "i32 3-D": np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5,
    "u8": np.array([0, 7, 255], dtype=np.uint8),
    "empty f32": np.zeros((0, 3), dtype=np.float32),
}


def test_files_we_write_load_in_safetensors(tmp_path):
    path = tmp_path / "ours.safetensors"
    save_tensors(path, ROUND_TRIP, metadata={"format": "pt", "note": "x"})
    theirs = safetensors.numpy.load_file(str(path))
    assert set(theirs) == set(ROUND_TRIP)
    for name, want in ROUND_TRIP.items():
        assert theirs[name].dtype == want.dtype, name
        assert theirs[name].shape == want.shape, name
        np.testing.assert_array_equal(theirs[name], want, err_msg=name)
    with safetensors.safe_open(str(path), framework="np") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}


def test_data_layout_follows_the_given_order(tmp_path):
    path = tmp_path / "ordered.safetensors"
    tensors = {"z": np.ones(3, np.float32), "a": np.ones(2, np.float16), "m": np.ones(1, np.int64)}
    header = save_tensors(path, tensors)
    assert list(header.entries) == ["z", "a", "m"]
    # 12 bytes of F32, then 4 of F16, then 8 of I64, back to back from the data start
    spans = [(e.begin - header.data_start, e.end - header.data_start) for e in header.entries.values()]
    assert spans == [(0, 12), (12, 16), (16, 24)]
    assert (header.data_start - 8) % 8 == 0  # header padded so the data starts 8-byte aligned


def test_big_endian_input_is_stored_little_endian(tmp_path):
    path = tmp_path / "be.safetensors"
    save_tensors(path, {"w": np.array([1.5, -2.0], dtype=">f4")})
    got = safetensors.numpy.load_file(str(path))["w"]
    assert got.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(got, [1.5, -2.0])


def test_files_safetensors_writes_load_in_our_reader(tmp_path):
    path = tmp_path / "theirs.safetensors"
    safetensors.numpy.save_file(ROUND_TRIP, str(path), metadata={"format": "np"})
    header = read_header(path)
    assert header.metadata == {"format": "np"}
    assert header.file_size == path.stat().st_size
    got = load_tensors(path)
    assert set(got) == set(ROUND_TRIP)
    for name, want in ROUND_TRIP.items():
        assert got[name].dtype == want.dtype, name
        assert got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_unsupported_dtype_is_refused_on_write(tmp_path):
    path = tmp_path / "bool.safetensors"
    with pytest.raises(TensorFileError, match="cannot store tensor 'flag'"):
        save_tensors(path, {"flag": np.array([True, False])})


# --- exact widening -----------------------------------------------------------------------------------------------

# float32 values whose low 16 bits are zero, so their high half is an exact bfloat16 bit pattern
BF16_CASES = [
    (0x3F80, 1.0),
    (0xC000, -2.0),
    (0x3E20, 0.15625),  # 0x3E200000 = 1.25 * 2**-3
    (0x0080, 2.0**-126),  # smallest normal
    (0x0001, 2.0**-133),  # smallest subnormal: 2**-126 * 2**-7
    (0x7F7F, 3.3895313892515355e38),  # largest finite: (2 - 2**-7) * 2**127
    (0x8000, -0.0),
    (0x7F80, np.inf),
    (0xFF80, -np.inf),
]


def test_bf16_converts_exactly_to_float32(tmp_path):
    bits = np.array([b for b, _ in BF16_CASES] + [0x7FC0], dtype="<u2")  # last one: a quiet NaN
    path = tmp_path / "bf16.safetensors"
    _write_raw(path, {"t": {"dtype": "BF16", "shape": [2, 5], "data_offsets": [0, bits.nbytes]}}, bits.tobytes())
    got = load_tensors(path)["t"]
    assert got.dtype == np.float32 and got.shape == (2, 5)
    flat = got.reshape(-1)
    want = np.array([v for _, v in BF16_CASES], dtype=np.float32)
    np.testing.assert_array_equal(flat[:-1], want)
    assert np.signbit(flat[6])  # -0.0 keeps its sign
    assert np.isnan(flat[-1])
    # the same bits, compared as float32 bit patterns: the low half is zero
    np.testing.assert_array_equal(flat[:-1].view("<u4"), bits[:-1].astype(np.uint32) << 16)


@pytest.mark.parametrize("float32", [False, True])
def test_bf16_is_float32_whatever_the_flag(tmp_path, float32):
    path = tmp_path / "bf16.safetensors"
    _write_raw(path, {"t": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}, struct.pack("<H", 0x4049))
    got = read_header(path).read("t", float32=float32)
    assert got.dtype == np.float32
    assert got[0] == 3.140625  # 0x40490000 = 1.5703125 * 2


F16_EXACT = [(1.0, 1.0), (-2.5, -2.5), (65504.0, 65504.0), (2.0**-24, 2.0**-24), (0.1, 0.0999755859375)]


def test_f16_widens_exactly_only_when_asked(tmp_path):
    halves = np.array([h for h, _ in F16_EXACT], dtype=np.float16)
    path = tmp_path / "f16.safetensors"
    safetensors.numpy.save_file({"h": halves}, str(path))
    kept = load_tensors(path)["h"]
    assert kept.dtype == np.float16
    widened = load_tensors(path, float32=True)["h"]
    assert widened.dtype == np.float32
    np.testing.assert_array_equal(widened, np.array([w for _, w in F16_EXACT], dtype=np.float32))


# --- corrupt files ------------------------------------------------------------------------------------------------

GOOD = {"a": _f32([2], 0, 8), "b": _f32([3], 8, 20)}
_A_0_8, _A_8_16 = json.dumps(_f32([2], 0, 8)), json.dumps(_f32([2], 8, 16))  # for a header with a repeated key


# (id, how to write the file, what the message must say after "<path>: ")
CORRUPT = [
    ("shorter than 8 bytes", lambda p: p.write_bytes(b"\x01\x02\x03"),
     r"not a safetensors file \(3 bytes, need at least 8\)"),
    ("empty file", lambda p: p.write_bytes(b""), r"not a safetensors file \(0 bytes"),
    ("header length beyond the file", lambda p: _write_raw(p, b"{}", length=1000),
     r"header claims 1000 bytes but the file has 10 bytes"),
    ("header length absurd", lambda p: _write_raw(p, b"{}", length=2**63), r"header claims 9223372036854775808 bytes"),
    ("header not JSON", lambda p: _write_raw(p, b"{not json"), r"header is not valid JSON"),
    ("header not UTF-8", lambda p: _write_raw(p, b'{"\xff": 1}'), r"header is not valid JSON"),
    ("header not an object", lambda p: _write_raw(p, "[1, 2]"), r"header is not a JSON object"),
    ("duplicate keys", lambda p: _write_raw(p, f'{{"a": {_A_0_8}, "a": {_A_8_16}}}', bytes(16)), r"duplicate key 'a'"),
    ("entry not an object", lambda p: _write_raw(p, {"a": [0, 8]}, bytes(8)), r"entry 'a' is not an object"),
    ("offsets overlap", lambda p: _write_raw(p, {"a": _f32([2], 0, 8), "b": _f32([2], 4, 12)}, bytes(12)),
     r"tensor 'b' starts at byte 4 of the data, expected 8 \(overlap or hole\)"),
    ("hole between tensors", lambda p: _write_raw(p, {"a": _f32([2], 0, 8), "b": _f32([2], 12, 20)}, bytes(20)),
     r"tensor 'b' starts at byte 12 of the data, expected 8 \(overlap or hole\)"),
    ("data not starting at 0", lambda p: _write_raw(p, {"a": _f32([2], 4, 12)}, bytes(12)),
     r"tensor 'a' starts at byte 4 of the data, expected 0"),
    ("trailing bytes", lambda p: _write_raw(p, GOOD, bytes(24)), r"tensors cover 20 data bytes but the file holds 24"),
    ("truncated data", lambda p: _write_raw(p, GOOD, bytes(17)), r"tensors cover 20 data bytes but the file holds 17"),
    ("size mismatch vs shape", lambda p: _write_raw(p, {"a": _f32([2, 2], 0, 8)}, bytes(8)),
     r"tensor 'a' of F32 \(2, 2\) needs 16 bytes, header says 8"),
    ("unknown dtype", lambda p: _write_raw(p, {"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}},
                                           bytes(2)), r"tensor 'a' has unsupported dtype 'F8_E4M3'"),
    ("missing dtype", lambda p: _write_raw(p, {"a": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
     r"tensor 'a' has unsupported dtype None"),
    ("negative shape", lambda p: _write_raw(p, {"a": _f32([-2], 0, 8)}, bytes(8)),
     r"tensor 'a' has invalid shape \[-2\]"),
    ("float shape", lambda p: _write_raw(p, {"a": _f32([2.0], 0, 8)}, bytes(8)),
     r"tensor 'a' has invalid shape \[2\.0\]"),
    ("bool shape", lambda p: _write_raw(p, {"a": _f32([True], 0, 4)}, bytes(4)),
     r"tensor 'a' has invalid shape \[True\]"),
    ("shape not a list", lambda p: _write_raw(p, {"a": _f32(2, 0, 8)}, bytes(8)), r"tensor 'a' has invalid shape 2"),
    # 2**32 * 2**32 elements wrap to 0 in int64 arithmetic: the 0-byte entry must still be refused
    ("shape overflows int64", lambda p: _write_raw(p, {"a": _f32([2**32, 2**32], 0, 0)}),
     r"tensor 'a' of F32 \(4294967296, 4294967296\) needs 73786976294838206464 bytes, header says 0"),
    ("shape beyond int64", lambda p: _write_raw(p, {"a": _f32([2**70], 0, 0)}),
     r"tensor 'a' of F32 \(1180591620717411303424,\) needs 4722366482869645213696 bytes"),
    ("offsets reversed", lambda p: _write_raw(p, {"a": _f32([0], 8, 0)}, bytes(8)),
     r"tensor 'a' has invalid data_offsets \[8, 0\]"),
    ("offsets one number", lambda p: _write_raw(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8]}},
                                                bytes(8)), r"tensor 'a' has invalid data_offsets \[8\]"),
    ("negative offset", lambda p: _write_raw(p, {"a": _f32([2], -8, 0)}, bytes(8)),
     r"tensor 'a' has invalid data_offsets \[-8, 0\]"),
    ("metadata not an object", lambda p: _write_raw(p, {"__metadata__": "xy", "a": _f32([2], 0, 8)}, bytes(8)),
     r"__metadata__ must map strings to strings"),
    ("metadata value not a string",
     lambda p: _write_raw(p, {"__metadata__": {"format": 1}, "a": _f32([2], 0, 8)}, bytes(8)),
     r"__metadata__ must map strings to strings"),
]


@pytest.mark.parametrize(("write", "message"), [c[1:] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_corrupt_file_is_refused_naming_the_file(tmp_path, write, message):
    path = tmp_path / "corrupt.safetensors"
    write(path)
    with pytest.raises(TensorFileError) as info:
        load_tensors(path)
    text = str(info.value)
    assert text.startswith(f"{path}: "), text
    assert re.search(message, text), text


def test_the_corrupt_table_differs_from_a_good_file_only_by_its_defect(tmp_path):
    """The hand-built good file reads, so each refusal above comes from its one defect."""
    path = tmp_path / "good.safetensors"
    _write_raw(path, GOOD, np.array([1, 2, 3, 4, 5], np.float32).tobytes())
    got = load_tensors(path)
    np.testing.assert_array_equal(got["a"], [1, 2])
    np.testing.assert_array_equal(got["b"], [3, 4, 5])
    assert safetensors.numpy.load_file(str(path)).keys() == {"a", "b"}


@pytest.mark.parametrize("target", ["missing", "directory"])
def test_unreadable_path_is_refused_naming_it(tmp_path, target):
    path = tmp_path / "x.safetensors"
    if target == "directory":
        path.mkdir()
    with pytest.raises(TensorFileError, match=re.escape(f"{path}: cannot read")):
        read_header(path)


def test_file_shrunk_after_the_header_was_read(tmp_path):
    path = tmp_path / "shrunk.safetensors"
    header = save_tensors(path, {"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)})
    with open(path, "r+b") as f:
        f.truncate(header.file_size - 6)
    with pytest.raises(TensorFileError, match=re.escape(f"{path}: tensor 'b' is truncated (10 of 16 bytes)")):
        header.read("b")
