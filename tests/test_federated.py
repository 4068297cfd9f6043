"""Federated ZO on Flower: partitions, the FedKSeed round, the message checks, and simulations
(>= 10 Flower SuperNodes on a tiny synthetic model) asserting what the server receives, bit-exact
replay on every device, robustness to bad clients and a killed server's resume."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import make_tiny_task

flwr = pytest.importorskip("flwr")

from edgetune.federated import protocol                     # noqa: E402
from edgetune.federated.config import FedConfig             # noqa: E402
from edgetune.federated.partition import partition          # noqa: E402
from edgetune.federated.rounds import (aggregate, candidate_seeds, local_steps,  # noqa: E402
                                       normalise, round_lr, slot_seeds)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_task(tmp_path_factory.mktemp("fedtiny"), 400)


def settings(tiny, out, **kw):
    model, data = tiny
    base = dict(model=model, data=data, verbalizer="a=a,b=b", clients=12, per_round=12,
                rounds=2, local_steps=3, k=16, q=8, batch=4, client_examples=16, lr=1e-2,
                eps=1e-2, partition="dirichlet:0.3", out=str(out), eval_every=1,
                eval_limit=20, test_limit=40, progress=False, personal_steps=3,
                dump_dir=str(out) + "-dump", timeout=900.0)
    base.update(kw)
    return FedConfig(**base)


# -- partitions ------------------------------------------------------------------------------
def test_dirichlet_partition_is_seeded_skewed_and_disjoint():
    labels = np.random.default_rng(0).integers(0, 3, 6000)
    a = partition(labels, 100, "dirichlet:0.3", seed=1, per_client=40)
    assert a == partition(labels, 100, "dirichlet:0.3", seed=1, per_client=40)
    assert a != partition(labels, 100, "dirichlet:0.3", seed=2, per_client=40)
    every = [i for p in a for i in p.train + p.heldout]
    assert len(every) == len(set(every)) == 4000                  # disjoint
    assert all(len(p.heldout) == 8 and len(p.train) == 32 for p in a)
    # label skew: the mean share of a client's majority label is far above IID's ~1/3

    def major(parts):
        return np.mean([np.bincount(labels[list(p.train + p.heldout)], minlength=3).max() / 40
                        for p in parts])
    assert major(a) > 0.65 > 0.5 > major(partition(labels, 100, "iid", seed=1, per_client=40))


def test_partition_rejects_bad_specs():
    from edgetune.errors import EdgetuneError
    for spec in ("dirichlet", "dirichlet:-1", "zipf:2"):
        with pytest.raises(EdgetuneError, match="--partition"):
            partition([0, 1] * 50, 5, spec)


# -- the round math --------------------------------------------------------------------------
class _Quadratic:
    """L(theta) = mean over rows of |theta - target_row|^2 on a tiny trainable set."""

    def __init__(self, param, targets):
        self.p, self.t = param, targets
        self.n = len(targets)
        self.labels = np.zeros(self.n, np.int64)

    def losses(self, rows, perts):
        out = []
        for pt in perts:
            v = pt.apply(self.p)
            out.append(float(np.mean([np.sum((v - self.t[r]) ** 2) for r in rows])))
        return out


def _param(d=32):
    from edgetune.zo.trainable import Param
    return Param("head:x", "head", np.zeros(d, np.float32), 400000)


def test_client_move_equals_server_step_from_its_pairs():
    """The aggregated (index, g) pairs of one client, applied by the server, move theta exactly
    where the client's local steps moved its own copy (up to fp32 summation order)."""
    from edgetune.zo.optim import ZOOptimizer
    p = _param()
    targets = np.random.default_rng(0).normal(size=(20, 32)).astype(np.float32)
    task = _Quadratic(p, targets)
    opt = ZOOptimizer([p], "sgd")
    seeds = candidate_seeds(1234, 16)
    acc, done = local_steps(task, np.arange(20), opt, seeds, 5, 8, 1e-2, 1e-3, 4, [0])
    assert done == 5 and set(acc) <= set(range(16))
    local = p.value.copy()
    p.value[...] = 0
    idx = sorted(acc)
    g = aggregate([(0, idx, [acc[i] for i in idx], 20)], 16, 1, 8, server_lr=1.0)
    opt.step(seeds, g, 1e-2)
    np.testing.assert_allclose(p.value, local, rtol=0, atol=1e-6)
    assert np.abs(local).max() > 1e-3                       # it did move


def test_disjoint_slots_aggregate_to_the_weighted_mean_of_client_moves():
    """Two clients of a round, each on its own slot of K candidates: the server's step over the
    round's 2K candidates (server lr 1) is the example-weighted mean of the two local moves."""
    from edgetune.zo.optim import ZOOptimizer
    p = _param()
    targets = np.random.default_rng(1).normal(size=(30, 32)).astype(np.float32)
    task = _Quadratic(p, targets)
    opt = ZOOptimizer([p], "sgd")
    rseed, k = 777, 16
    s0, s1 = slot_seeds(rseed, k, 0), slot_seeds(rseed, k, 1)
    assert s0 + s1 == candidate_seeds(rseed, 2 * k) and not set(s0) & set(s1)
    moves, replies = [], []
    for slot, rows, seeds in ((0, np.arange(10), s0), (1, np.arange(10, 30), s1)):
        p.value[...] = 0
        acc, _ = local_steps(task, rows, opt, seeds, 3, 8, 1e-2, 1e-3, 4, [slot])
        moves.append(p.value.copy())
        idx = sorted(acc)
        replies.append((slot, idx, [acc[i] for i in idx], len(rows)))
    p.value[...] = 0
    g = aggregate(replies, k, 2, 8, server_lr=1.0)
    assert len(g) == 2 * k and any(g[:k]) and any(g[k:])
    opt.step(candidate_seeds(rseed, 2 * k), g, 1e-2)
    want = (10 * moves[0] + 20 * moves[1]) / 30
    np.testing.assert_allclose(p.value, want, rtol=0, atol=1e-6)
    # server lr scales the same step
    p.value[...] = 0
    opt.step(candidate_seeds(rseed, 2 * k), aggregate(replies, k, 2, 8, server_lr=3.0), 1e-2)
    np.testing.assert_allclose(p.value, 3 * want, rtol=0, atol=3e-6)


def test_round_lr_schedule():
    assert [round_lr(1.0, r, 4, "constant") for r in range(4)] == [1.0] * 4
    cos = [round_lr(1.0, r, 4, "cosine") for r in range(4)]
    assert cos[0] == 1.0 and all(a > b > 0 for a, b in zip(cos, cos[1:]))


def test_normalise_gives_unit_rms_estimate():
    from edgetune.zo import rng
    g = normalise([3.0, -1.0, 0.5, 2.0])
    z = np.stack([rng.perturbation(s, 7, 20000) for s in range(4)])
    est = (np.asarray(g)[:, None] * z).mean(0)
    assert abs(np.sqrt(np.mean(est ** 2)) - 1.0) < 0.02
    assert normalise([0.0, 0.0]) == [0.0, 0.0]


# -- the message checks ----------------------------------------------------------------------
def _reply(**c):
    from flwr.app import ConfigRecord, RecordDict
    return RecordDict({"fedkseed": ConfigRecord(c)})


def test_check_reply_accepts_a_good_reply_and_rejects_each_malformation():
    good = _reply(idx=[0, 3], g=[0.5, -1.5], n=12)
    assert protocol.check_reply(good, 16, 300, 1000) == ([0, 3], [0.5, -1.5], 12)
    cases = {
        "oversized": (good, 2000),
        "wrong type: g": (_reply(idx=[0, 3], g=["0.5", "1"], n=12), 300),
        "wrong type: idx": (_reply(idx=[0.0, 3.0], g=[0.5, 1.5], n=12), 300),
        "wrong type: n": (_reply(idx=[0, 3], g=[0.5, 1.5], n=1.5), 300),
        "non-finite": (_reply(idx=[0, 3], g=[0.5, math.nan], n=12), 300),
        "unknown seed index": (_reply(idx=[0, 16], g=[0.5, 1.5], n=12), 300),
        "repeated seed index": (_reply(idx=[3, 3], g=[0.5, 1.5], n=12), 300),
        "keys": (_reply(idx=[0], g=[0.5], n=12, text="hello"), 300),
        "out of range": (_reply(idx=[0], g=[0.5], n=0), 300),
    }
    for why, (content, nbytes) in cases.items():
        with pytest.raises(protocol.Rejected, match=why):
            protocol.check_reply(content, 16, nbytes, 1000)
    from flwr.app import ArrayRecord, RecordDict
    weights = RecordDict({"fedkseed": _reply(idx=[0], g=[0.5], n=3)["fedkseed"],
                          "w": ArrayRecord([np.zeros(4, np.float32)])})
    with pytest.raises(protocol.Rejected, match="array"):
        protocol.check_reply(weights, 16, 300, 1000)


def test_reply_of_k64_fits_the_1024_byte_goal():
    """A full K=64 reply, with metadata as large as a simulation reply's (64-bit ids, a uuid)."""
    from flwr.app import Message, Metadata
    content = protocol.train_reply({i: 1234.5678 + i for i in range(64)}, 321)
    md = Metadata(run_id=2**63 - 1, message_id="0" * 64, src_node_id=2**63 - 1,
                  dst_node_id=1, reply_to_message_id="5cd196b4-8852-4ae5-891f-f123482300db",
                  group_id="", created_at=1796092347.671049, ttl=43187.5, message_type="train",
                  dst_task_id=1)
    m = Message(content=content, metadata=md)
    assert 700 < protocol.message_bytes(m) <= 1024


# -- the head fast path against the full model ----------------------------------------------
def test_head_task_equals_full_model_head(tiny):
    """Cached features + base + x @ D^T give the logits the model computes with the head set."""
    from edgetune.federated.client import load_data, load_model
    from edgetune.federated.tasks import HeadTask, extract_features
    from edgetune.train import objectives
    from edgetune.zo.trainable import Perturb, build_trainable
    cfg = settings(tiny, "/nonexistent")
    model = load_model(cfg)
    enc, pool, _ = load_data(cfg, model)
    exs = pool[:24]
    x, base = extract_features(model, exs, enc.label_tokens, batch_size=7)
    ts = build_trainable(model.net, "head", head_rows=enc.label_tokens)
    ts.params[0].value[...] = np.random.default_rng(0).normal(0, 0.05, ts.params[0].value.shape)
    task = HeadTask(x, base, [e.label for e in exs], ts)
    pert = Perturb(99, 1e-2, -1)
    ids = [list(e.input_ids) for e in exs]
    pos = [e.answer_pos for e in exs]
    for p in (None, pert):
        ref = objectives.class_logits(model, ids, pos, enc.label_tokens, p)
        np.testing.assert_allclose(task.logits(np.arange(24), p), ref, rtol=1e-4, atol=1e-4)
    ref = objectives.classification_loss(model, ids, pos, [e.label for e in exs],
                                         enc.label_tokens, pert)
    assert abs(task.losses(np.arange(24), [pert])[0] - ref) < 1e-4
    from edgetune.model.transformer import NoHooks
    model.net.hooks = NoHooks()


# -- simulations -----------------------------------------------------------------------------
def _run(cfg: FedConfig, env=None, check=True):
    """A simulation in its own process (Ray and the SIGKILL fault stay out of pytest)."""
    code = ("import json,sys; from edgetune.federated import FedConfig, federate; "
            "federate(FedConfig(**json.loads(sys.argv[1])))")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(cfg.to_dict())],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, **(env or {})})
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _replay_server_states(out, k):
    """The global state after each prefix of the server's seed log."""
    from edgetune.zo.seedlog import read_log
    header, recs, _ = read_log(os.path.join(out, "seedlog.jsonl"))
    from edgetune.zo.optim import ZOOptimizer
    from edgetune.zo.trainable import Param
    (name, (size, pscale)), = header["trainable"].items()
    p = Param(name, "head", np.zeros(size, np.float32), 400000, pscale=pscale)
    opt = ZOOptimizer([p], "sgd")
    states = [p.value.copy()]
    for r in recs:
        opt.step([int(s) for s in r["seeds"]], r["g"], r["lr"])
        states.append(p.value.copy())
    return header, recs, states


@pytest.fixture(scope="module")
def smoke(tiny, tmp_path_factory):
    """One 2-round simulation shared by the smoke and the resume test."""
    cfg = settings(tiny, tmp_path_factory.mktemp("smoke") / "fed")
    _run(cfg)
    return cfg


def test_federated_smoke_seeds_and_scalars_only_and_bitexact_replay(smoke):
    """12 Flower SuperNodes, 2 rounds, head on a tiny synthetic model: every message the server
    received holds only ints and floats within the size bound, and every device's replayed global
    state equals the server's bit for bit."""
    cfg = smoke
    out = cfg.out
    header, recs, states = _replay_server_states(out, cfg.k)
    assert len(recs) == 2 and all(len(r["clients"]) == 12 for r in recs)
    # each round: a slot of K candidates per sampled client, the lr of the cosine schedule
    assert all(len(r["seeds"]) == len(r["g"]) == 12 * cfg.k for r in recs)
    assert [r["lr"] for r in recs] == [round_lr(recs[0]["lr"], i, 2, "cosine") for i in range(2)]
    assert recs[1]["lr"] < recs[0]["lr"]
    msgs = [json.loads(l) for l in open(os.path.join(out, "messages.jsonl"))]
    # every message the server received: 12 partition ids, 2 train rounds, personalization
    assert sorted(m["type"] for m in msgs) == ["evaluate"] * 12 + ["query"] * 12 + ["train"] * 24
    for m in msgs:
        assert m["verdict"] == "accepted"
        assert set(m["kinds"]) <= {"int", "float"}
        assert all(isinstance(v, (int, float)) for v in m["values"])
        assert m["bytes"] <= cfg.reply_limit
        if m["type"] == "train":
            assert len(m["values"]) <= 2 * cfg.k + 1          # (index, g) pairs + n
    dumps = sorted(os.listdir(cfg.dump_dir))
    assert len(dumps) == 2 * 12 + 12
    for f in dumps:
        rnd = int(f.split("-r")[1].split(".")[0])
        with np.load(os.path.join(cfg.dump_dir, f)) as z:
            v = z[z.files[0]]
        assert np.array_equal(v.view(np.uint32), states[rnd].reshape(v.shape).view(np.uint32)), f
    assert np.abs(states[-1]).max() > 0                    # the rounds changed the model
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["rounds"] == 2 and s["personal"]["clients"] == 12
    assert 0 < s["bytes_up_per_client_round"] <= 1024
    for f in ("metrics.csv", "metrics.png", "global.safetensors"):
        assert os.path.exists(os.path.join(out, f)), f
    assert len([f for f in os.listdir(os.path.join(out, "clients"))]) == 12


def test_federated_drops_and_malformed_replies_are_ignored_with_reasons(tiny, tmp_path):
    cfg = settings(tiny, tmp_path / "fed", rounds=1, personal_steps=0,
                   faults="1:drop,2:nan,3:unknown_index,4:types,5:oversize")
    _run(cfg)
    rec = _replay_server_states(cfg.out, cfg.k)[1][0]
    assert rec["clients"] == [0] + list(range(6, 12))
    assert rec["dropped"] == [1]
    why = rec["rejected"]
    assert "non-finite" in why["2"] and "unknown seed index" in why["3"]
    assert "wrong type" in why["4"] and "oversized" in why["5"]
    log = open(os.path.join(cfg.out, "server.log")).read()
    assert "client 1 dropped" in log and "rejected the reply of client 2" in log
    # only the seven accepted replies were applied: their audited pairs aggregate to the step
    msgs = [json.loads(l) for l in open(os.path.join(cfg.out, "messages.jsonl"))]
    msgs = [m for m in msgs if m["type"] == "train"]
    assert sorted(m["verdict"].split(":")[0] for m in msgs) == \
        ["accepted"] * 7 + ["dropped"] + ["rejected"] * 4
    ok = sorted((m for m in msgs if m["verdict"] == "accepted"), key=lambda m: m["partition"])
    pairs = [(rec["sampled"].index(m["partition"]), c["idx"], c["g"], c["n"])
             for m, c in ((m, m["content"]["fedkseed"]) for m in ok)]
    assert aggregate(pairs, cfg.k, cfg.per_round, cfg.q, cfg.server_lr) == rec["g"]
    # the slots of the dropped and rejected clients stay 0
    for pid in range(1, 6):
        j = rec["sampled"].index(pid)
        assert not any(rec["g"][j * cfg.k:(j + 1) * cfg.k])


def test_killed_server_resumes_from_its_seed_log(smoke, tiny, tmp_path):
    """SIGKILL the server right after it logged round 0, resume: the seed log and the final
    state equal those of the uninterrupted 2-round smoke run."""
    cut = settings(tiny, tmp_path / "cut", personal_steps=0, dump_dir="")
    r = _run(cut, env={"EDGETUNE_FAULT": "federated-round-logged:1"}, check=False)
    assert r.returncode != 0
    assert len(_replay_server_states(cut.out, cut.k)[1]) == 1
    cut.resume = True
    _run(cut)
    a = _replay_server_states(smoke.out, smoke.k)
    b = _replay_server_states(cut.out, cut.k)
    assert len(b[1]) == 2
    assert [r["g"] for r in a[1]] == [r["g"] for r in b[1]]
    assert np.array_equal(a[2][-1].view(np.uint32), b[2][-1].view(np.uint32))


def test_cli_federate_flags_and_refusals(tiny, tmp_path, capsys):
    """The contract's flags parse; a bad partition or an existing run is refused before work."""
    from edgetune.cli import build_parser, main
    model, data = tiny
    a = build_parser().parse_args(
        ["federate", "--model", model, "--data", data, "--clients", "100", "--per-round", "10",
         "--rounds", "7", "--local-steps", "3", "--partition", "dirichlet:0.3", "--out", "x"])
    assert (a.clients, a.per_round, a.rounds, a.local_steps, a.partition, a.out) == \
        (100, 10, 7, 3, "dirichlet:0.3", "x")
    assert main(["federate", "--model", model, "--data", data, "--partition", "zipf:1",
                 "--out", str(tmp_path / "r")]) == 2
    assert "--partition" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    assert main(["federate", "--model", model, "--data", data, "--verbalizer", "a=a,b=b",
                 "--out", str(tmp_path / "busy")]) == 2
    assert "--overwrite" in capsys.readouterr().err
