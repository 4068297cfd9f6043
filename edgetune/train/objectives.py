"""Training objectives: scalar losses of a batch under one (possibly perturbed) forward pass.

  classification  cross-entropy over the verbalizer words' logits at the answer position
                  (MeZO's prompt-based fine-tuning); only those few vocabulary rows are computed.
  lm              causal-LM cross-entropy on completion (loss-mask) tokens, full vocabulary,
                  logits only at the masked positions.
  accuracy        1 - accuracy of the classification argmax: a non-differentiable metric that
                  ZO can still optimize.
All reductions run in fp32 and return a Python float.
"""
from __future__ import annotations

import numpy as np
import torch

OBJECTIVES = ("classification", "lm", "accuracy")


def class_logits(model, ids, answer_pos, label_tokens, perturb=None) -> torch.Tensor:
    """[B, C] logits of each class word at each sequence's answer position."""
    lg = model.logits_tensor(ids, positions=[[p] for p in answer_pos], perturb=perturb,
                             vocab=label_tokens)
    return lg[:, 0, :].float()


def classification_loss(model, ids, answer_pos, labels, label_tokens, perturb=None) -> float:
    lg = class_logits(model, ids, answer_pos, label_tokens, perturb)
    y = torch.as_tensor(labels, dtype=torch.long)
    return float(torch.nn.functional.cross_entropy(lg, y))


def accuracy_loss(model, ids, answer_pos, labels, label_tokens, perturb=None) -> float:
    lg = class_logits(model, ids, answer_pos, label_tokens, perturb)
    y = torch.as_tensor(labels, dtype=torch.long)
    return 1.0 - float((lg.argmax(-1) == y).float().mean())


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
    lg = model.logits_tensor(ids, positions=padded, perturb=perturb).float()  # [B, W, V]
    logp = torch.log_softmax(lg, dim=-1)
    total, count = torch.zeros((), dtype=torch.float32), 0
    for b, tg in enumerate(targets):
        if tg:
            total = total + (-logp[b, torch.arange(len(tg)), torch.as_tensor(tg)]).sum()
            count += len(tg)
    return float(total / max(count, 1))


def classification_losses(model, ids, answer_pos, labels, label_tokens, perturbs,
                          metric: str = "ce") -> list:
    """Losses of one batch under several perturbations in one layer-by-layer pass (ZO2)."""
    outs = model.logits_multi(ids, [[p] for p in answer_pos], perturbs, vocab=label_tokens)
    y = torch.as_tensor(labels, dtype=torch.long)
    res = []
    for lg in outs:
        lg = lg[:, 0, :].float()
        if metric == "ce":
            res.append(float(torch.nn.functional.cross_entropy(lg, y)))
        else:
            res.append(1.0 - float((lg.argmax(-1) == y).float().mean()))
    return res


def predict(model, ids, answer_pos, label_tokens) -> np.ndarray:
    return class_logits(model, ids, answer_pos, label_tokens).argmax(-1).numpy()
