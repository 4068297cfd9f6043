"""QTensor: edgetune's quantized weight = immutable integer codes + float group scales (+ mins).

Two integer layouts cover every supported GGUF type exactly (see formats/gguf_reader.py):

  kind "q4"  codes  uint8 [N, K//32, 16]   (rows and blocks may be strided; a block's 16 bytes are
                                            contiguous).  Byte j of block b holds element 32b+j in
                                            its low nibble and element 32b+j+16 in its high nibble
                                            (ggml's Q4_0/Q4_1 layout, so those map zero-copy).
             w[n,k] = scales[n,g] * (q - offset) + mins[n,g],   g = k // 32,  q in 0..15
  kind "q8"  codes  int8  [N, K//G, G]      G = group (16 or 32), inner G bytes contiguous.
             w[n,k] = scales[n,g] * q + mins[n,g],              g = k // G,   q in -128..127
  kind "f32" data   float32 [N, K] (F32/F16/BF16 tensors; small ones: norms, some embeddings)

scales/mins are float32 [N, K//G], C-contiguous, owned in RAM: they are what QZO training changes.
mins may be None (= 0).  Codes never change.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class QTensor:
    name: str
    kind: str                      # "q4" | "q8" | "f32"
    shape: tuple                   # logical (N, K) = (out_features, in_features); 1-D for vectors
    codes: np.ndarray | None = None
    scales: np.ndarray | None = None
    mins: np.ndarray | None = None
    group: int = 32
    offset: int = 0                # q4 only: 8 for Q4_0-style symmetric codes
    data: np.ndarray | None = None  # kind "f32"
    tensor_id: int = 0             # stable id for the perturbation RNG
    source_type: str = ""          # GGUF type name it came from, e.g. "Q4_1"
    meta: dict = field(default_factory=dict)
    # q4 only, optional: the codes in the C++ kernels' prepacked panel layout (kernels.prepack),
    # built once for a resident matrix; read instead of `codes` by the avx512/amx paths
    packed: np.ndarray | None = None

    @property
    def n_groups(self) -> int:
        return self.shape[-1] // self.group

    @property
    def nbytes_codes(self) -> int:
        if self.kind == "f32":
            return int(self.data.nbytes)
        n, k = self.shape
        return n * k // 2 if self.kind == "q4" else n * k


def unpack_q4(codes: np.ndarray) -> np.ndarray:
    """[N, B, 16] packed nibbles -> [N, B*32] uint8 codes 0..15 (numpy reference)."""
    c = np.asarray(codes)
    lo = c & 0x0F
    hi = c >> 4
    return np.concatenate([lo, hi], axis=-1).reshape(c.shape[0], -1)


def prepack_q4_reference(codes: np.ndarray) -> np.ndarray:
    """[N, K/32, 16] packed nibbles -> the kernels' prepacked panel layout (numpy reference of
    kernels.prepack): panels of 32 rows (zero rows past N), per panel and group two halves of 16
    rows, per half 4 chunks of 64 bytes, chunk d = bytes 4d..4d+3 of each of the 16 rows' blocks."""
    c = np.asarray(codes, dtype=np.uint8)
    n, ng, _ = c.shape
    p = -(-n // 32)
    pad = np.zeros((p * 32, ng, 16), np.uint8)
    pad[:n] = c
    # [panel, half, row, group, d, byte] -> [panel, group, half, d, row, byte]
    v = pad.reshape(p, 2, 16, ng, 4, 4).transpose(0, 3, 1, 4, 2, 5)
    return np.ascontiguousarray(v).reshape(-1)


def pack_q4(q: np.ndarray) -> np.ndarray:
    """[N, K] codes 0..15 -> [N, K//32, 16] packed (inverse of unpack_q4)."""
    q = np.asarray(q, dtype=np.uint8)
    n, k = q.shape
    if k % 32:
        raise ValueError(f"pack_q4: K={k} is not a multiple of 32")
    b = q.reshape(n, k // 32, 32)
    return (b[:, :, :16] | (b[:, :, 16:] << 4)).astype(np.uint8)


def codes_as_int(qt: QTensor) -> np.ndarray:
    """Integer codes as a dense [N, K] int32 array, offset already subtracted."""
    if qt.kind == "q4":
        return unpack_q4(qt.codes).astype(np.int32) - qt.offset
    if qt.kind == "q8":
        return np.asarray(qt.codes).reshape(qt.shape[0], -1).astype(np.int32)
    raise ValueError(f"{qt.name}: kind {qt.kind} has no integer codes")


def dequantize(qt: QTensor, scales: np.ndarray | None = None) -> np.ndarray:
    """Reference dequantization to float32 [N, K]; `scales` overrides qt.scales (e.g. perturbed)."""
    if qt.kind == "f32":
        return np.asarray(qt.data, dtype=np.float32)
    s = qt.scales if scales is None else scales
    q = codes_as_int(qt).astype(np.float64)
    n, k = qt.shape
    g = qt.group
    w = q.reshape(n, k // g, g) * np.asarray(s, np.float64)[:, :, None]
    if qt.mins is not None:
        w = w + np.asarray(qt.mins, np.float64)[:, :, None]
    return w.reshape(n, k).astype(np.float32)


def quantize_q4(w: np.ndarray, name: str = "", symmetric: bool = False) -> QTensor:
    """Round-to-nearest int4 with group 32 (asymmetric min/scale like Q4_1, or Q4_0-style)."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    if k % 32:
        raise ValueError(f"quantize_q4 {name}: K={k} is not a multiple of 32")
    b = w.reshape(n, k // 32, 32)
    if symmetric:
        amax_idx = np.abs(b).argmax(axis=-1)
        mx = np.take_along_axis(b, amax_idx[..., None], axis=-1)[..., 0]
        d = mx / -8.0
        inv = np.where(d != 0, 1.0 / np.where(d != 0, d, 1), 0.0)
        q = np.clip(np.round(b * inv[..., None]) + 8, 0, 15).astype(np.uint8)
        return QTensor(name, "q4", (n, k), codes=pack_q4(q.reshape(n, k)),
                       scales=d.astype(np.float32), mins=None, offset=8, source_type="Q4_0")
    lo = b.min(axis=-1)
    hi = b.max(axis=-1)
    d = (hi - lo) / 15.0
    inv = np.where(d != 0, 1.0 / np.where(d != 0, d, 1), 0.0)
    q = np.clip(np.round((b - lo[..., None]) * inv[..., None]), 0, 15).astype(np.uint8)
    return QTensor(name, "q4", (n, k), codes=pack_q4(q.reshape(n, k)),
                   scales=d.astype(np.float32), mins=lo.astype(np.float32), source_type="Q4_1")


def quantize_q8(w: np.ndarray, name: str = "", group: int = 32) -> QTensor:
    """Symmetric int8 with the given group size (like Q8_0)."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    if k % group:
        raise ValueError(f"quantize_q8 {name}: K={k} is not a multiple of {group}")
    b = w.reshape(n, k // group, group)
    d = np.abs(b).max(axis=-1) / 127.0
    inv = np.where(d != 0, 1.0 / np.where(d != 0, d, 1), 0.0)
    q = np.clip(np.round(b * inv[..., None]), -127, 127).astype(np.int8)
    return QTensor(name, "q8", (n, k), codes=q, scales=d.astype(np.float32), mins=None,
                   group=group, source_type="Q8_0")


def dequantize_rows(qt: QTensor, rows: np.ndarray) -> np.ndarray:
    """Dequantize only the given rows (an embedding lookup) -> float32 [len(rows), K]."""
    rows = np.asarray(rows, dtype=np.int64)
    if qt.kind == "f32":
        return np.asarray(qt.data[rows], dtype=np.float32)
    n, k = qt.shape
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise IndexError(f"{qt.name}: token id out of range 0..{n - 1}")
    codes = np.asarray(qt.codes[rows])
    if qt.kind == "q4":
        q = unpack_q4(codes).astype(np.float32) - qt.offset
    else:
        q = codes.reshape(len(rows), -1).astype(np.float32)
    g = qt.group
    w = q.reshape(len(rows), k // g, g) * qt.scales[rows][:, :, None]
    if qt.mins is not None:
        w = w + qt.mins[rows][:, :, None]
    return w.reshape(len(rows), k).astype(np.float32)


def slice_rows(qt: QTensor, rows: np.ndarray) -> QTensor:
    """A QTensor holding only the given output rows (copies those rows' codes and scales)."""
    rows = np.asarray(rows, dtype=np.int64)
    if qt.kind == "f32":
        return QTensor(f"{qt.name}[rows]", "f32", (len(rows), qt.shape[1]),
                       data=np.ascontiguousarray(qt.data[rows]), tensor_id=qt.tensor_id,
                       source_type=qt.source_type)
    return QTensor(f"{qt.name}[rows]", qt.kind, (len(rows), qt.shape[1]),
                   codes=np.ascontiguousarray(qt.codes[rows]),
                   scales=np.ascontiguousarray(qt.scales[rows]),
                   mins=None if qt.mins is None else np.ascontiguousarray(qt.mins[rows]),
                   group=qt.group, offset=qt.offset, tensor_id=qt.tensor_id,
                   source_type=qt.source_type)
