"""Seeded label-skewed Dirichlet partitions of a classification training pool across N users.

For each class c, a share vector p_c ~ Dirichlet(alpha * 1_N) splits that class's examples
across the N clients (Hsu et al. 2019, "Measuring the effects of non-identical data
distribution"): a small alpha (0.3) gives each user a few dominant labels, a large one is close
to IID.  Draws are redone (same seeded generator) until every client holds at least
`min_size` examples.  Each client's examples are then shuffled and the last `heldout` share
becomes its local held-out slice (personalization is scored there; it is never trained on).

The pool is the first `pool_size` examples of the dataset's fixed train split: the test split
is global and never partitioned, never trained on.  Same (labels, spec, seed) -> same partition,
on any machine.
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
              heldout: float = 0.2, min_size: int = 4, max_tries: int = 1000) -> list[ClientPart]:
    """Split pool positions 0..len(labels)-1 across n_clients (see the module docstring)."""
    labels = np.asarray(labels, dtype=np.int64)
    kind, alpha = parse_partition(spec)
    if n_clients < 1:
        raise EdgetuneError("--clients must be >= 1")
    if len(labels) < n_clients * min_size:
        raise EdgetuneError(f"{len(labels)} pool examples are too few for {n_clients} clients "
                            f"with at least {min_size} each")
    if not 0 <= heldout < 1:
        raise EdgetuneError("the held-out share must be in [0, 1)")
    rng = np.random.default_rng([seed, 0xDA7A])
    for _ in range(max_tries):
        owners = [[] for _ in range(n_clients)]
        if kind == "iid":
            for k, i in enumerate(rng.permutation(len(labels))):
                owners[k % n_clients].append(int(i))
        else:
            for c in np.unique(labels):
                idx = rng.permutation(np.flatnonzero(labels == c))
                p = rng.dirichlet(np.full(n_clients, alpha))
                cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
                for k, part in enumerate(np.split(idx, cuts)):
                    owners[k] += [int(i) for i in part]
        if min(len(o) for o in owners) >= min_size:
            break
    else:
        raise EdgetuneError(f"--partition {spec}: no draw in {max_tries} gave every client "
                            f"{min_size} examples; use more examples per client or a larger alpha")
    parts = []
    for o in owners:
        o = [int(i) for i in rng.permutation(np.asarray(sorted(o), dtype=np.int64))]
        nh = int(round(len(o) * heldout)) if heldout else 0
        nh = min(max(nh, 1 if heldout else 0), len(o) - 1)
        parts.append(ClientPart(tuple(o[:len(o) - nh]), tuple(o[len(o) - nh:])))
    return parts
