"""kquant.py: K-quant encoding checked against gguf-py's independent dequantizer; tuned scales
written back in the same type (codes and mins byte-identical, unchanged super-blocks untouched,
how much of a scale update survives); the memory planner counts K-quant codes as held in RAM.

    .venv/bin/python -m pytest tests/test_kquant.py -x -q
"""
import numpy as np
import pytest

from edgetune import kquant
from edgetune.formats.gguf_reader import GGUFFile, RawTensor, to_qtensor


@pytest.mark.parametrize("qtype", kquant.K_TYPES)
def test_encode_matches_ggml_layout(qtype):
    import gguf.quants as gq
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((6, 512)) * 0.02).astype(np.float32)
    b = kquant.encode(w, qtype)
    assert b.shape == (6, 2 * kquant.BLOCK_BYTES[qtype])
    ref = gq.dequantize(b, gq.GGMLQuantizationType[qtype]).reshape(6, 512)
    ours = kquant.decode(b, qtype, 512)
    np.testing.assert_array_equal(ours, ref)            # edgetune's reader == gguf-py's
    rel = np.linalg.norm(ours - w) / np.linalg.norm(w)
    assert rel < {"Q4_K": 0.1, "Q5_K": 0.05, "Q6_K": 0.025}[qtype], rel


@pytest.mark.parametrize("qtype", kquant.K_TYPES)
def test_refit_scales_keeps_codes_and_untouched_blocks(qtype):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((4, 512)) * 0.02).astype(np.float32)
    b = kquant.encode(w, qtype)
    raw = b.reshape(4, 2, -1)
    qt = to_qtensor(RawTensor("w", qtype, (4, 512), b, 0))
    same, stored = kquant.refit_scales(qtype, raw, qt.scales)
    np.testing.assert_array_equal(same, raw)
    np.testing.assert_array_equal(stored, qt.scales)
    s = qt.scales.copy()
    S = s.shape[1] // 2
    s[:, :S] *= (1 + 0.03 * rng.standard_normal((4, S))).astype(np.float32)   # super-block 0 only
    out, stored = kquant.refit_scales(qtype, raw, s)
    np.testing.assert_array_equal(out[:, 1], raw[:, 1])
    qt2 = to_qtensor(RawTensor("w", qtype, (4, 512), out.reshape(4, -1), 0))
    np.testing.assert_array_equal(qt2.codes, qt.codes)                         # codes kept
    if qt.mins is not None:
        np.testing.assert_array_equal(qt2.mins, qt.mins)
    np.testing.assert_allclose(qt2.scales, stored, rtol=1e-6)
    survived = 1 - np.linalg.norm(stored - s) / np.linalg.norm(s - qt.scales)
    assert survived > 0.5, survived     # a 3% scale change mostly survives 6/8-bit sub-scales


def test_requantize_changed_touches_only_changed_superblocks():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((3, 512)) * 0.02).astype(np.float32)
    b = kquant.encode(w, "Q4_K").reshape(3, 2, -1)
    w0 = kquant.decode(b.reshape(3, -1), "Q4_K", 512)
    w1 = w0.copy()
    w1[1, 300:310] += 0.05
    out = kquant.requantize_changed("Q4_K", b, w1, w0)
    np.testing.assert_array_equal(np.delete(out.reshape(6, -1), 3, 0), np.delete(b.reshape(6, -1), 3, 0))
    e_new = np.abs(kquant.decode(out.reshape(3, -1), "Q4_K", 512) - w1)[1, 256:].sum()
    assert e_new < np.abs(w0 - w1)[1, 256:].sum()


def test_planner_counts_kquant_codes_as_unpacked(tmp_path):
    from edgetune.memory.budget import _qbytes
    from edgetune.model.transformer import Transformer
    from edgetune.synth import write_synthetic
    path = write_synthetic("qwen3-tiny", "q4_k_m", tmp_path / "q.gguf", progress=False)
    g = GGUFFile(str(path))
    net = Transformer(g)
    for name, qt in net.qtensors().items():
        rt = g.tensors[name]
        held = qt.codes.nbytes if qt.kind != "f32" else qt.data.nbytes
        assert _qbytes(rt) == held, (name, rt.type_name, _qbytes(rt), held)


def test_synth_plan_nbytes_counts_the_q4_k_m_mix(tmp_path):
    from edgetune.synth import plan_nbytes, write_synthetic
    path = write_synthetic("gemma3-tiny", "q4_k_m", tmp_path / "g.gguf", progress=False)
    g = GGUFFile(str(path))
    assert plan_nbytes("gemma3-tiny", "q4_k_m") == sum(int(t.data.nbytes) for t in g.tensors.values())
    assert g.get("general.file_type") == 15          # llama.cpp's MOSTLY_Q4_K_M
