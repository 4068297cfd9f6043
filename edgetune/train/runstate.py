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
    return header, records


def apply_run(model, run_dir: str, log=None):
    """Attach the run's trainable set to `model` and restore its latest state; returns the set.
    log: (header, records) already read with read_run_log, to avoid reading the log twice."""
    from .loop import StepBatches, load_snapshot, open_dataset, replay
    header, records = log if log is not None else read_run_log(run_dir)
    cfg = make_config(flag_values={k: v for k, v in header["config"].items()
                                   if k not in ("resume", "overwrite")})
    calib, head_rows = None, None
    if "sparse" in cfg.method or "head" in cfg.method:
        import numpy as np
        import torch
        from . import data as datamod
        enc = datamod.encode(open_dataset(cfg), model, max_length=cfg.max_length,
                             chat=cfg.chat)
        if enc.dataset.kind == "classification":
            head_rows = enc.label_tokens
        if "sparse" in cfg.method:
            b = StepBatches(enc, cfg.batch, cfg.seed)
            calib = [torch.from_numpy(b.get(i).padded().astype(np.int64)) for i in range(4)]
    ts = build_trainable(model.net, cfg.method, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                         lora_targets=tuple(t.strip() for t in cfg.lora_targets.split(",")),
                         sparse_fraction=cfg.sparse_fraction, calibration=calib,
                         init_seed=cfg.seed, dist=cfg.dist, head_rows=head_rows)
    if json.loads(json.dumps(ts.describe())) != header.get("trainable"):
        raise EdgetuneError(f"{run_dir}: this model does not match the run's trainable set "
                            f"(was the run made with another model file?)")
    opt = ZOOptimizer(ts.params, cfg.optimizer, weight_decay=cfg.weight_decay,
                      momentum=cfg.momentum, dist=cfg.dist)
    replay(records, ts, opt, load_snapshot(run_dir, ts, opt))
    return ts
