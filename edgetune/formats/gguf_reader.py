"""GGUF in: metadata + tensors as read-only memory maps, converted to QTensors without copying codes.

Uses the `gguf` package's reader (numpy memmap, mode "r"), so codes of Q4_0/Q4_1/Q8_0 tensors are
strided views into the file and never enter RAM as a whole.  K-quants (Q4_K, Q5_K, Q6_K) interleave
their codes with sub-block scales, so their codes are unpacked once into edgetune's layouts
(still exact: see quant.py).  Every failure is a FormatError naming the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import FormatError, UnsupportedError
from ..quant import QTensor, pack_q4

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
QK_K = 256


@dataclass
class RawTensor:
    name: str
    type_name: str
    shape: tuple        # numpy order: (rows, cols) = (N, K) for a matrix
    data: np.ndarray    # uint8 memmap view of the tensor's bytes, shape (rows, bytes_per_row)
    offset: int         # absolute byte offset in the file


class GGUFFile:
    """An opened GGUF: `metadata` (dict of plain values), `tensors` (name -> RawTensor)."""

    def __init__(self, path):
        self.path = str(path)
        if not os.path.exists(self.path):
            raise FormatError(self.path, "no such file")
        if os.path.isdir(self.path):
            raise FormatError(self.path, "is a directory, expected a .gguf file")
        try:
            import gguf
            self._reader = gguf.GGUFReader(self.path, "r")
        except FormatError:
            raise
        except Exception as e:  # the gguf package raises ValueError/IndexError/... on bad files
            raise FormatError(self.path, f"not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.metadata = {}
        for key, field in self._reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.metadata[key] = field.contents()
            except Exception as e:
                raise FormatError(self.path, f"metadata key {key!r} is unreadable ({e})") from None
        self.tensors = {}
        for t in self._reader.tensors:
            type_name = t.tensor_type.name
            shape = tuple(int(x) for x in reversed([int(d) for d in t.shape]))  # ggml ne -> numpy
            data = np.asarray(t.data)
            if data.dtype != np.uint8:
                data = data.view(np.uint8)
            rows = shape[0] if len(shape) > 1 else 1
            self.tensors[t.name] = RawTensor(t.name, type_name, shape,
                                             data.reshape(rows, -1), int(t.data_offset))

    def get(self, key, default=None):
        return self.metadata.get(key, default)

    def require(self, key):
        if key not in self.metadata:
            raise FormatError(self.path, f"missing metadata key {key!r}")
        return self.metadata[key]

    def qtensor(self, name: str, tensor_id: int = 0) -> QTensor:
        if name not in self.tensors:
            raise FormatError(self.path, f"missing tensor {name!r}")
        return to_qtensor(self.tensors[name], self.path, tensor_id)


def _f16(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.float16).astype(np.float32)[..., 0]


def k_scale_min(scales: np.ndarray):
    """Unpack Q4_K/Q5_K 12-byte 6-bit (scale, min) pairs -> two [..., 8] uint8 arrays."""
    s = scales.reshape(scales.shape[:-1] + (3, 4))
    d, m, md = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def to_qtensor(rt: RawTensor, path: str = "", tensor_id: int = 0) -> QTensor:
    """Convert one raw GGUF tensor to a QTensor that represents it exactly."""
    t, name, shape = rt.type_name, rt.name, rt.shape
    if t not in SUPPORTED_TYPES:
        raise UnsupportedError(path, f"tensor {name!r} has quant type {t}, which edgetune does not "
                                     f"support (supported: {', '.join(SUPPORTED_TYPES)})")
    if t in ("F32", "F16", "BF16"):
        raw = rt.data.reshape(-1)
        if t == "F32":
            data = raw.view(np.float32)
        elif t == "F16":
            data = raw.view(np.float16).astype(np.float32)
        else:
            data = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return QTensor(name, "f32", shape, data=data.reshape(shape), tensor_id=tensor_id,
                       source_type=t)
    if len(shape) != 2:
        raise FormatError(path, f"quantized tensor {name!r} has shape {shape}, expected 2-D")
    n, k = shape
    blk = rt.data.reshape(n, -1)
    if t in ("Q4_0", "Q4_1", "Q8_0"):
        bsize = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[t]
        if blk.shape[1] * 32 != k * bsize:
            raise FormatError(path, f"tensor {name!r}: {blk.shape[1]} bytes per row do not fit {t} "
                                    f"with {k} columns")
        b = blk.reshape(n, k // 32, bsize)
        d = _f16(b[:, :, 0:2])
        if t == "Q4_0":
            return QTensor(name, "q4", shape, codes=b[:, :, 2:18], scales=d, mins=None, offset=8,
                           tensor_id=tensor_id, source_type=t)
        if t == "Q4_1":
            return QTensor(name, "q4", shape, codes=b[:, :, 4:20], scales=d, mins=_f16(b[:, :, 2:4]),
                           tensor_id=tensor_id, source_type=t)
        return QTensor(name, "q8", shape, codes=b[:, :, 2:34].view(np.int8), scales=d, mins=None,
                       group=32, tensor_id=tensor_id, source_type=t)
    # K-quants: super-blocks of 256
    if k % QK_K:
        raise FormatError(path, f"tensor {name!r}: {t} needs rows that are a multiple of 256, got {k}")
    nb = k // QK_K
    bsize = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[t]
    if blk.shape[1] != nb * bsize:
        raise FormatError(path, f"tensor {name!r}: {blk.shape[1]} bytes per row do not fit {t} "
                                f"with {k} columns")
    b = blk.reshape(n, nb, bsize)
    if t == "Q6_K":
        ql, qh, sc, d = b[..., :128], b[..., 128:192], b[..., 192:208], b[..., 208:210]
        d = _f16(d)                                              # [n, nb]
        sc = np.ascontiguousarray(sc).view(np.int8).astype(np.float32)  # [n, nb, 16]
        # ggml Q6_K: in 128-element chunk c, element 32j+l takes nibble j//2 of ql[c, (j%2)*32+l]
        # and bits 2j..2j+1 of qh[c, l]
        ql_c = ql.reshape(n, nb, 2, 64)
        qh_c = qh.reshape(n, nb, 2, 32)
        q = np.empty((n, nb, 2, 4, 32), np.int8)
        for j in range(4):
            low = (ql_c[..., (j % 2) * 32:(j % 2) * 32 + 32] >> (4 * (j // 2))) & 0x0F
            high = (qh_c >> (2 * j)) & 0x03
            q[..., j, :] = (low | (high << 4)).astype(np.int8) - 32
        codes = q.reshape(n, k // 16, 16)
        scales = (d[..., None] * sc).reshape(n, k // 16).astype(np.float32)
        return QTensor(name, "q8", shape, codes=codes, scales=scales, mins=None, group=16,
                       tensor_id=tensor_id, source_type=t)
    d = _f16(b[..., 0:2])
    dmin = _f16(b[..., 2:4])
    sc, mn = k_scale_min(np.ascontiguousarray(b[..., 4:16]))
    scales = (d[..., None] * sc.astype(np.float32)).reshape(n, k // 32)
    mins = (-dmin[..., None] * mn.astype(np.float32)).reshape(n, k // 32)
    if t == "Q4_K":
        qs = b[..., 16:144].reshape(n, nb, 4, 32)
        q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, k)  # chunk j: sub-blocks 2j, 2j+1
        return QTensor(name, "q4", shape, codes=pack_q4(q), scales=scales.astype(np.float32),
                       mins=mins.astype(np.float32), tensor_id=tensor_id, source_type=t)
    qh = b[..., 16:48].reshape(n, nb, 1, 32)
    qs = b[..., 48:176].reshape(n, nb, 4, 32)
    ql = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, nb, 8, 32)
    hb = (qh >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & 0x01
    q = (ql | (hb << 4)).astype(np.int8).reshape(n, k // 32, 32)
    return QTensor(name, "q8", shape, codes=q, scales=scales.astype(np.float32),
                   mins=mins.astype(np.float32), group=32, tensor_id=tensor_id, source_type=t)
