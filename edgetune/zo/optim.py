"""ZO optimizers (update theta from projected gradients) and learning-rate schedules.

A ZO step yields, for each query j, a scalar projected gradient g_j along direction z_j (z_j is
regenerated from the query's seed, never stored).  The gradient estimate is
ghat = (1/q) sum_j g_j c z_j (c = the Param's pscale, the same per-tensor factor the perturbation
used: a diagonal preconditioner), and:

  sgd       theta -= lr * (ghat + wd * theta)                       (MeZO, Malladi et al. 2023)
  momentum  m = mu*m + ghat;  theta -= lr * (m + wd * theta)
  adam      m,v moments of ghat, bias-corrected                     (ZO-AdaMM, Chen et al. 2019)
  sign      theta -= lr * (sign(ghat) + wd * theta)                 (ZO-signSGD, Liu et al. 2019)

Weight decay skips Params with decay=False (norms, biases, scales).  State (m, v) exists only
for the trainable set.  Updates are deterministic: replaying the same (seed, g, lr) sequence
reproduces theta bit for bit.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import EdgetuneError

OPTIMIZERS = ("sgd", "momentum", "adam", "sign")
SCHEDULES = ("constant", "linear", "cosine")


def lr_at(step: int, base_lr: float, total_steps: int, schedule: str = "constant",
          warmup: int = 0, min_ratio: float = 0.0) -> float:
    """Learning rate for 0-based `step`: linear warmup, then constant / linear / cosine decay."""
    if schedule not in SCHEDULES:
        raise EdgetuneError(f"unknown lr schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    span = max(1, total_steps - warmup)
    t = min(1.0, max(0.0, (step - warmup) / span))
    if schedule == "linear":
        f = 1.0 - t
    else:
        f = 0.5 * (1.0 + math.cos(math.pi * t))
    return base_lr * (min_ratio + (1.0 - min_ratio) * f)


def query_seed(seed: int, j: int) -> int:
    """Seed of query j of a step (j=0 is the step seed itself)."""
    if j == 0:
        return seed
    from .rng import stream_key
    return int(stream_key(seed, 0xA5A5_0000 + j))


class ZOOptimizer:
    def __init__(self, params, kind: str = "sgd", weight_decay: float = 0.0, momentum: float = 0.9,
                 betas=(0.9, 0.999), adam_eps: float = 1e-8, dist: str = "rademacher"):
        if kind not in OPTIMIZERS:
            raise EdgetuneError(f"unknown optimizer {kind!r}; choose from {', '.join(OPTIMIZERS)}")
        self.params = list(params)
        self.kind = kind
        self.weight_decay = float(weight_decay)
        self.momentum = float(momentum)
        self.betas = tuple(float(b) for b in betas)
        self.adam_eps = float(adam_eps)
        self.dist = dist
        self.t = 0
        self.m = {}
        self.v = {}
        if kind in ("momentum", "adam"):
            self.m = {p.name: np.zeros_like(p.value) for p in self.params}
        if kind == "adam":
            self.v = {p.name: np.zeros_like(p.value) for p in self.params}

    def _ghat(self, p, seeds, gs) -> np.ndarray:
        from .. import kernels
        out = np.zeros(p.value.shape, np.float32)
        q = len(gs)
        for s, g in zip(seeds, gs):
            kernels.rng_axpy(out, float(g) * p.pscale / q, s, p.tensor_id, self.dist)  # += (g/q) z
        return out

    def step(self, seeds, gs, lr: float):
        """Apply one update from the per-query seeds and projected gradients."""
        if len(seeds) != len(gs) or not gs:
            raise EdgetuneError("optimizer step needs one projected gradient per query seed")
        self.t += 1
        lr32 = np.float32(lr)
        wd = np.float32(self.weight_decay)
        from .. import kernels
        for p in self.params:
            if self.kind == "sgd":
                if wd and p.decay:
                    p.value -= lr32 * wd * p.value
                q = len(gs)
                for s, g in zip(seeds, gs):  # fused: theta += (-lr * g / q) * z, no temporary
                    kernels.rng_axpy(p.value, -float(lr32) * float(g) * p.pscale / q, s,
                                     p.tensor_id, self.dist)
                continue
            ghat = self._ghat(p, seeds, gs)
            if self.kind == "sign":
                upd = np.sign(ghat)
            elif self.kind == "momentum":
                m = self.m[p.name]
                m *= np.float32(self.momentum)
                m += ghat
                upd = m
            else:
                b1, b2 = self.betas
                m, v = self.m[p.name], self.v[p.name]
                m *= np.float32(b1)
                m += np.float32(1 - b1) * ghat
                v *= np.float32(b2)
                v += np.float32(1 - b2) * ghat * ghat
                mh = m / np.float32(1 - b1 ** self.t)
                vh = v / np.float32(1 - b2 ** self.t)
                upd = mh / (np.sqrt(vh) + np.float32(self.adam_eps))
            if wd and p.decay:
                upd = upd + wd * p.value
            p.value -= lr32 * upd.astype(np.float32)

    def state(self) -> dict:
        out = {"t": np.array(self.t)}
        for k, a in self.m.items():
            out[f"m:{k}"] = a
        for k, a in self.v.items():
            out[f"v:{k}"] = a
        return out

    def load_state(self, st: dict):
        self.t = int(st["t"])
        for k in self.m:
            self.m[k][...] = st[f"m:{k}"]
        for k in self.v:
            self.v[k][...] = st[f"v:{k}"]
