"""Rebuild a run's trained state on a freshly loaded model: snapshot + replay of the seed log tail."""
from __future__ import annotations

import json
import os

from ..config import make_config
from ..errors import EdgetuneError
from ..zo.optim import ZOOptimizer
from ..zo.seedlog import read_log
from ..zo.trainable import build_trainable


def read_run_log(run_dir: str):
    """(header, records) of a run directory's seed log, with errors naming what is missing."""
    run_dir = str(run_dir)
    if not os.path.exists(run_dir):
        raise EdgetuneError(f"{run_dir}: run directory not found")
    if not os.path.isdir(run_dir):
        raise EdgetuneError(f"{run_dir}: is not a directory (expected a run directory)")
    log_path = os.path.join(run_dir, "seedlog.jsonl")
    if not os.path.exists(log_path):
        raise EdgetuneError(f"{run_dir}: not a run directory (no seedlog.jsonl)")
    header, records, _ = read_log(log_path)
    if header is None:
        raise EdgetuneError(f"{log_path}: no valid header")
    from ..runlog import check_log_intact
    check_log_intact(log_path, records)   # a damaged record mid-log is refused, not skipped
    return header, records


def resolve_step(run_dir: str, step, records) -> int | None:
    """--step best|last|N -> a step count (None = last).  'best' is the best dev step recorded
    in summary.json (dev only: nothing is ever selected on test)."""
    if step in (None, "last"):
        return None
    if step == "best":
        path = os.path.join(str(run_dir), "summary.json")
        best = None
        if os.path.exists(path):
            try:
                with open(path) as f:
                    best = (json.load(f).get("best") or [None])[0]
            except (OSError, ValueError):
                best = None
        return None if best is None else int(best)
    try:
        n = int(step)
    except (TypeError, ValueError):
        raise EdgetuneError(f"--step: expected best, last or a step number, got {step!r}") from None
    done = sum(1 for r in records if r.get("type") in ("step", "skip"))
    if not 0 <= n <= done:
        raise EdgetuneError(f"{run_dir}: --step {n} is outside the run's 0..{done} logged steps")
    return n


def apply_run(model, run_dir: str, log=None, step="best"):
    """Attach the run's trainable set to `model` and restore its state at `step` (best: the best
    dev step; last; or a step number) by replaying the seed log; returns the set.
    log: (header, records) already read with read_run_log, to avoid reading the log twice."""
    from ..runlog import (StepBatches, build_set, check_header, check_log_intact, load_mask,
                          load_snapshot, open_dataset, replay, snapshot_step)
    from ..zo.head_grad import HeadAdam
    header, records = log if log is not None else read_run_log(run_dir)
    cfg = make_config(flag_values={k: v for k, v in header["config"].items()
                                   if k not in ("resume", "overwrite")})
    from . import data as datamod
    enc = datamod.encode(open_dataset(cfg), model, max_length=cfg.max_length, chat=cfg.chat)
    cfg = cfg.resolved(enc.dataset.kind)
    ts = build_set(model, cfg, enc, StepBatches(enc, cfg.batch, cfg.seed, cfg.train_limit),
                   mask=load_mask(run_dir, header))   # the stored mask, never a recomputed one
    check_header(header, ts, run_dir)   # set, tensor ids, RNG and log version, label rows
    opt = ZOOptimizer(ts.zo_params(), cfg.optimizer, weight_decay=cfg.weight_decay,
                      momentum=cfg.momentum, dist=cfg.dist)
    hopt = HeadAdam(ts.head_params()) if cfg.head_grad == "exact" else None
    target = resolve_step(run_dir, step, records)
    if target is None:
        check_log_intact(os.path.join(str(run_dir), "seedlog.jsonl"), records,
                         snapshot_step(str(run_dir)))
        replay(records, ts, opt, load_snapshot(run_dir, ts, opt, hopt), hopt)
    else:   # from the initial state (the log is the truth), or from best.npz when it matches
        start = 0
        if os.path.exists(os.path.join(str(run_dir), "best.npz")):
            import numpy as np
            with np.load(os.path.join(str(run_dir), "best.npz")) as z:
                snap = int(z["step"])
            if snap == target:
                start = load_snapshot(run_dir, ts, opt, hopt, name="best.npz")
        replay(records, ts, opt, start, hopt, to_step=target)
    ts.restored_step = target
    return ts


def check_trained_on(header: dict, path: str, run_dir) -> None:
    """Refuse a model file other than the one the run's log header names."""
    trained_on = header.get("model")
    if trained_on and os.path.basename(path) != trained_on:
        raise EdgetuneError(f"{path}: the run {run_dir} was trained on {trained_on}, not on this "
                            f"model file")


def open_run(run_dir, model=None, step="best"):
    """(model_path, Model, TrainableSet, header) for a run directory: the model it was trained on
    (or `model`, which must be the same file), with the run's state at `step` applied (best: the
    best dev step; last; or a step number).  What every exporter reads a run through."""
    from .. import assets
    from ..model.lm import load
    run_dir = str(run_dir)
    header, records = read_run_log(run_dir)
    cfg = header["config"]
    path = assets.resolve_model(model if model else cfg["model"], quant=cfg.get("quant", "q4_0"),
                                group_size=cfg.get("group_size", 32))
    if model:
        check_trained_on(header, path, run_dir)
    m = load(path)
    ts = apply_run(m, run_dir, log=(header, records), step=step)
    done = sum(1 for r in records if r.get("type") == "step")
    header["_steps"] = done if ts.restored_step is None else ts.restored_step
    return path, m, ts, header
