"""The server side: sample clients, send each the round and its tail, check and aggregate replies.

`FedServer.run(grid)` is the body of the ServerApp's @app.main(): a custom loop over
`grid.send_and_receive` (Flower's FedAvg strategy expects weight arrays; FedKSeed exchanges
seeds and scalars).  Round r:
  1. sample `per_round` partitions (seeded by the run seed and r: a resumed run samples the same),
  2. send each its round (round seed, its slot of K candidates, recipe with the round's lr from
     the schedule) and the seed-log records since it last synced,
  3. receive; a missing or error reply is a dropped client, ignored this round; every other reply
     goes through protocol.check_reply — a malformed one is rejected with a logged reason,
  4. aggregate the accepted replies into per_round*K scalars (rounds.aggregate), apply them, append the
     round to the seed log (fsync'd): that record is the next clients' tail.
The seed log is the truth: a killed server restarted with --resume replays it and continues at
the next round with identical samples and seeds.  Every received message is written to
OUT/messages.jsonl (its serialized size and every value it carried) for audit.

Run directory (OUT):
  seedlog.jsonl     header (TrainConfig-compatible, so `edgetune eval --run OUT` works) + one
                    step record per round: seeds (per_round*K candidates), g, lr, round_seed,
                    sampled (slot j is sampled[j]'s), clients (accepted), dropped, rejected
  metrics.csv       round, accepted, dropped, rejected, bytes up/down per client, dev accuracy
  messages.jsonl    the audit of received messages;  server.log  dropped/rejected reasons
  metrics.png       dev accuracy and bytes per round;  summary.json
  global.safetensors  the final global trainable state (+ tuned.gguf for scales/lora/norms)
"""
from __future__ import annotations

import csv
import json
import logging
import os
import time

import numpy as np

from .. import faults
from ..errors import EdgetuneError
from ..zo.optim import ZOOptimizer
from ..zo.seedlog import SeedLog, read_log
from ..zo.trainable import build_trainable
from . import protocol
from .client import cached_features, load_model, train_config
from .config import FedConfig
from .rounds import (absolute_units, aggregate, apply_record, candidate_seeds, round_lr,
                     round_seed)
from .tasks import HeadTask, ModelTask

log = logging.getLogger("edgetune.federated")


class FedServer:
    def __init__(self, cfg: FedConfig):
        self.cfg = cfg.validate()
        os.makedirs(cfg.out, exist_ok=True)
        self._logfile = open(os.path.join(cfg.out, "server.log"), "a")
        self.model = load_model(cfg)
        from ..train import data as datamod
        from ..train.loop import open_dataset
        self.enc = datamod.encode(open_dataset(train_config(cfg)), self.model,
                                  max_length=cfg.max_length)
        self.ts = build_trainable(self.model.net, cfg.method, init_seed=cfg.seed,
                                  head_rows=self.enc.label_tokens)
        self.opt = ZOOptimizer(self.ts.params, "sgd")
        self.lr, eps = absolute_units(self.ts, cfg.lr, cfg.eps)   # --lr/--eps are absolute
        self.recipe = {"steps": cfg.local_steps, "q": min(cfg.q, cfg.k), "lr": self.lr,
                       "eps": eps, "batch": cfg.batch}
        self.synced: dict[int, int] = {}
        self.records = self._open_log()
        for rec in self.records:
            apply_record(self.opt, rec)
        self.next_round = len(self.records)
        self.summary = self._read_summary()

    # -- bookkeeping -----------------------------------------------------------------------
    def note(self, text: str):
        log.warning(text)
        self._logfile.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")
        self._logfile.flush()

    def _open_log(self) -> list:
        path = os.path.join(self.cfg.out, "seedlog.jsonl")
        key = self.cfg.learning_key()
        if os.path.exists(path):
            if not self.cfg.resume:
                raise EdgetuneError(f"{self.cfg.out}: a federated seed log exists; pass --resume "
                                    f"to continue it or --overwrite to start over")
            header, records, _ = read_log(path)
            if header is None or header.get("federated") != key:
                raise EdgetuneError(f"{path}: the logged run has other settings; resume with the "
                                    f"same flags (only --rounds may grow, and only with "
                                    f"--schedule constant)")
            from ..runlog import check_header
            check_header(header, self.ts, path)   # set, tensor ids, RNG and log version
        records = [r for r in (read_log(path)[1] if os.path.exists(path) else [])
                   if r.get("type") == "step"]
        for i, r in enumerate(records):
            if r["step"] != i:
                raise EdgetuneError(f"{path}: seed log jumps from round {i} to {r['step']}")
        from ..runlog import header_fields
        self.seedlog = SeedLog(path, header={"config": train_config(self.cfg).to_dict(),
                                             "model": os.path.basename(self.model.path),
                                             "federated": key, **header_fields(self.ts, None)},
                               fsync_every=1)
        return records

    def _read_summary(self) -> dict:
        path = os.path.join(self.cfg.out, "summary.json")
        if self.cfg.resume and os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        return {}

    def _write_summary(self):
        with open(os.path.join(self.cfg.out, "summary.json"), "w") as f:
            json.dump(self.summary, f, indent=2)

    # -- evaluation ------------------------------------------------------------------------
    def eval_task(self, split: str, limit: int):
        exs = self.enc.examples(split)[:limit or None]
        if self.cfg.method == "head":
            x, base = cached_features(self.cfg, self.model, self.enc, split, exs)
            return HeadTask(x, base, [e.label for e in exs], self.ts)
        self.model.net.hooks = self.ts
        return ModelTask(self.model, exs, self.enc.label_tokens)

    def accuracy(self, split: str, limit: int) -> float:
        t = self.eval_task(split, limit)
        return float(np.mean(t.predict() == t.labels))

    # -- the rounds ------------------------------------------------------------------------
    def sample(self, rnd: int) -> list[int]:
        r = np.random.default_rng([self.cfg.seed, rnd, 0x5A3])
        return sorted(int(p) for p in r.choice(self.cfg.clients, self.cfg.per_round, replace=False))

    def tail_for(self, pid: int):
        start = self.synced.get(pid, 0)
        return self.records[start:], start

    def _audit(self, f, rnd: int, kind: str, pid, msg, nbytes: int, verdict: str):
        row = {"round": rnd, "type": kind, "partition": pid, "bytes": nbytes, "verdict": verdict}
        if msg.has_content():
            def show(v):
                if isinstance(v, list):
                    return [show(x) for x in v]
                return v if isinstance(v, (int, float)) else f"<{type(v).__name__}>"
            row["content"] = {name: ({k: show(v) for k, v in rec.items()}
                                     if hasattr(rec, "items") else f"<{type(rec).__name__}>")
                              for name, rec in msg.content.items()}
            flat = protocol.flat_values(msg.content)
            row["values"] = [show(v) for v in flat]
            row["kinds"] = sorted({type(v).__name__ for v in flat})
        f.write(json.dumps(row) + "\n")

    def wait_nodes(self, grid, audit, timeout: float = 120.0) -> dict:
        """{node id: partition id} of all `clients` nodes (asked with a "query" message)."""
        from flwr.app import ConfigRecord, Message, RecordDict
        t0 = time.time()
        while len(list(grid.get_node_ids())) < self.cfg.clients:
            if time.time() - t0 > timeout:
                raise EdgetuneError(f"only {len(list(grid.get_node_ids()))} of "
                                    f"{self.cfg.clients} nodes connected in {timeout:.0f}s")
            time.sleep(0.2)
        nodes = sorted(grid.get_node_ids())
        msgs = [Message(RecordDict({"query": ConfigRecord({"what": "partition"})}),
                        dst_node_id=n, message_type="query") for n in nodes]
        pid_of = {}
        # the first message starts every ClientApp process (model load, data): be patient
        for m in grid.send_and_receive(msgs, timeout=max(self.cfg.timeout, 900.0)):
            nbytes = protocol.message_bytes(m)
            if m.has_error() or nbytes > self.cfg.reply_limit:
                self._audit(audit, -1, "query", None, m, nbytes, "dropped")
                continue
            c = m.content.config_records.get("hello")
            p = c.get("partition") if c is not None and len(m.content) == 1 else None
            if isinstance(p, int) and not isinstance(p, bool) and 0 <= p < self.cfg.clients:
                pid_of[m.metadata.src_node_id] = p
                self._audit(audit, -1, "query", p, m, nbytes, "accepted")
            else:
                self._audit(audit, -1, "query", None, m, nbytes, "rejected: bad partition id")
        if sorted(pid_of.values()) != list(range(self.cfg.clients)):
            raise EdgetuneError(f"nodes report partitions {sorted(pid_of.values())[:10]}..., "
                                f"expected each of 0..{self.cfg.clients - 1} once")
        return pid_of

    def run(self, grid):
        from flwr.app import Message
        cfg = self.cfg
        if "zero_shot_test_acc" not in self.summary and not self.records:
            self.summary["zero_shot_test_acc"] = self.accuracy("test", cfg.test_limit)
            self._write_summary()
        audit = open(os.path.join(cfg.out, "messages.jsonl"), "a")
        pid_of = self.wait_nodes(grid, audit)
        node_of = {p: n for n, p in pid_of.items()}
        mpath = os.path.join(cfg.out, "metrics.csv")
        new = not os.path.exists(mpath)
        mf = open(mpath, "a", newline="")
        mw = csv.writer(mf)
        if new:
            mw.writerow(["round", "accepted", "dropped", "rejected", "bytes_up_per_client",
                         "bytes_down_per_client", "dev_acc", "elapsed_s"])
        t0 = time.perf_counter()
        bar = None
        if cfg.progress and cfg.rounds > self.next_round:
            from tqdm import tqdm
            bar = tqdm(total=cfg.rounds, initial=self.next_round, desc="federate", unit="round")
        for rnd in range(self.next_round, cfg.rounds):
            rseed = round_seed(cfg.seed, rnd)
            chosen = self.sample(rnd)
            msgs, down = [], []
            recipe = dict(self.recipe, lr=round_lr(self.lr, rnd, cfg.rounds, cfg.schedule))
            slot_of = {pid: j for j, pid in enumerate(chosen)}     # disjoint candidates
            for pid in chosen:
                tail, start = self.tail_for(pid)
                m = Message(protocol.train_content(rnd, rseed, cfg.k, cfg.per_round,
                                                   slot_of[pid], recipe, tail, start),
                            dst_node_id=node_of[pid], message_type="train")
                msgs.append(m)
                down.append(protocol.message_bytes(m))
            replies = list(grid.send_and_receive(msgs, timeout=cfg.timeout))
            accepted, ok_pids, rejected, up = [], [], {}, []
            got = set()
            for m in replies:
                pid = pid_of.get(m.metadata.src_node_id)
                nbytes = protocol.message_bytes(m)
                got.add(pid)
                if pid not in chosen:
                    self._audit(audit, rnd, "train", pid, m, nbytes, "unsolicited")
                    continue
                if m.has_error():
                    self.note(f"round {rnd}: client {pid} dropped ({m.error.reason})")
                    self.synced[pid] = 0       # its state is unknown: send it the whole log next
                    self._audit(audit, rnd, "train", pid, m, nbytes, "dropped")
                    continue
                up.append(nbytes)
                try:
                    idx, g, n = protocol.check_reply(m.content, cfg.k, nbytes, cfg.reply_limit)
                except protocol.Rejected as e:
                    rejected[str(pid)] = str(e)
                    self.note(f"round {rnd}: rejected the reply of client {pid}: {e}")
                    self._audit(audit, rnd, "train", pid, m, nbytes, f"rejected: {e}")
                    continue
                self._audit(audit, rnd, "train", pid, m, nbytes, "accepted")
                accepted.append((slot_of[pid], idx, g, n))
                ok_pids.append(pid)
                self.synced[pid] = rnd
            for pid in chosen:
                if pid not in got:
                    self.note(f"round {rnd}: client {pid} dropped (no reply in {cfg.timeout:.0f}s)")
                    self.synced[pid] = 0
            # replies arrive in any order: aggregate in partition order so the float sums, and
            # so the seed log, are the same on every run and on resume
            order = sorted(range(len(ok_pids)), key=lambda i: ok_pids[i])
            accepted = [accepted[i] for i in order]
            ok_pids = [ok_pids[i] for i in order]
            K = cfg.k * cfg.per_round
            g = aggregate(accepted, cfg.k, cfg.per_round, recipe["q"], cfg.server_lr) \
                if accepted else [0.0] * K
            rec = {"type": "step", "step": rnd, "seeds": [str(s) for s in candidate_seeds(rseed, K)],
                   "g": g, "lr": recipe["lr"], "round_seed": rseed, "sampled": chosen,
                   "clients": ok_pids,
                   "dropped": sorted(set(chosen) - set(ok_pids) - {int(p) for p in rejected}),
                   "rejected": rejected}
            self.seedlog.append(rec)
            apply_record(self.opt, rec)
            self.records.append(rec)
            faults.reached("federated-round-logged")
            done = rnd + 1
            dev = None
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.rounds:
                dev = self.accuracy("dev", cfg.eval_limit)
            mw.writerow([done, len(accepted), len(chosen) - len(accepted) - len(rejected),
                         len(rejected), f"{np.mean(up):.1f}" if up else "",
                         f"{np.mean(down):.1f}", "" if dev is None else f"{dev:.4f}",
                         f"{time.perf_counter() - t0:.1f}"])
            mf.flush()
            audit.flush()
            if bar is not None:
                bar.set_postfix(dev=f"{100 * dev:.1f}%" if dev is not None else "-",
                                up=f"{np.mean(up):.0f}B" if up else "-")
                bar.update(1)
        if bar is not None:
            bar.close()
        mf.close()
        self.seedlog.sync()
        self.personalize(grid, node_of, pid_of, audit)
        audit.close()
        self.finish()

    def personalize(self, grid, node_of, pid_of, audit):
        """Every client replays the final global state, scores it on its held-out slice,
        continues locally for personal_steps and scores again."""
        from flwr.app import Message
        cfg = self.cfg
        if cfg.personal_steps <= 0:
            return
        rnd = len(self.records)
        msgs = []
        for pid in range(cfg.clients):
            tail, start = self.tail_for(pid)
            msgs.append(Message(protocol.train_content(rnd, 0, cfg.k, cfg.per_round, 0,
                                                       self.recipe, tail, start,
                                                       cfg.personal_steps),
                                dst_node_id=node_of[pid], message_type="evaluate"))
        res = []
        for m in grid.send_and_receive(msgs, timeout=cfg.timeout):
            pid = pid_of.get(m.metadata.src_node_id)
            nbytes = protocol.message_bytes(m)
            if m.has_error():
                self.note(f"personalization: client {pid} dropped ({m.error.reason})")
                self._audit(audit, rnd, "evaluate", pid, m, nbytes, "dropped")
                continue
            try:
                n, a_g, a_p = protocol.check_personal(m.content, nbytes, cfg.reply_limit)
            except protocol.Rejected as e:
                self.note(f"personalization: rejected the reply of client {pid}: {e}")
                self._audit(audit, rnd, "evaluate", pid, m, nbytes, f"rejected: {e}")
                continue
            self._audit(audit, rnd, "evaluate", pid, m, nbytes, "accepted")
            res.append((pid, n, a_g, a_p))
        if res:
            self.summary["personal"] = {
                "clients": len(res),
                "heldout_acc_global": float(np.mean([r[2] for r in res])),
                "heldout_acc_personal": float(np.mean([r[3] for r in res])),
                "personal_gain_points": float(100 * np.mean([r[3] - r[2] for r in res]))}

    def finish(self):
        from safetensors.numpy import save_file
        cfg = self.cfg
        self.summary["final_test_acc"] = self.accuracy("test", cfg.test_limit)
        self.summary["rounds"] = len(self.records)
        self.summary["dev_acc"] = self.accuracy("dev", cfg.eval_limit)
        rows = []
        with open(os.path.join(cfg.out, "metrics.csv")) as f:
            rows = list(csv.DictReader(f))
        ups = [float(r["bytes_up_per_client"]) for r in rows if r["bytes_up_per_client"]]
        downs = [float(r["bytes_down_per_client"]) for r in rows if r["bytes_down_per_client"]]
        self.summary["bytes_up_per_client_round"] = float(np.mean(ups)) if ups else None
        self.summary["bytes_down_per_client_round"] = float(np.mean(downs)) if downs else None
        self._write_summary()
        save_file({k: np.ascontiguousarray(v) for k, v in self.ts.state().items()},
                  os.path.join(cfg.out, "global.safetensors"))
        plot_rounds(os.path.join(cfg.out, "metrics.csv"), os.path.join(cfg.out, "metrics.png"))
        self.seedlog.close()
        if cfg.method in ("scales", "lora", "norms"):
            from ..export.gguf_export import export_gguf
            export_gguf(cfg.out, os.path.join(cfg.out, "tuned.gguf"), overwrite=True)


def plot_rounds(csv_path: str, png_path: str):
    """Global dev accuracy and bytes per client against round."""
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    acc = [(int(r["round"]), 100 * float(r["dev_acc"])) for r in rows if r["dev_acc"]]
    if acc:
        ax[0].plot(*zip(*acc), marker="o", color="tab:green")
    ax[0].set_xlabel("round")
    ax[0].set_ylabel("global dev accuracy (%)")
    up = [(int(r["round"]), float(r["bytes_up_per_client"])) for r in rows if r["bytes_up_per_client"]]
    dn = [(int(r["round"]), float(r["bytes_down_per_client"])) for r in rows if r["bytes_down_per_client"]]
    if up:
        ax[1].plot(*zip(*up), label="client -> server")
    if dn:
        ax[1].plot(*zip(*dn), label="server -> client")
    ax[1].set_xlabel("round")
    ax[1].set_ylabel("serialized bytes per client")
    ax[1].legend()
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, png_path)
