"""Zeroth-order gradient estimators: projected gradients from perturbed losses (SPSA family).

  two_point (default)  g = (L(theta + eps z) - L(theta - eps z)) / (2 eps)       (Spall 1992; MeZO)
  one_sided            g = (L(theta + eps z) - L(theta)) / eps                  (one extra pass
                       per query, L(theta) shared by the queries)
  q queries            q independent directions per step; the optimizer averages g_j z_j.

Each g is clipped to [-clip, clip] (QZO's directional-derivative clipping keeps one unlucky
batch from wrecking int4 scales).  Losses come back as Python floats (fp64) computed from fp32
accumulations, so the difference L+ - L- is taken in at least fp32 everywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import EdgetuneError
from .optim import query_seed
from .trainable import Perturb

ESTIMATORS = ("two_point", "one_sided")


@dataclass
class Estimate:
    seeds: list
    g: list                      # clipped projected gradient per query
    lp: list                     # L(theta + eps z_j)
    lm: list                     # L(theta - eps z_j) (two_point) or L(theta) (one_sided)
    finite: bool = True
    raw_g: list = field(default_factory=list)

    @property
    def loss(self) -> float:
        """The step's loss estimate: mean over the evaluated passes."""
        vals = self.lp + self.lm
        return sum(vals) / len(vals)


def estimate(loss_fn, seed: int, eps: float, q: int = 1, mode: str = "two_point",
             clip: float | None = None, dist: str = "rademacher", pair_fn=None) -> Estimate:
    """loss_fn(Perturb | None) -> float.  Returns the projected gradients of one ZO step.

    pair_fn([Perturb, Perturb]) -> [float, float], if given, evaluates the +eps and -eps passes
    together, layer by layer (each layer's weights read once per query: ZO2)."""
    if mode not in ESTIMATORS:
        raise EdgetuneError(f"unknown estimator {mode!r}; choose from {', '.join(ESTIMATORS)}")
    if q < 1:
        raise EdgetuneError("--q (queries per step) must be >= 1")
    if not eps > 0:
        raise EdgetuneError("--eps must be > 0")
    seeds, gs, raw, lps, lms = [], [], [], [], []
    base = loss_fn(None) if mode == "one_sided" else None
    for j in range(q):
        s = query_seed(seed, j)
        if mode == "two_point" and pair_fn is not None:
            lp, lm = (float(v) for v in pair_fn([Perturb(s, eps, +1, dist), Perturb(s, eps, -1, dist)]))
            g = (lp - lm) / (2.0 * eps)
        elif mode == "two_point":
            lp = float(loss_fn(Perturb(s, eps, +1, dist)))
            lm = float(loss_fn(Perturb(s, eps, -1, dist)))
            g = (lp - lm) / (2.0 * eps)
        else:
            lp = float(loss_fn(Perturb(s, eps, +1, dist)))
            lm = float(base)
            g = (lp - lm) / eps
        raw.append(g)
        if clip is not None and math.isfinite(g):
            g = max(-clip, min(clip, g))
        seeds.append(s)
        gs.append(g)
        lps.append(lp)
        lms.append(lm)
    finite = all(math.isfinite(v) for v in gs + lps + lms)
    return Estimate(seeds, gs, lps, lms, finite, raw)
