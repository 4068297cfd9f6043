"""A client's local classification task: losses under perturbations and predictions, two ways.

  HeadTask   for the `head` trainable set.  The whole body is frozen, so each example's final
             normed hidden state at the answer position (x, n_embd floats) and the frozen
             label-word logits (base, C floats) are computed once (`extract_features`) and
             cached; a forward under head delta D is then logits = base + x @ D^T — exactly
             what Transformer.head computes with the head set attached (tested against the
             full model in tests/test_federated.py), at a few microseconds per example.
  ModelTask  any trainable set (scales, lora, norms, ...): the full int4 forward through the
             model with the set's hooks, both passes of a query layer by layer (ZO2).

Both expose the same four things the federated round needs: `n`, `labels`, `losses(rows,
perturbs)` (cross-entropy of the rows under each Perturb) and `predict(rows)`.
"""
from __future__ import annotations

import numpy as np

from ..model.transformer import NoHooks
from ..train import objectives


def extract_features(model, examples, label_tokens, batch_size: int = 32, progress=None):
    """(x [n, d] float32, base [n, C] float32) of encoded classification examples, computed
    with the frozen model (no trainable set attached while it runs)."""
    net = model.net
    saved, net.hooks = net.hooks, NoHooks()
    rows = net.output_rows_f32(label_tokens)     # the label rows in fp32, as the model's head
    n, d = len(examples), model.config.n_embd
    x = np.zeros((n, d), np.float32)
    base = np.zeros((n, len(label_tokens)), np.float32)
    order = sorted(range(n), key=lambda i: len(examples[i].input_ids))  # little padding
    try:
        for b in range(0, n, batch_size):
            idx = order[b:b + batch_size]
            tokens, _ = model._pad([list(examples[i].input_ids) for i in idx])
            pos = np.asarray([examples[i].answer_pos for i in idx], dtype=np.int64)
            sel = net.hidden(tokens, rows=np.arange(len(idx)) * tokens.shape[1] + pos)
            xn = np.asarray(net.norm(sel, "output_norm.weight", net.output_norm), np.float32)
            x[idx] = xn
            base[idx] = xn @ rows.T
            if progress is not None:
                progress(len(idx))
    finally:
        net.hooks = saved
    return x, base


def _ce(logits: np.ndarray, y: np.ndarray) -> float:
    lg = logits.astype(np.float64)
    m = lg.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(lg - m).sum(axis=1))
    return float(np.mean(lse - lg[np.arange(len(y)), y]))


class HeadTask:
    """Cached-feature task for the `head` set (see the module docstring)."""

    def __init__(self, x, base, labels, ts):
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.base = np.ascontiguousarray(base, dtype=np.float32)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.n = len(self.labels)
        if len(ts.params) != 1 or ts.params[0].kind != "head":
            raise ValueError("HeadTask needs a trainable set that is exactly `head`")
        self.param = ts.params[0]
        self._z = {}

    def _delta(self, pert) -> np.ndarray:
        p = self.param
        if pert is None:
            return p.value
        z = self._z.get(pert.seed)
        if z is None:
            if len(self._z) > 4096:
                self._z.clear()
            z = self._z[pert.seed] = pert.z(p)
        return p.value + np.float32(pert.eps * pert.sign * p.pscale) * z   # == Perturb.apply

    def logits(self, rows, pert=None) -> np.ndarray:
        return self.base[rows] + self.x[rows] @ self._delta(pert).T

    def losses(self, rows, perturbs) -> list:
        y = self.labels[rows]
        return [_ce(self.logits(rows, p), y) for p in perturbs]

    def predict(self, rows=None) -> np.ndarray:
        rows = np.arange(self.n) if rows is None else rows
        return self.logits(rows).argmax(-1)


class ModelTask:
    """Full-forward task for any trainable set attached to `model` (see the module docstring)."""

    def __init__(self, model, examples, label_tokens):
        self.model, self.examples, self.label_tokens = model, list(examples), list(label_tokens)
        self.labels = np.asarray([e.label for e in self.examples], dtype=np.int64)
        self.n = len(self.examples)

    def _cols(self, rows):
        ex = [self.examples[int(i)] for i in rows]
        return [list(e.input_ids) for e in ex], [e.answer_pos for e in ex], [e.label for e in ex]

    def losses(self, rows, perturbs) -> list:
        ids, pos, y = self._cols(rows)
        return objectives.classification_losses(self.model, ids, pos, y, self.label_tokens,
                                                list(perturbs))

    def predict(self, rows=None, batch_size: int = 32) -> np.ndarray:
        rows = np.arange(self.n) if rows is None else np.asarray(rows)
        out = []
        for b in range(0, len(rows), batch_size):
            ids, pos, _ = self._cols(rows[b:b + batch_size])
            out.append(objectives.predict(self.model, ids, pos, self.label_tokens))
        return np.concatenate(out) if out else np.zeros(0, np.int64)
