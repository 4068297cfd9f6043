"""Seeded label-skewed Dirichlet partitions of a classification training pool across N users.

Each client i draws its label mix q_i ~ Dirichlet(alpha * 1_C) (Hsu et al. 2019, "Measuring
the effects of non-identical data distribution"), then `per_client` examples: counts
~ Multinomial(per_client, q_i), taken without replacement from each class of the training split.
A small alpha (0.3) gives each user one or two dominant labels, a large one is close to IID
("iid" uses the split's own label frequencies).  Every client holds the same number of examples,
so none is left with too few to train on.  Each client's examples are shuffled and the last
`heldout` share becomes its local held-out slice (personalization is scored there; it is never
trained on).

Clients draw from the dataset's fixed train split only: the test split is global and never
partitioned, never trained on.  Same (labels, spec, seed) -> same partition, on any machine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import EdgetuneError


@dataclass(frozen=True)
class ClientPart:
    train: tuple      # indices into the pool (the client's private training examples)
    heldout: tuple    # indices into the pool (its local held-out slice)


def parse_partition(spec: str) -> tuple[str, float]:
    """'dirichlet:0.3' -> ('dirichlet', 0.3); 'iid' -> ('iid', 0.0)."""
    kind, _, arg = str(spec).partition(":")
    if kind == "iid" and not arg:
        return "iid", 0.0
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            alpha = float("nan")
        if not (alpha > 0 and math.isfinite(alpha)):
            raise EdgetuneError(f"--partition {spec!r}: dirichlet needs a positive alpha, "
                                f"e.g. dirichlet:0.3")
        return kind, alpha
    raise EdgetuneError(f"--partition {spec!r}: expected dirichlet:ALPHA or iid")


def partition(labels, n_clients: int, spec: str = "dirichlet:0.3", seed: int = 0,
              per_client: int = 40, heldout: float = 0.2) -> list[ClientPart]:
    """Draw `per_client` examples for each of n_clients from positions 0..len(labels)-1 (see the
    module docstring); no example goes to two clients."""
    labels = np.asarray(labels, dtype=np.int64)
    kind, alpha = parse_partition(spec)
    if n_clients < 1 or per_client < 2:
        raise EdgetuneError("need --clients >= 1 and at least 2 examples per client")
    if n_clients * per_client > len(labels):
        raise EdgetuneError(f"{n_clients} clients x {per_client} examples need "
                            f"{n_clients * per_client} training examples; there are {len(labels)}")
    if not 0 <= heldout < 1:
        raise EdgetuneError("the held-out share must be in [0, 1)")
    rng = np.random.default_rng([seed, 0xDA7A])
    classes = np.unique(labels)
    left = {int(c): list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    prior = np.array([len(left[int(c)]) for c in classes], np.float64) / len(labels)
    parts = []
    for _ in range(n_clients):
        p = prior if kind == "iid" else rng.dirichlet(np.full(len(classes), alpha))
        counts = rng.multinomial(per_client, p)
        own = []
        for c, n in zip(classes, counts):
            pool = left[int(c)]
            take = min(int(n), len(pool))
            own += [int(i) for i in pool[:take]]
            del pool[:take]
        while len(own) < per_client:                     # a class ran out: fill from the largest
            big = max(left, key=lambda c: len(left[c]))
            own.append(int(left[big].pop(0)))
        own = [int(i) for i in rng.permutation(np.asarray(own, dtype=np.int64))]
        nh = min(max(int(round(len(own) * heldout)), 1 if heldout else 0), len(own) - 1)
        parts.append(ClientPart(tuple(own[:len(own) - nh]), tuple(own[len(own) - nh:])))
    return parts
