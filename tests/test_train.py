"""Training engine on a tiny synthetic model: fused == explicit perturbation, replay, resume,
determinism, CLI outputs."""
import json
import os

import numpy as np
import pytest

import edgetune
from edgetune.config import make_config
from edgetune.errors import EdgetuneError
from edgetune.train.loop import finetune
from edgetune.train.runstate import apply_run
from edgetune.zo.seedlog import read_log
from edgetune.zo.trainable import Perturb, build_trainable
from tests.conftest import make_tiny_task


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_task(tmp_path_factory.mktemp("tiny"), 400)


def cfg_for(tiny, out, **kw):
    model, data = tiny
    base = dict(model=model, data=data, verbalizer="a=a,b=b", out=str(out), steps=12, batch=8,
                lr=1e-3, eps=1e-2, eval_every=6, eval_limit=16, test_limit=16, snapshot_every=5,
                progress=False, method="scales,norms,lora")
    base.update(kw)
    return make_config(flag_values=base)


def test_fused_scale_perturbation_equals_explicit(tiny):
    """A perturbed pass (scales in the int4 kernel, norms and LoRA handed to the C++ block) gives
    exactly the logits of an unperturbed pass over values written from the RNG's definition:
    theta + float32(eps * sign * pscale) * z, z from zo/rng.py's numpy twin (not Perturb.apply).
    Both sides build the same float32 values, so equality is exact, not approximate."""
    from edgetune.zo import rng
    m = edgetune.load(tiny[0])
    ts = build_trainable(m.net, "scales,norms,lora")
    r = np.random.default_rng(0)
    for p in ts.params:   # LoRA B away from 0, so its perturbation reaches the logits through A
        if p.kind == "lora_b":
            p.value[...] = (0.05 * r.standard_normal(p.value.shape)).astype(np.float32)
    ids = [m.tokenize("ab cd ef gh"), m.tokenize("ab ab")]
    eps, sign, seed = 1e-2, -1, 77
    fused = m.logits(ids, perturb=Perturb(seed=seed, eps=eps, sign=sign))
    base = m.logits(ids)
    saved = {p.name: p.value.copy() for p in ts.params}
    for p in ts.params:
        z = rng.perturbation(seed, p.tensor_id, p.value.shape)
        p.value[...] = saved[p.name] + np.float32(eps * sign * p.pscale) * z
    explicit = m.logits(ids)
    for p in ts.params:
        p.value[...] = saved[p.name]
    assert np.abs(fused - base).max() > 1e-3          # the perturbation does something
    np.testing.assert_array_equal(fused, explicit)
    assert {p.kind for p in ts.params} == {"scales", "norm", "lora_a", "lora_b"}
    np.testing.assert_array_equal(m.logits(ids), base)  # nothing was written by the fused pass


def test_replay_reproduces_state_bit_for_bit(tiny, tmp_path):
    run = finetune(cfg_for(tiny, tmp_path / "r"))
    final = {k: v.copy() for k, v in run.trainable.state().items()}
    assert any(np.any(v != 0) for k, v in final.items() if k.startswith("lora_b"))
    # from the last snapshot (step 12) + tail, and from scratch (no snapshot: full replay)
    m2 = edgetune.load(tiny[0])
    ts2 = apply_run(m2, str(tmp_path / "r"))
    for k, v in ts2.state().items():
        np.testing.assert_array_equal(v, final[k], err_msg=k)
    os.remove(tmp_path / "r" / "state.npz")
    m3 = edgetune.load(tiny[0])
    ts3 = apply_run(m3, str(tmp_path / "r"))
    for k, v in ts3.state().items():
        np.testing.assert_array_equal(v, final[k], err_msg=k)


def test_same_seed_same_curve_and_resume_matches(tiny, tmp_path):
    a = finetune(cfg_for(tiny, tmp_path / "a"))
    b = finetune(cfg_for(tiny, tmp_path / "b"))
    assert a.losses == b.losses and len(a.losses) == 12
    _, ra, _ = read_log(tmp_path / "a" / "seedlog.jsonl")
    _, rb, _ = read_log(tmp_path / "b" / "seedlog.jsonl")
    assert ra == rb
    # interrupted after 7 steps, resumed to 12: same state and log as the uninterrupted run
    # (--budget 0 keeps step 7's lr independent of the total with a constant schedule; a
    # cosine run's --steps may not change on resume, see test_resume_refuses_changed_trajectory)
    a = finetune(cfg_for(tiny, tmp_path / "a2", schedule="constant"))
    _, ra, _ = read_log(tmp_path / "a2" / "seedlog.jsonl")
    finetune(cfg_for(tiny, tmp_path / "c", steps=7, schedule="constant"))
    c = finetune(cfg_for(tiny, tmp_path / "c", steps=12, resume=True, schedule="constant"))
    _, rc, _ = read_log(tmp_path / "c" / "seedlog.jsonl")
    assert rc == ra
    for k, v in c.trainable.state().items():
        np.testing.assert_array_equal(v, a.trainable.state()[k], err_msg=k)


def test_run_directory_outputs_and_refusals(tiny, tmp_path):
    out = tmp_path / "run"
    run = finetune(cfg_for(tiny, out, steps=6, method="scales"))
    for f in ("config.json", "seedlog.jsonl", "state.npz", "metrics.csv", "metrics.png", "summary.json"):
        assert (out / f).exists(), f
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 6 and s["peak_rss_mb"] > 0 and s["final_test_acc"] is not None
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,lr,dev_acc,rss_mb") and len(rows) == 3  # steps 0, 6
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "6"]
    with pytest.raises(EdgetuneError, match="exists"):
        finetune(cfg_for(tiny, out, steps=6, method="scales"))
    with pytest.raises(EdgetuneError, match="trainable set differs"):
        finetune(cfg_for(tiny, out, steps=8, method="norms", resume=True))
    assert run.final_acc is not None


def test_cli_finetune_and_eval(tiny, tmp_path, capsys):
    from edgetune.cli import main
    out = tmp_path / "cli"
    model, data = tiny
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text(f"model: {model}\ndata: {data}\nsteps: 3\nbatch: 4\nverbalizer: 'a=a,b=b'\n"
                       f"eval_limit: 8\ntest_limit: 8\nlr: 0.5\n")
    rc = main(["finetune", "--config", str(cfgfile), "--out", str(out), "--lr", "1e-3",
               "--no-progress", "--method", "norms"])
    assert rc == 0
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-3  # flag beats file
    printed = capsys.readouterr().out
    assert "fine-tuned test accuracy" in printed and "peak RSS" in printed
    rc = main(["eval", "--model", model, "--run", str(out), "--data", data, "--verbalizer",
               "a=a,b=b", "--limit", "8"])
    assert rc == 0 and "accuracy:" in capsys.readouterr().out
    assert main(["finetune", "--model", str(tmp_path / "missing.gguf"), "--out",
                 str(tmp_path / "x"), "--no-progress"]) == 2


def test_dual_forward_equals_two_forwards(tiny):
    """ZO2: both perturbed passes layer by layer == two separate forwards, bit for bit."""
    from edgetune.train import objectives
    m = edgetune.load(tiny[0])
    build_trainable(m.net, "scales,norms,lora")
    ids = [m.tokenize("ab cd ef gh"), m.tokenize("ab ab")]
    ps = [Perturb(5, 1e-2, +1), Perturb(5, 1e-2, -1)]
    pair = objectives.classification_losses(m, ids, [-1, -1], [0, 1], [300, 301], ps)
    single = [objectives.classification_loss(m, ids, [-1, -1], [0, 1], [300, 301], p) for p in ps]
    assert pair == single and pair[0] != pair[1]


def test_nan_loss_skips_step_not_run(tiny, tmp_path, monkeypatch):
    from edgetune.train.passes import BatchPasses
    calls = {"n": 0}
    real = BatchPasses.class_losses

    def flaky(self, batch, ps, split=None, metric="ce"):  # the passes of step 1 come back NaN
        out, lg, x = real(self, batch, ps, split, metric)
        if split == "train":
            calls["n"] += 1
            if calls["n"] == 2:
                out = [float("nan")] * len(out)
        return out, lg, x
    monkeypatch.setattr(BatchPasses, "class_losses", flaky)
    run = finetune(cfg_for(tiny, tmp_path / "nan", steps=4, zero_shot=False, eval_every=0,
                           test_limit=8))
    _, recs, _ = read_log(tmp_path / "nan" / "seedlog.jsonl")
    assert [r["type"] for r in recs] == ["step", "skip", "step", "step"]
    assert run.skipped == 1 and all(np.isfinite(run.losses))


def test_budget_schedule_anneals_by_the_last_step_when_steps_run_out_first(tiny, tmp_path):
    """Under --budget the lr follows the spent fraction of the budget, or of --steps when the
    steps run out first: a run far inside its time budget still ends its cosine near zero (it
    used to stay at ~lr when a fast machine finished the steps early)."""
    run = finetune(cfg_for(tiny, tmp_path / "r", steps=20, budget=3600.0, schedule="cosine",
                           lr=1e-3, eval_every=0))
    recs = [r for r in read_log(str(tmp_path / "r" / "seedlog.jsonl"))[1] if "lr" in r]
    assert len(recs) == 20 and run.skipped == 0
    lrs = [r["lr"] for r in recs]
    assert lrs[0] == pytest.approx(1e-3, rel=1e-3)
    assert lrs[-1] < 0.05 * 1e-3                       # annealed: step 19 of 20 on the cosine
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))   # never rises
