"""Crash injection for the crash-safety tests: EDGETUNE_FAULT=point:N SIGKILLs this process the Nth
time `point` is reached (points: log-mid-record, snapshot-before-rename).  Unset: a no-op."""
from __future__ import annotations

import os
import signal

_spec = os.environ.get("EDGETUNE_FAULT", "")
_counts: dict = {}


def reached(point: str) -> None:
    if not _spec:
        return
    name, _, n = _spec.partition(":")
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
