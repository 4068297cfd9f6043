"""The exact gradient of the label-word loss w.r.t. the head rows and label bias (forward-only).

With logits l = x (W + D)^T + b over the C label words (x: final normed hidden state at the
answer position, W: the model's label rows, D: the `head` delta, b: the `bias` set) and
cross-entropy on label y:
    dL/dD = (softmax(l) - onehot(y))^T x / B        dL/db = mean(softmax(l) - onehot(y))
It needs only x from the unperturbed pass — no backward through the network, one d-vector per
example — so `--head-grad exact` stays forward-only: everything below the head is still trained
by ZO (or frozen).  The update is Adam; each step's gradient goes into the seed log (float32,
base64) so replay stays exact.
"""
from __future__ import annotations

import base64

import numpy as np

from ..errors import EdgetuneError


def gradients(x: np.ndarray, logits: np.ndarray, labels, params) -> dict:
    """name -> dL/dparam (float32) for the head/label_bias Params, from states x [B, d] and the
    unperturbed label-word logits [B, C]."""
    lg = np.asarray(logits, np.float64)
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    y = np.asarray(labels, np.int64)
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    out = {}
    for prm in params:
        if prm.kind == "head":
            out[prm.name] = (p.T @ np.asarray(x, np.float64)).astype(np.float32)
        elif prm.kind == "label_bias":
            out[prm.name] = p.sum(0).astype(np.float32)
    return out


def encode(grads: dict, params) -> str:
    flat = np.concatenate([grads[p.name].reshape(-1) for p in params]).astype("<f4")
    return base64.b64encode(flat.tobytes()).decode("ascii")


def decode(text: str, params) -> dict:
    flat = np.frombuffer(base64.b64decode(text), dtype="<f4")
    if flat.size != sum(p.size for p in params):
        raise EdgetuneError(f"seed log: exact head gradient has {flat.size} values, the run's "
                            f"head/bias has {sum(p.size for p in params)}")
    out, o = {}, 0
    for p in params:
        out[p.name] = flat[o:o + p.size].reshape(p.value.shape)
        o += p.size
    return out


class HeadAdam:
    """Adam on the head/bias Params from exact gradients; deterministic, state snapshotted."""

    def __init__(self, params, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.b1, self.b2 = betas
        self.eps = eps
        self.t = 0
        self.m = {p.name: np.zeros_like(p.value) for p in self.params}
        self.v = {p.name: np.zeros_like(p.value) for p in self.params}

    def step(self, grads: dict, lr: float):
        self.t += 1
        for p in self.params:
            g = grads[p.name]
            m, v = self.m[p.name], self.v[p.name]
            m *= np.float32(self.b1)
            m += np.float32(1 - self.b1) * g
            v *= np.float32(self.b2)
            v += np.float32(1 - self.b2) * g * g
            mh = m / np.float32(1 - self.b1 ** self.t)
            vh = v / np.float32(1 - self.b2 ** self.t)
            p.value -= np.float32(lr) * (mh / (np.sqrt(vh) + np.float32(self.eps)))

    def state(self) -> dict:
        out = {"t": np.array(self.t)}
        out.update({f"m:{k}": a for k, a in self.m.items()})
        out.update({f"v:{k}": a for k, a in self.v.items()})
        return out

    def load_state(self, st: dict):
        self.t = int(st["t"])
        for k in self.m:
            self.m[k][...] = st[f"m:{k}"]
            self.v[k][...] = st[f"v:{k}"]
