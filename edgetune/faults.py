"""Crash injection for the crash-safety tests: EDGETUNE_FAULT=point:N SIGKILLs this process the Nth
time `point` is reached.  Unset: a no-op.  Points, in the order a run reaches them:
  after-config          config.json written, seed log not yet created
  log-mid-record        half of a seed-log record written (the 1st is the header)
  eval-batch            before each batch of an evaluation (zero-shot, dev, final test)
  step-logged           a step's record appended, its evaluation and snapshot not yet done
  snapshot-before-rename  state.npz.tmp complete, not yet renamed
  before-summary        final evaluation done, summary.json not yet written
  rename-<file>         <file>.tmp complete, not yet renamed (train/rundir.atomic_file:
                        rename-config.json, rename-summary.json, rename-metrics.csv,
                        rename-metrics.png)"""
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
