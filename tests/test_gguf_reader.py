"""GGUF reader: every supported quant type converts exactly; bad files give named errors."""
import numpy as np
import pytest
import gguf
from gguf import GGMLQuantizationType as T

from edgetune.errors import FormatError, UnsupportedError
from edgetune.formats.gguf_reader import GGUFFile, RawTensor, to_qtensor
from edgetune.quant import dequantize

QUANTS = ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


def random_blocks(qtype: str, n: int, k: int, rng) -> np.ndarray:
    """Random but finite quant blocks: random code bytes, small positive fp16 scales."""
    bs, ts = gguf.GGML_QUANT_SIZES[getattr(T, qtype)]
    raw = rng.integers(0, 256, (n, k // bs * ts), dtype=np.uint8)
    r3 = raw.reshape(n, k // bs, ts)

    def fp16():
        return rng.uniform(1e-3, 5e-2, (n, k // bs)).astype(np.float16).view(np.uint8).reshape(n, k // bs, 2)
    if qtype in ("Q4_0", "Q8_0"):
        r3[:, :, 0:2] = fp16()
    elif qtype == "Q6_K":
        r3[:, :, 208:210] = fp16()
    else:
        r3[:, :, 0:2] = fp16()
        r3[:, :, 2:4] = fp16()
    return raw


@pytest.mark.parametrize("qtype", QUANTS)
def test_conversion_is_exact(qtype):
    rng = np.random.default_rng(1)
    n, k = 5, 768
    raw = random_blocks(qtype, n, k, rng)
    ref = gguf.quants.dequantize(raw, getattr(T, qtype))
    qt = to_qtensor(RawTensor("w", qtype, (n, k), raw, 0))
    assert qt.kind in ("q4", "q8")
    np.testing.assert_array_equal(dequantize(qt), ref)


def test_q4_0_q4_1_q8_0_codes_are_zero_copy_views():
    rng = np.random.default_rng(2)
    for qtype in ("Q4_0", "Q4_1", "Q8_0"):
        raw = random_blocks(qtype, 3, 64, rng)
        qt = to_qtensor(RawTensor("w", qtype, (3, 64), raw, 0))
        assert np.shares_memory(qt.codes, raw), qtype


def write_gguf(path, tensors, arch="llama", extra=None):
    """tensors: name -> (qtype, float32 array).  Writes real quantized bytes via gguf.quants."""
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in (extra or {}).items():
        w.add_uint32(k, v)
    for name, (qtype, arr) in tensors.items():
        qt = getattr(T, qtype)
        data = gguf.quants.quantize(arr, qt) if qtype not in ("F32",) else arr
        w.add_tensor(name, data, raw_dtype=qt if qtype != "F32" else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_file_roundtrip(tmp_path):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((8, 64)).astype(np.float32)
    b = rng.standard_normal((16,)).astype(np.float32)
    f = tmp_path / "m.gguf"
    write_gguf(f, {"a": ("Q4_0", a), "b": ("F32", b), "c": ("Q8_0", a)})
    g = GGUFFile(f)
    assert g.get("general.architecture") == "llama"
    qa = g.qtensor("a")
    ref = gguf.quants.dequantize(gguf.quants.quantize(a, T.Q4_0), T.Q4_0)
    np.testing.assert_array_equal(dequantize(qa), ref)
    np.testing.assert_array_equal(g.qtensor("b").data, b)
    assert np.abs(dequantize(g.qtensor("c")) - a).max() < 0.05


def test_missing_file(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        GGUFFile(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    f = tmp_path / "junk.gguf"
    f.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(FormatError, match="junk.gguf"):
        GGUFFile(f)


def test_truncated(tmp_path):
    rng = np.random.default_rng(4)
    f = tmp_path / "m.gguf"
    write_gguf(f, {"a": ("Q4_0", rng.standard_normal((64, 256)).astype(np.float32))})
    data = f.read_bytes()
    t = tmp_path / "trunc.gguf"
    t.write_bytes(data[: len(data) - 100])
    with pytest.raises(FormatError, match="trunc.gguf"):
        GGUFFile(t).qtensor("a")


def test_unsupported_quant_type_is_named(tmp_path):
    rng = np.random.default_rng(5)
    f = tmp_path / "q50.gguf"
    write_gguf(f, {"a": ("Q5_0", rng.standard_normal((4, 64)).astype(np.float32))})
    with pytest.raises(UnsupportedError, match="Q5_0"):
        GGUFFile(f).qtensor("a")


def test_unsupported_architecture_is_named(tmp_path):
    import edgetune
    f = tmp_path / "arch.gguf"
    write_gguf(f, {"token_embd.weight": ("F32", np.zeros((4, 8), np.float32))}, arch="mamba")
    with pytest.raises(UnsupportedError, match="mamba"):
        edgetune.load(f)
