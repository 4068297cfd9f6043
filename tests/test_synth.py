"""Synthetic GGUF models (edgetune.synth) and the block encoders (edgetune.formats.gguf_writer)."""
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from edgetune.errors import EdgetuneError  # noqa: E402
from edgetune.formats import gguf_writer as gw  # noqa: E402
from edgetune.synth import SHAPES, synthetic_vocab, write_synthetic  # noqa: E402

T = gguf.GGMLQuantizationType


def _fields(reader):
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _expected_tensors(shape, qname):
    s = SHAPES[shape]
    out = {}
    for name, shp, is_matrix in s.tensor_shapes():
        out[name] = (shp, T[qname.upper()] if is_matrix else T.F32)
    return out


def _check_file(path, shape, quant):
    s = SHAPES[shape]
    r = gguf.GGUFReader(str(path), "r")
    md = _fields(r)
    assert md["general.architecture"] == "llama"
    assert md["general.name"] == s.name
    assert md["general.file_type"] == {"q4_0": 2, "q4_1": 3, "q8_0": 7}[quant]
    assert md["llama.context_length"] == s.context_length
    assert md["llama.embedding_length"] == s.hidden
    assert md["llama.block_count"] == s.n_layers
    assert md["llama.feed_forward_length"] == s.ffn
    assert md["llama.attention.head_count"] == s.n_heads
    assert md["llama.attention.head_count_kv"] == s.n_kv_heads
    assert md["llama.rope.dimension_count"] == s.hidden // s.n_heads
    assert md["llama.rope.freq_base"] == pytest.approx(s.rope_base)
    assert md["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(s.rms_eps)
    assert md["llama.vocab_size"] == s.vocab
    assert md["tokenizer.ggml.model"] == "llama"
    toks = md["tokenizer.ggml.tokens"]
    assert len(toks) == len(md["tokenizer.ggml.scores"]) == len(md["tokenizer.ggml.token_type"]) == s.vocab
    assert toks[:3] == ["<unk>", "<s>", "</s>"] and toks[3] == "<0x00>" and toks[258] == "<0xFF>"
    assert len(set(toks)) == s.vocab
    assert md["tokenizer.ggml.bos_token_id"] == 1 and md["tokenizer.ggml.eos_token_id"] == 2

    want = _expected_tensors(shape, quant)
    got = {t.name: t for t in r.tensors}
    assert list(got) == list(want)
    for name, (shp, typ) in want.items():
        t = got[name]
        assert t.tensor_type == typ, name
        assert tuple(int(x) for x in reversed(list(t.shape))) == shp, name   # ggml ne -> numpy
    assert ("output.weight" in got) == (not s.tied)
    # values: norms near 1, matrices ~ N(0, 0.02)-ish
    norm = np.asarray(got["output_norm.weight"].data)
    assert np.all(np.abs(norm - 1) < 0.2)
    q = got["blk.0.attn_q.weight"]
    w = gguf.quants.dequantize(np.asarray(q.data), q.tensor_type)
    assert np.all(np.isfinite(w)) and 0.01 < float(w.std()) < 0.04 and abs(float(w.mean())) < 0.005
    return r


@pytest.mark.parametrize("quant", ["q4_0", "q4_1", "q8_0"])
def test_tiny_reads_back(tmp_path, quant):
    p = write_synthetic("tiny", quant, tmp_path / "tiny.gguf", progress=False)
    assert p == tmp_path / "tiny.gguf"
    _check_file(p, "tiny", quant)
    assert not (tmp_path / "tiny.gguf.tmp").exists()


def test_smollm2_shape_reads_back(tmp_path):
    p = write_synthetic("smollm2-135m", "q4_1", tmp_path / "s.gguf", progress=False)
    r = _check_file(p, "smollm2-135m", "q4_1")
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names and "blk.29.ffn_down.weight" in names
    assert len(r.tensors) == 1 + 30 * 9 + 1


def test_deterministic_and_seeded(tmp_path):
    a = write_synthetic("tiny", "q4_0", tmp_path / "a.gguf", seed=3, progress=False).read_bytes()
    b = write_synthetic("tiny", "q4_0", tmp_path / "b.gguf", seed=3, progress=False).read_bytes()
    c = write_synthetic("tiny", "q4_0", tmp_path / "c.gguf", seed=4, progress=False).read_bytes()
    assert a == b and a != c


def test_refuses_overwrite(tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(EdgetuneError, match="already exists"):
        write_synthetic("tiny", "q4_0", out, progress=False)
    assert out.read_bytes() == b"keep me"
    write_synthetic("tiny", "q4_0", out, overwrite=True, progress=False)
    _check_file(out, "tiny", "q4_0")


def test_clear_errors(tmp_path):
    with pytest.raises(EdgetuneError, match="unknown shape 'llama-70b'"):
        write_synthetic("llama-70b", "q4_0", tmp_path / "x.gguf", progress=False)
    with pytest.raises(EdgetuneError, match="unknown quant 'q5_k'"):
        write_synthetic("tiny", "q5_k", tmp_path / "x.gguf", progress=False)
    with pytest.raises(EdgetuneError, match="does not exist"):
        write_synthetic("tiny", "q4_0", tmp_path / "nodir" / "x.gguf", progress=False)
    with pytest.raises(EdgetuneError, match="is a directory"):
        write_synthetic("tiny", "q4_0", tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_directory(tmp_path, monkeypatch):
    import edgetune.synth as synth
    real = os.access
    monkeypatch.setattr(synth.os, "access", lambda p, m: False if str(p) == str(tmp_path) else real(p, m))
    with pytest.raises(EdgetuneError, match="not writable"):
        write_synthetic("tiny", "q4_0", tmp_path / "x.gguf", progress=False)
    monkeypatch.undo()
    if os.path.isdir("/proc/self"):   # directories where creating files fails even for root
        with pytest.raises(EdgetuneError, match="cannot write|not writable"):
            write_synthetic("tiny", "q4_0", "/proc/edgetune-x.gguf", progress=False)


def test_atomic_no_partial_file(tmp_path, monkeypatch):
    import edgetune.synth as synth
    calls = {"n": 0}
    real = synth.random_blocks

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(synth, "random_blocks", failing)
    out = tmp_path / "m.gguf"
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_synthetic("tiny", "q4_0", out, progress=False)
    assert list(tmp_path.iterdir()) == []          # neither m.gguf nor m.gguf.tmp
    out.write_bytes(b"old")                         # an existing file survives a failed overwrite
    calls["n"] = 0
    with pytest.raises(RuntimeError):
        write_synthetic("tiny", "q4_0", out, overwrite=True, progress=False)
    assert out.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["m.gguf"]


def test_cli_parser(tmp_path, capsys):
    import argparse

    from edgetune import synth
    parser = argparse.ArgumentParser(prog="edgetune")
    synth.add_cli(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["synth", "--shape", "tiny", "--quant", "q8_0", "--out",
                              str(tmp_path / "t.gguf"), "--seed", "7", "--no-progress"])
    assert args.func(args) == 0
    assert "wrote" in capsys.readouterr().out
    _check_file(tmp_path / "t.gguf", "tiny", "q8_0")
    with pytest.raises(SystemExit):
        parser.parse_args(["synth", "--shape", "nope", "--out", "x.gguf"])


def test_vocab():
    toks, scores, types = synthetic_vocab(512)
    assert len(toks) == len(scores) == len(types) == 512 and len(set(toks)) == 512
    assert types[:3] == [2, 3, 3] and types[3:259] == [6] * 256 and set(types[259:]) == {1}
    assert toks[259] == "\u2581" and "\u2581a" in toks
    assert len(set(synthetic_vocab(49152)[0])) == 49152


# ---------------------------------------------------------------- block encoders
def _weights(rng, n=48, k=256):
    w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    w[0, :32] = 1.0                                  # constant block
    w[1, :32] = (np.arange(32) % 16 - 8) * 0.5        # exactly representable in Q4_0/Q4_1
    w[2, 40] = -5.0                                  # an outlier
    w[3, 64:96] *= 1e-6                              # tiny values
    return w


@pytest.mark.parametrize("q", ["Q4_0", "Q4_1", "Q8_0"])
def test_encode_blocks_roundtrip(q):
    rng = np.random.default_rng(0)
    w = _weights(rng)
    b = gw.encode_blocks(w, q)
    n, k = w.shape
    assert b.dtype == np.uint8 and b.shape == (n, k // 32 * gw.BLOCK_BYTES[q])
    assert b.shape[1] * n == gguf.GGML_QUANT_SIZES[T[q]][1] * (n * k // 32)
    # bit-identical to the gguf package's ggml-reference quantizer
    assert np.array_equal(b, gguf.quants.quantize(w, T[q]))
    dq = gguf.quants.dequantize(b, T[q])
    # within quantization error: half a step per block (Q4_0: a full step, since the side opposite
    # the largest |w| only reaches +7 d), plus the fp16 rounding of d and m
    blocks = w.reshape(n, -1, 32)
    amax = np.abs(blocks).max(-1)
    span = blocks.max(-1) - blocks.min(-1)
    step, frac = {"Q4_0": (amax / 8, 1.0), "Q4_1": (span / 15, 0.5), "Q8_0": (amax / 127, 0.5)}[q]
    err = np.abs(dq - w).reshape(n, -1, 32).max(-1)
    assert np.all(err <= frac * step + amax * 2e-3 + 1e-6)   # 1e-6: fp16 d underflows for tiny blocks
    assert err.mean() < (frac * step).mean()
    if q != "Q8_0":
        assert np.array_equal(dq[1, :32], w[1, :32])
    # re-encoding the dequantized blocks reproduces the same bytes wherever the fp16 scale is a
    # normal number; where it underflows (row 3's 1e-8 block) ggml's codes are arbitrary, but the
    # re-encoded block still dequantizes to the same values
    bs = gw.BLOCK_BYTES[q]
    b2 = gw.encode_blocks(dq, q)
    d16 = b.reshape(n, -1, bs)[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    normal = np.abs(d16) >= np.finfo(np.float16).tiny
    assert normal.sum() >= normal.size - 2
    assert np.array_equal(b2.reshape(n, -1, bs)[normal], b.reshape(n, -1, bs)[normal])
    assert np.array_equal(gguf.quants.dequantize(b2, T[q]), dq)


@pytest.mark.parametrize("q", ["Q4_0", "Q4_1", "Q8_0"])
def test_pack_blocks_exact_inverse(q):
    """Random codes + fp16 scales -> blocks -> dequantize gives exactly d*(q-off)+m."""
    rng = np.random.default_rng(1)
    n, k = 16, 128
    nb = k // 32
    d = rng.uniform(1e-3, 1e-2, (n, nb)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.1, 0.0, (n, nb)).astype(np.float16).astype(np.float32)
    if q == "Q8_0":
        codes = rng.integers(-128, 128, (n, k)).astype(np.int8)
        want = codes.reshape(n, nb, 32) * d[..., None]
        b = gw.pack_blocks(q, codes, d)
    else:
        codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
        if q == "Q4_0":
            want = (codes.reshape(n, nb, 32).astype(np.float32) - 8) * d[..., None]
            b = gw.pack_blocks(q, codes, d)
        else:
            want = codes.reshape(n, nb, 32) * d[..., None] + m[..., None]
            b = gw.pack_blocks(q, codes, d, m)
        from edgetune.quant import pack_q4   # QTensor's packed layout gives the same bytes
        assert np.array_equal(gw.pack_blocks(q, pack_q4(codes), d, m if q == "Q4_1" else None), b)
    dq = gguf.quants.dequantize(b, T[q])
    assert np.array_equal(dq, want.reshape(n, k).astype(np.float32))


@pytest.mark.parametrize("q", ["Q4_0", "Q4_1", "Q8_0"])
def test_random_blocks_plausible(q):
    rng = np.random.default_rng(2)
    b = gw.random_blocks(q, 64, 512, rng, std=0.02)
    assert b.shape == (64, 512 // 32 * gw.BLOCK_BYTES[q]) and b.dtype == np.uint8
    w = gguf.quants.dequantize(b, T[q])
    assert np.all(np.isfinite(w))
    assert 0.015 < w.std() < 0.025 and abs(w.mean()) < 0.002


def test_stream_writer_checks(tmp_path):
    w = gw.GGUFStreamWriter(tmp_path / "x.gguf", "llama")
    w.add_tensor_info("a", (4, 64), "q8_0")
    w.add_tensor_info("b", (3,), "F32")
    w.write_head()
    with pytest.raises(ValueError, match="expected tensor 'a'"):
        w.write_tensor("b", [np.ones(3, np.float32)])
    with pytest.raises(ValueError, match="expected 272"):
        w.write_tensor("a", [np.zeros(10, np.uint8)])
    w.abort()


# ---------------------------------------------------------------- llama.cpp loads it
def test_llamacpp_loads_tiny(tmp_path):
    try:
        import llama_cpp
    except Exception as e:   # not installed / not built
        pytest.skip(f"llama_cpp cannot be imported: {e}")
    for quant in ("q4_0", "q4_1", "q8_0"):
        p = write_synthetic("tiny", quant, tmp_path / f"tiny-{quant}.gguf", progress=False)
        llm = llama_cpp.Llama(str(p), n_ctx=64, n_batch=64, logits_all=True, verbose=False, seed=0)
        toks = llm.tokenize(b"hello world", add_bos=True)
        assert toks[0] == 1 and all(0 <= t < 512 for t in toks)
        assert llm.detokenize(toks[1:]).strip() == b"hello world"
        llm.eval(toks)
        logits = np.asarray(llm.scores[: len(toks)])
        assert logits.shape == (len(toks), 512)
        assert np.all(np.isfinite(logits)) and logits.std() > 0
        del llm


def test_llamacpp_vocab_only_smollm2(tmp_path):
    try:
        import llama_cpp
    except Exception as e:
        pytest.skip(f"llama_cpp cannot be imported: {e}")
    p = write_synthetic("smollm2-135m", "q4_0", tmp_path / "s.gguf", progress=False)
    llm = llama_cpp.Llama(str(p), vocab_only=True, verbose=False)
    assert llm.n_vocab() == 49152
    toks = llm.tokenize(b"the cat", add_bos=False)
    assert llm.detokenize(toks).strip() == b"the cat"
