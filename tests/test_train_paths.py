"""Paths users reach inside `finetune` that no other test drives: the `accuracy` and `lm`
objectives (each logged loss is recomputed here, pass by pass, on the state a replay gives at that
step), and one_sided / q > 1 / momentum / Adam runs interrupted mid-way and resumed, which must be
bit-identical to uninterrupted runs — log, trainable state and optimizer state — under a cosine
schedule with warmup (the schedule depends on --steps, so the interruption is a crash, not a
shorter run)."""
import json

import numpy as np
import pytest

import edgetune
from edgetune import faults
from edgetune.config import make_config
from edgetune.runlog import StepBatches, open_dataset, step_seed
from edgetune.train import data as datamod
from edgetune.train import objectives
from edgetune.train.loop import finetune
from edgetune.train.runstate import apply_run
from edgetune.zo.seedlog import read_log
from edgetune.zo.trainable import Perturb
from tests.conftest import make_tiny_task


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_task(tmp_path_factory.mktemp("paths"), 200)


@pytest.fixture(scope="module")
def tiny_text(tiny, tmp_path_factory):
    """The tiny model + a {text} JSONL (the lm objective)."""
    import random
    r = random.Random(1)
    d = tmp_path_factory.mktemp("paths_lm")
    rows = [{"text": " ".join(r.choice(["ab", "cd", "ef", "gh"]) for _ in range(r.randint(4, 9)))}
            for _ in range(120)]
    (d / "text.jsonl").write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    return tiny[0], str(d / "text.jsonl")


def cfg_for(model, data, out, **kw):
    base = dict(model=model, data=data, out=str(out), steps=3, batch=4, lr=1e-3, eps=0.05,
                eval_every=0, eval_limit=0, test_limit=8, zero_shot=False, snapshot_every=0,
                progress=False, method="norms,lora", estimator="two_point", q=2, clip=0)
    base.update(kw)
    return make_config(flag_values=base)


def logged_losses_are_the_passes(cfg, run_dir, loss_of):
    """Every step record's lp (and lm) equal loss_of(model, batch, perturb) recomputed on a fresh
    model carrying the state a replay gives just before that step."""
    _, recs, _ = read_log(run_dir / "seedlog.jsonl")
    steps = [r for r in recs if r["type"] == "step"]
    assert len(steps) == cfg.steps
    m = edgetune.load(cfg.model)
    enc = datamod.encode(open_dataset(cfg), m, max_length=cfg.max_length)
    r = cfg.resolved(enc.dataset.kind)
    batches = StepBatches(enc, r.batch, r.seed, r.train_limit)
    for rec in steps:
        k = rec["step"]
        m = edgetune.load(cfg.model)
        apply_run(m, str(run_dir), step=k)          # the state the step started from
        batch = batches.get(k)
        if r.objective == "lm" and r.loss_positions > 0:
            batch = objectives.sample_loss_positions(batch, r.loss_positions, step_seed(r.seed, k))
        for j, s in enumerate(rec["seeds"]):
            lp = loss_of(m, enc, batch, Perturb(int(s), r.eps, +1))
            lm = loss_of(m, enc, batch, Perturb(int(s), r.eps, -1))
            assert abs(lp - rec["lp"][j]) <= 1e-6 and abs(lm - rec["lm"][j]) <= 1e-6, (k, j)
            assert rec["g"][j] == pytest.approx((rec["lp"][j] - rec["lm"][j]) / (2 * r.eps))
    return steps


def test_accuracy_objective_inside_finetune(tiny, tmp_path):
    cfg = cfg_for(*tiny, tmp_path / "acc", objective="accuracy", verbalizer="a=a,b=b",
                  eps=0.5, steps=3)
    finetune(cfg)

    def error_rate(m, enc, batch, p):
        return objectives.accuracy_loss(m, batch.input_ids, batch.answer_pos, batch.labels,
                                        enc.label_tokens, p)
    steps = logged_losses_are_the_passes(cfg, tmp_path / "acc", error_rate)
    vals = [v for r in steps for v in r["lp"] + r["lm"]]
    assert all(v * 4 == int(v * 4) for v in vals)      # error rates of a batch of 4


def test_lm_objective_inside_finetune(tiny_text, tmp_path):
    cfg = cfg_for(*tiny_text, tmp_path / "lm", objective="lm", loss_positions=3, steps=3)
    finetune(cfg)

    def nll(m, enc, batch, p):
        return objectives.lm_loss(m, batch.input_ids, batch.loss_masks, p)
    steps = logged_losses_are_the_passes(cfg, tmp_path / "lm", nll)
    assert all(r["lp"] != r["lm"] for r in steps)


class Crash(Exception):
    pass


@pytest.mark.parametrize("estimator,q,optimizer", [("one_sided", 3, "momentum"),
                                                   ("two_point", 2, "adam"),
                                                   ("normalized", 4, "adam")])
def test_resume_is_bit_identical_with_optimizer_state_and_cosine(tiny, tmp_path, monkeypatch,
                                                                 estimator, q, optimizer):
    kw = dict(verbalizer="a=a,b=b", method="scales,norms,lora", estimator=estimator, q=q,
              optimizer=optimizer, schedule="cosine", warmup=3, steps=10, snapshot_every=4,
              lr=1e-2 if optimizer == "adam" else 1e-3)
    finetune(cfg_for(*tiny, tmp_path / "whole", **kw))

    # the same run, crashed right after logging its 7th step (snapshot at 4: the resume loads it
    # and replays steps 4..6 from the log, optimizer state included), then --resume'd
    real, seen = faults.reached, {"n": 0}

    def crash_at_7(point):
        if point == "step-logged":
            seen["n"] += 1
            if seen["n"] == 7:
                raise Crash()
        real(point)
    monkeypatch.setattr(faults, "reached", crash_at_7)
    with pytest.raises(Crash):
        finetune(cfg_for(*tiny, tmp_path / "cut", **kw))
    monkeypatch.setattr(faults, "reached", real)
    _, cut, _ = read_log(tmp_path / "cut" / "seedlog.jsonl")
    assert len(cut) == 7
    with np.load(tmp_path / "cut" / "state.npz") as z:
        assert int(z["step"]) == 4 and any(k.startswith(("o:m:", "o:v:")) for k in z.files)
    finetune(cfg_for(*tiny, tmp_path / "cut", resume=True, **kw))

    _, a, _ = read_log(tmp_path / "whole" / "seedlog.jsonl")
    _, b, _ = read_log(tmp_path / "cut" / "seedlog.jsonl")
    assert len(a) == 10 and a == b
    assert len({r["lr"] for r in a}) >= 8                 # warmup then cosine: lr changes each step
    with np.load(tmp_path / "whole" / "state.npz") as za, np.load(tmp_path / "cut" / "state.npz") as zb:
        assert sorted(za.files) == sorted(zb.files)
        assert any(k.startswith("o:m:") for k in za.files)  # optimizer moments are in the snapshot
        for k in za.files:
            np.testing.assert_array_equal(za[k], zb[k], err_msg=k)
