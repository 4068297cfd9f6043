"""ZO engine unit tests on problems whose gradient is known (no model needed)."""
import math

import numpy as np
import pytest

from edgetune.zo import rng
from edgetune.zo.estimator import estimate
from edgetune.zo.optim import ZOOptimizer, lr_at, query_seed
from edgetune.zo.seedlog import SeedLog, encode_record, read_log
from edgetune.zo.trainable import Param, Perturb


def quadratic(n=64, seed=0):
    r = np.random.default_rng(seed)
    target = r.standard_normal(n).astype(np.float32)
    scale = r.uniform(0.5, 2.0, n).astype(np.float32)
    p = Param("theta", "norm", np.zeros(n, np.float32), tensor_id=7, decay=False)

    def loss(pert):
        th = p.value if pert is None else pert.apply(p)
        return float(0.5 * np.sum(scale.astype(np.float64) * (th.astype(np.float64) - target) ** 2))

    def grad():
        return scale * (p.value - target)
    return p, loss, grad


def test_update_moves_against_gradient():
    p, loss, grad = quadratic()
    opt = ZOOptimizer([p], "sgd")
    for step in range(50):
        g_true = grad().astype(np.float64)
        before = p.value.copy()
        est = estimate(loss, seed=1000 + step, eps=1e-3)
        opt.step(est.seeds, est.g, lr=1e-3)
        delta = (p.value - before).astype(np.float64)
        assert delta @ g_true <= 1e-9  # first-order change of the loss is never positive
        assert np.any(delta != 0)
    assert loss(None) < quadratic()[1](None)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_two_point_estimate_is_unbiased(dist):
    p, loss, grad = quadratic(n=16, seed=1)
    p.value[:] = np.random.default_rng(2).standard_normal(16).astype(np.float32)
    n = 4000
    acc = np.zeros(16)
    for s in range(n):
        est = estimate(loss, seed=s, eps=1e-3, dist=dist)
        acc += est.g[0] * rng.perturbation(s, p.tensor_id, 16, dist).astype(np.float64)
    g_hat = acc / n
    g_true = grad().astype(np.float64)
    rel = np.linalg.norm(g_hat - g_true) / np.linalg.norm(g_true)
    assert rel < 0.15, rel
    # and a single estimate's g is the directional derivative z . grad (quadratic: exact up to fp)
    est = estimate(loss, seed=5, eps=1e-3, dist=dist)
    z = rng.perturbation(5, p.tensor_id, 16, dist).astype(np.float64)
    assert math.isclose(est.g[0], z @ g_true, rel_tol=1e-3, abs_tol=1e-3)


def test_one_sided_and_q_queries():
    p, loss, grad = quadratic(n=8)
    e1 = estimate(loss, seed=3, eps=1e-4, mode="one_sided")
    z = rng.perturbation(3, p.tensor_id, 8).astype(np.float64)
    assert math.isclose(e1.g[0], z @ grad(), rel_tol=1e-2, abs_tol=1e-2)
    e4 = estimate(loss, seed=3, eps=1e-3, q=4)
    assert len(e4.g) == 4 and len(set(e4.seeds)) == 4 and e4.seeds[0] == 3
    assert e4.seeds[1] == query_seed(3, 1)


def test_clipping():
    p, loss, grad = quadratic(n=8)
    p.value[:] = 100.0
    e = estimate(loss, seed=1, eps=1e-3, clip=1.0)
    assert abs(e.g[0]) == 1.0 and abs(e.raw_g[0]) > 1.0


def test_nonfinite_loss_is_flagged():
    e = estimate(lambda pert: float("nan"), seed=1, eps=1e-3)
    assert not e.finite


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam", "sign"])
def test_every_optimizer_descends_and_replays_bit_for_bit(kind):
    p, loss, _ = quadratic(n=32)
    opt = ZOOptimizer([p], kind, weight_decay=0.0)
    l0 = loss(None)
    records = []
    for step in range(300):
        est = estimate(loss, seed=step, eps=1e-3, q=2 if kind == "momentum" else 1)
        lr = lr_at(step, 2e-3 if kind in ("sgd", "momentum") else 2e-2, 300, "cosine", warmup=10)
        opt.step(est.seeds, est.g, lr)
        records.append((est.seeds, est.g, lr))
    assert loss(None) < 0.7 * l0, (kind, loss(None), l0)
    # replay from the records alone
    p2 = Param("theta", "norm", np.zeros(32, np.float32), tensor_id=7, decay=False)
    opt2 = ZOOptimizer([p2], kind)
    for seeds, g, lr in records:
        opt2.step(seeds, g, lr)
    np.testing.assert_array_equal(p.value, p2.value)


def test_weight_decay_skips_no_decay_params():
    a = Param("a", "lora_a", np.ones(4, np.float32), 1, decay=True)
    b = Param("b", "norm", np.ones(4, np.float32), 2, decay=False)
    opt = ZOOptimizer([a, b], "sgd", weight_decay=0.5)
    opt.step([1], [0.0], lr=0.1)
    np.testing.assert_allclose(a.value, 0.95)
    np.testing.assert_array_equal(b.value, 1.0)


def test_schedules():
    assert lr_at(0, 1.0, 100, "constant", warmup=10) == pytest.approx(0.1)
    assert lr_at(10, 1.0, 100, "linear", warmup=10) == pytest.approx(1.0)
    assert lr_at(99, 1.0, 100, "linear") == pytest.approx(0.01)
    assert lr_at(50, 1.0, 100, "cosine") == pytest.approx(0.5)
    assert lr_at(0, 1.0, 100, "cosine") == pytest.approx(1.0)


def test_seedlog_roundtrip_and_torn_tail(tmp_path):
    path = tmp_path / "seedlog.jsonl"
    with SeedLog(path, header={"config": {"a": 1}}, fsync_every=3) as log:
        for i in range(5):
            log.append({"type": "step", "step": i, "seeds": [str(2**64 - 1 - i)],
                        "g": [0.1 * i, -1e-300], "lr": 1e-5})
    header, recs, _ = read_log(path)
    assert header["config"] == {"a": 1} and [r["step"] for r in recs] == list(range(5))
    assert recs[3]["g"] == [0.1 * 3, -1e-300]  # floats round-trip exactly
    data = path.read_bytes()
    # a torn final record (killed mid-write) is dropped, never replayed
    path.write_bytes(data[:-7])
    _, recs, _ = read_log(path)
    assert [r["step"] for r in recs] == [0, 1, 2, 3]
    # a flipped byte inside a record fails its CRC: that record and the rest are dropped
    bad = bytearray(data)
    i = data.index(b'"step":2')
    bad[i + 7] = ord("7")
    path.write_bytes(bytes(bad))
    _, recs, _ = read_log(path)
    assert [r["step"] for r in recs] == [0, 1]
    # reopening truncates the torn tail and appends cleanly after the last valid record
    path.write_bytes(data[:-7])
    with SeedLog(path) as log:
        log.append({"type": "step", "step": 4, "seeds": ["1"], "g": [0.5], "lr": 1e-5})
    _, recs, _ = read_log(path)
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4] and recs[-1]["g"] == [0.5]


def test_record_encoding_is_canonical():
    a = encode_record({"b": 1, "a": [1.5, 2]})
    b = encode_record({"a": [1.5, 2], "b": 1})
    assert a == b and a.endswith(b"\n")


def test_perturb_apply_is_pure():
    p = Param("x", "norm", np.arange(6, dtype=np.float32), 3)
    before = p.value.copy()
    v = Perturb(9, 0.5, -1).apply(p)
    np.testing.assert_array_equal(p.value, before)
    np.testing.assert_array_equal(v, before - 0.5 * rng.perturbation(9, 3, 6))
