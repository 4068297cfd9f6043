"""qgemm: every available C++ path vs the float64 numpy reference; in-kernel perturbation; threads.

Tolerances.  Errors are measured against sqrt(Σ_k x²w²) per output (what a random dot product's
magnitude looks like).  The SIMD paths quantize activations to int8 per group (like llama.cpp's Q8
activations): against the plain float64 reference that is noise of ~0.5% of the natural scale
(Frobenius < 2e-2, max < 1e-1), but against the reference that rounds the activations the same
way (kernels.int8_activations) only fp32 accumulation is left: Frobenius < 1e-6 and max < 1e-5.
The scalar path computes in fp32: 1e-5 / 1e-4.  Runs that share the quantized activations
(perturbed vs explicitly perturbed scales, thread counts) must agree to ~1e-6 or bit for bit.
"""
import numpy as np
import pytest
import torch

from edgetune import kernels, quant
from edgetune.quant import QTensor

# a missing extension is an ImportError under EDGETUNE_REQUIRE_KERNELS=1 (make test, .ci/run):
# the skip is only for a bare `pytest` on a numpy-only install
pytestmark = pytest.mark.skipif(not kernels.HAVE_KERNELS, reason="edgetune._kernels not built")

PATHS = kernels.available_paths()
SHAPES = [(1, 1, 32), (3, 5, 96), (7, 33, 576), (16, 100, 1536), (64, 257, 4096)]
# (kind, offset or group, with mins)
FORMATS = [("q4", 0, True), ("q4", 0, False), ("q4", 8, False), ("q4", 8, True),
           ("q8", 32, False), ("q8", 16, True), ("q8", 16, False)]


def make_qt(kind, n, k, arg, mins, seed=0, tensor_id=11):
    r = np.random.default_rng(seed)
    if kind == "q4":
        codes = r.integers(0, 256, size=(n, k // 32, 16), dtype=np.uint8)
        g, offset = 32, arg
    else:
        g, offset = arg, 0
        codes = r.integers(-127, 128, size=(n, k // g, g)).astype(np.int8)
    scales = (0.01 + 0.05 * np.abs(r.standard_normal((n, k // g)))).astype(np.float32)
    if kind == "q8":
        scales /= 16
    mn = (0.1 * r.standard_normal((n, k // g))).astype(np.float32) if mins else None
    return QTensor("w", kind, (n, k), codes=codes, scales=scales, mins=mn, group=g, offset=offset,
                   tensor_id=tensor_id)


def make_x(m, k, seed=1):
    return np.random.default_rng(seed).standard_normal((m, k)).astype(np.float32)


def noise_scale(x, qt, scales=None):
    """Per-output natural scale sqrt(Σ_k x² w²) (shape [M, N])."""
    w = quant.dequantize(qt, scales).astype(np.float64)
    return np.sqrt((x.astype(np.float64) ** 2) @ (w ** 2).T)


def _errs(y, ref, scale):
    err = np.asarray(y, np.float64) - ref
    fro = np.linalg.norm(err) / max(np.linalg.norm(scale), 1e-30)
    mx = np.max(np.abs(err) / np.maximum(scale, 1e-30)) if err.size else 0.0
    return fro, mx


def assert_close(y, ref, scale, path, what=""):
    fro, mx = _errs(y, ref, scale)
    tol_fro, tol_max = (1e-5, 1e-4) if path == "scalar" else (2e-2, 1e-1)
    assert fro < tol_fro and mx < tol_max, f"{path} {what}: fro {fro:.3g} max {mx:.3g}"


def check_path(y, x, qt, path, perturb=None, what=""):
    """y of `path` against the float64 reference; SIMD paths also against the reference that
    rounds the activations to int8 as they do, to fp32 accumulation accuracy."""
    s2 = kernels.perturbed_scales(qt, perturb) if perturb is not None else None
    scale = noise_scale(x, qt, s2)
    assert_close(y, kernels.qgemm_reference(x, qt, perturb), scale, path, what)
    if path != "scalar":
        fro, mx = _errs(y, kernels.qgemm_reference(x, qt, perturb, act_int8=True), scale)
        assert fro < 1e-6 and mx < 1e-5, f"{path} {what} vs int8-activation reference: fro {fro:.3g} max {mx:.3g}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f[0]}-{f[1]}-{'mins' if f[2] else 'nomins'}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_paths_vs_reference(path, fmt, shape):
    m, n, k = shape
    qt = make_qt(fmt[0], n, k, fmt[1], fmt[2])
    x = make_x(m, k)
    y = kernels.qgemm(x, qt, path=path)
    assert y.shape == (m, n) and y.dtype == np.float32
    check_path(y, x, qt, path, what=f"{fmt} {shape}")


def fake_q4_1_buffer(n, k, seed=3):
    """A GGUF-like Q4_1 tensor: [N rows] x [K/32 blocks of 20 bytes: fp16 d, fp16 m, 16 codes],
    each row padded by 8 bytes, so codes is a strided zero-copy view (row and block strides)."""
    r = np.random.default_rng(seed)
    nb = k // 32
    buf = r.integers(0, 256, size=(n, nb * 20 + 8), dtype=np.uint8)
    blocks = buf[:, : nb * 20].reshape(n, nb, 20)
    codes = blocks[:, :, 4:]
    assert np.shares_memory(codes, buf) and codes.strides == (nb * 20 + 8, 20, 1)
    return buf, codes


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("offset,mins", [(0, True), (8, False)])
def test_strided_codes_view(path, offset, mins):
    m, n, k = 9, 70, 320
    _, codes = fake_q4_1_buffer(n, k)
    base = make_qt("q4", n, k, offset, mins)
    qt = QTensor("w", "q4", (n, k), codes=codes, scales=base.scales, mins=base.mins, offset=offset)
    x = make_x(m, k)
    dense = QTensor("w", "q4", (n, k), codes=np.ascontiguousarray(codes), scales=base.scales,
                    mins=base.mins, offset=offset)
    y = kernels.qgemm(x, qt, path=path)
    np.testing.assert_array_equal(y, kernels.qgemm(x, dense, path=path))
    check_path(y, x, qt, path, what="strided")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
@pytest.mark.parametrize("fmt", [("q4", 0, True), ("q4", 8, False), ("q8", 16, True), ("q8", 32, False)],
                         ids=lambda f: f"{f[0]}-{f[1]}-{f[2]}")
def test_perturbation(path, dist, fmt):
    m, n, k = 5, 67, 576
    qt = make_qt(fmt[0], n, k, fmt[1], fmt[2], tensor_id=2**63 + 5)
    x = make_x(m, k)
    for sign in (1, -1):
        p = kernels.Perturbation(seed=2**63 + 77, eps=1e-2, sign=sign, dist=dist)
        y = kernels.qgemm(x, qt, perturb=p, path=path)
        s2 = kernels.perturbed_scales(qt, p)
        assert not np.array_equal(s2, qt.scales)
        # 1. against the float64 reference on explicitly perturbed scales
        ref = kernels.qgemm_reference(x, qt, perturb=p)
        np.testing.assert_allclose(ref, kernels.qgemm_reference(x, QTensor(
            "w", qt.kind, qt.shape, codes=qt.codes, scales=s2, mins=qt.mins, group=qt.group,
            offset=qt.offset)), rtol=1e-12, atol=1e-12)
        check_path(y, x, qt, path, p, f"perturbed {fmt} sign {sign}")
        # 2. against the same kernel on explicitly perturbed scales (same quantized activations)
        qt2 = QTensor("w", qt.kind, qt.shape, codes=qt.codes, scales=s2, mins=qt.mins, group=qt.group,
                      offset=qt.offset, tensor_id=qt.tensor_id)
        y2 = kernels.qgemm(x, qt2, path=path)
        assert np.linalg.norm(y - y2) <= 1e-5 * np.linalg.norm(y2)
    # 3. sign: +eps and -eps are symmetric around the unperturbed result (linear in the scales)
    yp = kernels.qgemm(x, qt, perturb=(2**63 + 77, 1e-2, 1, dist), path=path)
    ym = kernels.qgemm(x, qt, perturb=(2**63 + 77, 1e-2, -1, dist), path=path)
    y0 = kernels.qgemm(x, qt, path=path)
    assert np.linalg.norm(yp - ym) > 1e-3 * np.linalg.norm(y0)
    assert np.linalg.norm((yp + ym) / 2 - y0) <= 1e-5 * np.linalg.norm(y0)
    # tensor_id matters
    qt3 = QTensor("w", qt.kind, qt.shape, codes=qt.codes, scales=qt.scales, mins=qt.mins,
                  group=qt.group, offset=qt.offset, tensor_id=12)
    assert not np.array_equal(kernels.qgemm(x, qt3, perturb=(2**63 + 77, 1e-2, 1, dist), path=path), yp)


@pytest.mark.parametrize("path", PATHS)
def test_thread_count_invariance(path):
    m, n, k = 37, 300, 1024
    qt = make_qt("q4", n, k, 0, True)
    x = make_x(m, k)
    p = kernels.Perturbation(5, 1e-3, -1, "gaussian")
    old = kernels.get_num_threads()
    try:
        kernels.set_num_threads(1)
        assert kernels.get_num_threads() == 1
        a = kernels.qgemm(x, qt, perturb=p, path=path)
        kernels.set_num_threads(2)
        b = kernels.qgemm(x, qt, perturb=p, path=path)
    finally:
        kernels.set_num_threads(old)
    np.testing.assert_array_equal(a, b)


def test_lm_head_shape():
    m, n, k = 2, 49152, 576
    qt = make_qt("q4", n, k, 0, True)
    x = make_x(m, k)
    y = kernels.qgemm(x, qt)
    check_path(y, x, qt, kernels.best_path(), what="lm head")


def test_torch_in_torch_out_and_out_argument():
    qt = make_qt("q4", 40, 96, 8, False)
    x = torch.randn(2, 3, 96)
    y = kernels.qgemm(x, qt)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, 40) and y.dtype == torch.float32
    ref = kernels.qgemm(x.numpy(), qt)
    np.testing.assert_array_equal(y.numpy(), ref)
    out = torch.empty(2, 3, 40)
    r = kernels.qgemm(x, qt, out=out)
    assert r is out
    np.testing.assert_array_equal(out.numpy(), ref)
    out_np = np.empty((2, 3, 40), np.float32)
    assert kernels.qgemm(x.numpy(), qt, out=out_np) is out_np
    np.testing.assert_array_equal(out_np, ref)
    # non-float32 / non-contiguous inputs are converted
    xd = x.numpy().astype(np.float64)[:, :, :]
    np.testing.assert_array_equal(kernels.qgemm(xd, qt), ref)
    np.testing.assert_array_equal(kernels.qgemm(x.transpose(0, 1).contiguous().transpose(0, 1), qt).numpy(), ref)


def test_f32_kind_and_empty_batch():
    w = np.random.default_rng(0).standard_normal((7, 64)).astype(np.float32)
    qt = QTensor("f", "f32", (7, 64), data=w)
    x = make_x(3, 64)
    np.testing.assert_allclose(kernels.qgemm(x, qt), x @ w.T, rtol=1e-5, atol=1e-5)
    q = make_qt("q4", 7, 64, 0, True)
    assert kernels.qgemm(np.zeros((0, 64), np.float32), q).shape == (0, 7)


def test_errors_are_value_errors():
    qt = make_qt("q4", 8, 64, 0, True)
    with pytest.raises(ValueError, match="K=64"):
        kernels.qgemm(make_x(2, 63), qt)
    bad = QTensor("w", "q4", (8, 48), codes=np.zeros((8, 1, 16), np.uint8),
                  scales=np.ones((8, 1), np.float32))
    with pytest.raises(ValueError, match="multiple of the group size 32"):
        kernels.qgemm(make_x(2, 48), bad)
    with pytest.raises(ValueError, match="codes"):
        kernels.qgemm(make_x(2, 64), QTensor("w", "q4", (8, 64), codes=np.zeros((8, 2, 8), np.uint8),
                                             scales=qt.scales))
    with pytest.raises(ValueError, match="scales"):
        kernels.qgemm(make_x(2, 64), QTensor("w", "q4", (8, 64), codes=qt.codes,
                                             scales=np.ones((8, 3), np.float32)))
    with pytest.raises(ValueError):
        kernels.qgemm(make_x(2, 64), qt, perturb=(1, 1e-3, 2))
    with pytest.raises(ValueError):
        kernels.qgemm(make_x(2, 64), qt, perturb=(1, 1e-3, 1, "cauchy"))
    with pytest.raises(ValueError, match="path"):
        kernels.qgemm(make_x(2, 64), qt, path="sse9")
    with pytest.raises(ValueError):
        kernels.qgemm(make_x(2, 64), qt, out=np.empty((2, 9), np.float32))
    k = kernels._kernels
    with pytest.raises(ValueError, match="float32"):
        k.qgemm_q4(make_x(2, 64).astype(np.float64), qt.codes, qt.scales)
    with pytest.raises(ValueError, match="codes"):
        k.qgemm_q4(make_x(2, 64), qt.codes.astype(np.float32), qt.scales)
    with pytest.raises(ValueError, match="contiguous"):
        k.qgemm_q4(make_x(2, 64), np.repeat(qt.codes, 2, axis=2)[:, :, ::2], qt.scales)
    with pytest.raises(ValueError, match="scales"):
        k.qgemm_q4(make_x(2, 64), qt.codes, qt.scales.astype(np.float64))
    with pytest.raises(ValueError, match="inner"):
        k.qgemm_q4(make_x(2, 32), qt.codes, qt.scales)
    with pytest.raises(ValueError, match="offset"):
        k.qgemm_q4(make_x(2, 64), qt.codes, qt.scales, None, 16)


def test_fallback_reference_matches_kernel(monkeypatch):
    qt = make_qt("q8", 20, 64, 16, True)
    x = make_x(4, 64)
    fast = kernels.qgemm(x, qt)
    monkeypatch.setattr(kernels, "HAVE_KERNELS", False)
    slow = kernels.qgemm(x, qt)
    assert_close(fast, slow.astype(np.float64), noise_scale(x, qt), "fallback")


# --- fused multi-matrix qgemm and the C++ transformer-block ops ---------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", [("q4", 0, True), ("q4", 8, False), ("q8", 16, True), ("q8", 32, False)],
                         ids=lambda f: f"{f[0]}-{f[1]}-{f[2]}")
def test_qgemm_multi_matches_separate_calls(path, fmt):
    """Fused segments (own scales/mins/tensor_id/perturbation each) == separate qgemm calls, bit for bit."""
    qts = [make_qt(fmt[0], n, 576, fmt[1], fmt[2], seed=i, tensor_id=10 + i)
           for i, n in enumerate([67, 32, 100])]
    x = make_x(37, 576)
    ps = [kernels.Perturbation(5, 1e-2, -1, "gaussian"), None, kernels.Perturbation(7, 1e-2)]
    y = kernels.qgemm_multi(x, qts, ps, path=path)
    ref = np.concatenate([kernels.qgemm(x, qt, p, path=path) for qt, p in zip(qts, ps)], -1)
    np.testing.assert_array_equal(y, ref)
    kernels.set_num_threads(1)
    try:
        np.testing.assert_array_equal(kernels.qgemm_multi(x, qts, ps, path=path), y)
    finally:
        kernels.set_num_threads(0)
    yt = kernels.qgemm_multi(torch.from_numpy(x), qts, ps, path=path)
    assert isinstance(yt, torch.Tensor) and np.array_equal(yt.numpy(), y)


def test_block_ops_vs_torch():
    import math
    import torch.nn.functional as F
    torch.manual_seed(0)
    x = torch.randn(37, 576) * 3
    w = torch.randn(576)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5), ref, rtol=1e-5, atol=1e-5)
    gu = torch.randn(37, 200) * 5
    g, u = gu[:, :100], gu[:, 100:]
    torch.testing.assert_close(kernels.silu_mul(g, u), F.silu(g) * u, rtol=1e-5, atol=1e-6)
    B, T, H, Hkv, hd = 3, 9, 6, 2, 16
    for neox in (False, True):
        for rd in (16, 8):
            qkv = torch.randn(B * T, (H + 2 * Hkv) * hd)
            q, k, v = qkv[:, :H * hd], qkv[:, H * hd:(H + Hkv) * hd], qkv[:, (H + Hkv) * hd:]
            ang = torch.outer(torch.arange(T).double(), 1 / (10000 ** (torch.arange(0, rd, 2).double() / rd)))
            cos, sin = ang.cos().float(), ang.sin().float()
            out = kernels.attention(q, k, v, B, T, H, Hkv, cos, sin, neox, 1 / math.sqrt(hd))

            def rope(t):
                xr, xp = t[..., :rd], t[..., rd:]
                if not neox:
                    x1, x2 = xr[..., 0::2], xr[..., 1::2]
                    o = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)
                else:
                    x1, x2 = xr[..., :rd // 2], xr[..., rd // 2:]
                    o = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)
                return torch.cat([o, xp], -1)
            qq = rope(q.reshape(B, T, H, hd).transpose(1, 2))
            kk = rope(k.reshape(B, T, Hkv, hd).transpose(1, 2))
            vv = v.reshape(B, T, Hkv, hd).transpose(1, 2)
            ref = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
            torch.testing.assert_close(out, ref.transpose(1, 2).reshape(B * T, H * hd), rtol=1e-5, atol=1e-5)


# --- the AMX path: bit for bit the avx512 path ----------------------------------------------------

AMX_FORMATS = [("q4", 8, False), ("q4", 0, True), ("q4", 0, False), ("q8", 32, False), ("q8", 16, True)]
needs_amx = pytest.mark.skipif("amx" not in PATHS, reason="no AMX-INT8 here (CPU without it, the OS "
                               "refused the tile state, or EDGETUNE_AMX=0): the amx path cannot run")


def test_amx_switch_off():
    """EDGETUNE_AMX=0 removes the amx path (best path falls back to avx512); without it, a CPU that
    lists amx_int8 in /proc/cpuinfo gets the amx path (the permission request succeeds on Linux)."""
    import os
    import subprocess
    import sys
    code = "from edgetune import kernels; print(' '.join(kernels.available_paths()))"
    env = dict(os.environ, EDGETUNE_AMX="0")
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "amx" not in off.stdout.split()
    assert ("avx512" in off.stdout.split()) == ("avx512" in PATHS)
    try:
        with open("/proc/cpuinfo") as f:
            cpu_amx = "amx_int8" in f.read().split()
    except OSError:
        cpu_amx = False
    if cpu_amx and "avx512" in PATHS and os.environ.get("EDGETUNE_AMX") != "0":
        assert "amx" in PATHS and kernels.best_path() == "amx"


@needs_amx
@pytest.mark.parametrize("fmt", AMX_FORMATS, ids=lambda f: f"{f[0]}-{f[1]}-{'mins' if f[2] else 'nomins'}")
@pytest.mark.parametrize("m", [1, 3, 16, 17, 512])
def test_amx_bitwise_equals_avx512(fmt, m):
    """q4_0 (offset 8), q4_1 (mins), q8_0 (group 32), q8 group 16: same int32 group dots, same fp32
    epilogue in the same order, so every output bit agrees — with and without the perturbation, on
    1 and 2 threads, for N not a multiple of the 16-wide tiles."""
    n, k = 67, 576
    qt = make_qt(fmt[0], n, k, fmt[1], fmt[2], tensor_id=2**63 + 9)
    x = make_x(m, k) * 3
    old = kernels.get_num_threads()
    try:
        for threads in (1, 2):
            kernels.set_num_threads(threads)
            for p in (None, kernels.Perturbation(2**63 + 77, 1e-2, 1), kernels.Perturbation(3, 1e-2, -1, "gaussian")):
                a = kernels.qgemm(x, qt, perturb=p, path="amx")
                b = kernels.qgemm(x, qt, perturb=p, path="avx512")
                assert a.view(np.uint32).tolist() == b.view(np.uint32).tolist(), f"threads {threads} perturb {p}"
        check_path(a, x, qt, "amx", p, what=f"{fmt} M={m}")
    finally:
        kernels.set_num_threads(old)


@needs_amx
@pytest.mark.parametrize("group", [32, 16])
def test_amx_multi_bitwise_equals_avx512(group):
    """qgemm_multi (the C++ block's call): q4_0, q4_1 and q8 segments of one call, perturbed or not,
    equal the avx512 path's qgemm_multi bit for bit; longer K (several tile pipelines' worth)."""
    k = 1536
    if group == 32:
        qts = [make_qt("q4", 83, k, 8, False, seed=1, tensor_id=21), make_qt("q4", 16, k, 0, True, seed=2, tensor_id=22),
               make_qt("q8", 45, k, 32, False, seed=3, tensor_id=23)]
    else:
        qts = [make_qt("q8", n, k, 16, mins, seed=i, tensor_id=30 + i) for i, (n, mins) in enumerate([(50, True), (33, False)])]
    ps = [kernels.Perturbation(5, 1e-2, -1, "gaussian"), None, kernels.Perturbation(7, 1e-2)][:len(qts)]
    old = kernels.get_num_threads()
    try:
        for m in (1, 17, 130):
            x = make_x(m, k, seed=m)
            for threads in (1, 2):
                kernels.set_num_threads(threads)
                a = kernels.qgemm_multi(x, qts, ps, path="amx")
                b = kernels.qgemm_multi(x, qts, ps, path="avx512")
                assert a.view(np.uint32).tolist() == b.view(np.uint32).tolist(), f"M={m} threads {threads}"
    finally:
        kernels.set_num_threads(old)


# -- prepacked q4 codes (QTensor.packed, kernels.prepack) ------------------------------------------

@pytest.mark.parametrize("n", [2, 31, 32, 67])
def test_prepack_matches_numpy_reference_on_strided_codes(n):
    """kernels' prepack_q4 lays out exactly the bytes quant.prepack_q4_reference describes, from a
    GGUF-like strided view (row padding, 20-byte blocks), zero rows past N."""
    k = 320
    _, codes = fake_q4_1_buffer(n, k, seed=n)
    got = kernels._kernels.prepack_q4(codes)
    want = quant.prepack_q4_reference(codes)
    assert got.dtype == np.uint8 and got.shape == want.shape == (-(-n // 32) * 32 * k // 2,)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("path", [p for p in PATHS if p in ("avx512", "amx")])
@pytest.mark.parametrize("offset,mins", [(0, True), (8, False)])
def test_packed_codes_are_bit_identical_to_codes(path, offset, mins):
    """The avx512/amx paths reading QTensor.packed give every bit the codes give: qgemm, qgemm_multi
    and perturbed, M from 1 to 130, N not a multiple of 32, strided codes."""
    k = 576
    for n in (67, 32, 5):
        _, codes = fake_q4_1_buffer(n, k, seed=n)
        base = make_qt("q4", n, k, offset, mins, seed=n)
        plain = QTensor("w", "q4", (n, k), codes=codes, scales=base.scales, mins=base.mins, offset=offset,
                        tensor_id=7)
        packed = QTensor("w", "q4", (n, k), codes=codes, scales=base.scales, mins=base.mins, offset=offset,
                         tensor_id=7, packed=quant.prepack_q4_reference(codes))
        other = make_qt("q4", 40, k, offset, mins, seed=99)
        for m in (1, 17, 130):
            x = make_x(m, k, seed=m)
            for p in (None, kernels.Perturbation(5, 1e-2, -1, "gaussian")):
                a = kernels.qgemm(x, packed, perturb=p, path=path)
                b = kernels.qgemm(x, plain, perturb=p, path=path)
                assert a.view(np.uint32).tolist() == b.view(np.uint32).tolist(), f"N={n} M={m} {p}"
            a = kernels.qgemm_multi(x, [packed, other], [None, kernels.Perturbation(3, 1e-2)], path=path)
            b = kernels.qgemm_multi(x, [plain, other], [None, kernels.Perturbation(3, 1e-2)], path=path)
            assert a.view(np.uint32).tolist() == b.view(np.uint32).tolist(), f"multi N={n} M={m}"


def test_prepack_is_used_and_checked():
    """kernels.prepack sets packed exactly when the best path reads it; a wrong packed array is a
    ValueError naming the tensor, never a silent wrong result; the packed bytes are what the
    kernels read (corrupting them changes the output)."""
    qt = make_qt("q4", 40, 320, 0, True)
    done = kernels.prepack(qt)
    assert done == (kernels.best_path() in ("avx512", "amx"))
    if not done:
        return
    np.testing.assert_array_equal(qt.packed, quant.prepack_q4_reference(qt.codes))
    x = make_x(4, 320)
    y = kernels.qgemm(x, qt)
    bad = QTensor("w1", "q4", (40, 320), codes=qt.codes, scales=qt.scales, mins=qt.mins,
                  packed=qt.packed[:-64])
    with pytest.raises(ValueError, match="w1.*packed"):
        kernels.qgemm(x, bad)
    flipped = QTensor("w", "q4", (40, 320), codes=qt.codes, scales=qt.scales, mins=qt.mins,
                      packed=qt.packed ^ np.uint8(0x11))
    assert not np.array_equal(kernels.qgemm(x, flipped), y)
    assert kernels.prepack(make_qt("q8", 8, 64, 32, False)) is False
