"""Export a run: a merged GGUF that llama.cpp runs, or a llama.cpp LoRA adapter GGUF.

    edgetune export --run runs/x --format gguf      --out tuned.gguf
    edgetune export --run runs/x --format gguf-lora --out adapter.gguf

    export_gguf(run_dir, out, model=None, overwrite=False) -> Path
    export_lora_adapter(run_dir, out, model=None, overwrite=False) -> Path

The run's state is rebuilt on the source model (train/runstate.apply_run: snapshot + seed-log
tail), then the output is streamed tensor by tensor (row chunks of <= 16 MB of float32), so a 7B
model is never held in RAM.  The file is written to a temporary name in the output's directory,
fsync'd and renamed: a failed export leaves no partial file, and an existing file is only replaced
with overwrite=True.

Merged GGUF (`--format gguf`)
  * every metadata key of the source is copied with its GGUF type (strings byte-exact);
    general.name gets a " (edgetune <run>)" suffix; edgetune.* keys record the provenance.
  * every tensor no trainable touched is copied byte for byte.
  * norms / biases: the tuned float32 vectors (as F32).
  * scales (QZO) on Q4_0/Q4_1/Q8_0 tensors: the integer codes are kept exactly and the tuned
    scales are packed back into blocks of the same type (pack_blocks).  GGUF block scales are fp16
    (relative resolution 2^-11..2^-10), so an update below half an fp16 step vanishes.  Measured
    on SmolLM2-135M Q4_1 (210 tuned matrices), run `finetune --method scales --steps 40 --lr 1e-4`
    (its scales moved by ~2% relative), and on the same update scaled down (= 10x/100x smaller lr):
        update  rounding      ||W_exp-W_tuned|| / ||W_tuned-W_base||   ||fp16(s')-s|| / ||s'-s||   groups changed
        x1      nearest       0.015                                     1.000                       98.1%
        x1      compensate    0.014                                     1.000                       98.1%
        x1      stochastic    0.021                                     1.000                       98.1%
        x1      Q8_0 requant  0.173 (its own rounding noise is ~12x the fp16 loss)
        x0.1    nearest 0.152, compensate 0.140, stochastic 0.215                                   81%
        x0.01   nearest 0.949, compensate 0.929, stochastic 1.72                                    4.5%
    So a real run's update survives fp16 (98.5%); only far smaller updates are lost, and then no
    int4/int8-sized encoding keeps them (use rounding="f16").  The default, "compensate", picks
    per block the fp16 pair (d', m') minimizing the block's squared weight error
    ||(s'q + m) - (d'q + m')||^2 over d' in {fp16 below s', fp16 above s'} and m' in {m, fp16
    below/above m + (s' - d') * mean(q)}: d's rounding error is pushed into the block's min (Q4_1),
    preserving the block mean as far as m's own fp16 grid allows (m ~ -7.5 d, so that grid is ~8x
    coarser and the gain is modest, 2-8%); the candidates include round-to-nearest, so it is never
    worse per block.  For Q4_0/Q8_0 (no min) it is round-to-nearest.  Stochastic rounding is
    unbiased but adds ~40% more error.  Other choices: "nearest", "stochastic", "q8_0"/"f16"
    (re-encode the tuned float weights; larger file).
  * sparse deltas: the tuned weights (W + delta) of only the affected blocks are re-encoded in the
    tensor's type; per block the better (smaller squared error vs the tuned float block) of
    (a) re-rounding the codes with the block's own (d, m) and (b) encode_blocks of the tuned block
    is kept; every other block keeps its bytes.  Int4 steps are large next to small deltas, so
    most of a small delta is lost: on the tiny model (sparse,norms, lr 1e-2) 12 of 71 affected
    blocks were re-encoded and the residual energy is 35% of the deltas' (0.0013 vs 0.0038);
    pass report={} to export_gguf for a run's numbers.
  * LoRA: W' = W + (alpha/r) B A is re-quantized; default type Q8_0 (lora_type="q8_0"): measured
    on the tiny test model (12 steps, lr 1e-3) the weight residual ||W_exp - W_tuned|| /
    ||(alpha/r) B A|| is 0.021 with Q8_0 and 0.34 with Q4_1 re-encoding, the max logit error 0.007
    vs 0.035 (the LoRA update itself moves logits by 0.11).  lora_type="same" re-encodes into the source type instead.
  * K-quants (Q4_K/Q5_K/Q6_K) are written back in the same type (kquant.py): tuned scales refit
    each changed super-block's fp16 d and integer sub-scales with codes and mins kept; LoRA-merged
    or sparse-tuned matrices re-encode only the super-blocks whose weights changed.
  * tensors of other types (F16, BF16) that were tuned are written as Q8_0 (matrices) or F32.
  * head (the label-word rows): output.weight with W + delta on those rows (a tied-embedding
    model gets its own output.weight, a copy of token_embd, so the input embeddings stay); the
    bias set has no GGUF equivalent and is refused.
  * step: which state is exported — "best" (the best dev step; default), "last", or a number;
    the seed log is replayed to it.

LoRA adapter (`--format gguf-lora`) — llama.cpp's convert_lora_to_gguf conventions:
  general.type = "adapter", adapter.type = "lora", adapter.lora.alpha = alpha (llama.cpp scales by
  alpha / r, r = rows of lora_a, the same scale edgetune trains with), general.architecture copied,
  tensors "<base tensor>.lora_a" numpy [r, K] (ggml ne [K, r]) and ".lora_b" numpy [N, r], F32.
  Only a pure LoRA run can be exported so; a run that also tuned scales/norms/sparse is refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import EdgetuneError, FormatError
from ..formats.gguf_writer import BLOCK_BYTES, GGUFStreamWriter, encode_blocks, pack_blocks
from ..formats.gguf_writer import check_output as _check_out, write_atomic as _write_atomic
from ..kquant import K_TYPES

CHUNK_ELEMS = 4 << 20            # float32 elements per processing chunk (16 MB)
ROUNDINGS = ("compensate", "nearest", "stochastic", "q8_0", "f16")
LORA_TYPES = ("q8_0", "same")


# ---------------------------------------------------------------------------------------------
# run + model

def _open_run(run_dir, model, step="best"):
    from ..train.runstate import open_run
    return open_run(run_dir, model, step)


def _copy_metadata(src, w: GGUFStreamWriter, skip=()):
    """Copy every metadata key of the source (GGUFFile) with its GGUF type (from edgetune's own
    reader: no second parse of the file); strings are valid UTF-8, so .encode() is byte-exact."""
    from gguf import GGUFValueType as VT
    md = src.metadata
    for key in md:
        if key == "general.architecture" or key in skip:
            continue
        t = md.value_type(key)
        val = md[key]
        if key == "general.alignment":
            w.meta.add_custom_alignment(int(val))
            w.alignment = w.meta.data_alignment
            continue
        if t.startswith("ARRAY["):
            sub = VT[t[6:-1]]
            if sub == VT.ARRAY:
                raise FormatError(src.path, f"metadata key {key!r} is a nested array, which the "
                                            f"exporter cannot copy")
            vals = list(val)
            if not vals:
                continue           # empty arrays cannot be written by the gguf package
            if sub == VT.STRING:
                vals = [v.encode("utf-8") for v in vals]
            w.meta.add_key_value(key, vals, VT.ARRAY, sub_type=sub)
        elif t == "STRING":
            w.meta.add_key_value(key, val.encode("utf-8"), VT.STRING)
        else:
            w.meta.add_key_value(key, val, VT[t])


# ---------------------------------------------------------------------------------------------
# block helpers

def _f16_of(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)[..., 0]


def _block_fields(qtype: str, blocks: np.ndarray):
    """blocks uint8 [..., bs] -> (d, m or None, integer codes [..., 32] with offset removed)."""
    d = _f16_of(blocks[..., 0:2])
    if qtype == "Q8_0":
        return d, None, np.ascontiguousarray(blocks[..., 2:34]).view(np.int8).astype(np.int32)
    nib = blocks[..., 2:18] if qtype == "Q4_0" else blocks[..., 4:20]
    q = np.concatenate([nib & 0x0F, nib >> 4], axis=-1).astype(np.int32)
    if qtype == "Q4_0":
        return d, None, q - 8
    return d, _f16_of(blocks[..., 2:4]), q


def _decode_blocks(qtype: str, blocks: np.ndarray) -> np.ndarray:
    d, m, q = _block_fields(qtype, blocks)
    w = q.astype(np.float64) * d[..., None].astype(np.float64)
    if m is not None:
        w = w + m[..., None]
    return w.astype(np.float32)


def _f16_bracket(x: np.ndarray):
    """fp16 values (as float32) just below and above x (equal when x is representable)."""
    x = np.asarray(x, np.float32)
    h = x.astype(np.float16)
    hf = h.astype(np.float32)
    lo = np.where(hf > x, np.nextafter(h, np.float16(-np.inf)), h).astype(np.float32)
    hi = np.where(hf < x, np.nextafter(h, np.float16(np.inf)), h).astype(np.float32)
    return lo, hi


def round_scales(qtype: str, codes_int: np.ndarray, s_new: np.ndarray, m: np.ndarray | None,
                 rounding: str = "compensate", rng: np.random.Generator | None = None):
    """fp16-representable (d', m') for tuned scales s_new of blocks with integer codes.

    codes_int [n, nb, 32] (offset removed), s_new/m [n, nb].  Returns float32 (d', m' or None).
    """
    s_new = np.asarray(s_new, np.float32)
    if rounding == "nearest" or (rounding == "compensate" and m is None):
        d = s_new.astype(np.float16).astype(np.float32)
        return d, m
    lo, hi = _f16_bracket(s_new)
    if rounding == "stochastic":
        rng = rng or np.random.default_rng(0)
        span = (hi - lo).astype(np.float64)
        p = np.where(span > 0, (s_new - lo) / np.where(span > 0, span, 1), 0.0)
        d = np.where(rng.random(s_new.shape) < p, hi, lo).astype(np.float32)
        return d, m
    if rounding != "compensate":
        raise ValueError(f"unknown rounding {rounding!r}")
    # Q4_1: minimize sum_k ((s'-d') q_k + (m - m'))^2 over 2 x 3 fp16 candidates
    q = codes_int.astype(np.float64)
    sq, sq2, n = q.sum(-1), (q * q).sum(-1), q.shape[-1]
    s64, m64 = s_new.astype(np.float64), m.astype(np.float64)
    best_e = np.full(s_new.shape, np.inf)
    best_d = s_new.astype(np.float16).astype(np.float32)
    best_m = m.astype(np.float32)
    for dc in (lo, hi):
        dd = s64 - dc                                      # d error
        mstar = (m64 + dd * sq / n).astype(np.float32)
        mlo, mhi = _f16_bracket(mstar)
        for mc in (m.astype(np.float32), mlo, mhi):
            dm = m64 - mc
            e = dd * dd * sq2 + 2 * dd * dm * sq + n * dm * dm
            better = e < best_e
            best_e = np.where(better, e, best_e)
            best_d = np.where(better, dc, best_d)
            best_m = np.where(better, mc, best_m)
    return best_d.astype(np.float32), best_m.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# the merged GGUF

class _Plan:
    def __init__(self, name, shape, qtype, chunks):
        self.name, self.shape, self.qtype, self.chunks = name, shape, qtype, chunks


def _raw_chunks(rt):
    data = rt.data
    rows = data.shape[0]
    step = max(1, (16 << 20) // max(1, data.shape[1]))
    for r in range(0, rows, step):
        yield data[r:r + step]


def _tuned_rows(qt, ts, r0: int, r1: int) -> np.ndarray:
    """Tuned float32 weights of rows r0:r1 (tuned scales + LoRA merge + sparse deltas)."""
    from ..quant import dequantize, slice_rows
    w = dequantize(slice_rows(qt, np.arange(r0, r1)))
    lo = ts.lora.get(qt.name)
    if lo is not None:
        w += np.float32(lo.scale) * (lo.b.value[r0:r1] @ lo.a.value)
    sp = ts.sparse.get(qt.name)
    if sp is not None:
        rows = sp.rows
        sel = (rows >= r0) & (rows < r1)
        np.add.at(w, (rows[sel] - r0, sp.cols[sel]), sp.delta.value[sel])
    return w


class _Stats:
    """Accumulates squared errors for the export report."""

    def __init__(self):
        self.d = {}

    def add(self, key, **kv):
        e = self.d.setdefault(key, {})
        for k, v in kv.items():
            e[k] = e.get(k, 0.0) + float(v)

    def report(self) -> dict:
        out = {}
        for key, e in self.d.items():
            r = dict(e)
            if e.get("upd2", 0) > 0:
                r["residual_over_update"] = float(np.sqrt(e.get("res2", 0) / e["upd2"]))
            if e.get("sdiff2", 0) > 0:
                r["fp16_scale_survival"] = float(np.sqrt(e["sur2"] / e["sdiff2"]))
                r["fp16_scale_cosine"] = float(e["sdot"] / np.sqrt(e["sdiff2"] * max(e["sur2"], 1e-300)))
            if e.get("groups", 0) > 0:
                r["share_groups_changed"] = e.get("changed", 0) / e["groups"]
            out[key] = r
        return out


def _matrix_plan(name, rt, qt, base_qt, ts, rounding, lora_type, stats):
    """Out type + chunk generator for one tuned matrix."""
    src_type = rt.type_name
    has_scales = name in ts.scales
    has_lora = name in ts.lora
    has_sparse = name in ts.sparse
    block = src_type in BLOCK_BYTES
    n, k = rt.shape
    if src_type in K_TYPES:
        return _kquant_plan(name, rt, qt, base_qt, ts, stats)
    if has_lora:
        out_type = "Q8_0" if (lora_type == "q8_0" or not block) else src_type
        kind = "lora"
    elif not block:
        out_type, kind = "Q8_0", "requant"
    elif has_scales and rounding in ("q8_0", "f16"):
        out_type, kind = rounding.upper(), "requant"
    else:
        out_type, kind = src_type, "pack"
    bs = BLOCK_BYTES.get(src_type)
    nb = k // 32
    step = max(1, CHUNK_ELEMS // k)
    rng = np.random.default_rng(qt.tensor_id + 12345)
    sp = ts.sparse.get(name)

    def chunks():
        from ..quant import dequantize, slice_rows
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            wt = (_tuned_rows(qt, ts, r0, r1)
                  if (kind != "pack" or has_sparse or stats is not None) else None)
            if kind in ("lora", "requant"):
                if out_type == "F16":
                    outb = wt.astype(np.float16).view(np.uint8)
                    wx = outb.view(np.float16).astype(np.float32)
                else:
                    outb = encode_blocks(wt, out_type)
                    wx = (_decode_blocks(out_type, outb.reshape(r1 - r0, nb, -1)).reshape(r1 - r0, k)
                          if stats is not None else None)
            else:
                raw = rt.data[r0:r1].reshape(r1 - r0, nb, bs)
                d0, m0, q = _block_fields(src_type, raw)
                if has_scales:
                    s_new = ts.scales[name].value[r0:r1]
                    d1, m1 = round_scales(src_type, q, s_new, m0, rounding, rng)
                    codes = np.ascontiguousarray(raw[..., 2:34]).view(np.int8) if src_type == "Q8_0" \
                        else raw[..., (2 if src_type == "Q4_0" else 4):]
                    blocks = pack_blocks(src_type, codes, d1, m1).reshape(r1 - r0, nb, bs)
                    if stats is not None:
                        ds = s_new.astype(np.float64) - d0
                        dr = d1.astype(np.float64) - d0
                        stats.add(name.split(".")[-2], sdiff2=(ds * ds).sum(), sur2=(dr * dr).sum(),
                                  sdot=(ds * dr).sum(), groups=d0.size, changed=(d1 != d0).sum())
                else:
                    blocks = np.array(raw)
                if has_sparse:
                    blocks = _fix_sparse(src_type, blocks, wt, sp, r0, r1, stats, name)
                outb = blocks.reshape(r1 - r0, -1)
                wx = _decode_blocks(src_type, blocks).reshape(r1 - r0, k) if stats is not None else None
            if stats is not None:
                wb = dequantize(slice_rows(base_qt, np.arange(r0, r1)))
                upd, res = wt - wb, wx - wt
                stats.add(f"{kind}:{out_type}", upd2=(upd.astype(np.float64) ** 2).sum(),
                          res2=(res.astype(np.float64) ** 2).sum())
            yield outb
    return _Plan(name, rt.shape, out_type, chunks)


def _kquant_plan(name, rt, qt, base_qt, ts, stats):
    """A tuned Q4_K/Q5_K/Q6_K matrix written back in its own type (kquant.py): tuned scales alone
    refit each changed super-block's (d, sc) with codes and mins kept; LoRA / sparse re-encode the
    super-blocks whose float weights changed.  Unchanged super-blocks keep their bytes."""
    from ..kquant import BLOCK_BYTES as KB, decode, refit_scales, requantize_changed
    t = rt.type_name
    n, k = rt.shape
    nb, bs = k // 256, KB[t]
    only_scales = name in ts.scales and name not in ts.lora and name not in ts.sparse
    step = max(1, CHUNK_ELEMS // k)

    def chunks():
        from ..quant import dequantize, slice_rows
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            raw = np.asarray(rt.data[r0:r1]).reshape(r1 - r0, nb, bs)
            wt = _tuned_rows(qt, ts, r0, r1) if (not only_scales or stats is not None) else None
            if only_scales:
                s_new = ts.scales[name].value[r0:r1]
                blocks, stored = refit_scales(t, raw, s_new)
                if stats is not None:
                    s0 = slice_rows(base_qt, np.arange(r0, r1)).scales.astype(np.float64)
                    ds, dr = s_new.astype(np.float64) - s0, stored.astype(np.float64) - s0
                    stats.add(name.split(".")[-2], sdiff2=(ds * ds).sum(), sur2=(dr * dr).sum(),
                              sdot=(ds * dr).sum(), groups=s0.size, changed=(dr != 0).sum())
            else:
                w_old = decode(raw.reshape(r1 - r0, -1), t, k)
                blocks = requantize_changed(t, raw, wt, w_old)
            if stats is not None:
                wx = decode(blocks.reshape(r1 - r0, -1), t, k)
                wb = dequantize(slice_rows(base_qt, np.arange(r0, r1)))
                upd, res = wt - wb, wx - wt
                stats.add(f"{'kscales' if only_scales else 'krequant'}:{t}",
                          upd2=(upd.astype(np.float64) ** 2).sum(),
                          res2=(res.astype(np.float64) ** 2).sum())
            yield blocks.reshape(r1 - r0, -1)
    return _Plan(name, rt.shape, t, chunks)


def _fix_sparse(qtype, blocks, wt, sp, r0, r1, stats, name):
    """Re-encode the blocks of rows r0:r1 that hold sparse deltas (best of re-round / re-encode)."""
    rows = sp.rows
    sel = (rows >= r0) & (rows < r1)
    if not sel.any():
        return blocks
    n, nb, bs = blocks.shape
    key = np.unique((rows[sel] - r0) * nb + sp.cols[sel] // 32)
    br, bb = np.divmod(key, nb)
    target = wt.reshape(n, nb, 32)[br, bb]                       # [M, 32]
    cur = blocks[br, bb]                                          # [M, bs]
    # (a) keep the block's (d, m), re-round its codes to the tuned weights
    d, m, q = _block_fields(qtype, cur)
    safe = np.where(d != 0, d, 1)[:, None]
    t = target - (m[:, None] if m is not None else 0)
    if qtype == "Q8_0":
        qa = np.clip(np.round(t / safe), -128, 127).astype(np.int8)
        a = cur.copy()
        a[:, 2:34] = qa.view(np.uint8)
    else:
        off = 8 if qtype == "Q4_0" else 0
        qa = np.clip(np.round(t / safe) + off, 0, 15).astype(np.uint8)
        qa = np.where(d[:, None] != 0, qa, q + off).astype(np.uint8)
        a = cur.copy()
        a[:, -16:] = qa[:, :16] | (qa[:, 16:] << 4)
    # (b) encode the tuned block from scratch
    b = encode_blocks(target, qtype).reshape(-1, bs)
    ea = ((_decode_blocks(qtype, a) - target).astype(np.float64) ** 2).sum(-1)
    eb = ((_decode_blocks(qtype, b) - target).astype(np.float64) ** 2).sum(-1)
    blocks = blocks.copy()
    blocks[br, bb] = np.where((eb < ea)[:, None], b, a)
    if stats is not None:
        e0 = ((_decode_blocks(qtype, cur) - target).astype(np.float64) ** 2).sum()
        stats.add("sparse_blocks", blocks=len(key), reencoded=(eb < ea).sum(),
                  res2_before=e0, res2_after=np.minimum(ea, eb).sum(),
                  delta2=(sp.delta.value[sel].astype(np.float64) ** 2).sum())
    return blocks


def _provenance(w, header, run_dir, src_path, what):
    cfg = header.get("config", {})
    from ..version import __version__
    w.meta.add_string("edgetune.version", str(__version__))
    w.meta.add_string("edgetune.export", what)
    w.meta.add_string("edgetune.run", os.path.basename(os.path.normpath(str(run_dir))))
    w.meta.add_string("edgetune.source_model", os.path.basename(src_path))
    w.meta.add_string("edgetune.methods", str(cfg.get("method", "")))
    w.meta.add_uint32("edgetune.steps", int(header.get("_steps", 0)))
    w.meta.add_string("edgetune.config", json.dumps(cfg, sort_keys=True))


def _head_plan(src, ts) -> _Plan:
    """output.weight with the tuned label rows (W + head delta).  A model with tied embeddings
    (no output.weight; SmolLM2) gets its own output.weight — a copy of token_embd — so the
    label words' input embeddings stay untouched; llama.cpp uses output.weight when present.
    Q8_0/F16/F32 sources keep their type (only the label rows' blocks are re-encoded);
    a 4-bit head is written as Q8_0 so the small deltas survive."""
    name = "output.weight" if "output.weight" in src.tensors else "token_embd.weight"
    rt = src.tensors[name]
    qt = src.qtensor(name)
    delta = next(iter(ts.head.values())).value
    rows = np.asarray(ts.head_rows, np.int64)
    n, k = rt.shape
    out_type = rt.type_name if rt.type_name in ("Q8_0", "F16", "F32") else "Q8_0"
    step = max(1, CHUNK_ELEMS // k)

    def chunks():
        from ..quant import dequantize_rows
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            hit = (rows >= r0) & (rows < r1)
            if out_type == rt.type_name and not hit.any():
                yield np.asarray(rt.data[r0:r1]).reshape(r1 - r0, -1)
                continue
            w = dequantize_rows(qt, np.arange(r0, r1))
            np.add.at(w, rows[hit] - r0, delta[hit])
            if out_type == "F32":
                yield w.astype(np.float32).view(np.uint8)
            elif out_type == "F16":
                yield w.astype(np.float16).view(np.uint8)
            elif out_type == rt.type_name:   # Q8_0: re-encode only the rows that changed
                raw = np.array(np.asarray(rt.data[r0:r1]).reshape(r1 - r0, -1))
                for r in rows[hit] - r0:
                    raw[r] = encode_blocks(w[r:r + 1], out_type).reshape(-1)
                yield raw
            else:
                yield encode_blocks(w, out_type).reshape(r1 - r0, -1)
    return _Plan("output.weight", rt.shape, out_type, chunks)


def export_gguf(run_dir, out, model=None, overwrite: bool = False, *, rounding: str = "compensate",
                lora_type: str = "q8_0", report: dict | None = None, step="best") -> Path:
    """Write a complete GGUF with the run's tuned state merged; returns the output path.

    rounding: how tuned scales become fp16 block scales (see module doc; default "compensate").
    lora_type: "q8_0" (default) or "same" for LoRA-merged matrices.
    report: if a dict is given, it is filled with error measurements (costs one extra dequant).
    """
    from ..formats.gguf_reader import GGUFFile
    if rounding not in ROUNDINGS:
        raise EdgetuneError(f"unknown rounding {rounding!r}; choose from {', '.join(ROUNDINGS)}")
    if lora_type not in LORA_TYPES:
        raise EdgetuneError(f"unknown lora type {lora_type!r}; choose from {', '.join(LORA_TYPES)}")
    out = _check_out(out, overwrite)
    src_path, m, ts, header = _open_run(run_dir, model, step)
    if ts.label_bias is not None:
        raise EdgetuneError(f"{run_dir}: the run trained 'bias' (a logit offset per label word); "
                            f"a llama-architecture GGUF has no output bias, so llama.cpp cannot "
                            f"carry it. Export refused rather than dropped: train with --method "
                            f"head (the label rows, which export exactly) instead of bias")
    src = GGUFFile(src_path)                    # pristine view (the model's scales are tuned)
    qts = m.net.qtensors()
    stats = _Stats() if report is not None else None
    plans = []
    tuned_mats = set(ts.scales) | set(ts.lora) | set(ts.sparse)
    for name, rt in src.tensors.items():
        if name in tuned_mats:
            base = src.qtensor(name) if stats is not None else None
            plans.append(_matrix_plan(name, rt, qts[name], base, ts, rounding, lora_type, stats))
        elif name in ts.norms:
            vec = np.ascontiguousarray(ts.norms[name][0].value, dtype=np.float32)
            if vec.size != int(np.prod(rt.shape)):
                raise EdgetuneError(f"{name}: tuned vector has {vec.size} values, source tensor "
                                    f"{rt.shape}")
            plans.append(_Plan(name, rt.shape, "F32",
                               (lambda v=vec: iter([v.reshape(-1).view(np.uint8)]))))
        else:
            plans.append(_Plan(name, rt.shape, rt.type_name, (lambda r=rt: _raw_chunks(r))))
    for t in list(ts.norms):
        if t not in src.tensors:
            raise EdgetuneError(f"{src_path}: tuned tensor {t!r} is not in the model file")
    if ts.head:
        plans = [p for p in plans if p.name != "output.weight"] + [_head_plan(src, ts)]
    arch = src.require("general.architecture")
    run_name = os.path.basename(os.path.normpath(str(run_dir)))

    def fill(w):
        _copy_metadata(src, w, skip=("general.name",))
        w.meta.add_string("general.name", f"{src.get('general.name', 'model')} (edgetune {run_name})")
        _provenance(w, header, run_dir, src_path, "gguf")
        from gguf import GGMLQuantizationType as GT
        for p in plans:
            if p.qtype in ("F32", "F16", "Q4_0", "Q4_1", "Q8_0"):
                w.add_tensor_info(p.name, p.shape, p.qtype)
            else:                                   # copied K-quant / BF16 etc.: raw bytes
                nbytes = int(src.tensors[p.name].data.nbytes)
                w.meta.add_tensor_info(p.name, p.shape, np.dtype(np.float32), nbytes,
                                       raw_dtype=GT[p.qtype])
                from ..formats.gguf_writer import _TensorPlan
                w._plan.append(_TensorPlan(p.name, tuple(p.shape), p.qtype, nbytes))
        w.write_head()
        for p in plans:
            w.write_tensor(p.name, p.chunks())

    _write_atomic(out, arch, fill)
    if report is not None:
        report.update(stats.report())
    return out


# ---------------------------------------------------------------------------------------------
# LoRA adapter

def export_lora_adapter(run_dir, out, model=None, overwrite: bool = False, step="best") -> Path:
    """Write a llama.cpp LoRA adapter GGUF for a pure `lora` run; returns the output path."""
    out = _check_out(out, overwrite)
    src_path, m, ts, header = _open_run(run_dir, model, step)
    if not ts.lora:
        raise EdgetuneError(f"{run_dir}: the run has no LoRA adapters (methods: "
                            f"{','.join(ts.methods)}); export it with --format gguf instead")
    other = [x for x in ts.methods if x != "lora"]
    if other:
        raise EdgetuneError(f"{run_dir}: the run also tuned {', '.join(other)}, which a LoRA "
                            f"adapter cannot carry; export the merged model with --format gguf")
    from ..formats.gguf_reader import GGUFFile
    src = GGUFFile(src_path)
    arch = src.require("general.architecture")
    cfg = header.get("config", {})
    alpha = float(cfg.get("lora_alpha", 16.0))
    items = []
    for name, lo in ts.lora.items():
        r = lo.a.value.shape[0]
        if abs(lo.scale - alpha / r) > 1e-6 * max(1.0, abs(lo.scale)):
            raise EdgetuneError(f"{name}: LoRA scale {lo.scale} != alpha/r = {alpha}/{r}")
        items.append((f"{name}.lora_a", np.ascontiguousarray(lo.a.value, np.float32)))
        items.append((f"{name}.lora_b", np.ascontiguousarray(lo.b.value, np.float32)))
    run_name = os.path.basename(os.path.normpath(str(run_dir)))

    def fill(w):
        w.meta.add_string("general.type", "adapter")
        w.meta.add_string("general.name", f"{src.get('general.name', 'model')} LoRA (edgetune {run_name})")
        w.meta.add_string("adapter.type", "lora")
        w.meta.add_float32("adapter.lora.alpha", alpha)
        _provenance(w, header, run_dir, src_path, "gguf-lora")
        for n, a in items:
            w.add_tensor_info(n, a.shape, "F32")
        w.write_head()
        for n, a in items:
            w.write_tensor(n, [a.reshape(-1).view(np.uint8)])

    return _write_atomic(out, arch, fill)
