"""The one-call C++ transformer block (cpp_ext block.h, kernels.block_forward) against the references.

Transformer.layer_forward is one C++ call per layer for every architecture (llama, qwen2, qwen3,
gemma3, llama 3, phi3) and every trainable set.  Two references (tests/reference_forward.py):

- ops_layer: the same C++ pieces driven op by op from Python, the trainable set's hooks applied in
  torch in between (LoRA, sparse deltas by index_add).  Same op order, same int8 activation
  quantization: the block must be bit-identical — unperturbed, under a scale perturbation (both
  signs, both distributions), with perturbed norm weights (q/k head norms and post norms
  included), qwen2 biases, sparse deltas, on Q4_0/Q4_1/Q8_0 and the Q4_K/Q6_K mix, fused (phi3)
  and separate matrices, sliding-window layers, and for a whole layer range in one call.  LoRA
  terms are an fp32 GEMM of the block's own (another summation order than torch's): a tight bound.
- torch_layer: torch attention (SDPA with the causal / sliding-window mask), torch RoPE,
  F.silu/F.gelu.  Other arithmetic (exp, tanh, summation order): a bound relative to the layer's
  update, stated per test.

The llama.cpp golden tests (tests/test_golden.py, tests/test_archs.py) check the same forward
against an independent runtime.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import edgetune
from edgetune import kernels
from edgetune.model.transformer import NoHooks
from edgetune.quant import QTensor, dequantize
from edgetune.synth import write_synthetic
from edgetune.zo.trainable import Perturb, build_trainable

from tests.reference_forward import ops_layer, torch_layer

pytestmark = pytest.mark.skipif(not kernels.HAVE_KERNELS, reason="needs the C++ extension")

ARCH_SHAPES = ["gemma3-tiny", "qwen3-tiny", "llama3-tiny", "phi3-tiny"]


@pytest.fixture(scope="module", params=["q4_1", "q4_0", "q8_0"])
def tiny(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    return edgetune.load(write_synthetic("tiny", request.param, d / "m.gguf", seed=5, progress=False))


@pytest.fixture(scope="module", params=ARCH_SHAPES)
def arch(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    return edgetune.load(write_synthetic(request.param, "q4_k_m", d / "m.gguf", seed=5,
                                         progress=False))


def hidden_in(net, B=3, T=13, seed=0):
    """T = 13 > the gemma3-tiny window (8): sliding-window layers really hide keys."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, net.config.n_embd, generator=g)


def both_paths(net, h, pert):
    """(block, op-by-op reference) for every layer of net, each on the same input."""
    return [(net.layer_forward(i, h, pert), ops_layer(net, i, h, pert))
            for i in range(net.config.n_layer)]


def assert_identical(pairs):
    for got, ref in pairs:
        assert got.shape == ref.shape
        assert torch.equal(got, ref), f"max |diff| {float((got - ref).abs().max()):.3g}"


def unhooked(net, fn):
    saved, net.hooks = net.hooks, NoHooks()
    try:
        return fn()
    finally:
        net.hooks = saved


def test_unperturbed_block_is_bit_identical(tiny):
    assert_identical(both_paths(tiny.net, hidden_in(tiny.net), None))


def test_every_arch_is_bit_identical_to_its_op_by_op_reference(arch):
    net = arch.net
    c = net.config
    assert net.block_layer(0, None, 13) is not None
    assert_identical(both_paths(net, hidden_in(net), None))
    if c.swa_layers:   # gemma3: the window hides keys at T = 13 (window 8): it changes the output
        assert 0 < c.swa_window < 13
        i = c.swa_layers[0]
        h = hidden_in(net)
        got = net.layer_forward(i, h, None)
        saved = c.swa_window
        c.swa_window = 10**6
        try:
            assert not torch.equal(got, net.layer_forward(i, h, None))
        finally:
            c.swa_window = saved


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


def test_arch_scale_and_norm_perturbation_bit_identical(arch):
    """q/k head norms and gemma3's post norms are perturbed as data like the other norms."""
    net = arch.net
    ts = build_trainable(net, "scales,norms")
    try:
        names = {p.name for p in ts.params}
        for n in net.config.layer_vectors:
            assert f"norm:blk.0.{n}.weight" in names
        h = hidden_in(net, seed=1)
        for sign in (1, -1):
            pert = Perturb(seed=77, eps=1e-2, sign=sign)
            assert_identical(both_paths(net, h, pert))
        # a head norm alone moves the output (it is applied, not dropped)
        if net.config.layer_vectors:
            only = {k: v for k, v in ts.norms.items() if k.endswith("attn_k_norm.weight")}
            saved, ts.norms = ts.norms, only
            saved_s, ts.scales = ts.scales, {}
            try:
                pert = Perturb(seed=5, eps=1e-1, sign=1)
                got = net.layer_forward(0, h, pert)
                assert torch.equal(got, ops_layer(net, 0, h, pert))
                assert not torch.equal(got, net.layer_forward(0, h, None))
            finally:
                ts.norms, ts.scales = saved, saved_s
    finally:
        net.hooks = NoHooks()


def test_qwen2_biases_and_neox_rope_bit_identical(tmp_path):
    m = edgetune.load(write_synthetic("tiny", "q4_0", tmp_path / "m.gguf", seed=9, progress=False))
    net = m.net
    net.config.rope_mode = "neox"
    net._rope_cache.clear()
    r = np.random.default_rng(3)
    kv = net.config.n_head_kv * net.config.head_dim
    for L in net.layers:
        L.bias = {n: r.standard_normal(d).astype(np.float32)
                  for n, d in (("attn_q", net.config.n_embd), ("attn_k", kv), ("attn_v", kv))}
    h = hidden_in(net, seed=2)
    assert_identical(both_paths(net, h, None))
    ts = build_trainable(net, "norms,scales")
    assert any(p.kind == "bias" for p in ts.params)
    assert_identical(both_paths(net, h, Perturb(seed=7, eps=1e-2, sign=-1)))


def check_range(net):
    h = hidden_in(net, B=2, T=11, seed=4)
    ref = h
    for i in range(net.config.n_layer):
        ref = ops_layer(net, i, ref, None)
    got = net.layers_forward(0, net.config.n_layer, h, None)
    assert torch.equal(got, ref)


def test_layer_range_in_one_call_equals_layer_by_layer(tiny):
    check_range(tiny.net)


def test_arch_layer_range_in_one_call_equals_layer_by_layer(arch):
    check_range(arch.net)


def test_numpy_hidden_states_give_the_same_block(arch):
    """The lead's numpy activations: h as a float32 numpy array, same bits out (numpy)."""
    net = arch.net
    h = hidden_in(net, seed=8)
    got = net.layers_forward(0, net.config.n_layer, h.numpy(), None)
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, net.layers_forward(0, net.config.n_layer, h, None).numpy())


def to_f32(net):
    """Every layer matrix replaced by its dequantized float32 rows (kind f32): no int8 activations."""
    for L in net.layers:
        for n, qt in L.w.items():
            w = dequantize(qt).astype(np.float32)
            L.w[n] = QTensor(qt.name, "f32", w.shape, data=w, tensor_id=qt.tensor_id)
    return net


def torch_gap(net, methods=None):
    """max over layers (and an unperturbed + a perturbed pass) of ||block - torch|| / ||torch - h||."""
    h = hidden_in(net, seed=3)
    worst = 0.0
    for pert, ts in ((None, None), (Perturb(seed=3, eps=1e-2, sign=1), methods)):
        if pert is not None and ts is None:
            continue
        if ts:
            build_trainable(net, ts)
        try:
            for i in range(net.config.n_layer):
                got, ref = net.layer_forward(i, h, pert), torch_layer(net, i, h, pert)
                worst = max(worst, float((got - ref).norm() / (ref - h).norm()))
        finally:
            net.hooks = NoHooks()
    return worst


def test_block_agrees_with_the_torch_reference(arch):
    """torch SDPA (causal / sliding-window mask) / RoPE / F.silu / F.gelu(tanh) vs the block's,
    on float32 matrices (no int8 activations, so no quantization step can flip): float32
    rounding only — measured <= 8.3e-7 on every layer of the four arch shapes; bound 1e-5.
    On the Q4_K/Q6_K codes a last-bit difference can move an activation across an int8 step of
    the next GEMM: bound 5e-3 there (measured <= 1.2e-3, gemma3 with perturbed norms)."""
    net = to_f32(edgetune.load(arch.net.path).net)
    exact = torch_gap(net, "norms")
    quant = torch_gap(arch.net, "scales,norms")
    print(f"{net.config.arch}: max ||block - torch|| / ||torch - h||: f32 {exact:.2e}, "
          f"codes {quant:.2e}")
    assert exact <= 1e-5
    assert quant <= 5e-3


@pytest.mark.parametrize("targets", [("down",), ("q", "v", "o", "gate", "down")])
def test_lora_terms_within_tolerance(tmp_path, targets):
    """LoRA on ffn_down only: its term goes straight into the residual, so the block's fp32 GEMM
    must agree with torch's to float32 rounding (measured max |diff| 2.4e-7 on values ~3.6).
    LoRA before other matrices: a last-bit difference can move an activation across an int8
    quantization step of the next GEMM, so the bound is relative to the layer's update:
    ||block - ops|| / ||ops - h|| <= 1e-3 (measured <= 1.1e-4; 2e-7 where no step flips)."""
    m = edgetune.load(write_synthetic("tiny", "q4_1", tmp_path / "m.gguf", seed=11, progress=False))
    check_lora(m.net, targets)


def check_lora(net, targets, bound=1e-3):
    ts = build_trainable(net, "lora", lora_targets=targets, lora_rank=4)
    try:
        r = np.random.default_rng(0)
        for p in ts.params:  # B = 0 at init would make the adapters no-ops
            p.value[...] = r.standard_normal(p.value.shape).astype(np.float32) * 0.3
        h = hidden_in(net, seed=5)
        for pert in (None, Perturb(seed=99, eps=1e-2, sign=1)):
            for i in range(net.config.n_layer):
                got, ref = net.layer_forward(i, h, pert), ops_layer(net, i, h, pert)
                # the adapters matter (the test could fail) ...
                base = unhooked(net, lambda: net.layer_forward(i, h, None))
                assert float((ref - base).norm()) > 1e-2 * float((ref - h).norm())
                # ... and the block applies them as torch does
                if targets == ("down",):
                    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
                else:
                    assert float((got - ref).norm() / (ref - h).norm()) <= bound
    finally:
        net.hooks = NoHooks()


def test_lora_on_fused_and_k_quant_matrices(arch):
    """phi3: q/v adapt the fused attn_qkv, gate/up the fused [gate; up] (whole outputs)."""
    check_lora(arch.net, ("q", "v", "o", "gate", "down"))


def sparse_set(net, seed=0):
    calib = [torch.randint(3, 500, (2, 8))]
    ts = build_trainable(net, "sparse", calibration=calib, sparse_fraction=0.02)
    r = np.random.default_rng(seed)
    for p in ts.params:   # nonzero deltas (they start at 0)
        p.value[...] = (r.standard_normal(p.value.shape) * p.pscale).astype(np.float32)
    return ts


def check_sparse(net):
    ts = sparse_set(net)
    try:
        assert any(t is not None and t[1] is not None for t in net.block_layer(0, None, 13)[4])
        h = hidden_in(net, seed=6)
        for pert in (None, Perturb(seed=11, eps=1e-2, sign=1), Perturb(seed=11, eps=1e-2, sign=-1)):
            assert_identical(both_paths(net, h, pert))
        assert not torch.equal(net.layer_forward(0, h, None),
                               unhooked(net, lambda: net.layer_forward(0, h, None)))
    finally:
        net.hooks = NoHooks()
    assert ts.n_params() > 0


def test_sparse_deltas_as_data_bit_identical(tiny):
    """Sparse deltas go in as (rows, cols, deltas): same order as index_add, same bits."""
    check_sparse(tiny.net)


def test_arch_sparse_deltas_as_data_bit_identical(arch):
    check_sparse(arch.net)


def test_sparse_lora_scales_norms_together(arch):
    net = arch.net
    calib = [torch.randint(3, 500, (2, 8))]
    ts = build_trainable(net, "scales,sparse,norms", calibration=calib, sparse_fraction=0.01)
    try:
        for p in ts.params:
            if p.kind == "sparse":
                p.value[...] = np.float32(0.5) * p.pscale
        h = hidden_in(net, seed=12)
        assert_identical(both_paths(net, h, Perturb(seed=21, eps=1e-2, sign=-1, dist="gaussian")))
    finally:
        net.hooks = NoHooks()


class _TorchRecorder:
    """The calibration statistics as the per-op forward gathered them: sum x^2 in float64."""

    def __init__(self):
        self.sq = {}

    def scale_perturbation(self, qt, pert):
        return None

    def linear_extra(self, qt, x, y, pert):
        self.sq[qt.name] = self.sq.get(qt.name, 0) + x.double().pow(2).sum(0).numpy()
        return y

    def norm_weight(self, name, w, pert):
        return w


def test_sparse_calibration_sums_match_the_op_by_op_recorder(arch):
    """The block adds each matrix input's column sums of squares (LinearTerms.input_sq) where the
    per-op path called a Python recorder; the sums agree to float64 rounding and the mask they
    choose is the same."""
    from edgetune.zo.trainable import _input_norms, _NormRecorder
    net = arch.net
    tokens = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    ours = _input_norms(net, [tokens])
    rec = _TorchRecorder()
    net.hooks = rec
    try:
        h = net.embed_tokens(tokens)
        for i in range(net.config.n_layer):
            h = ops_layer(net, i, h, None)
    finally:
        net.hooks = NoHooks()
    assert set(ours) == set(rec.sq) and len(ours) == len(net.layers) * len(net.config.layer_weights)
    for name, v in rec.sq.items():
        ref = np.sqrt(v).astype(np.float32)
        np.testing.assert_allclose(ours[name], ref, rtol=1e-6)
    assert isinstance(_NormRecorder().linear_terms(net.layers[0].w[net.config.layer_weights[0]], None),
                      kernels.LinearTerms)


def test_gelu_piece_matches_torch():
    """The block's GELU(tanh) gate (computed as x / (1 + exp(-2u)), the same function) vs torch's
    in float64, error relative to |g * u|: measured 1.46e-7 (torch's own float32 GELU: 1.31e-7)."""
    g = torch.linspace(-8, 8, 4001).reshape(1, -1).repeat(3, 1) * torch.tensor([[1.0], [0.3], [2.0]])
    u = torch.randn(g.shape, generator=torch.Generator().manual_seed(0))
    got = kernels.gelu_mul(g, u).double()
    ref = F.gelu(g.double(), approximate="tanh") * u.double()
    err = float(((got - ref).abs() / ((g.double() * u.double()).abs() + 1e-30)).max())
    assert err <= 5e-7, err


def test_f32_matrices_run_in_the_block(tmp_path):
    """Unquantized (F32/F16/BF16) layer matrices: fp32 rows in the block's own fp32 GEMM; the
    reference is numpy's matmul (another summation order): ||block - ops|| / ||ops - h|| <= 1e-5."""
    m = edgetune.load(write_synthetic("tiny", "q4_1", tmp_path / "m.gguf", seed=3, progress=False))
    net = to_f32(m.net)
    ts = build_trainable(net, "lora,norms", lora_rank=2)
    for p in ts.params:
        p.value[...] += np.float32(0.1)
    try:
        h = hidden_in(net, seed=9)
        for pert in (None, Perturb(seed=2, eps=1e-2, sign=1)):
            for i in range(net.config.n_layer):
                got, ref = net.layer_forward(i, h, pert), ops_layer(net, i, h, pert)
                assert float((got - ref).norm() / (ref - h).norm()) <= 1e-5
    finally:
        net.hooks = NoHooks()


def test_streamed_layers_equal_resident(arch, tmp_path):
    """A streamed layer runs the same C++ block once its codes are read in: same bits."""
    path = arch.net.path
    ids = [[1] + list(range(5, 20))]
    full = arch.logits(ids)
    m = edgetune.load(path, streamed_layers=[0, 1])
    try:
        np.testing.assert_array_equal(m.logits(ids), full)
    finally:
        m.net.close()


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
    lay = net.block_layer(0, None, 16)
    cos, sin = net.rope(16)
    x = h.reshape(-1, net.config.n_embd)
    with pytest.raises(ValueError, match="7 segments"):
        kernels.block_forward(x, net.block_config(), [(lay[0][:6],) + lay[1:]], 4, 16, cos, sin)
    with pytest.raises(ValueError, match="attn_norm"):
        kernels.block_forward(x, net.block_config(), [(lay[0], lay[1][:-1]) + lay[2:]], 4, 16, cos, sin)
    with pytest.raises(ValueError, match="block_forward h"):
        kernels.block_forward(x[:-1], net.block_config(), [lay], 4, 16, cos, sin)
    with pytest.raises(ValueError, match="10-tuple"):
        kernels.block_forward(x, net.block_config(), [lay[:5]], 4, 16, cos, sin)
    bad = kernels.LinearTerms(sparse=(np.array([0]), np.array([10**6]), np.ones(1, np.float32)))
    terms = [None] * 6 + [kernels._terms(bad)]
    with pytest.raises(ValueError, match="sparse index .* outside ffn_down"):
        kernels.block_forward(x, net.block_config(), [lay[:4] + (terms,) + lay[5:]], 4, 16, cos, sin)

    class OldHooks(NoHooks):
        linear_terms = None
    net.hooks = OldHooks()
    try:
        with pytest.raises(TypeError, match="linear_terms"):
            net.layer_forward(0, h, None)
    finally:
        net.hooks = NoHooks()


# -- keep_rows: the last layer computes only the rows the caller reads --------------------------

def kept_rows_cases(B, T):
    """Row lists into B*T: the last position of each sequence, an unordered list with a repeat,
    every row reversed, and none."""
    M = B * T
    return [np.arange(1, B + 1, dtype=np.int64) * T - 1,
            np.array([M - 1, 0, T - 1, T - 1, T + 4, 5], np.int64),
            np.arange(M, dtype=np.int64)[::-1].copy(),
            np.zeros(0, np.int64)]


def check_kept_rows(net, pert, B=3, T=13, seed=0):
    """For single layers and the whole range, resident: the kept rows are the full forward's rows,
    bit for bit, and the last layer really ran its FFN on those rows only."""
    h = hidden_in(net, B, T, seed).numpy()
    D, n = net.config.n_embd, net.config.n_layer
    for i0, i1 in ((0, n), (n - 1, n), (0, 1)):
        full = net.layers_forward(i0, i1, h, pert).reshape(-1, D)
        assert kernels.block_last_ffn_rows() == B * T
        for rows in kept_rows_cases(B, T):
            got = net.layers_forward(i0, i1, h, pert, rows=rows)
            assert got.shape == (len(rows), D)
            np.testing.assert_array_equal(got, full[rows])
            assert kernels.block_last_ffn_rows() == len(rows)


def test_kept_rows_are_the_full_forwards_rows(tiny):
    net = tiny.net
    check_kept_rows(net, None)
    build_trainable(net, "scales,norms")
    try:
        for sign in (1, -1):
            check_kept_rows(net, Perturb(seed=31, eps=1e-2, sign=sign), seed=1)
    finally:
        net.hooks = NoHooks()


def test_arch_kept_rows_are_the_full_forwards_rows(arch):
    """Every arch (q/k head norms, post norms, fused matrices, sliding windows: T = 13 > 8)."""
    net = arch.net
    check_kept_rows(net, None)
    build_trainable(net, "scales,norms")
    try:
        check_kept_rows(net, Perturb(seed=32, eps=1e-2, sign=-1, dist="gaussian"), seed=2)
    finally:
        net.hooks = NoHooks()


def test_kept_rows_with_lora_and_sparse_terms(arch):
    """LoRA on every matrix and sparse deltas act on the kept rows exactly as on all rows."""
    net = arch.net
    ts = build_trainable(net, "lora", lora_targets=("q", "k", "v", "o", "gate", "up", "down"),
                         lora_rank=4)
    r = np.random.default_rng(1)
    try:
        for p in ts.params:
            p.value[...] = r.standard_normal(p.value.shape).astype(np.float32) * 0.3
        check_kept_rows(net, None)
        check_kept_rows(net, Perturb(seed=4, eps=1e-2, sign=1), seed=3)
        sparse_set(net, seed=2)
        check_kept_rows(net, Perturb(seed=5, eps=1e-2, sign=-1), seed=4)
    finally:
        net.hooks = NoHooks()


class _QKVRecorder:
    """Calibration sums on the attention inputs only (q/k/v, or phi3's fused qkv)."""

    def __init__(self):
        from edgetune.zo.trainable import _NormRecorder
        self.rec = _NormRecorder()

    def __getattr__(self, name):
        return getattr(self.rec, name)

    def linear_terms(self, qt, pert):
        if qt.name.split(".")[-2] in ("attn_q", "attn_k", "attn_v", "attn_qkv"):
            return self.rec.linear_terms(qt, pert)
        return None


def test_calibration_sums_see_every_row_when_rows_are_kept(arch):
    """input_sq on the last layer's o/gate/up/down needs every row: that layer runs in full (and
    the sums are those of the full forward, bit for bit); sums on q/k/v only (every row runs
    there anyway) still let the last layer skip."""
    from edgetune.zo.trainable import _NormRecorder
    net = arch.net
    B, T = 3, 13
    h = hidden_in(net, B, T, seed=7).numpy()
    D, n = net.config.n_embd, net.config.n_layer
    rows = kept_rows_cases(B, T)[1]
    for make, skips in ((_NormRecorder, False), (_QKVRecorder, True)):
        for i0 in (0, n - 1):
            full_rec, kept_rec = make(), make()
            net.hooks = full_rec
            try:
                full = net.layers_forward(i0, n, h, None).reshape(-1, D)
                net.hooks = kept_rec
                got = net.layers_forward(i0, n, h, None, rows=rows)
            finally:
                net.hooks = NoHooks()
            np.testing.assert_array_equal(got, full[rows])
            assert kernels.block_last_ffn_rows() == (len(rows) if skips else B * T)
            assert set(full_rec.sq) == set(kept_rec.sq) and full_rec.sq
            for name, v in full_rec.sq.items():
                np.testing.assert_array_equal(kept_rec.sq[name], v, err_msg=name)


def test_gemm_rows_do_not_depend_on_the_other_rows(tiny):
    """What keep_rows relies on: on every kernel path, a row of qgemm's result is the same bits
    whichever rows share the call (activations are quantized per row; the AMX path pads tiles of
    16 rows), perturbed or not."""
    qt = tiny.net.layers[0].w["attn_q"]
    r = np.random.default_rng(0)
    x = r.standard_normal((40, qt.shape[1])).astype(np.float32)
    subsets = [np.array([7]), np.array([39, 0, 16, 3, 3]), np.arange(17), np.arange(40)[::-1]]
    for path in kernels.available_paths():
        for pert in (None, Perturb(seed=3, eps=1e-2, sign=1)):
            p = None if pert is None else (pert.seed, pert.eps, pert.sign, pert.dist)
            full = kernels.qgemm(x, qt, perturb=p, path=path)
            for rows in subsets:
                got = kernels.qgemm(np.ascontiguousarray(x[rows]), qt, perturb=p, path=path)
                np.testing.assert_array_equal(got, full[rows], err_msg=f"{path} {qt.kind}")


def test_model_logits_at_positions_read_only_those_rows(arch):
    """Model.logits(positions=...) and logits_multi: the same bits as the full hidden states
    gathered at those positions then sent through the head (their old definition)."""
    m, net = arch, arch.net
    r = np.random.default_rng(5)
    batch = [list(r.integers(3, 500, n)) for n in (13, 7, 11)]
    tokens, lengths = m._pad(batch)
    B = len(batch)
    build_trainable(net, "scales,norms")
    try:
        pert = Perturb(seed=9, eps=1e-2, sign=1)
        for positions in ([-1], [[12], [3], [10]], [0, -1, 2, -1], [[0, 6], [6, 0], [1, 1]]):
            idx = np.asarray(m._resolve_positions(positions, lengths), np.int64)
            for p, vocab in ((None, None), (pert, None), (pert, [3, 17, 99])):
                h = net.hidden(tokens, p)
                want = net.head(h[np.arange(B)[:, None], idx], p, vocab)
                got = m.logits(batch, positions=positions, perturb=p, vocab=vocab)
                np.testing.assert_array_equal(got, want)
                assert kernels.block_last_ffn_rows() == idx.size
            multi = m.logits_multi(batch, positions, [None, pert], vocab=[3, 17, 99])
            for lg, p in zip(multi, [None, pert]):
                np.testing.assert_array_equal(lg, m.logits(batch, positions=positions, perturb=p,
                                                           vocab=[3, 17, 99]))
        # positions=None: every real position, the padding rows skipped in the last block
        for p in (None, pert):
            h = net.hidden(tokens, p)
            got = m.logits(batch, perturb=p)
            assert kernels.block_last_ffn_rows() == sum(lengths)
            for i, n in enumerate(lengths):
                np.testing.assert_array_equal(got[i, :n], net.head(h[i, :n], p))
                assert not got[i, n:].any()
    finally:
        net.hooks = NoHooks()


def test_streamed_last_layer_keeps_rows_too(arch, tmp_path):
    """Streamed layers run one call per layer: the last one gets the rows; same bits as resident,
    one pass and several (ZO2 layer by layer)."""
    path = arch.net.path
    n = arch.config.n_layer
    ids = [[1] + list(range(5, 20)), [1] + list(range(30, 41))]
    full = arch.logits(ids, positions=[-1, 2])
    m = edgetune.load(path, streamed_layers=[0, n - 1])
    try:
        np.testing.assert_array_equal(m.logits(ids, positions=[-1, 2]), full)
        assert kernels.block_last_ffn_rows() == 4
        tokens, _ = m._pad(ids)
        rows = np.array([15, 16 + 11, 3], np.int64)
        perts = [None, Perturb(seed=1, eps=1e-2, sign=1), Perturb(seed=1, eps=1e-2, sign=-1)]
        for net in (arch.net, m.net):
            build_trainable(net, "scales,norms")
        try:
            h0 = arch.net.hidden_upto(tokens, 1)
            want = [h.reshape(-1, h.shape[-1])[rows] for h in arch.net.hidden_from(h0, 1, perts)]
            for net in (arch.net, m.net):
                got = net.hidden_from(h0, 1, perts, rows)
                assert kernels.block_last_ffn_rows() == len(rows)
                for g, w in zip(got, want):
                    np.testing.assert_array_equal(g, w)
        finally:
            arch.net.hooks = m.net.hooks = NoHooks()
    finally:
        m.net.close()


def test_bad_keep_rows_are_refused(tiny):
    net = tiny.net
    B, T = 2, 5
    x = hidden_in(net, B, T).numpy().reshape(B * T, -1)
    lay = [net.block_layer(0, None, T)]
    cos, sin = net.rope(T)
    cfg = net.block_config()
    for bad, msg in ((np.zeros((2, 1), np.int64), "1-D"), (np.array([0.0, 1.0]), "integer"),
                     (np.array([0, B * T]), r"keep_rows\[1\] = 10 is outside 0..9"),
                     (np.array([-1]), r"keep_rows\[0\] = -1 is outside")):
        with pytest.raises(ValueError, match=msg):
            kernels.block_forward(x, cfg, lay, B, T, cos, sin, keep_rows=bad)
    # the extension checks them too (dtype, range) and the out shape they imply
    raw = kernels._kernels.block_forward
    out = np.empty((2, x.shape[1]), np.float32)
    args = (x, out, cfg, lay, B, T, cos, sin, "auto")
    with pytest.raises(ValueError, match="int64"):
        raw(*args, np.array([0, 1], np.int32))
    with pytest.raises(ValueError, match="outside 0..9"):
        raw(*args, np.array([0, 10], np.int64))
    with pytest.raises(ValueError, match=r"block_forward out .*expected \(3, "):
        raw(*args, np.array([0, 1, 2], np.int64))
    raw(*args, np.array([9, 0], np.int64))   # the right shape goes through
    np.testing.assert_array_equal(out, net.layer_forward(0, x.reshape(B, T, -1), None).reshape(B * T, -1)[[9, 0]])


def test_batch_passes_compute_only_the_rows_they_read(tmp_path):
    """BatchPasses' label-word states (answer positions) and LM losses (loss-mask positions),
    frozen prefix + passes layer by layer: the same bits as the full hidden states gathered."""
    from edgetune.train.data import Batch
    from edgetune.train.objectives import lm_targets, log_softmax32
    from edgetune.train.passes import LM_ROWS, BatchPasses
    m = edgetune.load(write_synthetic("tiny", "q4_1", tmp_path / "m.gguf", seed=4, progress=False))
    net = m.net
    ts = build_trainable(net, "scales,norms", layers="top:2")
    try:
        r = np.random.default_rng(2)
        ids = [list(r.integers(3, 500, n)) for n in (9, 14, 6)]
        masks = [[0] * 3 + [1] * (len(s) - 3) for s in ids]
        b = Batch(ids, [8, 10, 5], [0, 1, 0], masks, [0, 1, 2])
        tokens, _ = m._pad(ids)
        B = len(ids)
        perts = [None, Perturb(3, 1e-2, 1), Perturb(3, 1e-2, -1)]
        bp = BatchPasses(m, ts, [300, 301], chunk=2)
        states, _ = bp._compute_states(ids, b.answer_pos, perts)
        padded, targets = lm_targets(ids, masks)
        y = np.asarray([t for tg in targets for t in tg])
        losses = bp.lm_losses(b, perts)
        assert kernels.block_last_ffn_rows() == len(y)
        for p, x, loss in zip(perts, states, losses):
            h = net.hidden(tokens, p)
            np.testing.assert_array_equal(x, net.final_norm(h[np.arange(B), b.answer_pos], p))
            hs = np.concatenate([h[i, padded[i][:len(tg)]] for i, tg in enumerate(targets)])
            total = 0.0
            for r0 in range(0, len(y), LM_ROWS):
                lp = log_softmax32(net.head(hs[r0:r0 + LM_ROWS], p))
                total += float(-lp[np.arange(lp.shape[0]), y[r0:r0 + LM_ROWS]].astype(np.float64).sum())
            assert loss == total / len(y)
    finally:
        net.hooks = NoHooks()
