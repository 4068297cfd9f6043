"""The Flower apps: a ServerApp (@app.main() driving FedServer) and a ClientApp (@app.train(),
@app.evaluate(), @app.query()) speaking the Message API with ConfigRecord payloads (protocol.py).

`make_server_app(settings)` / `make_client_app(settings)` bind a settings dict (FedConfig keys)
for the simulation engine; the module-level `server_app` / `client_app` read the same keys from
the run config instead (`flwr run` / [tool.flwr.app.config]) — what the deployment engine loads
(see the README, "Federated fine-tuning").  A node's partition comes from its node config
(`partition-id`, set by the simulation engine or `flower-supernode --node-config`).
"""
from __future__ import annotations

import math

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from .config import FedConfig


def _settings(bound: dict, context: Context) -> FedConfig:
    merged = dict(bound)
    merged.update({k: v for k, v in dict(context.run_config).items()})
    return FedConfig.from_dict(merged)


def make_server_app(settings: dict | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from .server import FedServer
        FedServer(_settings(settings or {}, context)).run(grid)

    return app


def _faulty(kind: str, msg: Message, k: int) -> Message:
    """Tests only: a misbehaving client's reply (cfg.faults 'PID:KIND')."""
    if kind == "drop":
        raise RuntimeError("simulated device drop mid-round")
    bad = {"nan": {"idx": [0, 1], "g": [0.5, math.nan], "n": 10},
           "unknown_index": {"idx": [0, k + 3], "g": [0.5, 0.25], "n": 10},
           "types": {"idx": [0, 1], "g": ["0.5", "0.25"], "n": 10},
           "oversize": {"idx": list(range(k)), "g": [0.1] * k, "n": 10,
                        "pad": [1.0] * 4096}}[kind]
    return Message(RecordDict({"fedkseed": ConfigRecord(bad)}), reply_to=msg)


def make_client_app(settings: dict | None = None) -> ClientApp:
    app = ClientApp()

    def _pid(context: Context) -> int:
        return int(context.node_config["partition-id"])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"hello": ConfigRecord({"partition": _pid(context)})}),
                       reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from . import protocol
        from .client import device
        cfg = _settings(settings or {}, context)
        pid = _pid(context)
        c = msg.content["round"]
        faults = dict(f.split(":") for f in cfg.faults.split(",") if f)
        if str(pid) in faults:
            return _faulty(faults[str(pid)], msg, int(c["k"]))
        dev = device(cfg)
        rnd = int(c["round"])
        dev.sync(context.state, protocol.read_tail(c), int(c["tail_from"]), rnd)
        dev.dump(pid, rnd)
        recipe = {k: c[k] for k in ("steps", "q", "lr", "eps", "batch")}
        acc, n = dev.train(pid, rnd, int(c["round_seed"]), int(c["k"]), int(c["slot"]), recipe)
        return Message(protocol.train_reply(acc, n), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        from . import protocol
        from .client import device
        cfg = _settings(settings or {}, context)
        pid = _pid(context)
        c = msg.content["round"]
        dev = device(cfg)
        rnd = int(c["round"])
        dev.sync(context.state, protocol.read_tail(c), int(c["tail_from"]), rnd)
        dev.dump(pid, rnd)
        recipe = {k: c[k] for k in ("steps", "q", "lr", "eps", "batch")}
        n, a_g, a_p = dev.personalize(pid, int(c["personal_steps"]), recipe)
        return Message(protocol.personal_reply(n, a_g, a_p), reply_to=msg)

    return app


# the deployment engine's entry points (pyproject [tool.flwr.app.components])
server_app = make_server_app()
client_app = make_client_app()
