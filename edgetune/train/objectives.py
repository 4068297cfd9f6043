"""Training objectives: scalar losses of a batch under one (possibly perturbed) forward pass.

  classification  cross-entropy over the verbalizer words' logits at the answer position
                  (MeZO's prompt-based fine-tuning); only those few vocabulary rows are computed.
  lm              causal-LM cross-entropy on completion (loss-mask) tokens, full vocabulary,
                  logits only at the masked positions.
  accuracy        1 - accuracy of the classification argmax: a non-differentiable metric that
                  ZO can still optimize.
Losses are reduced in float64 (ce_losses below) and returned as Python floats.
"""
from __future__ import annotations

import numpy as np

OBJECTIVES = ("classification", "lm", "accuracy")


def ce_losses(logits: np.ndarray, labels) -> np.ndarray:
    """Mean cross-entropy per pass: logits [P, B, C] -> [P] (float64)."""
    lg = np.asarray(logits, np.float64)
    m = lg.max(-1, keepdims=True)
    lse = (m[..., 0] + np.log(np.exp(lg - m).sum(-1)))
    y = np.asarray(labels, np.int64)
    picked = np.take_along_axis(lg, np.broadcast_to(y[None, :, None], lg.shape[:2] + (1,)), -1)[..., 0]
    return (lse - picked).mean(-1)


def log_softmax32(logits) -> np.ndarray:
    """log_softmax over the last axis in float32 (max-subtracted), as torch.log_softmax."""
    lg = np.asarray(logits, np.float32)
    m = lg.max(-1, keepdims=True)
    z = lg - m
    return z - np.log(np.exp(z).sum(-1, keepdims=True, dtype=np.float32))


def log_softmax64(logits) -> np.ndarray:
    """log_softmax over the last axis in float64: x - (max + log(sum(exp(x - max))))."""
    lg = np.asarray(logits, np.float64)
    m = lg.max(-1, keepdims=True)
    return lg - (m + np.log(np.exp(lg - m).sum(-1, keepdims=True)))


def error_rates(logits: np.ndarray, labels) -> np.ndarray:
    """1 - accuracy per pass: logits [P, B, C] -> [P]."""
    return 1.0 - (np.asarray(logits).argmax(-1) == np.asarray(labels)[None]).mean(-1)


def class_logits(model, ids, answer_pos, label_tokens, perturb=None) -> np.ndarray:
    """[B, C] logits of each class word at each sequence's answer position."""
    lg = model.logits(ids, positions=[[p] for p in answer_pos], perturb=perturb,
                      vocab=label_tokens)
    return np.asarray(lg, np.float32)[:, 0, :]


def classification_loss(model, ids, answer_pos, labels, label_tokens, perturb=None) -> float:
    return float(ce_losses(class_logits(model, ids, answer_pos, label_tokens, perturb)[None],
                           labels)[0])


def accuracy_loss(model, ids, answer_pos, labels, label_tokens, perturb=None) -> float:
    return float(error_rates(class_logits(model, ids, answer_pos, label_tokens, perturb)[None],
                             labels)[0])


def lm_targets(ids, loss_masks):
    """(positions padded to one width, targets per sequence): position t-1 predicts token t for
    every t whose loss mask is 1; a sequence's list is padded by repeating its first position
    (padded entries are ignored).  positions is None when no token carries the loss."""
    positions, targets = [], []
    for seq, mask in zip(ids, loss_masks):
        pos = [t - 1 for t in range(1, len(seq)) if mask[t]]
        positions.append(pos)
        targets.append([seq[t + 1] for t in pos])
    width = max(len(p) for p in positions)
    if width == 0:
        return None, targets
    return [(p + [p[0] if p else 0] * (width - len(p))) for p in positions], targets


def sample_loss_positions(batch, k: int, seed: int):
    """The batch with each sequence's loss mask cut to k of its loss tokens, chosen at random
    from `seed` (the step's seed: a resumed run picks the same ones).  The language-model loss
    then needs full-vocabulary logits at k positions per sequence, not at every token."""
    import dataclasses
    import numpy as np
    rng = np.random.default_rng(int(seed) % 2**63)
    masks = []
    for m in batch.loss_masks:
        on = [t for t in range(1, len(m)) if m[t]]
        keep = set(rng.choice(on, size=k, replace=False).tolist()) if len(on) > k else set(on)
        masks.append([1 if t in keep else 0 for t in range(len(m))])
    return dataclasses.replace(batch, loss_masks=masks)


def lm_loss(model, ids, loss_masks, perturb=None) -> float:
    """Mean CE of next-token prediction over tokens whose loss mask is 1."""
    padded, targets = lm_targets(ids, loss_masks)
    if padded is None:
        return 0.0
    logp = log_softmax64(model.logits(ids, positions=padded, perturb=perturb))  # [B, W, V]
    total, count = 0.0, 0
    for b, tg in enumerate(targets):
        if tg:
            total += float(-logp[b, np.arange(len(tg)), np.asarray(tg, np.int64)].sum())
            count += len(tg)
    return total / max(count, 1)


def classification_losses(model, ids, answer_pos, labels, label_tokens, perturbs,
                          metric: str = "ce") -> list:
    """Losses of one batch under several perturbations in one layer-by-layer pass (ZO2)."""
    outs = model.logits_multi(ids, [[p] for p in answer_pos], perturbs, vocab=label_tokens)
    lg = np.stack([np.asarray(o, np.float32)[:, 0, :] for o in outs])     # [P, B, C]
    fn = ce_losses if metric == "ce" else error_rates
    return [float(v) for v in fn(lg, labels)]


def predict(model, ids, answer_pos, label_tokens) -> np.ndarray:
    return class_logits(model, ids, answer_pos, label_tokens).argmax(-1)
