"""Zeroth-order gradient estimators: projected gradients from perturbed losses (SPSA family).

  two_point   g_j = (L(theta + eps z_j) - L(theta - eps z_j)) / (2 eps)   (Spall 1992; MeZO)
  one_sided   g_j = (L(theta + eps z_j) - L(theta)) / eps                  (L(theta) shared)
  normalized  g_j = (L(theta + eps z_j) - L(theta)) / std_j L(theta + eps z_j)
              (FZOO, ICLR 2026): q one-sided queries; dividing by the spread of their losses
              makes the step size independent of the loss scale and of eps — the update's
              per-element RMS is about lr * pscale / sqrt(q) whatever the task — so one lr
              suits every trainable set and the run does not drift when the loss gets small.

The optimizer averages g_j z_j over the q queries.  Each g_j is clipped to [-clip, clip]
(QZO's directional-derivative clipping keeps one unlucky batch from wrecking int4 scales).
Losses are Python floats (fp64) from fp32 accumulations.

All passes of a step are requested at once (`losses_fn(perturbs) -> losses`), so the model can
run its frozen blocks once and the rest layer by layer for all passes (train/passes.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import EdgetuneError
from .optim import query_seed
from .trainable import Perturb

ESTIMATORS = ("two_point", "one_sided", "normalized")


@dataclass
class Estimate:
    seeds: list
    g: list                      # clipped projected gradient per query
    lp: list                     # L(theta + eps z_j)
    lm: list                     # L(theta - eps z_j) (two_point) or L(theta) (one-sided kinds)
    finite: bool = True
    raw_g: list = field(default_factory=list)
    base_loss: float | None = None   # L(theta), when a pass computed it
    extra: object = None             # what losses_fn returned beyond the losses (e.g. features)

    @property
    def loss(self) -> float:
        """The step's loss estimate: L(theta) when it was computed, else the mean of the passes."""
        if self.base_loss is not None:
            return self.base_loss
        vals = self.lp + self.lm
        return sum(vals) / len(vals)


def perturbations(seed: int, eps: float, q: int, mode: str, dist: str, need_base: bool = False):
    """The passes of one step: (query seeds, perturbs) — None is the unperturbed pass."""
    seeds = [query_seed(seed, j) for j in range(q)]
    if mode == "two_point":
        ps = [P for s in seeds for P in (Perturb(s, eps, +1, dist), Perturb(s, eps, -1, dist))]
        return seeds, ([None] + ps) if need_base else ps
    return seeds, [None] + [Perturb(s, eps, +1, dist) for s in seeds]


def check(mode: str, q: int, eps: float):
    if mode not in ESTIMATORS:
        raise EdgetuneError(f"unknown estimator {mode!r}; choose from {', '.join(ESTIMATORS)}")
    if q < 1:
        raise EdgetuneError("--q (queries per step) must be >= 1")
    if mode == "normalized" and q < 2:
        raise EdgetuneError("--estimator normalized divides by the spread of q losses: use --q 2 or more")
    if not eps > 0:
        raise EdgetuneError("--eps must be > 0")


def estimate_from(losses_fn, seed: int, eps: float, q: int = 1, mode: str = "two_point",
                  clip: float | None = None, dist: str = "rademacher",
                  need_base: bool = False) -> Estimate:
    """losses_fn(perturbs) -> list of losses, or (losses, extra).  One ZO step's estimate."""
    check(mode, q, eps)
    seeds, perts = perturbations(seed, eps, q, mode, dist, need_base)
    res = losses_fn(perts)
    extra = None
    if isinstance(res, tuple):
        res, extra = res
    losses = [float(v) for v in res]
    base = None
    if perts and perts[0] is None:
        base, losses = losses[0], losses[1:]
    if mode == "two_point":
        lps, lms = losses[0::2], losses[1::2]
        raw = [(a - b) / (2.0 * eps) for a, b in zip(lps, lms)]
    else:
        lps, lms = losses, [base] * q
        if mode == "one_sided":
            raw = [(a - base) / eps for a in lps]
        else:
            mean = sum(lps) / q
            std = math.sqrt(sum((a - mean) ** 2 for a in lps) / q)
            raw = [(a - base) / std if std > 0 else 0.0 for a in lps]
    gs = [max(-clip, min(clip, g)) if clip is not None and math.isfinite(g) else g for g in raw]
    vals = gs + lps + lms + ([base] if base is not None else [])
    finite = all(v is not None and math.isfinite(v) for v in vals)
    return Estimate(seeds, gs, lps, lms, finite, raw, base, extra)


def estimate(loss_fn, seed: int, eps: float, q: int = 1, mode: str = "two_point",
             clip: float | None = None, dist: str = "rademacher", pair_fn=None) -> Estimate:
    """One pass at a time: loss_fn(Perturb | None) -> float.  pair_fn(perturbs) -> losses, if
    given, evaluates all passes of the step together (layer by layer)."""
    if pair_fn is not None:
        return estimate_from(pair_fn, seed, eps, q, mode, clip, dist)
    return estimate_from(lambda ps: [loss_fn(p) for p in ps], seed, eps, q, mode, clip, dist)
