"""The GGUF reader treats its input as untrusted (issue 6, "Hostile model files").

1. Property-based fuzzing: a small valid GGUF (written by gguf.GGUFWriter) is mutated — byte flips,
   truncations, inserted/deleted bytes, header/length/count/dim/offset fields overwritten with
   extreme values.  Opening the result, reading every metadata value and converting every tensor
   must succeed or raise FormatError (UnsupportedError included) naming the file: no other
   exception, no hang (per-example alarm + hypothesis deadline), no allocation explosion
   (tracemalloc peak per example).  A few hundred examples by default, >= 10,000 with
   EDGETUNE_LONG=1.
2. One hand-crafted file per check the reader makes, asserting the message names the file and
   the problem.
"""
from __future__ import annotations

import os
import signal
import struct
import tempfile
import time
import tracemalloc
from datetime import timedelta

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from hypothesis import HealthCheck, given, settings, strategies as st

from edgetune.errors import FormatError, UnsupportedError
from edgetune.formats import gguf_reader
from edgetune.formats.gguf_reader import GGUFFile

LONG = os.environ.get("EDGETUNE_LONG") == "1"
MAX_EXAMPLES = 10_000 if LONG else 300
PEAK_LIMIT = 200 * 2**20          # bytes traced per example
HANG_SECONDS = 10                 # hard per-example alarm (the machine is shared: be generous)


# ------------------------------------------------------------------------------------------------
# hand-crafted GGUF bytes
def gstr(b) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def kv_u32(key, v: int) -> bytes:
    return kv(key, 4, struct.pack("<I", v))


def kv_str(key, v) -> bytes:
    return kv(key, 8, gstr(v))


def kv_arr(key, etype: int, count: int, items: bytes) -> bytes:
    return kv(key, 9, struct.pack("<IQ", etype, count) + items)


def tinfo(name, ne, ttype: int, offset: int) -> bytes:
    return (gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
            + struct.pack("<IQ", ttype, offset))


def build(kvs=(), tinfos=(), data=b"", *, magic=b"GGUF", version=3, n_tensors=None, n_kv=None,
          alignment=32) -> bytes:
    head = magic + struct.pack("<IQQ", version, len(tinfos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tinfos)
    return body + b"\0" * ((-len(body)) % alignment) + data


F32_4 = tinfo("t", [4], 0, 0)               # a valid F32 tensor of 4 elements at offset 0
DATA_16 = np.arange(4, dtype=np.float32).tobytes()


@pytest.fixture
def write(tmp_path):
    def w(data: bytes, name="bad.gguf"):
        p = tmp_path / name
        p.write_bytes(data)
        return p
    return w


def expect(path, *fragments, exc=FormatError, access=None):
    """GGUFFile(path) (then `access(g)`) raises `exc` whose message names the file and contains
    every fragment."""
    with pytest.raises(exc) as ei:
        g = GGUFFile(path)
        if access is not None:
            access(g)
    msg = str(ei.value)
    assert ei.value.path == str(path) and msg.startswith(str(path)), msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


# ------------------------------------------------------------------------------------------------
# unit tests: one per check
def test_valid_handcrafted_file_reads(write):
    p = write(build([kv_u32("a.b", 7), kv_str("s", "héllo"),
                     kv_arr("arr", 8, 2, gstr("x") + gstr("yz"))], [F32_4], DATA_16))
    g = GGUFFile(p)
    assert g.metadata == {"a.b": 7, "s": "héllo", "arr": ["x", "yz"]}
    assert g.metadata.value_type("arr") == "ARRAY[STRING]"
    np.testing.assert_array_equal(g.qtensor("t").data, np.arange(4, dtype=np.float32))
    assert not g.tensors["t"].data.flags.writeable


def test_empty_and_short_file(write):
    expect(write(b""), "truncated", "0 bytes")
    expect(write(b"GGUF\x03\0\0\0"), "truncated", "8 bytes")


def test_bad_magic(write):
    expect(write(build(magic=b"GGML")), "not a GGUF file", "b'GGML'")


@pytest.mark.parametrize("version", [0, 1, 4, 2**32 - 1])
def test_bad_version(write, version):
    expect(write(build(version=version)), f"unsupported GGUF version {version}")


def test_big_endian_is_named(write):
    expect(write(build(version=0x03000000)), "big-endian")


@pytest.mark.parametrize("count", [2**64 - 1, 2**63, 2**32, 1000])
def test_absurd_tensor_count(write, count):
    expect(write(build([kv_u32("a", 1)], [F32_4], DATA_16, n_tensors=count)),
           f"tensor count {count}", "cannot fit")


@pytest.mark.parametrize("count", [2**64 - 1, 2**63, 1000])
def test_absurd_kv_count(write, count):
    expect(write(build([kv_u32("a", 1)], n_kv=count)), f"metadata count {count}", "cannot fit")


def test_kv_count_larger_than_present_is_truncation(write):
    expect(write(build([kv_u32("a", 1), kv_u32("b", 2)], n_kv=3) + b"\0" * 64),
           "metadata key #2")


@pytest.mark.parametrize("n", [2**64 - 1, 2**63, 70000])
def test_huge_key_length(write, n):
    bad = struct.pack("<Q", n) + b"k" + struct.pack("<II", 4, 1)
    expect(write(build([bad]) + b"\0" * 32), "metadata key #0", "limit of 65535")


def test_key_length_past_end(write):
    bad = struct.pack("<Q", 60000) + b"k" + struct.pack("<II", 4, 1)
    expect(write(build([bad])), "truncated", "metadata key #0")


@pytest.mark.parametrize("n", [2**64 - 1, 2**63, 10**6])
def test_huge_string_value(write, n):
    bad = gstr("s") + struct.pack("<IQ", 8, n) + b"abc"
    expect(write(build([bad])), "truncated", "string value of 's'")


@pytest.mark.parametrize("count", [2**64 - 1, 2**61, 10**6])
def test_huge_array_count(write, count):
    expect(write(build([kv_arr("arr", 4, count, b"\0" * 16)])), "array 'arr'", f"claims {count}")


def test_huge_string_in_string_array(write):
    items = gstr("ok") + struct.pack("<Q", 2**62) + b"x"
    expect(write(build([kv_arr("arr", 8, 2, items)])), "string #1 of array 'arr'", "claims")


@pytest.mark.parametrize("vtype", [13, 255, 2**32 - 1])
def test_unknown_value_type(write, vtype):
    expect(write(build([kv("k", vtype, b"\0" * 8)])), "unknown value type", str(vtype))


def test_unknown_array_element_type(write):
    expect(write(build([kv_arr("arr", 77, 1, b"\0" * 8)])), "array 'arr'",
           "unknown element type 77")


def test_nested_array_rejected(write):
    inner = struct.pack("<IQ", 4, 1) + b"\1\0\0\0"
    expect(write(build([kv_arr("arr", 9, 1, inner)])), "'arr'", "array of arrays")


def test_duplicate_key(write):
    expect(write(build([kv_u32("a.b", 1), kv_u32("a.b", 2)])), "duplicate metadata key 'a.b'")


def test_empty_key(write):
    expect(write(build([kv_u32("", 1)]) + b"\0" * 32), "metadata key #0", "empty")


def test_non_utf8_key(write):
    expect(write(build([kv_u32(b"bad\xff", 1)])), "metadata key #0", "not valid UTF-8")


def test_non_utf8_string_value(write):
    expect(write(build([kv_str("s", b"\xc3\x28")])), "string value of 's'", "not valid UTF-8")


def test_non_utf8_in_lazy_string_array_fails_on_access(write, monkeypatch):
    monkeypatch.setattr(gguf_reader, "LAZY_ARRAY_MIN", 2)
    items = gstr("a") + gstr("b") + gstr(b"\xff\xfe")
    p = write(build([kv_arr("toks", 8, 3, items), kv_u32("n", 3)]))
    g = GGUFFile(p)                               # lazy: located and bounds-checked only
    assert g.get("n") == 3 and "toks" in g.metadata and len(g.metadata) == 2
    expect(p, "string #2 of metadata array 'toks'", "not valid UTF-8",
           access=lambda g: g.metadata["toks"])


@pytest.mark.parametrize("a", [0, 3, 48, 2**21, 2**32 - 1])
def test_bad_alignment(write, a):
    expect(write(build([kv_u32("general.alignment", a)], [F32_4], DATA_16)),
           f"general.alignment = {a}", "power of two")


def test_alignment_wrong_type(write):
    expect(write(build([kv_str("general.alignment", "32")])), "general.alignment has type STRING")


def test_custom_alignment_is_used(write):
    p = write(build([kv_u32("general.alignment", 64)], [tinfo("a", [4], 0, 0),
                                                       tinfo("b", [4], 0, 64)],
                    DATA_16 + b"\0" * 48 + DATA_16 * 2, alignment=64))
    g = GGUFFile(p)
    assert g.alignment == 64 and g.data_offset % 64 == 0
    assert g.tensors["b"].offset == g.data_offset + 64


@pytest.mark.parametrize("n_dims", [0, 5, 2**32 - 1])
def test_bad_n_dims(write, n_dims):
    t = gstr("t") + struct.pack("<I", n_dims) + struct.pack("<Q", 4) * 5 + struct.pack("<IQ", 0, 0)
    expect(write(build([], [t], DATA_16 * 8)), "tensor 't' has", f"{n_dims} dimensions")


def test_zero_dim(write):
    expect(write(build([], [tinfo("t", [4, 0], 0, 0)], DATA_16)), "tensor 't'", "zero dimension")


@pytest.mark.parametrize("ne", [[2**40, 2**40], [2**64 - 1, 2**64 - 1, 2**64 - 1, 2**64 - 1],
                                [2**32, 2**32]])
def test_huge_dims_no_overflow(write, ne):
    expect(write(build([], [tinfo("t", ne, 0, 0)], DATA_16)), "tensor 't'",
           "more than the whole file")


def test_duplicate_tensor_name(write):
    expect(write(build([], [tinfo("t", [4], 0, 0), tinfo("t", [4], 0, 32)], DATA_16 * 4)),
           "duplicate tensor name 't'")


def test_tensor_name_too_long(write):
    expect(write(build([], [tinfo("x" * 65, [4], 0, 0)], DATA_16)), "name of tensor #0",
           "limit of 64")


def test_empty_tensor_name(write):
    expect(write(build([], [tinfo("", [4], 0, 0)], DATA_16)), "tensor #0", "empty name")


@pytest.mark.parametrize("tid", [4, 5, 31, 99, 2**32 - 1])
def test_unknown_ggml_type_id(write, tid):
    expect(write(build([], [tinfo("t", [32], tid, 0)], DATA_16 * 64)),
           f"unknown ggml type id {tid}")


def test_row_not_whole_blocks(write):
    expect(write(build([], [tinfo("t", [48, 2], int(T.Q4_0), 0)], b"\0" * 128)),
           "row length 48", "Q4_0 block size 32")


def test_misaligned_offset(write):
    expect(write(build([], [tinfo("t", [4], 0, 4)], DATA_16 * 2)), "data offset 4",
           "alignment 32")


def test_data_past_end_of_file(write):
    expect(write(build([], [tinfo("t", [8], 0, 0)], DATA_16)), "truncated", "tensor 't' data",
           "past the end of the file")


def test_offset_past_end_of_file(write):
    expect(write(build([], [tinfo("t", [4], 0, 2**63)], DATA_16)), "tensor 't' data",
           "past the end")


def test_tensor_data_size_matches_type(write):
    # Q8_0 [64, 2]: 2 rows * 2 blocks * 34 bytes = 136 bytes; 128 bytes present -> truncated
    expect(write(build([], [tinfo("t", [64, 2], int(T.Q8_0), 0)], b"\0" * 128)),
           "tensor 't' data", "past the end")
    g = GGUFFile(write(build([], [tinfo("t", [64, 2], int(T.Q8_0), 0)], b"\0" * 136), "ok.gguf"))
    assert g.tensors["t"].data.shape == (2, 68)


def test_overlapping_tensors(write):
    expect(write(build([], [tinfo("a", [16], 0, 0), tinfo("b", [4], 0, 32)], DATA_16 * 4)),
           "tensors 'a' and 'b' overlap")


def test_truncated_real_file(write, tmp_path):
    data = base_file()
    g = GGUFFile(write(data, "base.gguf"))
    end = max(t.offset + t.data.nbytes for t in g.tensors.values())   # then alignment padding
    for cut in (end - 1, g.data_offset + 1, len(data) // 2, 100, 30):
        expect(write(data[:cut], f"cut{cut}.gguf"), "truncated")


def test_known_but_unsupported_type_opens_then_unsupported(write):
    p = write(build([], [tinfo("t", [32, 2], int(T.Q5_0), 0)], b"\0" * 44))
    g = GGUFFile(p)
    assert g.tensors["t"].type_name == "Q5_0"
    expect(p, "tensor 't' has quant type Q5_0", exc=UnsupportedError, access=lambda g: g.qtensor("t"))


def test_directory_and_unreadable(tmp_path):
    expect(tmp_path, "is a directory")
    if os.geteuid() != 0:
        p = tmp_path / "noperm.gguf"
        p.write_bytes(build())
        p.chmod(0)
        expect(p, "cannot")


def test_ggml_type_table_matches_gguf_package():
    for tid, (name, blck, tsize) in gguf_reader.GGML_TYPES.items():
        t = T(tid)
        assert t.name == name and gguf.GGML_QUANT_SIZES[t] == (blck, tsize)


# ------------------------------------------------------------------------------------------------
# agreement with the gguf package on every value type
def test_every_value_type_matches_gguf_package(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_reader, "LAZY_ARRAY_MIN", 3)     # exercise lazy and eager arrays
    p = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_uint8("u8", 200); w.add_int8("i8", -100); w.add_uint16("u16", 60000)
    w.add_int16("i16", -30000); w.add_uint32("u32", 2**32 - 1); w.add_int32("i32", -2**31)
    w.add_float32("f32", 0.1); w.add_uint64("u64", 2**64 - 1); w.add_int64("i64", -2**63)
    w.add_float64("f64", 1e300); w.add_bool("yes", True); w.add_bool("no", False)
    w.add_string("s", "ünïcödé ✓"); w.add_string("empty", "")
    w.add_array("arr.str.small", ["a", "bb"])
    w.add_array("arr.str.big", [f"tok{i}" for i in range(50)] + ["", "Ġ t"])
    w.add_array("arr.i32", list(range(-5, 20)))
    w.add_array("arr.f32", [0.5, 1.5, -2.25, 3.0])
    w.add_array("arr.bool", [True, False, True, True])
    w.add_array("arr.empty", [])
    w.add_custom_alignment(64)
    w.add_tensor("x", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()

    g = GGUFFile(p)
    assert isinstance(g.metadata._values["arr.str.big"], gguf_reader._LazyArray)
    ref = gguf.GGUFReader(str(p))
    want = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(g.metadata) == list(want)
    for k, v in want.items():
        got = g.metadata[k]
        assert got == v and type(got) is type(v), (k, got, v)
        if isinstance(v, list):
            assert all(type(a) is type(b) for a, b in zip(got, v)), k
    assert g.metadata.value_type("u8") == "UINT8"
    assert g.metadata.value_type("arr.i32") == "ARRAY[INT32]"
    t = ref.tensors[0]
    assert g.tensors["x"].offset == t.data_offset and g.alignment == 64
    np.testing.assert_array_equal(g.qtensor("x").data, np.arange(12, dtype=np.float32).reshape(3, 4))
    assert "not decoded" not in repr(g.metadata)          # everything was read above


def test_smollm2_open_is_small(smollm2_path):
    """Opening the embedded model allocates a few MB, not the ~170 MB of gguf.GGUFReader."""
    tracemalloc.start()
    try:
        g = GGUFFile(smollm2_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, peak
    assert len(g.tensors) == 272 and g.require("general.architecture") == "llama"
    assert len(g.metadata["tokenizer.ggml.tokens"]) == 49152
    assert len(g.metadata["tokenizer.ggml.merges"]) == 48900


# ------------------------------------------------------------------------------------------------
# fuzzing
_BASE: bytes | None = None
_FIELDS: list | None = None
_HEAD_END = 0


def base_file() -> bytes:
    """A small valid GGUF: scalar + string + array metadata, F32/F16/Q4_0/Q8_0/Q4_K/Q5_0 tensors."""
    global _BASE, _FIELDS, _HEAD_END
    if _BASE is None:
        rng = np.random.default_rng(0)
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "base.gguf")
            w = gguf.GGUFWriter(p, "llama")
            w.add_uint32("llama.block_count", 1)
            w.add_float32("llama.rope.freq_base", 10000.0)
            w.add_bool("tokenizer.ggml.add_bos_token", True)
            w.add_string("general.name", "fuzz")
            w.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a", "b", "Ġc", "dé"])
            w.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0, -3.0, -4.0, -5.0])
            w.add_array("tokenizer.ggml.token_type", [3, 3, 1, 1, 1, 1])
            w.add_array("general.tags", ["x", "y"])
            for name, qt, shape in [("norm", T.F32, (8,)), ("emb", T.F16, (2, 8)),
                                    ("q4", T.Q4_0, (2, 64)), ("q8", T.Q8_0, (2, 32)),
                                    ("qk", T.Q4_K, (1, 256)), ("q5", T.Q5_0, (1, 32))]:
                a = rng.standard_normal(shape).astype(np.float32)
                if qt == T.F32:
                    w.add_tensor(name, a)
                elif qt == T.F16:
                    w.add_tensor(name, a.astype(np.float16))
                elif qt == T.Q4_K:      # gguf cannot quantize K-quants: random blocks, sane d/dmin
                    raw = rng.integers(0, 256, (1, 144), dtype=np.uint8)
                    raw[0, 0:4] = np.array([0.01, 0.02], np.float16).view(np.uint8)
                    w.add_tensor(name, raw, raw_dtype=qt)
                else:
                    w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)
            w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file()
            w.close()
            _BASE = open(p, "rb").read()
        _FIELDS, _HEAD_END = locate_fields(_BASE)
    return _BASE


def locate_fields(b: bytes):
    """(offset, width) of every integer field of a valid GGUF (independent of the reader)."""
    fields = [(4, 4), (8, 8), (16, 8)]
    n_t, n_kv = struct.unpack_from("<QQ", b, 8)
    pos = 24
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string(pos):
        fields.append((pos, 8))
        return pos + 8 + struct.unpack_from("<Q", b, pos)[0]
    for _ in range(n_kv):
        pos = string(pos)
        fields.append((pos, 4))
        vt = struct.unpack_from("<I", b, pos)[0]
        pos += 4
        if vt == 8:
            pos = string(pos)
        elif vt == 9:
            et, n = struct.unpack_from("<IQ", b, pos)
            fields += [(pos, 4), (pos + 4, 8)]
            pos += 12
            for _ in range(n):
                if et == 8:
                    pos = string(pos)
                else:
                    fields.append((pos, sizes[et]))
                    pos += sizes[et]
        else:
            fields.append((pos, sizes[vt]))
            pos += sizes[vt]
    for _ in range(n_t):
        pos = string(pos)
        nd = struct.unpack_from("<I", b, pos)[0]
        fields.append((pos, 4))
        pos += 4
        for _ in range(nd):
            fields.append((pos, 8))
            pos += 8
        fields += [(pos, 4), (pos + 4, 8)]
        pos += 12
    return fields, pos


def _extremes(width: int) -> list[int]:
    top = 2 ** (8 * width)
    vals = {0, 1, 2, 3, 4, 5, 8, 9, 12, 13, 31, 32, 33, 64, 255, top - 1, top - 2, top // 2,
            top // 2 - 1, 2**16 - 1, 2**16}
    if width == 8:
        vals |= {2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**64 - 32, 2**63 + 1}
    return sorted(v for v in vals if v < top)


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"GGUF reader took more than {HANG_SECONDS} s on one file")


@st.composite
def mutation(draw):
    b = base_file()
    n = len(b)
    pos = draw(st.one_of(st.integers(0, _HEAD_END), st.integers(0, n - 1)))
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "field", "field", "set"]))
    if kind == "flip":
        return ("flip", pos, draw(st.integers(1, 255)))
    if kind == "truncate":
        return ("truncate", pos)
    if kind == "insert":
        return ("insert", pos, draw(st.binary(min_size=1, max_size=16)))
    if kind == "delete":
        return ("delete", pos, draw(st.integers(1, 64)))
    if kind == "set":
        return ("set", pos, draw(st.sampled_from([0, 0xFF, 0x7F, 0x80])))
    off, width = draw(st.sampled_from(_FIELDS))
    value = draw(st.one_of(st.sampled_from(_extremes(width)),
                           st.integers(0, 2 ** (8 * width) - 1)))
    return ("field", off, width, value)


def apply(b: bytes, muts) -> bytes:
    b = bytearray(b)
    for m in muts:
        kind, pos = m[0], min(m[1], max(len(b) - 1, 0))
        if kind == "flip" and b:
            b[pos] ^= m[2]
        elif kind == "set" and b:
            b[pos] = m[2]
        elif kind == "truncate":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = m[2]
        elif kind == "delete":
            del b[pos:pos + m[2]]
        elif kind == "field" and m[1] + m[2] <= len(b):
            b[m[1]:m[1] + m[2]] = m[3].to_bytes(m[2], "little")
    return bytes(b)


def exercise(path) -> str:
    """What a caller does with a model file; returns 'ok' or the error class name."""
    try:
        g = GGUFFile(path)
        for k in list(g.metadata):
            v = g.metadata[k]
            assert isinstance(v, (int, float, bool, str, list)), (k, type(v))
            g.metadata.value_type(k)
        repr(g.metadata)
        g.get("general.architecture")
        for i, name in enumerate(g.tensors):
            rt = g.tensors[name]
            assert not rt.data.flags.writeable
            assert rt.offset >= g.data_offset and rt.offset + rt.data.nbytes <= os.path.getsize(path)
            try:
                g.qtensor(name, i)
            except UnsupportedError:
                pass
        return "ok"
    except FormatError as e:
        assert e.path == str(path) and str(e).startswith(str(path)) and e.problem, str(e)
        return type(e).__name__


FUZZ_STATS: dict = {}


@settings(max_examples=MAX_EXAMPLES, deadline=timedelta(seconds=5), derandomize=not LONG,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
          database=None if not LONG else settings.default.database)
@given(muts=st.lists(mutation(), min_size=1, max_size=4))
def test_fuzz_mutated_files(muts):
    data = apply(base_file(), muts)
    d = FUZZ_DIR
    path = os.path.join(d, "m.gguf")
    with open(path, "wb") as f:
        f.write(data)
    old_lazy = gguf_reader.LAZY_ARRAY_MIN
    gguf_reader.LAZY_ARRAY_MIN = 3          # the base file's tokenizer arrays are lazy
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    tracemalloc.start()
    try:
        outcome = exercise(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        gguf_reader.LAZY_ARRAY_MIN = old_lazy
    assert peak < PEAK_LIMIT, f"allocation explosion: {peak} bytes traced for {len(data)}-byte file"
    FUZZ_STATS[outcome] = FUZZ_STATS.get(outcome, 0) + 1


FUZZ_DIR = ""


@pytest.fixture(scope="module", autouse=True)
def _fuzz_env():
    global FUZZ_DIR
    base_file()
    with tempfile.TemporaryDirectory() as d:
        FUZZ_DIR = d
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if FUZZ_STATS:
                print(f"\nGGUF fuzz: {sum(FUZZ_STATS.values())} files in "
                      f"{time.perf_counter() - t0:.1f} s, outcomes {FUZZ_STATS}")


def test_fuzz_base_file_is_valid():
    """The unmutated file converts completely (so the fuzzer starts from a good file)."""
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "base.gguf")
        with open(p, "wb") as f:
            f.write(base_file())
        g = GGUFFile(p)
        assert exercise(p) == "ok"
        assert set(g.tensors) == {"norm", "emb", "q4", "q8", "qk", "q5"}
        assert g.metadata["tokenizer.ggml.tokens"][-1] == "dé"
        with pytest.raises(UnsupportedError, match="Q5_0"):
            g.qtensor("q5")
