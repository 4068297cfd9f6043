"""GGUF in: metadata + tensors as read-only memory maps, converted to QTensors without copying codes.

edgetune parses GGUF v2/v3 (little-endian) itself, from one read-only ``np.memmap`` of the file:

* header, metadata (KV pairs) and tensor infos are decoded with ``struct`` from the map;
* small metadata values are decoded eagerly into plain Python values; large arrays (more than
  ``LAZY_ARRAY_MIN`` elements: tokenizer tokens/merges/scores/token types) are only located and
  bounds-checked at open and decoded on first access of their key (``GGUFFile.metadata`` is a
  read-only Mapping that caches the decoded value).  Opening the 98 MB SmolLM2 file therefore costs
  a few MB of RAM instead of ~170 MB (the ``gguf`` package's reader builds numpy objects for every
  one of its ~100k vocabulary entries);
* tensor data are strided uint8 views into the map, so codes of Q4_0/Q4_1/Q8_0 tensors are
  zero-copy and never enter RAM as a whole.  K-quants (Q4_K, Q5_K, Q6_K) interleave their codes with
  sub-block scales, so their codes are unpacked once into edgetune's layouts (still exact: see
  quant.py).

The file is untrusted input.  Every problem raises ``FormatError(path, problem)`` naming the file
and what is wrong (``UnsupportedError`` — a FormatError — for a well-formed tensor whose ggml type
edgetune cannot convert, raised by ``qtensor``/``to_qtensor``).  Checked at open, before any
allocation sized by the file's own numbers:

* size >= 24-byte header; magic ``GGUF``; version 2 or 3 (v1 and big-endian files are rejected);
* tensor_count / kv_count: what the remaining bytes could hold at minimum per entry;
* every length/count read (key, string value, array count, tensor name, n_dims) is checked against
  the bytes left in the file before anything is sliced, decoded or looped over; all loops run over
  counts validated this way, so parsing is O(file size) and cannot hang;
* keys: non-empty, <= 65535 bytes, valid UTF-8, no duplicates; value types 0..12 only;
  arrays of arrays are rejected (the spec's models never use them; llama.cpp rejects them too);
* strings (keys, names, values) must be valid UTF-8: a bad one is a FormatError naming the key
  (for lazily decoded arrays this is raised when the key is first read), never silently replaced;
* ``general.alignment``: an integer, a power of two, 1..1 MiB (default 32);
* tensor infos: name non-empty, <= 64 bytes (GGML_MAX_NAME), unique; n_dims in 1..4; every dim
  >= 1 and the element count bounded (Python ints, no overflow); ggml type id known (unknown ids
  are a FormatError, known-but-unconvertible types an UnsupportedError at conversion); the row
  length a whole number of the type's blocks;
* tensor data: offset a multiple of the alignment, size = elements / block size * type size, whole
  extent inside the file (a truncated file is reported as such), no two tensors overlapping.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import FormatError, UnsupportedError
from ..quant import QTensor, pack_q4

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
QK_K = 256

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 20
MAX_KEY_BYTES = 65535          # spec: keys are at most 2^16-1 bytes
MAX_TENSOR_NAME_BYTES = 64     # spec / GGML_MAX_NAME
MAX_DIMS = 4                   # GGML_MAX_DIMS
LAZY_ARRAY_MIN = 1024          # arrays with more elements are decoded on first access
HEADER_BYTES = 24              # magic, version u32, tensor_count u64, kv_count u64
_MIN_KV_BYTES = 8 + 1 + 4 + 1           # key len, >= 1 key byte, value type, >= 1 value byte
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8   # name len, name, n_dims, 1 dim, type, offset

# ggml type id -> (name, block size in elements, block size in bytes); as gguf.GGML_QUANT_SIZES.
# Ids not listed (removed or future types) are a FormatError: edgetune cannot even size them.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4),
    27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}

# GGUF metadata value types
_STRING, _ARRAY = 8, 9
# type id -> (name, struct format, numpy dtype, byte size) for fixed-size values
_SCALARS = {
    0: ("UINT8", "<B", "<u1", 1), 1: ("INT8", "<b", "<i1", 1), 2: ("UINT16", "<H", "<u2", 2),
    3: ("INT16", "<h", "<i2", 2), 4: ("UINT32", "<I", "<u4", 4), 5: ("INT32", "<i", "<i4", 4),
    6: ("FLOAT32", "<f", "<f4", 4), 7: ("BOOL", "<B", "<u1", 1), 10: ("UINT64", "<Q", "<u8", 8),
    11: ("INT64", "<q", "<i8", 8), 12: ("FLOAT64", "<d", "<f8", 8),
}
_BOOL = 7
_FLOATS = (6, 12)
VALUE_TYPE_NAMES = {**{k: v[0] for k, v in _SCALARS.items()}, _STRING: "STRING", _ARRAY: "ARRAY"}
_U32 = struct.Struct("<I").unpack_from
_U64 = struct.Struct("<Q").unpack_from


@dataclass
class RawTensor:
    name: str
    type_name: str
    shape: tuple        # numpy order: (rows, cols) = (N, K) for a matrix
    data: np.ndarray    # uint8 memmap view of the tensor's bytes, shape (rows, bytes_per_row)
    offset: int         # absolute byte offset in the file


@dataclass(frozen=True)
class _LazyArray:
    """A located, bounds-checked metadata array not yet decoded."""
    elem_type: int
    count: int
    offset: int         # absolute offset of the first element
    nbytes: int


class Metadata(Mapping):
    """Read-only mapping key -> plain Python value; large arrays are decoded on first access."""

    def __init__(self, gfile: "GGUFFile", values: dict, types: dict):
        self._g = gfile
        self._values = values
        self._types = types

    def __getitem__(self, key):
        v = self._values[key]
        if isinstance(v, _LazyArray):
            v = self._g._decode_array(key, v)
            self._values[key] = v
        return v

    def __contains__(self, key):
        return key in self._values

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    def value_type(self, key) -> str:
        """The GGUF type of a key's value: 'UINT32', 'STRING', 'ARRAY[STRING]', ..."""
        return self._types[key]

    def __repr__(self):
        def show(v):
            if isinstance(v, _LazyArray):
                return f"<{v.count} x {VALUE_TYPE_NAMES[v.elem_type]}, not decoded>"
            if isinstance(v, list) and len(v) > 8:
                return f"[{', '.join(map(repr, v[:3]))}, ... ({len(v)} items)]"
            return repr(v)
        return "Metadata({" + ", ".join(f"{k!r}: {show(v)}" for k, v in self._values.items()) + "})"


class GGUFFile:
    """An opened GGUF: `metadata` (Mapping of plain values), `tensors` (name -> RawTensor)."""

    def __init__(self, path):
        self.path = str(path)
        if not os.path.exists(self.path):
            raise FormatError(self.path, "no such file")
        if os.path.isdir(self.path):
            raise FormatError(self.path, "is a directory, expected a .gguf file")
        try:
            size = os.path.getsize(self.path)
        except OSError as e:
            raise FormatError(self.path, f"cannot read the file ({e.strerror or e})") from None
        if size < HEADER_BYTES:
            raise FormatError(self.path, f"truncated: {size} bytes, shorter than the "
                                         f"{HEADER_BYTES}-byte GGUF header")
        try:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise FormatError(self.path, f"cannot map the file ({e})") from None
        self._size = int(self._mm.shape[0])
        self._buf = memoryview(self._mm)
        self._pos = 0
        self.version = 0
        self.alignment = DEFAULT_ALIGNMENT
        self.data_offset = 0
        values, types = self._read_header_and_metadata()
        self.metadata = Metadata(self, values, types)
        self.tensors = self._read_tensors()

    # -- low-level reads: every one checks the bytes it needs are in the file --------------------
    def _fail(self, problem: str):
        raise FormatError(self.path, problem) from None

    def _need(self, n: int, what: str, at: int | None = None):
        at = self._pos if at is None else at
        if n > self._size - at:
            self._fail(f"truncated or corrupt: {what} at byte {at} needs {n} bytes but only "
                       f"{max(self._size - at, 0)} remain (file is {self._size} bytes)")

    def _u32(self, what: str) -> int:
        self._need(4, what)
        v = _U32(self._buf, self._pos)[0]
        self._pos += 4
        return v

    def _u64(self, what: str) -> int:
        self._need(8, what)
        v = _U64(self._buf, self._pos)[0]
        self._pos += 8
        return v

    def _str(self, what: str, max_len: int | None = None) -> str:
        at = self._pos
        n = self._u64(f"length of {what}")
        if max_len is not None and n > max_len:
            self._fail(f"{what} at byte {at} is {n} bytes long, more than the limit of {max_len}")
        self._need(n, f"{what} ({n} bytes)")
        raw = self._buf[self._pos:self._pos + n]
        self._pos += n
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            self._fail(f"{what} at byte {at} is not valid UTF-8 ({e.reason} at byte {at + 8 + e.start})")

    # -- header + metadata ---------------------------------------------------------------------
    def _read_header_and_metadata(self):
        magic = bytes(self._buf[0:4])
        if magic != GGUF_MAGIC:
            self._fail(f"not a GGUF file (magic bytes {magic!r}, expected {GGUF_MAGIC!r})")
        self._pos = 4
        version = self._u32("version")
        if version not in GGUF_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in GGUF_VERSIONS:
                self._fail(f"big-endian GGUF (version {swapped}) is not supported; "
                           f"convert it to little-endian")
            self._fail(f"unsupported GGUF version {version} (edgetune reads versions 2 and 3)")
        self.version = version
        n_tensors = self._u64("tensor count")
        n_kv = self._u64("metadata key/value count")
        room = self._size - self._pos
        if n_kv > room // _MIN_KV_BYTES:
            self._fail(f"corrupt header: metadata count {n_kv} cannot fit in the {room} bytes "
                       f"after the header")
        if n_tensors > room // _MIN_TENSOR_INFO_BYTES or \
                n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > room:
            self._fail(f"corrupt header: tensor count {n_tensors} (with {n_kv} metadata entries) "
                       f"cannot fit in the {room} bytes after the header")
        self._n_tensors = n_tensors
        values: dict = {}
        types: dict = {}
        for i in range(n_kv):
            at = self._pos
            key = self._str(f"metadata key #{i}", MAX_KEY_BYTES)
            if not key:
                self._fail(f"metadata key #{i} at byte {at} is empty")
            if key in values:
                self._fail(f"duplicate metadata key {key!r} (second at byte {at})")
            vtype = self._u32(f"value type of {key!r}")
            values[key], types[key] = self._read_value(key, vtype)
        if "general.alignment" in values:
            a = values["general.alignment"]
            if not (types["general.alignment"] in ("UINT8", "INT8", "UINT16", "INT16", "UINT32",
                                                   "INT32", "UINT64", "INT64")):
                self._fail(f"general.alignment has type {types['general.alignment']}, "
                           f"expected an integer")
            if a < 1 or a > MAX_ALIGNMENT or a & (a - 1):
                self._fail(f"general.alignment = {a} is not a power of two between 1 and "
                           f"{MAX_ALIGNMENT}")
            self.alignment = a
        return values, types

    def _read_value(self, key: str, vtype: int):
        if vtype in _SCALARS:
            name, fmt, _, n = _SCALARS[vtype]
            self._need(n, f"{name} value of {key!r}")
            v = struct.unpack_from(fmt, self._buf, self._pos)[0]
            self._pos += n
            return (bool(v) if vtype == _BOOL else v), name
        if vtype == _STRING:
            return self._str(f"string value of {key!r}"), "STRING"
        if vtype == _ARRAY:
            etype = self._u32(f"element type of array {key!r}")
            at = self._pos
            count = self._u64(f"element count of array {key!r}")
            if etype == _ARRAY:
                self._fail(f"metadata {key!r} is an array of arrays, which edgetune does not accept")
            if etype not in _SCALARS and etype != _STRING:
                self._fail(f"metadata array {key!r} has unknown element type {etype}")
            esize = _SCALARS[etype][3] if etype in _SCALARS else 8   # a string is >= 8 bytes
            room = self._size - self._pos
            if count > room // esize:
                self._fail(f"truncated or corrupt: array {key!r} at byte {at} claims {count} "
                           f"{VALUE_TYPE_NAMES[etype]} elements but only {room} bytes remain")
            start = self._pos
            if etype == _STRING:
                self._skip_strings(key, count)
            else:
                self._pos += count * esize
            lazy = _LazyArray(etype, count, start, self._pos - start)
            tname = f"ARRAY[{VALUE_TYPE_NAMES[etype]}]"
            if count > LAZY_ARRAY_MIN:
                return lazy, tname
            return self._decode_array(key, lazy), tname
        self._fail(f"metadata {key!r} has unknown value type {vtype}")

    def _skip_strings(self, key: str, count: int):
        """Walk `count` strings, checking every length against the file; no decoding."""
        buf, size, pos = self._buf, self._size, self._pos
        for i in range(count):
            if pos + 8 > size:
                self._pos = pos
                self._need(8, f"length of string #{i} of array {key!r}")
            n = _U64(buf, pos)[0]
            pos += 8
            if n > size - pos:
                self._fail(f"truncated or corrupt: string #{i} of array {key!r} at byte {pos - 8} "
                           f"claims {n} bytes but only {size - pos} remain")
            pos += n
        self._pos = pos

    def _decode_array(self, key: str, a: _LazyArray) -> list:
        if a.elem_type in _SCALARS:
            dt = _SCALARS[a.elem_type][2]
            arr = np.frombuffer(self._buf, dtype=dt, count=a.count, offset=a.offset)
            return (arr != 0).tolist() if a.elem_type == _BOOL else arr.tolist()
        buf, pos, out = self._buf, a.offset, []
        end = a.offset + a.nbytes            # already validated by _skip_strings at open
        for i in range(a.count):
            n = _U64(buf, pos)[0]
            pos += 8
            if pos + n > end:  # pragma: no cover - the file changed under the map
                self._fail(f"string #{i} of array {key!r} runs past the array")
            try:
                out.append(str(buf[pos:pos + n], "utf-8"))
            except UnicodeDecodeError as e:
                self._fail(f"string #{i} of metadata array {key!r} (at byte {pos - 8}) is not "
                           f"valid UTF-8 ({e.reason})")
            pos += n
        return out

    # -- tensor infos + data -------------------------------------------------------------------
    def _read_tensors(self) -> dict:
        infos = []
        names = set()
        for i in range(self._n_tensors):
            at = self._pos
            name = self._str(f"name of tensor #{i}", MAX_TENSOR_NAME_BYTES)
            if not name:
                self._fail(f"tensor #{i} at byte {at} has an empty name")
            if name in names:
                self._fail(f"duplicate tensor name {name!r} (second at byte {at})")
            names.add(name)
            n_dims = self._u32(f"n_dims of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                self._fail(f"tensor {name!r} has {n_dims} dimensions, expected 1 to {MAX_DIMS}")
            ne = [self._u64(f"dimension {j} of tensor {name!r}") for j in range(n_dims)]
            type_id = self._u32(f"type of tensor {name!r}")
            offset = self._u64(f"data offset of tensor {name!r}")
            if any(d < 1 for d in ne):
                self._fail(f"tensor {name!r} has a zero dimension (ggml shape {ne})")
            if type_id not in GGML_TYPES:
                self._fail(f"tensor {name!r} has unknown ggml type id {type_id}")
            type_name, blck, tsize = GGML_TYPES[type_id]
            if ne[0] % blck:
                self._fail(f"tensor {name!r}: row length {ne[0]} is not a multiple of the "
                           f"{type_name} block size {blck}")
            n_el = 1
            for d in ne:
                n_el *= d               # Python ints: cannot overflow
            nbytes = n_el // blck * tsize
            if nbytes > self._size:
                self._fail(f"tensor {name!r} with ggml shape {ne} and type {type_name} would need "
                           f"{nbytes} bytes, more than the whole file ({self._size} bytes)")
            if offset % self.alignment:
                self._fail(f"tensor {name!r}: data offset {offset} is not a multiple of the "
                           f"alignment {self.alignment}")
            infos.append((name, type_name, tuple(reversed(ne)), offset, nbytes))
        a = self.alignment
        self.data_offset = start = (self._pos + a - 1) // a * a
        room = self._size - start
        tensors = {}
        for name, type_name, shape, offset, nbytes in infos:
            if offset > room or nbytes > room - offset:
                self._fail(f"truncated or corrupt: tensor {name!r} data (bytes {start + offset}.."
                           f"{start + offset + nbytes}) extends past the end of the file "
                           f"({self._size} bytes)")
        prev = None
        for name, _, _, offset, nbytes in sorted(infos, key=lambda t: (t[3], t[4])):
            if prev is not None and offset < prev[1]:
                self._fail(f"tensors {prev[0]!r} and {name!r} overlap (data offsets "
                           f"{prev[2]}..{prev[1]} and {offset}..{offset + nbytes})")
            prev = (name, offset + nbytes, offset)
        for name, type_name, shape, offset, nbytes in infos:
            rows = shape[0] if len(shape) > 1 else 1
            data = np.asarray(self._mm[start + offset:start + offset + nbytes]).reshape(rows, -1)
            tensors[name] = RawTensor(name, type_name, shape, data, start + offset)
        return tensors

    # -- public --------------------------------------------------------------------------------
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
