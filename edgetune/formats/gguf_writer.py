"""GGUF out: ggml block encoders (Q4_0 / Q4_1 / Q8_0) and a streaming GGUF writer.

Block layouts (32 elements per block, little-endian):
  Q4_0  18 bytes  fp16 d | 16 bytes nibbles          w = d * (q - 8)
  Q4_1  20 bytes  fp16 d | fp16 m | 16 bytes nibbles w = d * q + m
  Q8_0  34 bytes  fp16 d | 32 x int8                 w = d * q
Nibble byte j of a block holds element j in its low nibble and element j+16 in its high nibble.

Three ways to make block bytes, all returning uint8 [N, (K//32) * block_bytes]:
  encode_blocks(w, qtype)              float32 [N, K] -> blocks, round-to-nearest exactly like ggml's
                                       quantize_row_*_ref (re-encoding its own dequantization is exact)
  pack_blocks(qtype, codes, d, m)      integer codes + scales (+ mins) -> blocks, no rounding of codes
                                       (scales/mins are stored as fp16). This is the exact inverse of
                                       dequantization for any block; export of tuned scales uses it.
  random_blocks(qtype, n_rows, k, rng, std)   random codes with plausible scales (synthetic models)

GGUFStreamWriter writes header, metadata and tensor infos first, then each tensor's data in
chunks, so a multi-GB model never has to be in RAM.  write_atomic(out, arch, fill) wraps it: a
temporary file in out's directory, fsync'd and renamed, so a failure never leaves a partial `out`.
add_llama_hparams / add_file_type write the metadata keys llama.cpp reads for a llama-family model.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import EdgetuneError

QK = 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
QUANT_TYPES = tuple(BLOCK_BYTES)
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7,   # gguf.LlamaFileType.MOSTLY_*
             "Q4_K_M": 15}
K_BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}   # 256-element super-blocks (kquant.py)


def _qname(qtype) -> str:
    """Accepts 'q4_0', 'Q4_0', or a gguf.GGMLQuantizationType; returns 'Q4_0' etc."""
    name = getattr(qtype, "name", qtype)
    if not isinstance(name, str):
        raise ValueError(f"unknown quant type {qtype!r}")
    up = name.upper()
    if up not in BLOCK_BYTES and up not in K_BLOCK_BYTES and up not in ("F32", "F16", "Q4_K_M"):
        raise ValueError(f"unsupported quant type {name!r} (supported: "
                         f"{', '.join(q.lower() for q in QUANT_TYPES)})")
    return up


def ggml_type(qtype):
    """gguf.GGMLQuantizationType for a name like 'q4_0'."""
    import gguf
    return gguf.GGMLQuantizationType[_qname(qtype)]


def row_nbytes(qtype, k: int) -> int:
    q = _qname(qtype)
    if q == "F32":
        return 4 * k
    if q == "F16":
        return 2 * k
    if q in K_BLOCK_BYTES:
        if k % 256:
            raise ValueError(f"{q}: row length {k} is not a multiple of 256")
        return (k // 256) * K_BLOCK_BYTES[q]
    if k % QK:
        raise ValueError(f"{q}: row length {k} is not a multiple of {QK}")
    return (k // QK) * BLOCK_BYTES[q]


def tensor_nbytes(qtype, shape) -> int:
    shape = tuple(int(s) for s in shape)
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return rows * row_nbytes(qtype, shape[-1])


def _check_2d(w: np.ndarray, what: str) -> tuple[int, int]:
    if w.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D [N, K] array, got shape {w.shape}")
    n, k = w.shape
    if k % QK:
        raise ValueError(f"{what}: K={k} is not a multiple of {QK}")
    return n, k


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 codes [..., 32] (0..15) -> [..., 16] bytes (low nibble j, high nibble j+16)."""
    return (q[..., :16] | (q[..., 16:] << np.uint8(4))).astype(np.uint8)


def _assemble(header_parts: list[np.ndarray], payload: np.ndarray, n: int, nb: int) -> np.ndarray:
    """Concatenate per-block header fields (each [n, nb, h] uint8) and payload [n, nb, p]."""
    blocks = np.concatenate(header_parts + [payload], axis=-1)
    return np.ascontiguousarray(blocks).reshape(n, -1)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """float array [n, nb] -> [n, nb, 2] uint8 of its fp16 (round-to-nearest-even) bits."""
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8).reshape(*x.shape, 2)


def encode_blocks(w: np.ndarray, qtype, group: int = QK) -> np.ndarray:
    """Quantize float32 [N, K] to ggml blocks -> uint8 [N, (K//32) * block_bytes].

    Bit-for-bit the algorithm of ggml's quantize_row_q4_0_ref / q4_1_ref / q8_0_ref (float32
    arithmetic, fp16 scales, truncation/roundf exactly as in C), so dequantizing and re-encoding a
    block this function produced returns the same bytes.

    group (Q4_0/Q4_1 only): the statistics (scale d, and min for Q4_1) are computed over groups of
    `group` elements (a multiple of 32 dividing K) and repeated into each of the group's 32-element
    blocks, which stay ggml blocks (llama.cpp reads them unchanged).  group=32 is ggml exactly.
    """
    q = _qname(qtype)
    if q not in BLOCK_BYTES:
        raise ValueError(f"encode_blocks: {q} is not a block quant type")
    w = np.asarray(w, dtype=np.float32)
    n, k = _check_2d(w, "encode_blocks")
    check_group(group, k, q)
    nb = k // QK
    b = w.reshape(n, k // group, group)
    if q == "Q4_0":
        # max = the element with the largest |x| (first one on ties), d = max / -8
        imax = np.abs(b).argmax(axis=-1)[..., None]
        mx = np.take_along_axis(b, imax, axis=-1)[..., 0]
        d = (mx / np.float32(-8.0)).astype(np.float32)
        x = b * _inverse(d)[..., None]
        x += np.float32(8.5)
    elif q == "Q4_1":
        lo = b.min(axis=-1)
        d = ((b.max(axis=-1) - lo) / np.float32(15.0)).astype(np.float32)
        x = b - lo[..., None]
        x *= _inverse(d)[..., None]
        x += np.float32(0.5)
    else:  # Q8_0
        amax = np.abs(b).max(axis=-1)
        d = (amax / np.float32(127.0)).astype(np.float32)
        x = b * _inverse(d)[..., None]
        neg = np.signbit(x)
        a = np.abs(x).astype(np.float64)   # C roundf: half away from 0 (exact in float64)
        del x
        a += 0.5
        np.floor(a, out=a)
        codes = a.astype(np.int8)
        del a
        np.negative(codes, out=codes, where=neg)
        return _assemble([_f16_bytes(d)], codes.view(np.uint8), n, nb)
    np.trunc(x, out=x)                    # (int8_t) truncates; x >= 0.5
    np.minimum(x, np.float32(15), out=x)
    codes = x.astype(np.uint8).reshape(n, nb, QK)
    del x
    per = group // QK
    parts = [_f16_bytes(np.repeat(d, per, axis=1))]
    if q == "Q4_1":
        parts.append(_f16_bytes(np.repeat(lo, per, axis=1)))
    return _assemble(parts, _pack_nibbles(codes), n, nb)


def _inverse(d: np.ndarray) -> np.ndarray:
    """1/d in float32, 0 where d == 0 (as ggml: id = d ? 1.0f/d : 0.0f)."""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)


def check_group(group: int, k: int, qtype="Q4_0") -> int:
    """A quantization group size: a positive multiple of 32 dividing the row length k (Q8_0: 32)."""
    g = int(group)
    if g != group or g < QK or g % QK:
        raise ValueError(f"group size {group} is not a positive multiple of {QK}")
    if _qname(qtype) == "Q8_0" and g != QK:
        raise ValueError(f"Q8_0 has a fixed group size of {QK}, not {g}")
    if k % g:
        raise ValueError(f"group size {g} does not divide the row length {k}")
    return g


def pack_blocks(qtype, codes: np.ndarray, scales: np.ndarray, mins: np.ndarray | None = None
                ) -> np.ndarray:
    """Integer codes + per-block scales (+ mins) -> ggml blocks uint8 [N, (K//32) * block_bytes].

    codes: Q4_0/Q4_1 uint8 [N, K] in 0..15 (Q4_0 stores q with w = d*(q-8)), or already packed
           nibbles [N, K//32, 16] (edgetune's QTensor "q4" layout, which is ggml's);
           Q8_0 int8 [N, K] or [N, K//32, 32].
    scales, mins: float [N, K//32]; stored as fp16 (mins only for Q4_1).
    """
    q = _qname(qtype)
    if q not in BLOCK_BYTES:
        raise ValueError(f"pack_blocks: {q} is not a block quant type")
    codes = np.asarray(codes)
    n = codes.shape[0]
    scales = np.asarray(scales, dtype=np.float32)
    nb = scales.shape[-1]
    if scales.shape != (n, nb):
        raise ValueError(f"pack_blocks: scales shape {scales.shape} != ({n}, K//32)")
    if q in ("Q4_0", "Q4_1"):
        if codes.ndim == 3 and codes.shape[1:] == (nb, 16):
            packed = codes.astype(np.uint8, copy=False)
        elif codes.ndim == 2 and codes.shape[1] == nb * QK:
            c = codes.astype(np.uint8, copy=False).reshape(n, nb, QK)
            if c.max(initial=0) > 15:
                raise ValueError("pack_blocks: 4-bit codes must be in 0..15")
            packed = _pack_nibbles(c)
        else:
            raise ValueError(f"pack_blocks: codes shape {codes.shape} does not match scales {scales.shape}")
        parts = [_f16_bytes(scales)]
        if q == "Q4_1":
            if mins is None:
                raise ValueError("pack_blocks: Q4_1 needs mins")
            mins = np.asarray(mins, dtype=np.float32)
            if mins.shape != scales.shape:
                raise ValueError(f"pack_blocks: mins shape {mins.shape} != scales shape {scales.shape}")
            parts.append(_f16_bytes(mins))
        elif mins is not None and np.any(np.asarray(mins) != 0):
            raise ValueError("pack_blocks: Q4_0 has no mins")
        return _assemble(parts, packed, n, nb)
    c = codes.reshape(n, -1)
    if c.shape[1] != nb * QK:
        raise ValueError(f"pack_blocks: codes shape {codes.shape} does not match scales {scales.shape}")
    c = c.astype(np.int8, copy=False).reshape(n, nb, QK)
    return _assemble([_f16_bytes(scales)], c.view(np.uint8), n, nb)


def random_blocks(qtype, n_rows: int, k: int, rng: np.random.Generator, std: float = 0.02
                  ) -> np.ndarray:
    """Random codes with plausible scales -> uint8 [n_rows, (k//32) * block_bytes].

    Codes are uniform; each block's scale is chosen so the dequantized weights have roughly
    standard deviation `std` and mean 0 (scale jittered by ~10% per block).
    """
    q = _qname(qtype)
    if q not in BLOCK_BYTES:
        raise ValueError(f"random_blocks: {q} is not a block quant type")
    if k % QK:
        raise ValueError(f"random_blocks: K={k} is not a multiple of {QK}")
    nb = k // QK
    bs = BLOCK_BYTES[q]
    out = np.frombuffer(bytearray(rng.bytes(n_rows * nb * bs)), dtype=np.uint8).reshape(n_rows, nb, bs)
    j = rng.standard_normal((n_rows, nb), dtype=np.float32)
    j *= np.float32(0.1)
    j += np.float32(1.0)
    np.abs(j, out=j)
    if q == "Q4_0":
        d = j * np.float32(std / 4.61)            # std of uniform (q - 8), q in 0..15
        d[rng.random((n_rows, nb), dtype=np.float32) < 0.5] *= -1   # (q - 8) has mean -0.5
        out[:, :, 0:2] = _f16_bytes(d)
    elif q == "Q4_1":
        d = j * np.float32(std / 4.61)
        m = d * np.float32(-7.5)                  # centre the codes' mean at 0
        out[:, :, 0:2] = _f16_bytes(d)
        out[:, :, 2:4] = _f16_bytes(m)
    else:
        d = j * np.float32(std / 73.9)            # std of uniform int8
        out[:, :, 0:2] = _f16_bytes(d)
    return out.reshape(n_rows, nb * bs)


@dataclass
class _TensorPlan:
    name: str
    shape: tuple
    qtype: str
    nbytes: int


class GGUFStreamWriter:
    """Write a GGUF without holding tensor data: declare, write the head, then stream data.

        w = GGUFStreamWriter(path, "llama")
        w.meta.add_uint32("llama.block_count", 2)       # any gguf.GGUFWriter add_* call
        w.add_tensor_info("blk.0.attn_q.weight", (64, 64), "q4_0")
        w.write_head()                                  # header + metadata + tensor infos
        w.write_tensor("blk.0.attn_q.weight", chunks)   # iterable of uint8 arrays, in order
        w.close()

    Tensors must be written in the order they were declared; each one's total bytes are checked.
    Shapes are numpy order (rows, cols) = (N, K); GGUF stores them reversed (ggml ne).
    """

    def __init__(self, path, arch: str):
        import gguf
        self.path = str(path)
        self.meta = gguf.GGUFWriter(self.path, arch)
        self._plan: list[_TensorPlan] = []
        self._next = 0
        self._f = None
        self.alignment = self.meta.data_alignment

    def add_tensor_info(self, name: str, shape, qtype) -> int:
        q = _qname(qtype)
        shape = tuple(int(s) for s in shape)
        nbytes = tensor_nbytes(q, shape)
        self.meta.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=ggml_type(q))
        self._plan.append(_TensorPlan(name, shape, q, nbytes))
        return nbytes

    @property
    def tensors(self) -> list[_TensorPlan]:
        return list(self._plan)

    @property
    def total_nbytes(self) -> int:
        return sum(self.meta.ggml_pad(t.nbytes, self.alignment) for t in self._plan)

    def write_head(self) -> None:
        self.meta.write_header_to_file()
        self.meta.write_kv_data_to_file()
        self.meta.write_ti_data_to_file()
        self._f = self.meta.fout[0]
        self._pad()

    def _pad(self) -> None:
        pos = self._f.tell()
        pad = self.meta.ggml_pad(pos, self.alignment) - pos
        if pad:
            self._f.write(b"\0" * pad)

    def write_tensor(self, name: str, chunks: Iterable[np.ndarray], on_bytes=None) -> None:
        if self._f is None:
            raise RuntimeError("GGUFStreamWriter: write_head() first")
        if self._next >= len(self._plan):
            raise ValueError(f"GGUFStreamWriter: tensor {name!r} was not declared")
        plan = self._plan[self._next]
        if plan.name != name:
            raise ValueError(f"GGUFStreamWriter: expected tensor {plan.name!r} next, got {name!r}")
        written = 0
        for chunk in chunks:
            a = np.ascontiguousarray(chunk)
            nb = a.nbytes
            if written + nb > plan.nbytes:
                raise ValueError(f"GGUFStreamWriter: {name}: more than {plan.nbytes} bytes")
            self._f.write(memoryview(a).cast("B"))
            written += nb
            if on_bytes is not None:
                on_bytes(nb)
        if written != plan.nbytes:
            raise ValueError(f"GGUFStreamWriter: {name}: wrote {written} bytes, expected {plan.nbytes}")
        self._pad()
        self._next += 1

    def close(self, fsync: bool = True) -> None:
        """Finish: checks every declared tensor was written, flushes (and fsyncs) the file."""
        try:
            if self._f is not None:
                if self._next != len(self._plan):
                    missing = self._plan[self._next].name
                    raise ValueError(f"GGUFStreamWriter: tensor {missing!r} and later were not written")
                self._f.flush()
                if fsync:
                    os.fsync(self._f.fileno())
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the file handle without checks (the caller removes the partial file)."""
        self.meta.close()
        self._f = None


# ---------------------------------------------------------------------------------------------
# metadata shared by every writer of a llama-family model

def add_llama_hparams(meta, arch: str, *, vocab: int, context_length: int, hidden: int,
                      n_layers: int, ffn: int, n_heads: int, n_kv_heads: int, rope_base: float,
                      rms_eps: float, rope_linear_factor: float = 1.0) -> None:
    """The `{arch}.*` hyperparameter keys llama.cpp reads (meta: a gguf.GGUFWriter)."""
    meta.add_uint32(f"{arch}.vocab_size", vocab)
    meta.add_uint32(f"{arch}.context_length", context_length)
    meta.add_uint32(f"{arch}.embedding_length", hidden)
    meta.add_uint32(f"{arch}.block_count", n_layers)
    meta.add_uint32(f"{arch}.feed_forward_length", ffn)
    meta.add_uint32(f"{arch}.attention.head_count", n_heads)
    meta.add_uint32(f"{arch}.attention.head_count_kv", n_kv_heads)
    meta.add_uint32(f"{arch}.rope.dimension_count", hidden // n_heads)
    meta.add_float32(f"{arch}.rope.freq_base", float(rope_base))
    meta.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", float(rms_eps))
    if rope_linear_factor != 1.0:
        meta.add_string(f"{arch}.rope.scaling.type", "linear")
        meta.add_float32(f"{arch}.rope.scaling.factor", float(rope_linear_factor))


def add_file_type(meta, qtype) -> None:
    """general.file_type (the dominant tensor type) and general.quantization_version."""
    meta.add_uint32("general.file_type", FILE_TYPE[_qname(qtype)])
    meta.add_uint32("general.quantization_version", 2)


# ---------------------------------------------------------------------------------------------
# atomic output files

def check_output(out, overwrite: bool) -> Path:
    """An output file path we may write: not a directory, not existing (unless overwrite), in an
    existing writable directory.  Raises EdgetuneError naming the problem."""
    out = Path(out)
    if out.is_dir():
        raise EdgetuneError(f"{out}: is a directory; give the output .gguf file name")
    if out.exists() and not overwrite:
        raise EdgetuneError(f"{out}: already exists; pass --overwrite to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise EdgetuneError(f"{out}: output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EdgetuneError(f"{out}: output directory {parent} is not writable")
    return out


def check_free_space(directory, nbytes: int, what: str) -> None:
    """Refuse to start writing `what` (nbytes) when its directory has less free space."""
    free = shutil.disk_usage(directory).free
    if free < nbytes:
        raise EdgetuneError(f"{directory}: not enough free disk space for {what} (needs "
                            f"{nbytes / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free)")


def _fsync_dir(path: Path) -> None:
    try:
        dfd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def write_atomic(out, arch: str, fill) -> Path:
    """Create a GGUFStreamWriter on a temporary file next to `out`, `fill(writer)` (declare, write
    the head, stream every tensor), then fsync and rename it onto `out`.  On any failure the
    temporary file is removed (a crash can leave only a hidden `.NAME.tmp-PID`, never a file that
    looks complete); an OSError becomes an EdgetuneError naming `out`."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    w = None
    try:
        w = GGUFStreamWriter(tmp, arch)
        fill(w)
        w.close(fsync=True)
        os.replace(tmp, out)
        _fsync_dir(out.parent if str(out.parent) else Path("."))
    except OSError as e:
        if w is not None:
            w.abort()
        tmp.unlink(missing_ok=True)
        raise EdgetuneError(f"{out}: cannot write ({e.strerror or e})") from None
    except BaseException:
        if w is not None:
            w.abort()
        tmp.unlink(missing_ok=True)
        raise
    return out
