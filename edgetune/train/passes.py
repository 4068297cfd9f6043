"""Losses of one batch under many perturbations, computing each thing once (DESIGN principle 7).

A ZO step asks for the loss of the same batch under P perturbations (2q for two-point, q + 1 for
one-sided / normalised).  Done naively that is P full forwards.  Here:

  * blocks below the trainable set's first block (`TrainableSet.first_layer`) run once per step,
    unperturbed, and every perturbed pass starts from their output;
  * the blocks above run layer by layer for `chunk` passes at a time, so a block's weights are
    read once per chunk (ZO2 generalised from 2 passes to P);
  * when only `head`/`bias` train (`TrainableSet.frozen_body`) nothing below the label-word logits
    can change: the final normed hidden state at each example's answer position is computed once
    per example and cached (one d-vector per example, e.g. 2.3 KB for SmolLM2), and a perturbed
    pass is a C x d product — a step costs a forward only for examples never seen before.

Cost of one step, in forwards of the batch (n blocks, K trainable ones, P passes):
    (n - K + P * K) / n        (+ the label-word logits, negligible)
and ~0 for a frozen body once its examples are cached.  `step_cost()` returns it.

The same object scores dev/test examples, so evaluation of a frozen body is also nearly free
after the first time.
"""
from __future__ import annotations

import numpy as np

from ..errors import EdgetuneError
from .objectives import (ce_losses, error_rates, lm_targets, log_softmax32,  # noqa: F401  (re-exported)
                         log_softmax64)


LM_ROWS = 256   # next-token rows whose full-vocabulary logits are held at once (lm losses)


def step_cost(n_layer: int, first_layer: int, passes: int) -> float:
    """Forwards per step for a set whose lowest trainable block is first_layer (see above)."""
    k = n_layer - first_layer
    return (n_layer - k + passes * k) / n_layer


class BatchPasses:
    """Label-word logits / LM losses of batches under lists of perturbations (None = unperturbed).

    model: an edgetune Model whose net carries the trainable set `ts` as its hooks.
    chunk: perturbed passes that go through a block together (memory: chunk hidden states)."""

    def __init__(self, model, ts, label_tokens=None, chunk: int = 8, cache: bool = True,
                 features: dict | None = None, prefix: dict | None = None,
                 prefix_splits=("dev",)):
        self.model, self.ts, self.label_tokens = model, ts, label_tokens
        self.chunk = max(1, int(chunk))
        # ts None (the untuned model) has a frozen body too, but only callers that share the
        # feature dict (train/scoring.py) ask for the cache then
        self.cache_on = bool(cache) and (ts.frozen_body if ts is not None else features is not None)
        # (split, index) -> final normed state [d] of a frozen body; `features` shares one dict
        # between BatchPasses of the same model file (several runs scored in one process)
        self._features: dict = {} if features is None else features
        # (split, batch indices, first_layer) -> output of the frozen blocks below first_layer,
        # kept for the splits in prefix_splits (dev: scored every eval_every steps on the same
        # batches); `prefix` shares the dict between runs of one model file (train/scoring.py)
        self._prefix: dict = {} if prefix is None else prefix
        self.prefix_splits = tuple(prefix_splits)
        self.forwards = 0                  # examples that went through the network (for stats)
        self._out_f32 = None               # lm_exact: the output matrix as float32 [V, d]

    @property
    def first_layer(self) -> int:
        return self.model.config.n_layer if self.ts is None else self.ts.first_layer

    # -- classification ------------------------------------------------------------------------
    def _final_states(self, batch, perturbs, split: str | None):
        """Final normed states at the answer positions, one [B, d] tensor per perturbation."""
        if self.cache_on and split is not None:
            keys = [(split, i) for i in batch.indices]
            missing = [j for j, k in enumerate(keys) if k not in self._features]
            if missing:
                sub = [batch.input_ids[j] for j in missing]
                pos = [batch.answer_pos[j] for j in missing]
                x = self._compute_states(sub, pos, [None])[0][0]
                for j, row in zip(missing, x):
                    self._features[keys[j]] = row.copy()
            x = np.stack([self._features[k] for k in keys])
            return [x] * len(perturbs), True
        key = ((split, tuple(batch.indices), self.first_layer)
               if split in self.prefix_splits and self.first_layer > 0 else None)
        return self._compute_states(batch.input_ids, batch.answer_pos, perturbs, key)

    def _compute_states(self, ids, answer_pos, perturbs, key=None):
        """(states, shared): shared when the states cannot depend on the perturbation.
        key: cache the frozen blocks' output under it (the same examples come again)."""
        model, net = self.model, self.model.net
        tokens, lengths = model._pad(ids)
        B = tokens.shape[0]
        idx = np.asarray(answer_pos, dtype=np.int64)
        f = self.first_layer
        if key is not None and key in self._prefix:
            h0 = self._prefix[key]
        else:
            self.forwards += B
            h0 = net.hidden_upto(tokens, f)
            if key is not None and 0 < f:
                self._prefix[key] = h0
        frozen_norm = self.ts is None or "output_norm.weight" not in getattr(self.ts, "norms", {})
        if f >= net.config.n_layer and frozen_norm:
            x = net.final_norm(h0[np.arange(B), idx])
            return [x] * len(perturbs), True
        rows = np.arange(B, dtype=np.int64) * tokens.shape[1] + idx   # the answer positions only
        out = []
        for c in range(0, len(perturbs), self.chunk):
            part = perturbs[c:c + self.chunk]
            for h, p in zip(net.hidden_from(h0, f, part, rows), part):
                out.append(net.final_norm(h, p))
        return out, False

    def class_logits(self, batch, perturbs, split: str | None = None):
        """(logits [P, B, C] float32 numpy, x_base): x_base is the unperturbed final state [B, d]
        when perturbs contains None (the exact head gradient needs it), else None."""
        if not self.label_tokens:
            raise EdgetuneError("class_logits needs a classification dataset's label words")
        states, shared = self._final_states(batch, perturbs, split)
        net = self.model.net
        rows = self.label_tokens
        x_base = None
        if None in perturbs:
            x_base = np.asarray(states[perturbs.index(None)], np.float32)
        if shared:  # one state for every pass: vectorise the head over all perturbations
            lg = net.label_logits(states[0], rows, perturbs)
        else:
            lg = np.stack([net.label_logits(x, rows, [p])[0] for x, p in zip(states, perturbs)])
        return lg, x_base

    def class_losses(self, batch, perturbs, split=None, metric: str = "ce"):
        lg, x = self.class_logits(batch, perturbs, split)
        fn = ce_losses if metric == "ce" else error_rates
        return [float(v) for v in fn(lg, batch.labels)], lg, x

    def predict(self, batch, split=None) -> np.ndarray:
        lg, _ = self.class_logits(batch, [None], split)
        return lg[0].argmax(-1)

    # -- language modelling --------------------------------------------------------------------
    def _lm_rows(self, batch):
        """(tokens, first block to run, rows, targets [N]) for a batch's next-token rows, or None
        when no token carries the loss; rows: their flat indices b*T + t into the hidden states
        (the last block computes only those: Transformer.hidden_from's rows)."""
        padded, targets = lm_targets(batch.input_ids, batch.loss_masks)
        if padded is None:
            return None
        tokens, _ = self.model._pad(batch.input_ids)
        B, W = tokens.shape[0], len(padded[0])
        idx = np.asarray(padded, dtype=np.int64)
        ridx = np.asarray([b * W + j for b, tg in enumerate(targets) for j in range(len(tg))],
                          dtype=np.int64)
        y = np.asarray([t for tg in targets for t in tg], dtype=np.int64)
        self.forwards += B
        rows = (np.arange(B, dtype=np.int64)[:, None] * tokens.shape[1] + idx).reshape(-1)[ridx]
        return tokens, min(self.first_layer, self.model.net.config.n_layer), rows, y

    def lm_losses(self, batch, perturbs) -> list:
        """Mean next-token CE over loss-mask tokens under each perturbation (full vocabulary,
        logits only where the loss needs them: the target rows, LM_ROWS at a time, since the
        full-vocabulary logits of a whole evaluation batch would set the peak RSS)."""
        rows = self._lm_rows(batch)
        if rows is None:
            return [0.0] * len(perturbs)
        tokens, f, rows, y = rows
        net = self.model.net
        out = []
        h0 = net.hidden_upto(tokens, f)
        for c in range(0, len(perturbs), self.chunk):
            part = perturbs[c:c + self.chunk]
            for hs, p in zip(net.hidden_from(h0, f, part, rows), part):
                total = 0.0
                for r in range(0, len(y), LM_ROWS):
                    lp = log_softmax32(net.head(hs[r:r + LM_ROWS], p))
                    total += float(-lp[np.arange(lp.shape[0]), y[r:r + LM_ROWS]]
                                   .astype(np.float64).sum())
                out.append(total / len(y))
        return out

    def lm_exact(self, batch, param) -> tuple:
        """(mean next-token CE of the unperturbed pass, {param.name: dL/dg}) for the final
        output norm's weight g (`--head-grad exact` on text).  With n the final hidden state
        divided by its RMS, the logits are (n * g) E^T, so

            dL/dg = sum over loss tokens of  n * ((softmax(logits) - onehot(target)) E) / count

        — the logits' own inputs, no backward through the network (forward-only).  E, the
        output matrix dequantized to float32, is kept after the first call (V x d floats)."""
        rows = self._lm_rows(batch)
        if rows is None:
            return 0.0, {param.name: np.zeros_like(param.value)}
        tokens, f, rows, y = rows
        net = self.model.net
        hsel = np.asarray(net.hidden_from(net.hidden_upto(tokens, f), f, [None], rows)[0],
                          np.float32)
        n = net.rms_norm(hsel, np.ones(hsel.shape[-1], dtype=np.float32))
        logp = log_softmax64(net.head(hsel))
        rows = np.arange(len(y))
        loss = float(-logp[rows, y].sum()) / len(y)
        r = np.exp(logp)
        r[rows, y] -= 1.0
        r /= len(y)
        if self._out_f32 is None:   # dequantized in row blocks: no V x d temporaries
            from ..quant import dequantize_rows
            V = net.output.shape[0]
            e = np.empty(net.output.shape, np.float32)
            for i0 in range(0, V, 4096):
                e[i0:i0 + 4096] = dequantize_rows(net.output, np.arange(i0, min(i0 + 4096, V)))
            self._out_f32 = e
        grad = (n.astype(np.float64) * (r.astype(np.float32) @ self._out_f32).astype(np.float64)).sum(0)
        return loss, {param.name: grad.astype(np.float32).reshape(param.value.shape)}

