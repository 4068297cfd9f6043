"""The non-GEMM kernels (ops.h: rms_norm, silu_mul, attention with RoPE; rng_ops.h: the
perturbation stream) against numpy twins that do the same float32 operations in the same order,
so the comparison is bit for bit — for the AVX-512 intrinsics and the portable loops alike
(kernels.ops_set_simd switches between them), and for any thread count."""
import math

import numpy as np
import pytest
import torch

from edgetune import kernels
from edgetune.zo import rng

pytestmark = pytest.mark.skipif(not kernels.HAVE_KERNELS, reason="needs the C++ extension")

f32 = np.float32


def exp_approx(x):
    """ops.cpp's exp_approx (Cephes expf), op for op in float32."""
    x = np.asarray(x, f32)
    x = np.where(x < f32(-87.0), f32(-87.0), x)
    x = np.where(x > f32(88.0), f32(88.0), x)
    t = x * f32(1.44269504088896341)
    fi = (t + f32(12582912.0)) - f32(12582912.0)
    r = x - fi * f32(0.693359375)
    r = r - fi * f32(-2.12194440e-4)
    p = np.full_like(x, f32(1.9875691500e-4))
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + f32(c)
    p = (p * (r * r) + r) + f32(1.0)
    e = (fi.astype(np.int32) + 127).astype(np.uint32) << np.uint32(23)
    return p * e.view(f32)


def silu_mul_ref(g, u):
    g, u = np.asarray(g, f32), np.asarray(u, f32)
    return g / (f32(1.0) + exp_approx(-g)) * u


def rms_norm_ref(x, w, eps):
    """16 lane partial sums of squares, then summed in lane order, then the tail."""
    x, w = np.asarray(x, f32), np.asarray(w, f32)
    M, D = x.shape
    nb = D // 16
    acc = np.zeros((M, 16), f32)
    for i in range(nb):
        blk = x[:, 16 * i:16 * i + 16]
        acc = acc + blk * blk
    ss = np.zeros(M, f32)
    for j in range(16):
        ss = ss + acc[:, j]
    for i in range(16 * nb, D):
        ss = ss + x[:, i] * x[:, i]
    r = f32(1.0) / np.sqrt(ss / f32(D) + f32(eps))
    return (x * r[:, None]) * w


def rope_ref(x, cos, sin, rd, neox):
    """x [..., T, hd] float32; cos/sin [T, rd/2]."""
    out = x.copy()
    h2 = rd // 2
    if neox:
        x1, x2 = x[..., :h2], x[..., h2:rd]
        out[..., :h2] = x1 * cos - x2 * sin
        out[..., h2:rd] = x1 * sin + x2 * cos
    else:
        x1, x2 = x[..., 0:rd:2], x[..., 1:rd:2]
        out[..., 0:rd:2] = x1 * cos - x2 * sin
        out[..., 1:rd:2] = x1 * sin + x2 * cos
    return out


def attention_ref(q, k, v, B, T, H, Hkv, cos, sin, neox, scale):
    """Causal GQA attention, ops.cpp's order: scores summed over d from 0, scaled, max-shifted
    exp, the exps summed in key order, then the output accumulated in key order."""
    hd = q.shape[1] // H
    rd = 2 * cos.shape[1]
    qh = rope_ref(q.reshape(B, T, H, hd).transpose(0, 2, 1, 3), cos, sin, rd, neox)   # [B, H, T, hd]
    kh = rope_ref(k.reshape(B, T, Hkv, hd).transpose(0, 2, 1, 3), cos, sin, rd, neox)
    vh = v.reshape(B, T, Hkv, hd).transpose(0, 2, 1, 3)
    g = H // Hkv
    kh, vh = np.repeat(kh, g, axis=1), np.repeat(vh, g, axis=1)     # kv head of q head h: h // g
    s = np.zeros((B, H, T, T), f32)
    for d in range(hd):
        s = s + qh[..., :, d, None] * kh[..., None, :, d]
    s = s * f32(scale)
    causal = np.tril(np.ones((T, T), bool))
    mx = np.where(causal, s, f32(-np.inf)).max(-1, keepdims=True)
    e = exp_approx(s - mx)
    tot = np.zeros((B, H, T), f32)
    for u in range(T):
        tot = np.where(causal[:, u], tot + e[..., u], tot)
    inv = f32(1.0) / tot
    o = np.zeros((B, H, T, hd), f32)
    for u in range(T):
        p = e[..., u] * inv
        o = np.where(causal[:, u, None], o + p[..., None] * vh[..., u, None, :], o)
    return o.transpose(0, 2, 1, 3).reshape(B * T, H * hd)


@pytest.fixture(params=[True, False], ids=["simd", "portable"])
def path(request):
    kernels.ops_set_simd(request.param)
    yield request.param
    kernels.ops_set_simd(True)
    kernels.set_num_threads(0)


def test_ops_simd_switch():
    kernels.ops_set_simd(False)
    assert kernels.ops_simd() is False
    on = kernels.ops_set_simd(True)
    assert on == kernels.ops_simd()    # True exactly where the CPU has AVX-512F


def test_exp_approx_twin_is_close_to_exp():
    # the twin itself is a fair exp (else the bit-exact tests below would prove little)
    x = np.linspace(-80, 80, 10001).astype(f32)
    np.testing.assert_allclose(exp_approx(x), np.exp(x.astype(np.float64)), rtol=3e-7)


@pytest.mark.parametrize("M,D", [(37, 576), (5, 17), (8, 4096), (3, 16), (2, 15)])
def test_rms_norm_bit_exact(path, M, D):
    r = np.random.default_rng(D)
    x = (r.standard_normal((M, D)) * 3).astype(f32)
    w = r.standard_normal(D).astype(f32)
    want = rms_norm_ref(x, w, 1e-5)
    for nt in (1, 2):
        kernels.set_num_threads(nt)
        np.testing.assert_array_equal(kernels.rms_norm(torch.from_numpy(x), torch.from_numpy(w), 1e-5).numpy(),
                                      want)
    # strided rows (a view into a wider buffer)
    wide = np.zeros((M, D + 7), f32)
    wide[:, 3:3 + D] = x
    np.testing.assert_array_equal(kernels.rms_norm(torch.from_numpy(wide)[:, 3:3 + D], torch.from_numpy(w),
                                                   1e-5).numpy(), want)


@pytest.mark.parametrize("M,D", [(37, 576), (5, 17), (8, 4096), (3, 16), (2, 15), (1, 1)])
def test_add_rms_norm_is_the_add_then_rms_norm_bit_for_bit(path, M, D):
    """The block's residual add fused with the RMSNorm after it: the same bits as numpy's float32
    a + b followed by rms_norm (the unfused kernel and its numpy twin), strided inputs included."""
    r = np.random.default_rng(M * 1000 + D)
    a = (r.standard_normal((M, D)) * 3).astype(f32)
    b = (r.standard_normal((M, D)) * 0.7).astype(f32)
    w = r.standard_normal(D).astype(f32)
    want_sum = a + b
    want = kernels.rms_norm(want_sum, w, 1e-5)
    np.testing.assert_array_equal(want, rms_norm_ref(want_sum, w, 1e-5))
    wide = np.zeros((M, D + 5), f32)   # rows of b at a wider stride
    wide[:, 2:2 + D] = b
    for nt in (1, 2):
        kernels.set_num_threads(nt)
        for bb in (b, wide[:, 2:2 + D]):
            s, n = kernels.add_rms_norm(a, bb, w, 1e-5)
            np.testing.assert_array_equal(s, want_sum)
            np.testing.assert_array_equal(n, want)
    # in place (sum written over a, as the block does with h_out = h_in)
    a2 = a.copy()
    out = np.empty_like(a)
    kernels._kernels.add_rms_norm(a2, b, w, 1e-5, a2, out)
    np.testing.assert_array_equal(a2, want_sum)
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("M,F", [(37, 1536), (3, 17), (9, 16), (1, 5)])
def test_silu_mul_bit_exact(path, M, F):
    r = np.random.default_rng(F)
    gu = (r.standard_normal((M, 2 * F)) * 6).astype(f32)
    gu[0, :5] = [100.0, -100.0, 0.0, -0.0, -90.0]      # the clamps of exp, signed zeros
    g, u = gu[:, :F], gu[:, F:]
    want = silu_mul_ref(g, u)
    for nt in (1, 2):
        kernels.set_num_threads(nt)
        got = kernels.silu_mul(torch.from_numpy(gu)[:, :F], torch.from_numpy(gu)[:, F:]).numpy()
        np.testing.assert_array_equal(got, want)


ATT_CASES = [  # B, T, H, Hkv, hd, rope_dim, neox
    (2, 32, 9, 3, 64, 64, False),     # SmolLM2's shape
    (1, 70, 4, 2, 64, 64, True),      # > 64 keys: two passes of score blocks
    (2, 9, 6, 2, 16, 8, False),       # partial RoPE, one 16-lane vector per head
    (2, 5, 4, 4, 48, 48, True),       # MHA, 3 vectors per head, neox halves of 24 (masked tail)
    (1, 17, 8, 2, 128, 128, False),   # 8 vectors per head (two rows per output pass)
    (1, 40, 4, 1, 80, 64, False),     # 5 vectors, dims past rope_dim copied
    (1, 1, 2, 1, 64, 64, True),       # a single token
    (1, 6, 2, 1, 24, 24, False),      # head_dim not a multiple of 16: the portable loops
]


@pytest.mark.parametrize("case", ATT_CASES, ids=lambda c: "B{}T{}H{}kv{}hd{}rd{}{}".format(*c[:6], "neox" if c[6] else ""))
def test_attention_bit_exact(path, case):
    B, T, H, Hkv, hd, rd, neox = case
    r = np.random.default_rng(T * hd)
    qkv = (r.standard_normal((B * T, (H + 2 * Hkv) * hd)) * 2).astype(f32)
    q, k, v = qkv[:, :H * hd], qkv[:, H * hd:(H + Hkv) * hd], qkv[:, (H + Hkv) * hd:]
    ang = np.outer(np.arange(T), 1 / (10000 ** (np.arange(0, rd, 2) / rd)))
    cos, sin = np.cos(ang).astype(f32), np.sin(ang).astype(f32)
    scale = 1 / math.sqrt(hd)
    want = attention_ref(q, k, v, B, T, H, Hkv, cos, sin, neox, scale)
    t = torch.from_numpy(qkv)
    tq, tk, tv = t[:, :H * hd], t[:, H * hd:(H + Hkv) * hd], t[:, (H + Hkv) * hd:]   # strided views
    for nt in (1, 2):
        kernels.set_num_threads(nt)
        got = kernels.attention(tq, tk, tv, B, T, H, Hkv, torch.from_numpy(cos), torch.from_numpy(sin), neox,
                                scale).numpy()
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_rng_stream_bit_exact(path, dist):
    for n, off in [(1, 0), (7, 3), (8, 0), (9, 1), (65536 + 13, 5), (200_003, 2**40 + 3)]:
        for seed in (0, 2**64 - 1, 12345):
            z = rng.perturbation(seed, 77, (n,), dist, off)
            np.testing.assert_array_equal(kernels.rng_perturbation(seed, 77, n, dist, off), z)
            base = np.linspace(-1, 1, n).astype(f32)
            got = kernels.rng_axpy(base.copy(), 0.37, seed, 77, dist, off)
            np.testing.assert_array_equal(got, base + f32(0.37) * z)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_perturb_apply_is_the_numpy_expression(dist):
    """trainable.Perturb.apply (the LoRA/norm/bias values of a perturbed pass) regenerates z in
    C++ and adds it in place; the result is the documented numpy expression bit for bit."""
    from edgetune.zo.trainable import Param, Perturb
    r = np.random.default_rng(3)
    for shape in [(8, 576), (576,), (3, 5, 7), ()]:
        v = r.standard_normal(shape).astype(f32)
        p = Param("blk.0.attn_norm.weight", "norm", v.copy(), 100003, pscale=0.0371)
        for seed, sign in [(5, 1), (2**63 + 11, -1)]:
            pe = Perturb(seed, 1e-3, sign, dist)
            z = rng.perturbation(seed, p.tensor_id, shape, dist)
            got = pe.apply(p)
            assert got.dtype == f32 and got.shape == shape
            np.testing.assert_array_equal(got, v + f32(pe.eps * pe.sign * p.pscale) * z)
            np.testing.assert_array_equal(pe.z(p), z)
            np.testing.assert_array_equal(p.value, v)      # the Param itself is untouched


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_perturbed_gemm_scales_same_on_both_rng_paths(dist):
    """The GEMMs regenerate each weight row's perturbed scales with rng_ops' 8-lane loop
    (internal.h scale_row -> rng_add_scaled): the outputs equal those of the scalar loop bit
    for bit, and those of the kernel given numpy's perturbed scales (kernels.perturbed_scales)."""
    from edgetune.quant import QTensor
    r = np.random.default_rng(5)
    n, k = 37, 576                      # 18 groups a row: two 8-lane blocks and a scalar tail
    codes = r.integers(0, 256, size=(n, k // 32, 16), dtype=np.uint8)
    scales = (0.01 + 0.05 * np.abs(r.standard_normal((n, k // 32)))).astype(f32)
    qt = QTensor("w", "q4", (n, k), codes=codes, scales=scales, mins=None, group=32, offset=8,
                 tensor_id=2**63 + 5)
    x = r.standard_normal((9, k)).astype(f32)
    p = kernels.Perturbation(seed=2**63 + 77, eps=1e-2, sign=-1, dist=dist)
    s2 = kernels.perturbed_scales(qt, p)
    qt2 = QTensor("w", "q4", (n, k), codes=codes, scales=s2, mins=None, group=32, offset=8,
                  tensor_id=qt.tensor_id)
    try:
        for path in kernels.available_paths():
            ys = []
            for simd in (True, False):
                kernels.ops_set_simd(simd)
                ys.append(kernels.qgemm(x, qt, perturb=p, path=path))
            np.testing.assert_array_equal(ys[0], ys[1])
            np.testing.assert_array_equal(ys[0], kernels.qgemm(x, qt2, path=path))
    finally:
        kernels.ops_set_simd(True)
