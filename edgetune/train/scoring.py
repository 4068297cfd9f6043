"""Score several runs (and the untuned model) on one split in one process.

`edgetune eval --run A --run B ... [--baselines]` uses this.  Runs whose whole body is frozen
(`head`, `bias`: only the label-word logits change) share one dict of final normed states, so the
network runs once per example for all of them and for the zero-shot line; any other run gets a
freshly loaded model, and runs whose lowest trainable block is the same (e.g. two `--layers top:2`
runs) share the output of the blocks below it (held in memory: ~0.2 GB for SmolLM2 on 1,200
tweets).  Every run is restored at `step` (best dev step by
default) by replaying its seed log (train/runstate.apply_run), exactly as single-run eval does.
"""
from __future__ import annotations

import time

from .metrics import class_report, predictions
from .passes import BatchPasses


def _load(path):
    from ..model.lm import load
    return load(path)


def frozen_body(header: dict) -> bool:
    """True when a run's log header lists only head/bias tensors (nothing needs applying)."""
    from ..zo.trainable import HEAD_METHODS
    names = header.get("trainable") or {}
    return bool(names) and all(k.split(":", 1)[0] in HEAD_METHODS for k in names)


def score_runs(path: str, ds_factory, runs, split: str = "test", limit=None, batch: int = 16,
               step="best", baselines: bool = False, log=print, logs=None) -> list:
    """[{"run", "step", "report", "seconds", "shared"}] for each run (run None: the untuned
    model's zero-shot line, first, when baselines).  ds_factory(model) -> the encoded dataset
    (every run is scored on exactly the same examples).  logs: run -> (header, records) already
    read with runstate.read_run_log (each seed log is read once)."""
    from .runstate import apply_run, read_run_log
    logs = dict(logs or {})
    shared_model = _load(path)
    ds = ds_factory(shared_model)
    features: dict = {}
    prefix: dict = {}      # (split, batch, first_layer) -> frozen blocks' output
    out = []
    todo = ([None] if baselines else []) + list(runs)
    for run in todo:
        t = time.perf_counter()
        model, ts = shared_model, None
        if run is not None:
            runlog = logs[run] if run in logs else read_run_log(run)
            frozen = frozen_body(runlog[0])
            # a set that changes the body (scales: in place) gets a model of its own
            model = shared_model if frozen else _load(path)
            ts = apply_run(model, run, log=runlog, step=step)
            assert ts.frozen_body == frozen
        else:
            from ..model.transformer import NoHooks
            model.net.hooks = NoHooks()
        shared = ts is None or ts.frozen_body
        # runs that train only the top blocks share the frozen blocks' output too
        passes = BatchPasses(model, ts, ds.label_tokens, features=features if shared else None,
                             prefix=prefix, prefix_splits=(split,))
        pred = predictions(model, ds, split, batch, limit, passes)
        rep = class_report(pred, ds, split)
        dt = time.perf_counter() - t
        rstep = None if ts is None else ("last" if ts.restored_step is None else ts.restored_step)
        out.append({"run": run, "step": rstep, "report": rep, "seconds": dt, "shared": shared})
        name = run if run is not None else "zero-shot (untuned model)"
        log(f"{name}: accuracy {100 * rep['accuracy']:.2f}% ({split}, {len(pred)} examples"
            + (f", step {rstep}" if run is not None else "") + f"; {dt:.0f}s"
            + (", frozen-body features shared" if shared and run is not None else "") + ")")
        if model is not shared_model:
            model.net.close()
    return out
