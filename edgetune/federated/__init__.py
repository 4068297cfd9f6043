"""Federated ZO fine-tuning on Flower: devices exchange seeds and scalars, never weights or text.

  partition.py   seeded Dirichlet label-skew partitions + local held-out slices
  tasks.py       a client's loss/predict: cached features for `head`, full forward otherwise
  rounds.py      FedKSeed math: round/candidate seeds, local steps, aggregation, replay
  protocol.py    message payloads and the server's checks on everything it receives
  client.py      the device: partition, replayed global state, local training, personalization
  server.py      the round loop over grid.send_and_receive, seed log, metrics, resume
  apps.py        Flower ServerApp / ClientApp (Message API)
  simulation.py  `edgetune federate`: the simulation engine on one machine
"""
from .config import FedConfig


def federate(config):
    from .simulation import federate as _federate
    return _federate(config)


__all__ = ["FedConfig", "federate"]
