"""The one-call C++ transformer block (cpp_ext block.h, kernels.block_forward) against the per-op path.

Transformer.layer_forward now makes one C++ call per layer; the per-op path it replaced
(Transformer._layer_forward_ops: the same C++ pieces driven from Python, the hooks called in
between) is the reference.  Same op order, same int8 activation quantization: the outputs must be
bit-identical — unperturbed, under a scale perturbation (both signs, both distributions), with
perturbed norm weights, with qwen2-style q/k/v biases and neox RoPE, on Q4_0/Q4_1/Q8_0 codes, and
for a whole layer range in one call.  LoRA terms are an fp32 GEMM of the block's own (another
summation order than torch's), so there the bound is a tight tolerance.  The llama.cpp golden test
(tests/test_golden.py) checks the same forward against an independent runtime.
"""
import numpy as np
import pytest
import torch

import edgetune
from edgetune import kernels
from edgetune.model.transformer import NoHooks
from edgetune.synth import write_synthetic
from edgetune.zo.trainable import Perturb, build_trainable

pytestmark = pytest.mark.skipif(not kernels.HAVE_KERNELS, reason="needs the C++ extension")


@pytest.fixture(scope="module", params=["q4_1", "q4_0", "q8_0"])
def tiny(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    return edgetune.load(write_synthetic("tiny", request.param, d / "m.gguf", seed=5, progress=False))


def hidden_in(net, B=3, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, net.config.n_embd, generator=g)


def both_paths(net, h, pert):
    """(block path, per-op reference) for every layer of net, each on the same input."""
    out = []
    for i in range(net.config.n_layer):
        assert net.block_layer(i, pert) is not None, "this layer must run as one C++ call"
        out.append((net.layer_forward(i, h, pert), net._layer_forward_ops(i, h, pert)))
    return out


def assert_identical(pairs):
    for got, ref in pairs:
        assert got.shape == ref.shape
        assert torch.equal(got, ref), f"max |diff| {float((got - ref).abs().max()):.3g}"


def test_unperturbed_block_is_bit_identical(tiny):
    assert_identical(both_paths(tiny.net, hidden_in(tiny.net), None))


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_scale_and_norm_perturbation_bit_identical(tiny, dist):
    net = tiny.net
    ts = build_trainable(net, "scales,norms", dist=dist)
    try:
        h = hidden_in(net, seed=1)
        for sign in (1, -1):
            pert = Perturb(seed=1234, eps=1e-2, sign=sign, dist=dist)
            pairs = both_paths(net, h, pert)
            assert_identical(pairs)
            # the perturbation really changes the output (the test could fail)
            assert not torch.equal(pairs[0][0], net.layer_forward(0, h, None))
    finally:
        net.hooks = NoHooks()
    assert ts.n_params() > 0


def test_qwen2_biases_and_neox_rope_bit_identical(tmp_path):
    m = edgetune.load(write_synthetic("tiny", "q4_0", tmp_path / "m.gguf", seed=9, progress=False))
    net = m.net
    net.config.rope_mode = "neox"
    net._rope_cache.clear()
    g = torch.Generator().manual_seed(3)
    kv = net.config.n_head_kv * net.config.head_dim
    for L in net.layers:
        L.bias = {"attn_q": torch.randn(net.config.n_embd, generator=g),
                  "attn_k": torch.randn(kv, generator=g), "attn_v": torch.randn(kv, generator=g)}
    h = hidden_in(net, seed=2)
    assert_identical(both_paths(net, h, None))
    ts = build_trainable(net, "norms,scales")
    assert any(p.kind == "bias" for p in ts.params)
    assert_identical(both_paths(net, h, Perturb(seed=7, eps=1e-2, sign=-1)))


def test_layer_range_in_one_call_equals_layer_by_layer(tiny):
    net = tiny.net
    h = hidden_in(net, B=2, T=9, seed=4)
    ref = h
    for i in range(net.config.n_layer):
        ref = net._layer_forward_ops(i, ref, None)
    got = net.layers_forward(0, net.config.n_layer, h, None)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("targets", [("down",), ("q", "v", "o", "gate", "down")])
def test_lora_terms_within_tolerance(tmp_path, targets):
    """LoRA on ffn_down only: its term goes straight into the residual, so the block's fp32 GEMM
    must agree with torch's to float32 rounding (measured max |diff| 2.4e-7 on values ~3.6).
    LoRA before other matrices: a last-bit difference can move an activation across an int8
    quantization step of the next GEMM, so the bound is relative to the layer's update:
    ||block - ops|| / ||ops - h|| <= 1e-3 (measured <= 1.1e-4; 2e-7 where no step flips)."""
    m = edgetune.load(write_synthetic("tiny", "q4_1", tmp_path / "m.gguf", seed=11, progress=False))
    net = m.net
    ts = build_trainable(net, "lora", lora_targets=targets, lora_rank=4)
    r = np.random.default_rng(0)
    for p in ts.params:  # B = 0 at init would make the adapters no-ops
        p.value[...] = r.standard_normal(p.value.shape).astype(np.float32) * 0.3
    h = hidden_in(net, seed=5)
    for pert in (None, Perturb(seed=99, eps=1e-2, sign=1)):
        for i in range(net.config.n_layer):
            assert net.block_layer(i, pert) is not None
            got, ref = net.layer_forward(i, h, pert), net._layer_forward_ops(i, h, pert)
            # the adapters matter (the test could fail) ...
            saved, net.hooks = net.hooks, NoHooks()
            base = net.layer_forward(i, h, None)
            net.hooks = saved
            assert float((ref - base).norm()) > 1e-2 * float((ref - h).norm())
            # ... and the block applies them as torch does
            if targets == ("down",):
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
            else:
                assert float((got - ref).norm() / (ref - h).norm()) <= 1e-3


def test_sets_that_cannot_describe_themselves_fall_back(tiny, tmp_path):
    net = tiny.net
    calib = [torch.randint(3, 500, (2, 8))]
    ts = build_trainable(net, "sparse", calibration=calib)
    try:
        assert net.block_layer(0, None) is None
        ts.params[0].value[:] = 0.5  # a nonzero delta: the fallback must still apply it
        h = hidden_in(net, seed=6)
        got = net.layer_forward(0, h, None)
        assert torch.equal(got, net._layer_forward_ops(0, h, None))
        net.hooks = NoHooks()
        assert not torch.equal(got, net.layer_forward(0, h, None))
    finally:
        net.hooks = NoHooks()
        ts.params[0].value[:] = 0


def test_arena_stops_growing_and_bad_input_is_refused(tiny):
    net = tiny.net
    h = hidden_in(net, B=4, T=16)
    net.layer_forward(0, h, None)
    size = kernels.block_arena_bytes()
    assert size > 0
    for _ in range(3):
        net.layer_forward(1, h, None)
        net.layer_forward(0, hidden_in(net, B=2, T=5), None)  # smaller: reuses the arena
    assert kernels.block_arena_bytes() == size
    lay = net.block_layer(0, None)
    cos, sin = net.rope(16)
    x = h.reshape(-1, net.config.n_embd)
    with pytest.raises(ValueError, match="7 segments"):
        kernels.block_forward(x, net.block_config(), [(lay[0][:6],) + lay[1:]], 4, 16, cos, sin)
    with pytest.raises(ValueError, match="attn_norm"):
        kernels.block_forward(x, net.block_config(), [(lay[0], lay[1][:-1]) + lay[2:]], 4, 16, cos, sin)
    with pytest.raises(ValueError, match="block_forward h"):
        kernels.block_forward(x[:-1], net.block_config(), [lay], 4, 16, cos, sin)
