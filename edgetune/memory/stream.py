"""Layer streaming: weights of streamed layers come from the model file into two reusable buffers.

A prefetch thread reads layer l+1 (the next streamed layer, wrapping around to the first one for
the next forward) while layer l computes.  `acquire(l)` blocks until layer l is *completely* read
(an Event set only after the last byte landed), then points the layer's QTensors' codes at views
of the buffer; `release(l)` drops those views and lets the thread refill the buffer.  Only two
layers' bytes are ever held, whatever the model size.  Scales of streamed tensors that are not
trained are converted from the buffer on each use; trained ones (QZO) stay resident.

Reading uses os.pread on a private file descriptor (the page cache is the kernel's, not this
process's memory); after each read posix_fadvise(DONTNEED) is optional (`drop_cache=True`, used to
measure cold-cache steps honestly).
"""
from __future__ import annotations

import os
import threading

import numpy as np

from ..errors import EdgetuneError
from ..formats.gguf_reader import RawTensor, to_qtensor


def pread_into(fd: int, buf: memoryview, offset: int) -> None:
    """Fill buf from the file at offset (loops over short reads)."""
    done = 0
    n = len(buf)
    while done < n:
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            raise EdgetuneError(f"unexpected end of file while streaming a layer (offset {offset})")
        done += got


class LayerStreamer:
    def __init__(self, path: str, layer_tensors: dict, reader=None, drop_cache: bool = False):
        """layer_tensors: layer index -> list of (name, type_name, shape, file offset, nbytes)."""
        self.path = path
        self.layers = sorted(layer_tensors)
        self.tensors = layer_tensors
        self.fd = os.open(path, os.O_RDONLY)
        self.reader = reader or pread_into
        self.drop_cache = drop_cache
        size = max(sum(t[4] for t in ts) for ts in layer_tensors.values())
        self.buffers = [np.empty(size, np.uint8), np.empty(size, np.uint8)]
        self.slot_layer = [None, None]          # which layer each buffer holds / is loading
        self.ready = [threading.Event(), threading.Event()]
        self.free = [threading.Event(), threading.Event()]
        for e in self.free:
            e.set()
        self.error = None
        self.bytes_read = 0
        self._next_slot = 0
        self._slot_for = {}
        self._lock = threading.Lock()
        self._queue = []
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="edgetune-prefetch", daemon=True)
        self._thread.start()
        self._schedule(self.layers[0])
        if len(self.layers) > 1:
            self._schedule(self.layers[1])

    # -- prefetch thread -----------------------------------------------------------------------
    def _schedule(self, layer: int):
        with self._wake:
            slot = self._next_slot
            self._next_slot ^= 1
            self._slot_for[layer] = slot
            self._queue.append((slot, layer))
            self._wake.notify()

    def _run(self):
        while True:
            with self._wake:
                while not self._queue and not self._stop:
                    self._wake.wait()
                if self._stop:
                    return
                slot, layer = self._queue.pop(0)
            self.free[slot].wait()               # the compute side released this buffer
            if self._stop:
                return
            self.free[slot].clear()
            try:
                buf = memoryview(self.buffers[slot])
                pos = 0
                for (_, _, _, off, nbytes) in self.tensors[layer]:
                    self.reader(self.fd, buf[pos:pos + nbytes], off)
                    if self.drop_cache:
                        os.posix_fadvise(self.fd, off, nbytes, os.POSIX_FADV_DONTNEED)
                    pos += nbytes
                self.bytes_read += pos
            except BaseException as e:  # surfaced to the compute thread by acquire()
                self.error = e
            self.slot_layer[slot] = layer
            self.ready[slot].set()               # only now: the layer is completely read

    # -- compute side --------------------------------------------------------------------------
    def acquire(self, layer: int, qtensors: dict):
        """Wait until `layer` is fully read, then set codes (and untrained scales) of its QTensors."""
        slot = self._slot_of(layer)
        self.ready[slot].wait()
        if self.error is not None:
            raise EdgetuneError(f"{self.path}: reading layer {layer} failed: {self.error}")
        if self.slot_layer[slot] != layer:
            raise EdgetuneError(f"internal: buffer holds layer {self.slot_layer[slot]}, not {layer}")
        buf = self.buffers[slot]
        pos = 0
        for (name, type_name, shape, off, nbytes) in self.tensors[layer]:
            qt = qtensors[name]
            rows = shape[0] if len(shape) > 1 else 1
            raw = buf[pos:pos + nbytes].reshape(rows, -1)
            fresh = to_qtensor(RawTensor(name, type_name, tuple(shape), raw, off), self.path,
                               qt.tensor_id)
            qt.codes = fresh.codes             # a view into the buffer (Q4_0/Q4_1/Q8_0)
            if qt.meta.get("scales_per_use"):  # untrained: this use's scales come from the buffer
                qt.scales, qt.mins = fresh.scales, fresh.mins
            pos += nbytes
        return slot

    def read_tensor(self, name: str, tensor_id: int = 0):
        """Read one tensor of a streamed layer outside the prefetch cycle (a converted QTensor)."""
        for ts in self.tensors.values():
            for (tname, type_name, shape, off, nbytes) in ts:
                if tname == name:
                    buf = np.empty(nbytes, np.uint8)
                    pread_into(self.fd, memoryview(buf), off)
                    rows = shape[0] if len(shape) > 1 else 1
                    return to_qtensor(RawTensor(name, type_name, tuple(shape),
                                                buf.reshape(rows, -1), off), self.path, tensor_id)
        raise EdgetuneError(f"{self.path}: {name} is not a streamed tensor")

    def release(self, layer: int, qtensors: dict):
        slot = self._slot_of(layer)
        for (name, *_rest) in self.tensors[layer]:
            qt = qtensors[name]
            qt.codes = None
            if qt.meta.get("scales_per_use"):
                qt.scales = qt.mins = None
        self.ready[slot].clear()
        self.slot_layer[slot] = None
        self.free[slot].set()
        k = self.layers.index(layer)
        self._schedule(self.layers[(k + 2) % len(self.layers)])

    def _slot_of(self, layer: int) -> int:
        with self._lock:
            return self._slot_for[layer]

    def close(self):
        with self._wake:
            self._stop = True
            self._wake.notify()
        for e in self.free:
            e.set()
        self._thread.join(timeout=5)
        try:
            os.close(self.fd)
        except OSError:
            pass
