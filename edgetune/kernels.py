"""kernels: y = x · W^T for QTensors — the only importer of the C++ extension edgetune._kernels.

    qgemm(x, qt, perturb=None, out=None, path="auto")   fast path (C++; numpy fallback if missing)
    qgemm_reference(x, qt, perturb=None)                 float64 numpy reference
    Perturbation(seed, eps, sign=+1, dist="rademacher")  read every group scale of qt as
                                                         s + eps*sign*z(seed, qt.tensor_id, n*G+g)

The perturbation is an argument, not a write: the kernel adds eps·sign·z to the scales it reads
(z from the counter-based RNG of zo/rng.py, regenerated in C++), so nothing is restored afterwards.
block_forward(h, cfg, layers, ...) runs whole transformer blocks of any architecture in archs.py in
one C++ call (block_layer() describes a layer as data: its QTensors + scale perturbations, the
perturbed norm/bias values and each matrix's LinearTerms: LoRA, sparse deltas, calibration sums).
The C++ paths quantize activations to int8 per group (like llama.cpp's Q8 activations): expect
~1e-2 relative error against the float64 reference, identical results for any thread count;
`qgemm_reference(..., int8_activations=True)` rounds the activations the same way.

Without the extension the GEMMs and the RNG fall back to numpy (announced once on stderr at
import); the transformer forward (block_forward) has no Python twin outside tests and refuses
with a clear error.
EDGETUNE_REQUIRE_KERNELS=1 (set by `make test` and .ci/run) makes a missing or broken extension
an ImportError instead, so a broken build fails the test suite rather than skipping it.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np

from . import quant
from .zo import rng

try:
    from . import _kernels
    HAVE_KERNELS = True
    _IMPORT_ERROR = None
except ImportError as e:  # exercised by tests/test_build.py in a subprocess
    if os.environ.get("EDGETUNE_REQUIRE_KERNELS") == "1":
        raise ImportError(f"edgetune._kernels (the C++ extension) does not import: {e}. "
                          f"EDGETUNE_REQUIRE_KERNELS=1 forbids the numpy fallback; rebuild it "
                          f"with `make install`") from e
    _kernels = None
    HAVE_KERNELS = False
    _IMPORT_ERROR = e
    print(f"edgetune: the C++ extension edgetune._kernels is not available ({e}); falling back "
          f"to the slow numpy reference (set EDGETUNE_REQUIRE_KERNELS=1 to make this an error)",
          file=sys.stderr, flush=True)

_MASK64 = (1 << 64) - 1
DISTS = {"rademacher": 0, "gaussian": 1}


@dataclass(frozen=True)
class Perturbation:
    """In-kernel scale perturbation; tensor_id comes from the QTensor."""
    seed: int
    eps: float
    sign: int = 1
    dist: str = "rademacher"

    def __post_init__(self):
        if self.sign not in (1, -1):
            raise ValueError(f"Perturbation.sign must be +1 or -1, got {self.sign!r}")
        d = self.dist
        if isinstance(d, (int, np.integer)) and not isinstance(d, bool):
            if int(d) not in (0, 1):
                raise ValueError(f"Perturbation.dist must be 0/1 or a name in {tuple(DISTS)}, got {d!r}")
            object.__setattr__(self, "dist", rng.DISTRIBUTIONS[int(d)])
        elif d not in DISTS:
            raise ValueError(f"unknown perturbation distribution {d!r}; choose one of {tuple(DISTS)}")


def as_perturbation(p) -> Perturbation | None:
    """None, a Perturbation, or a tuple (seed, eps[, sign[, dist]])."""
    if p is None or isinstance(p, Perturbation):
        return p
    if isinstance(p, (tuple, list)) and 2 <= len(p) <= 4:
        return Perturbation(*p)
    if all(hasattr(p, a) for a in ("seed", "eps")):  # any object with the same fields
        return Perturbation(p.seed, p.eps, getattr(p, "sign", 1), getattr(p, "dist", "rademacher"))
    raise ValueError(f"perturb must be None, a Perturbation or (seed, eps, sign, dist), got {p!r}")


def perturbed_scales(qt: quant.QTensor, perturb) -> np.ndarray:
    """qt.scales + float32(eps*sign) * z, rounded exactly as the C++ kernels round it."""
    p = as_perturbation(perturb)
    s = np.asarray(qt.scales, dtype=np.float32)
    if p is None:
        return s
    z = rng.perturbation(p.seed, qt.tensor_id, s.shape, p.dist)
    return s + np.float32(p.eps * p.sign) * z


# --- helpers ------------------------------------------------------------------------------------

def _is_torch(a) -> bool:
    return type(a).__module__.split(".")[0] == "torch"


def _to_numpy_x(x):
    if _is_torch(x):
        if x.device.type != "cpu":
            raise ValueError(f"qgemm: x must be a CPU tensor, got device {x.device}")
        import torch
        x = x.detach()
        if x.dtype != torch.float32:
            x = x.to(torch.float32)
        return x.contiguous().numpy()
    return np.asarray(x)


def _check_x(x: np.ndarray, qt: quant.QTensor) -> tuple:
    if x.ndim < 1:
        raise ValueError("qgemm: x must have at least one dimension")
    n, k = qt.shape
    if x.shape[-1] != k:
        raise ValueError(f"qgemm: x has shape {tuple(x.shape)} but {qt.name or 'W'} is "
                         f"[N={n}, K={k}]: the last dimension of x must be K={k}")
    return x.shape[:-1]


def _check_codes(qt: quant.QTensor) -> None:
    n, k = qt.shape
    g = 32 if qt.kind == "q4" else qt.group
    if k % g:
        raise ValueError(f"qgemm: {qt.name or 'W'} has shape (N={n}, K={k}); K must be a multiple of "
                         f"the group size {g}")
    want = (n, k // g, 16 if qt.kind == "q4" else g)
    if qt.codes is None or tuple(qt.codes.shape) != want:
        got = None if qt.codes is None else tuple(qt.codes.shape)
        raise ValueError(f"qgemm: {qt.kind} codes of {qt.name or 'W'} (N={n}, K={k}) must have shape "
                         f"{want}, got {got}")
    if qt.scales is None or tuple(np.shape(qt.scales)) != (n, k // g):
        raise ValueError(f"qgemm: scales of {qt.name or 'W'} must have shape {(n, k // g)}, "
                         f"got {None if qt.scales is None else tuple(np.shape(qt.scales))}")


# --- public API ---------------------------------------------------------------------------------

def int8_activations(x, group: int) -> np.ndarray:
    """The activations the SIMD kernels actually multiply, as float64: the numpy twin of
    cpp_ext's quantize_act_row — per group of `group` values d = max|x| / 127 (fp32),
    q = round-half-even(x * (127 / max|x|)) clamped to +-127, x' = q * d."""
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    k = x32.shape[-1]
    xg = x32.reshape(-1, k // group, group)
    amax = np.abs(xg).max(-1, keepdims=True)
    d = amax / np.float32(127.0)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    q = np.clip(np.rint(xg * inv), -127, 127)
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(x32.shape)


def qgemm_reference(x, qt: quant.QTensor, perturb=None, act_int8: bool = False) -> np.ndarray:
    """float64 numpy x @ dequantize(qt, perturbed scales).T, shape (..., N).
    act_int8: first round x as the SIMD kernels do (int8_activations), so the remaining
    difference from a SIMD path is fp32 accumulation only."""
    xn = np.asarray(_to_numpy_x(x), dtype=np.float64)
    lead = _check_x(xn, qt)
    if act_int8 and qt.kind != "f32":
        xn = int8_activations(_to_numpy_x(x), 32 if qt.kind == "q4" else qt.group)
    if qt.kind == "f32":
        w = np.asarray(qt.data, dtype=np.float64)
    else:
        w = quant.dequantize(qt, perturbed_scales(qt, perturb)).astype(np.float64)
    return (xn.reshape(-1, qt.shape[1]) @ w.T).reshape(*lead, qt.shape[0])


def qgemm(x, qt: quant.QTensor, perturb=None, out=None, path: str = "auto"):
    """y = x @ W^T with W = qt dequantized on the fly, shape (..., N) float32.

    x: numpy array or torch CPU tensor [..., K] (converted to contiguous float32 if needed);
    the result has the same kind (torch in -> torch out, zero-copy).  out: optional float32
    C-contiguous array/tensor of the result's shape.  perturb: None, Perturbation or
    (seed, eps, sign, dist).  path: "auto" or one of available_paths() (for testing).
    """
    torch_in = _is_torch(x)
    xn = _to_numpy_x(x)
    lead = _check_x(xn, qt)
    n, k = qt.shape
    if qt.kind in ("q4", "q8"):
        _check_codes(qt)
    x2 = np.ascontiguousarray(xn.reshape(-1, k), dtype=np.float32)
    p = as_perturbation(perturb)

    out_np = None
    if out is not None:
        out_np = out.numpy() if _is_torch(out) else out
        if not isinstance(out_np, np.ndarray) or out_np.dtype != np.float32 \
                or not out_np.flags.c_contiguous or out_np.shape != (*lead, n):
            raise ValueError(f"qgemm: out must be a C-contiguous float32 array of shape {(*lead, n)}")
        out2 = out_np.reshape(-1, n)
    else:
        out2 = None

    if qt.kind == "f32":
        y = np.matmul(x2, np.asarray(qt.data, dtype=np.float32).T, out=out2)
    elif qt.kind not in ("q4", "q8"):
        raise ValueError(f"qgemm: unsupported QTensor kind {qt.kind!r}")
    elif not HAVE_KERNELS:
        y = qgemm_reference(x2, qt, p).astype(np.float32)
        if out2 is not None:
            out2[...] = y
            y = out2
    else:
        scales = np.ascontiguousarray(qt.scales, dtype=np.float32)
        mins = None if qt.mins is None else np.ascontiguousarray(qt.mins, dtype=np.float32)
        kw = dict(out=out2, path=path)
        if p is not None:
            kw.update(perturb=True, seed=int(p.seed) & _MASK64, tensor_id=int(qt.tensor_id) & _MASK64,
                      eps=float(p.eps), sign=int(p.sign), dist=DISTS[p.dist])
        if qt.kind == "q4":
            y = _kernels.qgemm_q4(x2, qt.codes, scales, mins, int(qt.offset), packed=_packed_of(qt), **kw)
        else:
            y = _kernels.qgemm_q8(x2, qt.codes, scales, mins, **kw)

    if out is not None:
        return out
    y = y.reshape(*lead, n)
    if torch_in:
        import torch
        return torch.from_numpy(y)
    return y


def _segment(qt: quant.QTensor, perturb) -> tuple:
    """qt + its perturbation as the C++ segment tuple (bits, codes, scales, mins, offset, perturb,
    seed, tensor_id, eps, sign, dist) of qgemm_multi and block_forward; for block_forward an f32
    QTensor is (32, its float32 [N, K] rows, ...) and has no scales to perturb."""
    p = as_perturbation(perturb)
    if qt.kind == "f32":
        if p is not None:
            raise ValueError(f"{qt.name or 'W'} is stored unquantized (f32): it has no group scales "
                             f"to perturb")
        data = np.ascontiguousarray(qt.data, dtype=np.float32)
        return (32, data, None, None, 0, False, 0, 0, 0.0, 1, 0)
    _check_codes(qt)
    bits = 4 if qt.kind == "q4" else 8
    scales = np.ascontiguousarray(qt.scales, dtype=np.float32)
    mins = None if qt.mins is None else np.ascontiguousarray(qt.mins, dtype=np.float32)
    packed = _packed_of(qt)
    if p is None:
        return (bits, qt.codes, scales, mins, int(qt.offset), False, 0, 0, 0.0, 1, 0, packed)
    return (bits, qt.codes, scales, mins, int(qt.offset), True, int(p.seed) & _MASK64,
            int(qt.tensor_id) & _MASK64, float(p.eps), int(p.sign), DISTS[p.dist], packed)


# the paths that read QTensor.packed (the others read codes)
_PACKED_PATHS = ("avx512", "amx")


def _packed_of(qt: quant.QTensor):
    """qt.packed if it is set (q4 only): checked against the codes' shape."""
    pk = getattr(qt, "packed", None)
    if pk is None or qt.kind != "q4":
        return None
    n, k = qt.shape
    want = -(-n // 32) * 32 * k // 2
    if pk.dtype != np.uint8 or pk.ndim != 1 or pk.size != want:
        raise ValueError(f"{qt.name or 'W'}: packed codes must be kernels.prepack's uint8 array of "
                         f"{want} bytes, got {pk.dtype} {pk.shape}")
    return pk


def prepack(qt: quant.QTensor) -> bool:
    """Give a resident q4 QTensor its prepacked codes (QTensor.packed) when this CPU's best path
    reads them (avx512, amx); a no-op elsewhere.  Returns whether packed codes are set.  The codes
    must not change afterwards (they never do: training changes scales and separate deltas)."""
    if qt.kind != "q4" or qt.codes is None or not HAVE_KERNELS or best_path() not in _PACKED_PATHS:
        return False
    _check_codes(qt)
    qt.packed = _kernels.prepack_q4(qt.codes)
    return True


def qgemm_multi(x, qts, perturbs=None, path: str = "auto"):
    """Fused [qgemm(x, qts[0], perturbs[0]), qgemm(x, qts[1], ...), ...] concatenated along the last
    axis (shape (..., ΣN), float32; torch in -> torch out).  Each QTensor keeps its own scales, mins
    and perturbation (own tensor_id); the activations are quantized once and one parallel loop
    covers every matrix.  Bit-identical to the separate calls.  Falls back to separate calls for
    mixed kinds/groups or without the extension."""
    qts = list(qts)
    perturbs = [None] * len(qts) if perturbs is None else list(perturbs)
    if len(perturbs) != len(qts):
        raise ValueError("qgemm_multi: need one perturbation (or None) per QTensor")
    torch_in = _is_torch(x)
    xn = _to_numpy_x(x)
    k = qts[0].shape[1]
    fusable = (HAVE_KERNELS and 1 <= len(qts) <= 16
               and all(qt.kind == qts[0].kind and qt.kind in ("q4", "q8") and qt.shape[1] == k
                       and qt.group == qts[0].group for qt in qts))
    if not fusable:
        ys = [qgemm(xn, qt, p, path=path) for qt, p in zip(qts, perturbs)]
        y = np.concatenate(ys, axis=-1)
    else:
        lead = _check_x(xn, qts[0])
        x2 = np.ascontiguousarray(xn.reshape(-1, k), dtype=np.float32)
        segs = [_segment(qt, p) for qt, p in zip(qts, perturbs)]
        n = sum(qt.shape[0] for qt in qts)
        y = np.empty((x2.shape[0], n), dtype=np.float32)
        _kernels.qgemm_multi(x2, segs, y, path=path)
        y = y.reshape(*lead, n)
    if torch_in:
        import torch
        return torch.from_numpy(y)
    return y


# --- transformer-block helpers (C++, on the kernel thread pool); torch float32 CPU tensors ------

def _np2d(t):
    """torch [R, C] float32 tensor with contiguous rows -> numpy view (no copy)."""
    return t.detach().numpy()


def rms_norm(x, w, eps: float):
    """x * rsqrt(mean(x², -1) + eps) * w over the last axis of a float32 array [..., D] (a new
    contiguous array; torch in -> torch out)."""
    d = x.shape[-1]
    wn = _vec32(w)
    if _is_torch(x):
        import torch
        x2 = x.reshape(-1, d)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        out = torch.empty(x2.shape, dtype=torch.float32)
        _kernels.rms_norm(_np2d(x2), wn, float(eps), out.numpy())
        return out.reshape(x.shape)
    x2 = np.asarray(x, np.float32).reshape(-1, d)
    if x2.strides[-1] != 4:
        x2 = np.ascontiguousarray(x2)
    out = np.empty(x2.shape, dtype=np.float32)
    _kernels.rms_norm(x2, wn, float(eps), out)
    return out.reshape(x.shape)


def silu_mul(g, u):
    """silu(g) * u for torch float32 [M, F] tensors with contiguous rows (new contiguous tensor)."""
    import torch
    if g.stride() != u.stride() or g.stride(-1) != 1:
        g, u = g.contiguous(), u.contiguous()
    out = torch.empty(g.shape, dtype=torch.float32)
    _kernels.silu_mul(_np2d(g), _np2d(u), out.numpy())
    return out


def attention(q, k, v, B: int, T: int, H: int, Hkv: int, cos, sin, neox: bool, scale: float,
              window: int = 0):
    """Causal attention with RoPE on token-major q [B*T, H*hd], k/v [B*T, Hkv*hd] (rows may be
    strided views); cos/sin [T, rope_dim/2]; window > 0: key j hidden from query p when
    p - j >= window.  Returns [B*T, H*hd]."""
    import torch
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty((q.shape[0], q.shape[1]), dtype=torch.float32)
    _kernels.attention(_np2d(q), _np2d(k), _np2d(v), int(B), int(T), int(H), int(Hkv),
                       _vec2d(cos), _vec2d(sin), bool(neox), float(scale), out.numpy(), int(window))
    return out


def _vec2d(t) -> np.ndarray:
    """A contiguous float32 numpy copy-or-view of a numpy array or torch tensor."""
    if _is_torch(t):
        t = t.detach().contiguous().numpy()
    return np.ascontiguousarray(t, dtype=np.float32)


def _vec32(v) -> np.ndarray:
    if _is_torch(v):
        import torch
        v = v.detach().to(torch.float32).contiguous().numpy()
    return np.ascontiguousarray(v, dtype=np.float32).reshape(-1)


@dataclass(frozen=True)
class LinearTerms:
    """What a trainable set adds to one matrix's output y = x W^T, as data for the C++ block:

    lora      None or (A [r, K], B [N, r], scale): y += scale * (x A^T) B^T, A and B as perturbed
              for this pass;
    sparse    None or (rows, cols, deltas) [n]: for i in order, y[:, rows[i]] += x[:, cols[i]] *
              deltas[i] (deltas as perturbed), after the LoRA term — torch's index_add order;
    input_sq  None or a float64 [K] array the block adds sum over rows of x**2 to (the sparse
              mask's calibration statistics)."""
    lora: tuple | None = None
    sparse: tuple | None = None
    input_sq: np.ndarray | None = None


def _terms(t):
    if t is None:
        return None
    if not isinstance(t, LinearTerms):
        raise ValueError(f"block_layer: a matrix's terms must be None or a LinearTerms, got {t!r}")
    lo = None if t.lora is None else (np.ascontiguousarray(t.lora[0], np.float32),
                                      np.ascontiguousarray(t.lora[1], np.float32), float(t.lora[2]))
    sp = None if t.sparse is None else (np.ascontiguousarray(t.sparse[0], np.int64),
                                        np.ascontiguousarray(t.sparse[1], np.int64),
                                        _vec32(t.sparse[2]))
    return (lo, sp, t.input_sq)


def block_layer(mats, perturbs, attn_norm, ffn_norm, biases=None, terms=None, head_norms=None,
                post_norms=None, window: int = 0, rope=None) -> tuple:
    """One transformer layer as data for block_forward.

    mats: 7 entries in the order q, k, v, o, gate, up, down: QTensors (q4/q8 codes or f32 rows), or
    None where a fused layout has no matrix (phi3: attn_qkv in q's place with k, v None; [gate; up]
    in up's place with gate None); perturbs: their scale perturbations (None / Perturbation /
    tuple each); attn_norm/ffn_norm: the norm weight vectors as they are to be used (already
    perturbed); biases: None or (q, k, v) bias vectors (already perturbed); terms: None or 7
    entries, each None or a LinearTerms; head_norms: None or (q_norm, k_norm) [head_dim] (qwen3,
    gemma3); post_norms: None or (post_attention_norm, post_ffw_norm) [n_embd] (gemma3); window:
    0 or the sliding window (key j hidden from query p when p - j >= window); rope: None or this
    layer's own (cos, sin) [T, rope_dim/2].  Vectors and tables may be numpy arrays or torch tensors."""
    if len(mats) != 7 or len(perturbs) != 7:
        raise ValueError("block_layer: need 7 matrices (q, k, v, o, gate, up, down) and 7 perturbations")
    terms = [None] * 7 if terms is None else list(terms)
    if len(terms) != 7:
        raise ValueError("block_layer: need 7 term entries (None for nothing added)")
    segs = [None if qt is None else _segment(qt, p) for qt, p in zip(mats, perturbs)]
    b = None if biases is None else tuple(None if v is None else _vec32(v) for v in biases)
    hn = None if head_norms is None else tuple(_vec32(v) for v in head_norms)
    pn = None if post_norms is None else tuple(_vec32(v) for v in post_norms)
    cos, sin = (None, None) if rope is None else (_vec2d(rope[0]), _vec2d(rope[1]))
    return (segs, _vec32(attn_norm), _vec32(ffn_norm), b, [_terms(t) for t in terms], hn, pn,
            int(window), cos, sin)


def block_forward(h, cfg: tuple, layers: list, B: int, T: int, cos, sin, out=None, path: str = "auto",
                  keep_rows=None):
    """Transformer blocks (block_layer tuples, applied in order) on h [B*T, n_embd] float32 in one
    C++ call (edgetune/block.h): RMSNorm, q/k/v (+biases, head norms, LoRA, sparse), RoPE, GQA
    causal (or sliding-window) attention, o, post norm, residual, RMSNorm, gate/up, SiLU or
    GELU(tanh) gate * up, down, post norm, residual.  cfg: (n_embd, n_head, n_head_kv, head_dim,
    n_ff, rope_dim, neox, rms_eps, attn_scale, act) with act 0 = SiLU, 1 = GELU(tanh); cos/sin
    [T, rope_dim/2] (numpy or torch).  h and out are numpy arrays or torch tensors (out may be h);
    returns out (new, h's kind, when None).

    keep_rows: None, or a 1-D integer array of row indices into B*T (any order, repeats allowed):
    only those rows are wanted and out is [len(keep_rows), n_embd], in that order.  The last layer
    then runs its o-projection, residual and FFN on those rows only (its q/k/v and attention still
    cover every row); each row is bit-identical to the full forward's.  A last layer with
    calibration sums (LinearTerms.input_sq) on o/gate/up/down runs in full (the sums see every row)."""
    if not HAVE_KERNELS:
        raise RuntimeError(f"the transformer forward runs in the C++ extension edgetune._kernels, "
                           f"which does not import ({_IMPORT_ERROR}); rebuild it with `make install`")
    torch_in = _is_torch(h)
    hn = h.detach().contiguous().numpy() if torch_in else np.ascontiguousarray(h, np.float32)
    keep = None
    if keep_rows is not None:
        keep = np.asarray(keep_rows.numpy() if _is_torch(keep_rows) else keep_rows)
        if keep.ndim != 1 or not (keep.dtype.kind in "iu" or keep.size == 0):
            raise ValueError(f"block_forward: keep_rows must be a 1-D array of integer row indices "
                             f"into B*T, got dtype {keep.dtype} shape {keep.shape}")
        keep = np.ascontiguousarray(keep, np.int64)
        n = int(B) * int(T)
        bad = (keep < 0) | (keep >= n)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"block_forward: keep_rows[{i}] = {int(keep[i])} is outside "
                             f"0..{n - 1} (B*T = {n} rows)")
    if out is None:
        on = np.empty_like(hn) if keep is None else np.empty((keep.size, hn.shape[-1]), np.float32)
        if torch_in:
            import torch
            res = torch.from_numpy(on)
        else:
            res = on
    else:
        on = out.numpy() if _is_torch(out) else out
        res = out
    _kernels.block_forward(hn, on, tuple(cfg), list(layers), int(B), int(T), _vec2d(cos), _vec2d(sin),
                           path, keep)
    return res


def add_rms_norm(a, b, w, eps: float):
    """(s, n): s = a + b and n = rms_norm(s, w, eps) in one pass over the rows (the block's residual
    add fused with the RMSNorm after it; bit-identical to the two ops).  float32 numpy [M, D]."""
    a2, b2 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    s, n = np.empty(a2.shape, np.float32), np.empty(a2.shape, np.float32)
    _kernels.add_rms_norm(a2, b2, _vec32(w), float(eps), s, n)
    return s, n


def gelu_mul(g, u):
    """gelu_tanh(g) * u (the block's GELU gate, float32 [M, F]; numpy or torch, h's kind out)."""
    torch_in = _is_torch(g)
    gn, un = _vec2d(g), _vec2d(u)
    out = np.empty(gn.shape, np.float32)
    _kernels.gelu_mul(gn, un, out)
    if torch_in:
        import torch
        return torch.from_numpy(out)
    return out


def block_arena_bytes() -> int:
    return int(_kernels.block_arena_bytes()) if HAVE_KERNELS else 0


def block_last_ffn_rows() -> int:
    """Rows the last layer of the latest block_forward call ran its o-projection and FFN on:
    B*T, or len(keep_rows) when it skipped the rows nobody reads (tests check the skip)."""
    return int(_kernels.block_last_ffn_rows())


def _dist_id(dist) -> int:
    if isinstance(dist, (int, np.integer)) and not isinstance(dist, bool) and int(dist) in (0, 1):
        return int(dist)
    if dist in DISTS:
        return DISTS[dist]
    raise ValueError(f"unknown perturbation distribution {dist!r}; choose one of {tuple(DISTS)}")


def rng_perturbation(seed: int, tensor_id: int, shape, dist="rademacher", offset: int = 0) -> np.ndarray:
    """z for elements offset.. of a tensor (float32, shaped like `shape`); = zo.rng.perturbation."""
    shp = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if not HAVE_KERNELS:
        return rng.perturbation(seed, tensor_id, shp, rng.DISTRIBUTIONS[_dist_id(dist)], offset)
    n = int(np.prod(shp)) if shp else 1
    return _kernels.rng_perturbation(int(seed) & _MASK64, int(tensor_id) & _MASK64, n, _dist_id(dist),
                                     int(offset) & _MASK64).reshape(shp)


def rng_axpy(out: np.ndarray, alpha: float, seed: int, tensor_id: int, dist="rademacher",
             offset: int = 0) -> np.ndarray:
    """In place: out += float32(alpha) * z(seed, tensor_id, offset + flat index); returns out.
    Rounds exactly like numpy's `out += np.float32(alpha) * z` (the ZO update without storing z)."""
    d = _dist_id(dist)
    if not HAVE_KERNELS:
        out += np.float32(alpha) * rng.perturbation(seed, tensor_id, out.shape, rng.DISTRIBUTIONS[d], offset)
        return out
    _kernels.rng_axpy(out, float(alpha), int(seed) & _MASK64, int(tensor_id) & _MASK64, d, int(offset) & _MASK64)
    return out


def set_num_threads(n: int) -> None:
    """Kernel threads (n <= 0: all cores)."""
    if HAVE_KERNELS:
        _kernels.set_num_threads(int(n))


def get_num_threads() -> int:
    return _kernels.get_num_threads() if HAVE_KERNELS else 1


def available_paths() -> list:
    """C++ kernel paths this CPU runs, slowest to fastest ([] without the extension)."""
    return list(_kernels.available_paths()) if HAVE_KERNELS else []


def best_path() -> str:
    return _kernels.best_path() if HAVE_KERNELS else "numpy"


def ops_simd() -> bool:
    """Whether rms_norm / silu_mul / attention and the rng stream run as AVX-512 intrinsics
    (else as the portable C++ loops; both are bit-identical)."""
    return bool(_kernels.ops_simd()) if HAVE_KERNELS else False


def ops_set_simd(on: bool) -> bool:
    """Use the AVX-512 intrinsics (the default where the CPU has them) or force the portable
    loops (tests compare the two); returns whether the intrinsics are used now."""
    return bool(_kernels.ops_set_simd(bool(on))) if HAVE_KERNELS else False
