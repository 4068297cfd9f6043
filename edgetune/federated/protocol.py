"""What crosses the network in a federated round, and the checks every received message passes.

Server -> client (message type "train"; "evaluate" at the end for personalization), one
ConfigRecord "round":
    round, round_seed, k, slots, slot      this round: slots*K candidates derive from round_seed;
                                           this client's are slot*K..slot*K+K-1 (rounds.py)
    steps, q, lr, eps, batch               the local recipe (lr: this round's, from the schedule)
    tail_from, tail_seeds, tail_lr, tail_g the global seed log's records tail_from..round-1
                                           (their round seeds, lrs, and slots*K scalars each, flat)
    personal_steps                         "evaluate" only
Client -> server ("train" reply), one ConfigRecord "fedkseed":
    idx  list[int]    candidate indices the client used, ascending, each in [0, K) (its slot)
    g    list[float]  the accumulated normalised projected gradient of each
    n    int          its training example count (the aggregation weight)
Client -> server ("evaluate" reply), one ConfigRecord "personal": n (int, held-out examples),
acc_global, acc_personal (floats in [0, 1]).

No weights, activations or text appear in either direction.  `check_reply` is the gate on the
server: a reply that is not exactly one of these shapes (wrong record kinds or keys, wrong types,
a non-finite or absurd value, an unknown or repeated seed index, more bytes than the bound) is
rejected with its reason and never applied.  Sizes are those of the serialized protobuf Message
(metadata included), as it travels between SuperNode and SuperLink.
"""
from __future__ import annotations

import math

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.serde import message_to_proto

from .rounds import candidate_seeds

G_LIMIT = 1e6          # |accumulated g| above this is not something normalised steps produce
N_LIMIT = 10_000_000


class Rejected(Exception):
    """A reply failed a check; str(self) is the logged reason."""


def message_bytes(msg: Message) -> int:
    """Serialized size of a Message (content + metadata), as Flower sends it."""
    return len(message_to_proto(msg).SerializeToString())


def reply_bound(k: int) -> int:
    """Largest acceptable "train" reply: K (index, double) pairs + a count + metadata headroom."""
    return 512 + 12 * k


def train_content(rnd: int, rseed: int, k: int, slots: int, slot: int, recipe: dict, tail: list,
                  tail_from: int, personal_steps: int | None = None) -> RecordDict:
    """The server's message to a sampled client (see the module docstring)."""
    c = {"round": int(rnd), "round_seed": int(rseed), "k": int(k), "slots": int(slots),
         "slot": int(slot),
         "steps": int(recipe["steps"]), "q": int(recipe["q"]), "lr": float(recipe["lr"]),
         "eps": float(recipe["eps"]), "batch": int(recipe["batch"]),
         "tail_from": int(tail_from),
         "tail_seeds": [int(r["round_seed"]) for r in tail],
         "tail_lr": [float(r["lr"]) for r in tail],
         "tail_g": [float(g) for r in tail for g in r["g"]]}
    if personal_steps is not None:
        c["personal_steps"] = int(personal_steps)
    return RecordDict({"round": ConfigRecord(c)})


def read_tail(c) -> list[dict]:
    """The tail records of a server message, as seed-log step records."""
    seeds, lrs, flat = list(c["tail_seeds"]), list(c["tail_lr"]), list(c["tail_g"])
    k = int(c["k"]) * int(c["slots"])          # scalars per record: every slot's candidates
    if len(lrs) != len(seeds) or len(flat) != k * len(seeds):
        raise ValueError("malformed tail: lengths do not match")
    first = int(c["tail_from"])
    return [{"step": first + i, "round_seed": int(s), "lr": float(lr),
             "seeds": candidate_seeds(int(s), k), "g": [float(v) for v in flat[i * k:(i + 1) * k]]}
            for i, (s, lr) in enumerate(zip(seeds, lrs))]


def train_reply(acc: dict, n: int) -> RecordDict:
    idx = sorted(acc)
    return RecordDict({"fedkseed": ConfigRecord({"idx": [int(i) for i in idx],
                                                 "g": [float(acc[i]) for i in idx],
                                                 "n": int(n)})})


def personal_reply(n: int, acc_global: float, acc_personal: float) -> RecordDict:
    return RecordDict({"personal": ConfigRecord({"n": int(n), "acc_global": float(acc_global),
                                                 "acc_personal": float(acc_personal)})})


def _only_config(content: RecordDict, name: str, keys: set):
    if len(content.array_records) or len(content.metric_records):
        raise Rejected("carries array or metric records (only one ConfigRecord is allowed)")
    names = sorted(content.config_records)
    if names != [name]:
        raise Rejected(f"expected one ConfigRecord {name!r}, got {names}")
    c = content.config_records[name]
    if set(c) != keys:
        raise Rejected(f"record {name!r} has keys {sorted(c)}, expected {sorted(keys)}")
    return c


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_reply(content: RecordDict, k: int, nbytes: int, max_bytes: int):
    """(idx, g, n) of a valid "train" reply, else raise Rejected(reason)."""
    if nbytes > max_bytes:
        raise Rejected(f"oversized: {nbytes} bytes > bound {max_bytes}")
    c = _only_config(content, "fedkseed", {"idx", "g", "n"})
    idx, g, n = c["idx"], c["g"], c["n"]
    if not isinstance(idx, list) or not all(_is_int(i) for i in idx):
        raise Rejected("wrong type: idx must be a list of ints")
    if not isinstance(g, list) or not all(isinstance(v, float) for v in g):
        raise Rejected("wrong type: g must be a list of floats")
    if not _is_int(n):
        raise Rejected("wrong type: n must be an int")
    if len(idx) != len(g) or not idx:
        raise Rejected(f"idx has {len(idx)} entries, g has {len(g)} (need the same, >= 1)")
    bad = [i for i in idx if not 0 <= i < k]
    if bad:
        raise Rejected(f"unknown seed index {bad[0]} (this round has {k} candidates)")
    if len(set(idx)) != len(idx):
        raise Rejected("repeated seed index")
    if not all(math.isfinite(v) for v in g):
        raise Rejected("non-finite projected gradient (NaN or inf)")
    if any(abs(v) > G_LIMIT for v in g):
        raise Rejected(f"projected gradient beyond {G_LIMIT:g}")
    if not 0 < n <= N_LIMIT:
        raise Rejected(f"example count {n} out of range")
    return list(idx), list(g), int(n)


def check_personal(content: RecordDict, nbytes: int, max_bytes: int):
    """(n, acc_global, acc_personal) of a valid "evaluate" reply, else raise Rejected."""
    if nbytes > max_bytes:
        raise Rejected(f"oversized: {nbytes} bytes > bound {max_bytes}")
    c = _only_config(content, "personal", {"n", "acc_global", "acc_personal"})
    if not _is_int(c["n"]) or not 0 < c["n"] <= N_LIMIT:
        raise Rejected("wrong type or range: n")
    accs = (c["acc_global"], c["acc_personal"])
    if not all(isinstance(a, float) and 0.0 <= a <= 1.0 for a in accs):
        raise Rejected("wrong type or range: accuracies must be floats in [0, 1]")
    return int(c["n"]), float(accs[0]), float(accs[1])


def flat_values(content: RecordDict) -> list:
    """Every leaf value of a message's content (for the privacy audit)."""
    out = []
    for rec in content.values():
        for v in (rec.values() if hasattr(rec, "values") else [rec]):
            out += list(v) if isinstance(v, list) else [v]
    return out
