"""The seed log: an append-only, checksummed record of every ZO step — the run's source of truth.

File format (`seedlog.jsonl`, UTF-8, one JSON object per line; keys sorted, no spaces):

    {"config":{...},"crc":C,"head_rows":[3524,9174,2731]|null,
     "mask":{"file":"mask.npz","sha256":"..."}|null,"model":"x.gguf","rng_version":1,
     "tensor_ids":{name:id,...},"trainable":{name:[size,pscale],...},"type":"header","version":2}
    {"crc":C,"g":[0.0123,...],"l0":0.92,"loss":0.93,"lp":[0.95,...],"lr":5e-05,
     "seeds":["8123...",...],"step":12,"type":"step"}
    {"crc":C,"hg":"<base64 float32>","hlr":0.001,"loss":0.9,"lr":1.0,"step":14,"type":"step"}
    {"crc":C,"reason":"non-finite loss or gradient (...)","seeds":["..."],"step":13,"type":"skip"}
    {"at_step":20,"changed":{"lr":[0.001,0.002]},"crc":C,"type":"config"}

`seeds` are the per-query seeds as decimal strings (64-bit), `g` the clipped projected gradient of
each query, `lp` the losses of the +eps passes and `lm` (two-point) or `l0` (one-sided kinds:
L(theta), once) the others; `hg`/`hlr` an exact head gradient and its learning rate; a `config`
record marks settings changed on `--resume --accept-config-change`.  The header's `tensor_ids`,
`rng_version`, `head_rows` and `mask` are what edgetune/runlog.py checks before it resumes,
replays or exports a run (version 1 headers, written before they existed, lack them).
Replaying the step records in order (regenerate z from each of `seeds`, apply the optimizer with
`g` and `lr`) reproduces the trainable state bit for bit.
`crc` is the CRC32 of the record's canonical JSON without the crc field: a torn or corrupted line
(a kill mid-write, a bad sector) fails the check and it and everything after it are dropped.
A damaged record followed by valid ones is not a torn tail: edgetune/runlog.py refuses to resume
or replay such a log (naming the steps lost) rather than silently drop the steps after it.
Records are flushed to the OS after every write (a killed process loses at most the step in
flight) and fsync'd every `fsync_every` records and on close (power loss loses at most that many).
"""
from __future__ import annotations

import json
import os
import zlib

from .. import faults
from ..errors import FormatError

VERSION = 2   # 2: the header records tensor_ids, rng_version, head_rows and the stored mask


def _canonical(rec: dict) -> bytes:
    return json.dumps(rec, sort_keys=True, separators=(",", ":"), allow_nan=True).encode("utf-8")


def encode_record(rec: dict) -> bytes:
    body = {k: v for k, v in rec.items() if k != "crc"}
    out = dict(body)
    out["crc"] = zlib.crc32(_canonical(body))
    return _canonical(out) + b"\n"


def decode_line(line: bytes):
    """A record, or None if the line is torn/corrupt."""
    if not line.endswith(b"\n"):
        return None
    try:
        rec = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(rec, dict) or "crc" not in rec:
        return None
    crc = rec.pop("crc")
    if zlib.crc32(_canonical(rec)) != crc:
        return None
    return rec


def read_log(path) -> tuple[dict | None, list[dict], int]:
    """(header, records, valid_bytes): records up to the first torn/corrupt line."""
    header, records, valid = None, [], 0
    if not os.path.exists(path):
        return None, [], 0
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        line = data[pos:] if nl < 0 else data[pos:nl + 1]
        rec = decode_line(line)
        if rec is None:
            break
        if rec.get("type") == "header":
            if header is not None or records:
                raise FormatError(path, "seed log has a second header")
            header = rec
        else:
            records.append(rec)
        pos += len(line)
        valid = pos
    if records and header is None:
        raise FormatError(path, "seed log has no header")
    return header, records, valid


def records_after(path, valid: int) -> list[dict]:
    """Valid records found after the first torn/corrupt line (at byte `valid`): empty for a torn
    tail (a kill mid-write), not empty when a record in the middle of the log was damaged."""
    with open(path, "rb") as f:
        f.seek(valid)
        lines = f.read().split(b"\n")[1:]     # skip the damaged line itself
    found = (decode_line(line + b"\n") for line in lines if line)
    return [r for r in found if r is not None and r.get("type") != "header"]


class SeedLog:
    """Append-only writer.  Opening an existing log truncates a torn tail before appending."""

    def __init__(self, path, header: dict | None = None, fsync_every: int = 10):
        self.path = str(path)
        self.fsync_every = max(1, int(fsync_every))
        self._pending = 0
        existing_header, self.records, valid = read_log(self.path)
        if existing_header is None and header is None:
            raise FormatError(self.path, "a new seed log needs a header")
        self.header = existing_header
        self._f = open(self.path, "ab")
        if self._f.tell() != valid:  # drop a torn/corrupt tail so appends follow valid records
            self._f.truncate(valid)
            self._f.seek(valid)
        if existing_header is None:
            self.header = dict(header, type="header", version=VERSION)
            self._write(self.header, force_sync=True)

    def _write(self, rec: dict, force_sync: bool = False):
        data = encode_record(rec)
        if faults._spec:  # crash tests: die with half a record on disk
            self._f.write(data[: len(data) // 2])
            self._f.flush()
            faults.reached("log-mid-record")
            data = data[len(data) // 2:]
        self._f.write(data)
        self._f.flush()
        self._pending += 1
        if force_sync or self._pending >= self.fsync_every:
            os.fsync(self._f.fileno())
            self._pending = 0

    def append(self, rec: dict):
        self._write(rec)
        self.records.append(rec)

    def sync(self):
        self._f.flush()
        os.fsync(self._f.fileno())
        self._pending = 0

    def close(self):
        if not self._f.closed:
            self.sync()
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
