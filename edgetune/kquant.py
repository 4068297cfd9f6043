"""K-quants out: encode float weights as ggml Q4_K / Q5_K / Q6_K super-blocks, and write tuned scales
back into a K-quant tensor without touching its codes.

Super-block layouts (256 elements, little-endian; formats/gguf_reader.py decodes them):
  Q4_K 144 B  fp16 d | fp16 dmin | 12 B six-bit (sc, mn) x 8 | 128 B nibbles
              sub-block j (32 elements): w = d*sc_j*q - dmin*mn_j, q in 0..15
  Q5_K 176 B  as Q4_K, plus 32 B of fifth bits (bit j of byte l = bit 4 of element 32j+l), q 0..31
  Q6_K 210 B  128 B low nibbles | 64 B high 2-bit pairs | 16 x int8 sc | fp16 d
              sub-block j (16 elements): w = d*sc_j*q, q in -32..31

What `scales` training changes on a K-quant tensor: edgetune holds each sub-block's effective scale
d*sc_j as one float32 (QTensor.scales: 8 per Q4_K/Q5_K super-block, 16 per Q6_K), and the kernels
perturb those fused, like any group scale.  The mins (dmin*mn_j) stay fixed.  To store a tuned tensor
in its own type (`refit_scales`), the codes and the mins are kept byte for byte, and per super-block
the pair (fp16 d, integer sc_j) that best represents the tuned scales is searched: d over the fp16
values within +-SEARCH_ULPS steps of max(s)/sc_max and of the original d, sc_j = round(s_j / d)
clipped to the type's range.  Super-blocks whose scales did not change keep their bytes.  What
survives is measured by tests/test_kquant.py and reported by export (`report=`): sc_j has 6 bits
(Q4_K/Q5_K: 0..63) or 8 (Q6_K), so a sub-block scale moves in steps of ~1/40 of itself; a shared
change of the super-block moves d, which is fp16 (2^-11 relative) and survives almost entirely.

Survival 1 - ||stored - s'|| / ||s' - s|| measured on a 256 x 2048 Gaussian matrix (std 0.02) for
a random relative change of every sub-block scale (independent) or of each super-block's scales
together (common), with kquant.refit_scales:
    change      0.1%   0.3%   1%     3%     10%
    Q4_K indep  0.05   0.07   0.56   0.85   0.95     common  0.82  0.94  0.98  0.99  1.00
    Q5_K indep  0.03   0.09   0.57   0.86   0.96     common  0.68  0.89  0.97  0.99  1.00
    Q6_K indep  0.00   0.19   0.74   0.91   0.97     common  0.09  0.62  0.89  0.96  0.99
So changes below ~1% per sub-block mostly round away, larger ones survive; a LoRA merge into a
4-bit tensor is usually smaller than half a code step and keeps the codes (tests/test_archs.py
prints residual/update per run: ~1.0 for LoRA on Q4_K, 0.1-0.9 for scales).

`encode` (float -> blocks) is round-to-nearest with ggml's layout: per sub-block scale (and min,
clamped so 0 is representable as in ggml), the sub-block scales/mins quantized to 6 (Q6_K: 8) bits
under one fp16 super-scale, then the codes re-rounded with the stored scales.  It is not ggml's
iterative search (make_qkx2/make_qx_quants), so it is slightly less accurate, never differently
laid out: llama.cpp reads what it writes.  Used for LoRA-merged and sparse-tuned K-quant tensors
and for synthetic K-quant models.
"""
from __future__ import annotations

import numpy as np

QK_K = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
K_TYPES = tuple(BLOCK_BYTES)
SEARCH_ULPS = 16


def _f16b(x: np.ndarray) -> np.ndarray:
    """float [...] -> uint8 [..., 2] fp16 bits."""
    x = np.ascontiguousarray(np.asarray(x, np.float32).astype(np.float16))
    return x.view(np.uint8).reshape(*x.shape, 2)


def _f16v(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)[..., 0]


def _check(w: np.ndarray, qtype: str) -> tuple:
    if qtype not in BLOCK_BYTES:
        raise ValueError(f"{qtype} is not a K-quant type (choose from {', '.join(K_TYPES)})")
    w = np.asarray(w, np.float32)
    if w.ndim != 2 or w.shape[1] % QK_K:
        raise ValueError(f"{qtype}: expected [N, K] with K a multiple of {QK_K}, got {w.shape}")
    return w.shape[0], w.shape[1] // QK_K


def pack_scale_min(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins [..., 8] -> the 12-byte Q4_K/Q5_K field (inverse of
    gguf_reader.k_scale_min)."""
    sc = sc.astype(np.uint8)
    mn = mn.astype(np.uint8)
    out = np.empty(sc.shape[:-1] + (12,), np.uint8)
    out[..., 0:4] = (sc[..., :4] & 0x3F) | ((sc[..., 4:] >> 4) << 6)
    out[..., 4:8] = (mn[..., :4] & 0x3F) | ((mn[..., 4:] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4)
    return out


def _safe_div(a, b):
    return np.where(b != 0, a / np.where(b != 0, b, 1), 0.0)


def _quant_sub(v: np.ndarray, vmax: int):
    """Non-negative sub-block values [..., S] -> (fp16 super-scale [...], ints [..., S] 0..vmax)."""
    d = _f16v(_f16b(v.max(axis=-1) / vmax))
    q = np.clip(np.rint(_safe_div(v, d[..., None])), 0, vmax)
    return d, q


def encode(w: np.ndarray, qtype: str) -> np.ndarray:
    """float32 [N, K] -> uint8 [N, K/256 * block bytes] of `qtype` blocks (round-to-nearest)."""
    n, nb = _check(w, qtype)
    if qtype == "Q6_K":
        b = w.reshape(n, nb, 16, 16).astype(np.float32)
        idx = np.abs(b).argmax(axis=-1)
        mx = np.take_along_axis(b, idx[..., None], axis=-1)[..., 0]
        s = mx / -32.0                                             # [n, nb, 16] signed
        amax = np.abs(s).max(axis=-1)
        d = _f16v(_f16b(amax / 127.0))
        sc = np.clip(np.rint(_safe_div(s, d[..., None])), -128, 127)
        eff = d[..., None] * sc
        q = np.clip(np.rint(_safe_div(b, eff[..., None])), -32, 31).astype(np.int16)
        return pack_q6_k(d, sc.astype(np.int8), q.reshape(n, nb, QK_K))
    b = w.reshape(n, nb, 8, 32).astype(np.float32)
    qmax = 15 if qtype == "Q4_K" else 31
    lo = np.minimum(b.min(axis=-1), 0.0)                          # ggml: the min is <= 0
    hi = b.max(axis=-1)
    s = (hi - lo) / qmax
    d, sc = _quant_sub(s, 63)
    dmin, mn = _quant_sub(-lo, 63)
    eff_s = d[..., None] * sc
    eff_m = dmin[..., None] * mn
    q = np.clip(np.rint(_safe_div(b + eff_m[..., None], eff_s[..., None])), 0, qmax).astype(np.uint8)
    return pack_q45_k(qtype, d, dmin, sc, mn, q.reshape(n, nb, QK_K))


def pack_q45_k(qtype, d, dmin, sc, mn, q) -> np.ndarray:
    """Q4_K/Q5_K fields -> blocks.  d, dmin [n, nb]; sc, mn [n, nb, 8] ints 0..63; q [n, nb, 256]
    codes 0..15 (0..31 for Q5_K)."""
    n, nb = d.shape
    q = q.astype(np.uint8).reshape(n, nb, 4, 2, 32)               # chunk c: sub-blocks 2c, 2c+1
    qs = (q[:, :, :, 0] & 0x0F) | ((q[:, :, :, 1] & 0x0F) << 4)   # [n, nb, 4, 32]
    parts = [_f16b(d), _f16b(dmin), pack_scale_min(sc, mn)]
    if qtype == "Q5_K":
        hb = (q.reshape(n, nb, 8, 32) >> 4) & 0x01
        qh = np.zeros((n, nb, 32), np.uint8)
        for j in range(8):
            qh |= (hb[:, :, j] << j).astype(np.uint8)
        parts.append(qh)
    parts.append(qs.reshape(n, nb, 128))
    return np.ascontiguousarray(np.concatenate(parts, axis=-1)).reshape(n, -1)


def pack_q6_k(d, sc, q) -> np.ndarray:
    """Q6_K fields -> blocks.  d [n, nb]; sc [n, nb, 16] int8; q [n, nb, 256] codes -32..31."""
    n, nb = d.shape
    u = (q.astype(np.int16) + 32).astype(np.uint8).reshape(n, nb, 2, 4, 32)  # chunk, j, l
    ql = np.empty((n, nb, 2, 64), np.uint8)
    ql[..., 0:32] = (u[:, :, :, 0] & 0x0F) | ((u[:, :, :, 2] & 0x0F) << 4)
    ql[..., 32:64] = (u[:, :, :, 1] & 0x0F) | ((u[:, :, :, 3] & 0x0F) << 4)
    qh = np.zeros((n, nb, 2, 32), np.uint8)
    for j in range(4):
        qh |= (((u[:, :, :, j] >> 4) & 0x03) << (2 * j)).astype(np.uint8)
    parts = [ql.reshape(n, nb, 128), qh.reshape(n, nb, 64),
             np.ascontiguousarray(sc.astype(np.int8)).view(np.uint8), _f16b(d)]
    return np.ascontiguousarray(np.concatenate(parts, axis=-1)).reshape(n, -1)


def decode(blocks: np.ndarray, qtype: str, k: int) -> np.ndarray:
    """blocks uint8 [N, K/256 * bytes] -> float32 [N, K] (through the reader's exact conversion)."""
    from .formats.gguf_reader import RawTensor, to_qtensor
    from .quant import dequantize
    n = blocks.shape[0]
    return dequantize(to_qtensor(RawTensor("k", qtype, (n, k), np.asarray(blocks), 0)))


def refit_scales(qtype: str, raw: np.ndarray, s_new: np.ndarray):
    """Tuned sub-block scales back into K-quant blocks, codes and mins unchanged.

    raw: uint8 [n, nb, bytes] source blocks; s_new: float32 [n, nb * S] tuned effective scales
    (S = 8 for Q4_K/Q5_K, 16 for Q6_K).  Returns (blocks [n, nb, bytes], stored scales [n, nb*S]):
    per changed super-block the (fp16 d, integer sc) closest to s_new in squared error; super-blocks
    whose scales equal the stored ones keep their bytes."""
    n, nb, bs = raw.shape
    out = np.array(raw)
    if qtype == "Q6_K":
        d0 = _f16v(raw[..., 208:210])
        sc0 = np.ascontiguousarray(raw[..., 192:208]).view(np.int8).astype(np.float32)
        lo, hi = -128, 127
    else:
        from .formats.gguf_reader import k_scale_min
        d0 = _f16v(raw[..., 0:2])
        sc0, mn0 = k_scale_min(np.ascontiguousarray(raw[..., 4:16]))
        sc0 = sc0.astype(np.float32)
        lo, hi = 0, 63
    S = sc0.shape[-1]
    s_old = d0[..., None] * sc0
    s = np.asarray(s_new, np.float32).reshape(n, nb, S)
    changed = np.any(s != s_old, axis=-1)
    if changed.any():
        ss, dd0 = s[changed], d0[changed]                      # [m, S], [m]
        amax = np.abs(ss).max(axis=-1)
        bits0 = np.stack([dd0, amax / hi], -1).astype(np.float16).view(np.int16)   # [m, 2]
        steps = np.arange(-SEARCH_ULPS, SEARCH_ULPS + 1, dtype=np.int16)
        cand = (bits0[:, :, None] + steps).reshape(len(ss), -1).view(np.float16).astype(np.float32)
        cand = np.where(np.isfinite(cand) & (cand > 0), cand, dd0[:, None])        # [m, C]
        sc = np.clip(np.rint(_safe_div(ss[:, None, :], cand[..., None])), lo, hi)  # [m, C, S]
        err = ((cand[..., None] * sc - ss[:, None, :]) ** 2).sum(-1)
        best = err.argmin(-1)
        d_best = cand[np.arange(len(ss)), best]
        sc_best = sc[np.arange(len(ss)), best]
        blk = out[changed]
        if qtype == "Q6_K":
            blk[:, 192:208] = sc_best.astype(np.int8).view(np.uint8)
            blk[:, 208:210] = _f16b(d_best)
        else:
            blk[:, 0:2] = _f16b(d_best)
            blk[:, 4:16] = pack_scale_min(sc_best, mn0[changed])
        out[changed] = blk
    if qtype == "Q6_K":
        stored = _f16v(out[..., 208:210])[..., None] * \
            np.ascontiguousarray(out[..., 192:208]).view(np.int8).astype(np.float32)
    else:
        from .formats.gguf_reader import k_scale_min
        stored = _f16v(out[..., 0:2])[..., None] * \
            k_scale_min(np.ascontiguousarray(out[..., 4:16]))[0].astype(np.float32)
    return out, stored.reshape(n, nb * S).astype(np.float32)


def _reround(qtype: str, raw: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Blocks raw [m, bytes] with their codes re-rounded to w [m, 256] under the blocks' own stored
    scales and mins (d, sc, dmin, mn unchanged)."""
    m = raw.shape[0]
    if qtype == "Q6_K":
        d = _f16v(raw[:, 208:210])
        sc = np.ascontiguousarray(raw[:, 192:208]).view(np.int8)
        eff = (d[:, None] * sc.astype(np.float32))[:, :, None]
        q = np.clip(np.rint(_safe_div(w.reshape(m, 16, 16), eff)), -32, 31)
        return pack_q6_k(d[:, None], sc[:, None], q.reshape(m, 1, QK_K)).reshape(m, -1)
    from .formats.gguf_reader import k_scale_min
    d, dmin = _f16v(raw[:, 0:2]), _f16v(raw[:, 2:4])
    sc, mn = k_scale_min(np.ascontiguousarray(raw[:, 4:16]))
    eff_s = (d[:, None] * sc.astype(np.float32))[:, :, None]
    eff_m = (dmin[:, None] * mn.astype(np.float32))[:, :, None]
    qmax = 15 if qtype == "Q4_K" else 31
    q = np.clip(np.rint(_safe_div(w.reshape(m, 8, 32) + eff_m, eff_s)), 0, qmax)
    return pack_q45_k(qtype, d[:, None], dmin[:, None], sc[:, None], mn[:, None],
                      q.reshape(m, 1, QK_K)).reshape(m, -1)


def requantize_changed(qtype: str, raw: np.ndarray, w_new: np.ndarray, w_old: np.ndarray) -> np.ndarray:
    """Re-encode only the super-blocks whose float weights changed (LoRA merge, sparse deltas);
    raw uint8 [n, nb, bytes], w_new/w_old float32 [n, nb*256].  Per changed super-block the better
    (smaller squared error to w_new) of re-rounding its codes under its own scales and mins, and a
    fresh `encode`, is kept.  Returns blocks [n, nb, bytes]."""
    n, nb, bs = raw.shape
    out = np.array(raw)
    wn = np.asarray(w_new, np.float32).reshape(n, nb, QK_K)
    ch = np.any(wn != np.asarray(w_old, np.float32).reshape(n, nb, QK_K), axis=-1)
    if ch.any():
        target = wn[ch]                                          # [m, 256]
        cands = [_reround(qtype, raw[ch], target), encode(target, qtype)]
        errs = [((decode(c, qtype, QK_K) - target) ** 2).sum(-1) for c in cands]
        out[ch] = np.where((errs[1] < errs[0])[:, None], cands[1], cands[0])
    return out
