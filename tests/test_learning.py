"""Learning machinery on a tiny synthetic model: frozen blocks computed once, many passes layer by
layer, the head/bias sets, the normalized estimator, the exact head gradient, best-step
selection on dev (--step best|last|N), head export to llama.cpp, and resume refusals."""
import json

import numpy as np
import pytest
import torch

import edgetune
from edgetune.config import make_config
from edgetune.errors import EdgetuneError
from edgetune.train.loop import finetune
from edgetune.train.passes import BatchPasses, ce_losses, step_cost
from edgetune.train.runstate import apply_run
from edgetune.zo import head_grad
from edgetune.zo.estimator import estimate_from
from edgetune.zo.trainable import Perturb, build_trainable, parse_layers
from edgetune.train.data import Batch
from tests.conftest import make_tiny_task

LABELS = [300, 301]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_task(tmp_path_factory.mktemp("learn"), 400)


def _batch(m, texts, labels):
    ids = [m.tokenize(t) for t in texts]
    return Batch(ids, [len(s) - 1 for s in ids], list(labels), [[] for _ in ids],
                 list(range(len(ids))))


def cfg_for(tiny, out, **kw):
    model, data = tiny
    base = dict(model=model, data=data, verbalizer="a=a,b=b", out=str(out), steps=30, batch=8,
                eval_every=10, eval_limit=16, test_limit=16, snapshot_every=7, progress=False)
    base.update(kw)
    return make_config(flag_values=base)


def test_parse_layers():
    assert parse_layers("all", 4) == (0, 1, 2, 3)
    assert parse_layers("top:2", 30) == (28, 29)
    assert parse_layers("3-5", 30) == (3, 4, 5)
    assert parse_layers("7", 30) == (7,)
    assert parse_layers("top:40", 30) == tuple(range(30))   # more than the model has: all
    assert parse_layers("none", 30) == ()                   # norms: the final norm only
    for bad in ("top:0", "5-3", "x", "30"):
        with pytest.raises(EdgetuneError, match="--layers"):
            parse_layers(bad, 30)


def test_step_cost_model():
    assert step_cost(30, 30, 129) == 1.0            # frozen body: one forward
    assert step_cost(30, 0, 2) == 2.0               # everything trains: every pass is a forward
    assert abs(step_cost(30, 26, 9) - (26 + 9 * 4) / 30) < 1e-12


def test_frozen_prefix_and_multipass_equal_separate_forwards(tiny):
    """Blocks below the set computed once + all passes layer by layer == one full forward per
    pass, bit for bit; and the prefix really is shared (the top-2 set starts at block 2)."""
    m = edgetune.load(tiny[0])
    ts = build_trainable(m.net, "scales,norms,lora", layers="top:2")
    n = m.config.n_layer
    assert ts.first_layer == n - 2 and all(int(k.split(".")[1]) >= n - 2 for k in ts.scales)
    b = _batch(m, ["ab cd ef gh", "ab ab", "gh ef cd ab ab"], [0, 1, 0])
    bp = BatchPasses(m, ts, LABELS, chunk=3)
    perts = [None] + [Perturb(s, 1e-2, sg) for s in (5, 6) for sg in (1, -1)]
    lg, x = bp.class_logits(b, perts)
    for i, p in enumerate(perts):
        ref = m.logits(b.input_ids, positions=[[q] for q in b.answer_pos], perturb=p, vocab=LABELS)
        np.testing.assert_array_equal(lg[i], ref[:, 0, :])
    assert np.abs(lg[1] - lg[2]).max() > 1e-4       # the perturbations do something
    tokens, _ = m._pad(b.input_ids)
    full = m.net.hidden(tokens)
    pre = m.net.hidden_upto(tokens, n - 2)
    np.testing.assert_array_equal(m.net.hidden_from(pre, n - 2, [None])[0], full)


def test_head_bias_vectorised_equals_explicit(tiny):
    """label_logits (all perturbations in one einsum) == writing theta + eps*z into head/bias
    and running the plain forward, pass by pass."""
    m = edgetune.load(tiny[0])
    ts = build_trainable(m.net, "head,bias", head_rows=LABELS)
    assert ts.frozen_body and ts.first_layer == m.config.n_layer
    rng = np.random.default_rng(0)
    for p in ts.params:
        p.value[...] = rng.normal(0, 0.05, p.value.shape).astype(np.float32)
    b = _batch(m, ["ab cd", "ef gh ab", "cd"], [1, 0, 1])
    bp = BatchPasses(m, ts, LABELS)
    perts = [None, Perturb(9, 1e-2, 1), Perturb(9, 1e-2, -1), Perturb(10, 1e-2, 1)]
    lg, _ = bp.class_logits(b, perts)
    for i, p in enumerate(perts):
        saved = {q.name: q.value.copy() for q in ts.params}
        if p is not None:
            for q in ts.params:
                q.value[...] = p.apply(q)
        ref = m.logits(b.input_ids, positions=[[a] for a in b.answer_pos], vocab=LABELS)[:, 0]
        for q in ts.params:
            q.value[...] = saved[q.name]
        np.testing.assert_allclose(lg[i], ref, rtol=0, atol=2e-6)
    # the base logits are the model's label rows in fp32: equal to a float64 product
    x = np.asarray(bp._compute_states(b.input_ids, b.answer_pos, [None])[0][0], np.float64)
    W = m.net.output_rows_f32(LABELS).astype(np.float64)
    full = x @ (W + ts.head[next(iter(ts.head))].value).T + ts.label_bias.value
    np.testing.assert_allclose(lg[0], full, rtol=0, atol=1e-4)


def test_feature_cache_changes_nothing_and_saves_forwards(tiny):
    m = edgetune.load(tiny[0])
    ts = build_trainable(m.net, "head", head_rows=LABELS)
    b = _batch(m, ["ab cd", "ef gh ab", "cd", "ab ab ab"], [1, 0, 1, 0])
    cached, plain = BatchPasses(m, ts, LABELS, cache=True), BatchPasses(m, ts, LABELS, cache=False)
    perts = [None, Perturb(3, 1e-2, 1)]
    a1, _ = cached.class_logits(b, perts, "train")
    a2, _ = cached.class_logits(b, perts, "train")
    c, _ = plain.class_logits(b, perts, "train")
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_allclose(a1, c, rtol=0, atol=1e-6)
    assert cached.forwards == 4 and plain.forwards == 4   # the second call ran nothing


def test_normalized_estimator_divides_by_loss_spread():
    theta = np.array([0.3, -0.2, 0.5], np.float64)

    def losses(ps):
        out = []
        for p in ps:
            z = np.zeros(3) if p is None else p.sign * p.eps * \
                np.array([1.0 if (p.seed >> k) & 1 else -1.0 for k in range(3)])
            out.append(float(((theta + z) ** 2).sum()))
        return out
    e = estimate_from(losses, seed=11, eps=1e-3, q=8, mode="normalized")
    lp = np.array(e.lp)
    assert e.base_loss == pytest.approx(float((theta ** 2).sum()))
    np.testing.assert_allclose(e.g, (lp - e.base_loss) / lp.std(), rtol=1e-12)
    e10 = estimate_from(lambda ps: [10 * v for v in losses(ps)], 11, 1e-3, 8, "normalized")
    np.testing.assert_allclose(e10.g, e.g, rtol=1e-9)   # invariant to the loss scale
    with pytest.raises(EdgetuneError, match="q 2"):
        estimate_from(losses, 1, 1e-3, 1, "normalized")


def test_exact_head_gradient_matches_finite_differences():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 7)).astype(np.float32)
    W = rng.normal(size=(3, 7)).astype(np.float32)
    y = np.array([0, 2, 1, 1, 0])

    class P:
        def __init__(self, name, kind, value):
            self.name, self.kind, self.value, self.size = name, kind, value, value.size
    D = P("head", "head", rng.normal(0, 0.1, (3, 7)))
    b = P("bias", "label_bias", rng.normal(0, 0.1, 3))

    def loss(D_, b_):
        return float(ce_losses((x.astype(np.float64) @ (W + D_).T + b_)[None], y)[0])
    g = head_grad.gradients(x, x @ (W + D.value).T + b.value, y, [D, b])
    h = 1e-6
    for (i, j) in [(0, 0), (2, 5), (1, 3)]:
        Dp, Dm = D.value.copy(), D.value.copy()
        Dp[i, j] += h
        Dm[i, j] -= h
        assert g["head"][i, j] == pytest.approx((loss(Dp, b.value) - loss(Dm, b.value)) / (2 * h),
                                                abs=1e-5)
    for c in range(3):
        bp, bm = b.value.copy(), b.value.copy()
        bp[c] += h
        bm[c] -= h
        assert g["bias"][c] == pytest.approx((loss(D.value, bp) - loss(D.value, bm)) / (2 * h),
                                             abs=1e-5)
    enc = head_grad.encode(g, [D, b])
    back = head_grad.decode(enc, [D, b])
    np.testing.assert_array_equal(back["head"], g["head"])


def test_head_run_learns_selects_best_and_replays_any_step(tiny, tmp_path):
    out = tmp_path / "h"
    run = finetune(cfg_for(tiny, out, method="head,bias", steps=40, eval_every=8, lr=1.0))
    s = json.loads((out / "summary.json").read_text())
    best_step, best_dev = s["best"]
    assert best_step == run.best_step and best_dev == max(a for _, a in run.dev_curve)
    assert [st for st, _ in run.dev_curve] == [0, 8, 16, 24, 32, 40]
    rep = s["test_report"]
    assert set(rep) >= {"accuracy", "recall", "majority_acc", "n"} and rep["n"] == 16
    assert (out / "best.npz").exists()
    # --step N replays the log from scratch to step N; best == the snapshot at the best step
    states = {}
    for step in ("best", "last", 0, 13, best_step):
        m = edgetune.load(tiny[0])
        states[step] = apply_run(m, str(out), step=step).state()
    for k, v in states["best"].items():
        np.testing.assert_array_equal(v, states[best_step][k])
        np.testing.assert_array_equal(states[0][k], 0 * v)
    with np.load(out / "state.npz") as z:
        for k, v in states["last"].items():
            np.testing.assert_array_equal(v, z[f"p:{k}"])
    assert any(np.any(states[13][k] != states["last"][k]) for k in states[13])
    with pytest.raises(EdgetuneError, match="outside"):
        apply_run(edgetune.load(tiny[0]), str(out), step=41)


def test_exact_head_run_replays_and_logs_gradients(tiny, tmp_path):
    out = tmp_path / "x"
    finetune(cfg_for(tiny, out, method="head", head_grad="exact", steps=12, eval_every=4))
    recs = [json.loads(line) for line in (out / "seedlog.jsonl").read_text().splitlines()[1:]]
    assert all("hg" in r and "seeds" not in r for r in recs)    # no ZO part: exact only
    m = edgetune.load(tiny[0])
    last = apply_run(m, str(out), step="last").state()
    with np.load(out / "state.npz") as z:
        for k, v in last.items():
            np.testing.assert_array_equal(v, z[f"p:{k}"])
            assert np.any(v != 0)


def test_top_layers_lora_with_exact_head(tiny, tmp_path):
    """A hybrid: exact head + ZO LoRA on the top block; resume == uninterrupted, bit for bit."""
    import os
    import subprocess
    import sys
    kw = dict(method="lora,head", layers="top:1", head_grad="exact", steps=10, q=4, eval_every=5)
    a = finetune(cfg_for(tiny, tmp_path / "a", **kw))
    ra = (tmp_path / "a" / "seedlog.jsonl").read_text().splitlines()
    # SIGKILL while writing step 8's record (snapshot at step 7), then --resume
    model, data = tiny
    cmd = [sys.executable, "-m", "edgetune", "finetune", "--model", model, "--data", data,
           "--verbalizer", "a=a,b=b", "--out", str(tmp_path / "b"), "--batch", "8",
           "--eval-limit", "16", "--test-limit", "16", "--snapshot-every", "7", "--no-progress",
           "--method", "lora,head", "--layers", "top:1", "--head-grad", "exact", "--steps", "10",
           "--q", "4", "--eval-every", "5"]
    r = subprocess.run(cmd, env=dict(os.environ, EDGETUNE_FAULT="log-mid-record:10"),
                       capture_output=True, text=True)
    assert r.returncode != 0
    finetune(cfg_for(tiny, tmp_path / "b", resume=True, **kw))
    rb = (tmp_path / "b" / "seedlog.jsonl").read_text().splitlines()
    assert rb[1:] == ra[1:]
    with np.load(tmp_path / "a" / "state.npz") as za, np.load(tmp_path / "b" / "state.npz") as zb:
        assert sorted(za.files) == sorted(zb.files)
        for k in za.files:
            np.testing.assert_array_equal(za[k], zb[k], err_msg=k)
    rec = json.loads(ra[1])
    assert len(rec["seeds"]) == 4 and "hg" in rec and "l0" in rec
    assert all(k.split(":")[1].startswith(f"blk.{a.model.config.n_layer - 1}.") or
               k.startswith("head") for k in a.trainable.state())


def test_resume_refuses_changed_trajectory(tiny, tmp_path):
    out = tmp_path / "r"
    finetune(cfg_for(tiny, out, method="head", steps=6))
    with pytest.raises(EdgetuneError, match="lr was"):
        finetune(cfg_for(tiny, out, method="head", steps=6, lr=0.5, resume=True))
    with pytest.raises(EdgetuneError, match="steps was 6, now 9"):   # cosine: lr depends on it
        finetune(cfg_for(tiny, out, method="head", steps=9, resume=True))
    finetune(cfg_for(tiny, out, method="head", steps=9, resume=True, accept_config_change=True))
    recs = [json.loads(line) for line in (out / "seedlog.jsonl").read_text().splitlines()[1:]]
    notes = [r for r in recs if r["type"] == "config"]
    assert notes and notes[0]["changed"]["steps"] == [6, 9] and notes[0]["at_step"] == 6
    assert [r["step"] for r in recs if r["type"] == "step"] == list(range(9))


def test_export_head_to_llamacpp_and_refuse_bias(tiny, tmp_path):
    import llama_cpp
    from edgetune.export.gguf_export import export_gguf
    out = tmp_path / "h"
    finetune(cfg_for(tiny, out, method="head", steps=20, lr=3.0, eval_every=0))
    m = edgetune.load(tiny[0])
    ts = apply_run(m, str(out), step="last")
    delta = next(iter(ts.head.values())).value
    assert np.abs(delta).max() > 1e-3
    f = export_gguf(str(out), tmp_path / "h.gguf", step="last")
    ex = edgetune.load(f)
    ids = [m.tokenize("ab cd ef"), m.tokenize("gh gh")]
    for s in ids:
        tuned = m.logits([s], positions=[-1], vocab=LABELS)[0, 0]
        exported = ex.logits([s], positions=[-1], vocab=LABELS)[0, 0]
        base = edgetune.load(tiny[0]).logits([s], positions=[-1], vocab=LABELS)[0, 0]
        assert np.abs(exported - tuned).max() < 0.05 * np.abs(tuned - base).max() + 1e-3
        ll = llama_cpp.Llama(str(f), logits_all=True, verbose=False, n_ctx=64, seed=0)
        ll.eval(s)
        lc = np.array(ll.scores[len(s) - 1])[LABELS]
        assert np.abs(lc - exported).max() < 0.05 * np.abs(tuned - base).max() + 1e-2
    # the input embeddings are not the tuned head: the label words embed as before
    np.testing.assert_array_equal(
        np.asarray(ex.net.embed_tokens(torch.tensor([LABELS]))),
        np.asarray(edgetune.load(tiny[0]).net.embed_tokens(torch.tensor([LABELS]))))
    finetune(cfg_for(tiny, tmp_path / "b", method="head,bias", steps=3, eval_every=0))
    with pytest.raises(EdgetuneError, match="no output bias"):
        export_gguf(str(tmp_path / "b"), tmp_path / "b.gguf")


def test_lm_objective_top_layers_best_dev_nll_and_llamacpp_perplexity(tiny, tmp_path):
    """Text data: lora on the top block, the normalized estimator, best step by dev NLL; the
    exported GGUF's perplexity in llama.cpp equals edgetune's on the same tokens."""
    import math
    from edgetune.export.gguf_export import export_gguf
    from edgetune.export.llamacpp_eval import nll_llamacpp
    from edgetune.train import data as D
    from edgetune.train.metrics import lm_nll
    model, _ = tiny
    txt = tmp_path / "t.jsonl"
    rows = [{"text": " ".join(["ab cd", "ef gh", "ab ab cd"][i % 3] for _ in range(4))}
            for i in range(120)]
    txt.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "lm"
    run = finetune(make_config(flag_values=dict(
        model=model, data=str(txt), out=str(out), steps=12, batch=8, eval_every=4, eval_limit=8,
        test_limit=8, progress=False, lr=0.5, method="lora", layers="top:4")))
    n = run.model.config.n_layer     # lora on the top 4 blocks (all 2 here)
    assert run.trainable.methods == ("lora",) and run.trainable.layers == tuple(range(n))
    s = json.loads((out / "summary.json").read_text())
    assert s["test_report"]["perplexity"] > 1 and s["zero_shot_test_ppl"] > 1
    nlls = [-v for _, v in s["dev_curve"]]
    assert -s["best"][1] == min(nlls)
    m = edgetune.load(model)
    apply_run(m, str(out))
    ds = D.encode(D.load_jsonl(str(txt)), m, max_length=96)
    tot, cnt = lm_nll(m, ds, "test", 8, 8)
    assert math.exp(tot / cnt) == pytest.approx(s["test_report"]["perplexity"], rel=1e-6)
    f = export_gguf(str(out), tmp_path / "lm.gguf")
    lt, lc = nll_llamacpp(f, ds, "test", 8)
    assert lc == cnt and abs(lt / lc - tot / cnt) < 0.02


def test_eval_several_runs_shares_frozen_features_and_equals_single_eval(tiny, tmp_path, capsys):
    """`edgetune eval --run A --run B --baselines`: head runs share one forward of the frozen body
    (and the zero-shot line uses it too); a body run gets its own model.  Every line equals what
    scoring each run alone gives, and --no-final-test leaves the test split untouched."""
    from edgetune.cli import main as cli_main
    from edgetune.train import data as datamod
    from edgetune.train.loop import open_dataset
    from edgetune.train.metrics import evaluate
    # the body runs first: scales change the model in place, so they must get their own model
    runs = {"sc": dict(method="scales", layers="top:1", steps=6, q=2, lr=0.5),
            "h": dict(method="head", steps=12, lr=1.0), "hb": dict(method="head,bias", steps=12),
            "lo": dict(method="lora", layers="top:1", steps=6, q=2)}
    for name, kw in runs.items():
        r = finetune(cfg_for(tiny, tmp_path / name, final_test=False, zero_shot=False, **kw))
        assert r.final_acc is None and r.report is None
    js = tmp_path / "scores.json"
    assert cli_main(["eval", "--model", tiny[0], "--data", tiny[1], "--verbalizer", "a=a,b=b",
                     "--limit", "24", "--batch", "5", "--baselines", "--json", str(js)]
                    + sum((["--run", str(tmp_path / n)] for n in runs), [])) == 0
    res = json.loads(js.read_text())["results"]
    assert [x["run"] for x in res] == [None] + [str(tmp_path / n) for n in runs]
    assert [x["shared"] for x in res] == [True, False, True, True, False]
    cfg = make_config(flag_values={"data": tiny[1], "verbalizer": "a=a,b=b"})
    for x in res:
        m = edgetune.load(tiny[0])
        if x["run"] is not None:
            ts = apply_run(m, x["run"])
            assert x["step"] == ("last" if ts.restored_step is None else ts.restored_step)
        ds = datamod.encode(open_dataset(cfg), m, max_length=96)
        assert x["report"]["accuracy"] == evaluate(m, ds, "test", 7, 24)
        assert x["report"]["n"] == 24
    # another model file than the runs were trained on is refused, naming it
    import shutil
    other = tmp_path / "other.gguf"
    shutil.copy(tiny[0], other)
    capsys.readouterr()
    assert cli_main(["eval", "--model", str(other), "--data", tiny[1], "--verbalizer", "a=a,b=b",
                     "--baselines", "--run", str(tmp_path / "h")]) != 0
    assert "was trained on tiny.gguf, not on this model file" in capsys.readouterr().err


def test_loss_positions_sampled_from_the_step_seed():
    from edgetune.train.objectives import sample_loss_positions
    b = Batch([[1] * 40, [2] * 6], [0, 0], [0, 0], [[0] * 10 + [1] * 30, [0, 1, 1, 1, 1, 1]], [0, 1])
    a1, a2, c = (sample_loss_positions(b, 8, s) for s in (7, 7, 8))
    assert a1.loss_masks == a2.loss_masks and a1.loss_masks != c.loss_masks
    assert sum(a1.loss_masks[0]) == 8 and a1.loss_masks[1] == b.loss_masks[1]   # 5 <= 8: all kept
    assert all(m <= o for m, o in zip(a1.loss_masks[0], b.loss_masks[0]))     # a subset


def test_lm_final_norm_only_runs_once_per_step_and_replays(tmp_path, tiny):
    """norms --layers none on text: only output_norm trains, the blocks run once per step
    (first_layer == n_layer), the loss uses --loss-positions tokens; replay == the live state."""
    model, _ = tiny
    txt = tmp_path / "t.jsonl"
    txt.write_text("\n".join(json.dumps({"text": "ab cd ef gh ab ab cd " * 3}) for _ in range(60)))
    out = tmp_path / "n"
    run = finetune(make_config(flag_values=dict(
        model=model, data=str(txt), out=str(out), steps=6, batch=4, eval_every=3, eval_limit=4,
        test_limit=4, progress=False, method="norms", layers="none", q=4, loss_positions=3)))
    assert list(run.trainable.state()) == ["norm:output_norm.weight"]
    assert run.trainable.first_layer == run.model.config.n_layer
    m = edgetune.load(model)
    replayed = apply_run(m, str(out), step="last").state()
    with np.load(out / "state.npz") as z:
        np.testing.assert_array_equal(replayed["norm:output_norm.weight"],
                                      z["p:norm:output_norm.weight"])


def test_lm_exact_final_norm_gradient_equals_autograd_and_run_replays(tmp_path, tiny):
    """--head-grad exact on text trains the final output norm g with dL/dg computed from the
    unperturbed pass (no backward through the network).  It equals torch autograd of the same
    loss through (n * g) E^T on the dequantized output matrix; the run lowers the train loss,
    replays to its live state, and without norms in --method it is refused with the fix."""
    from edgetune.quant import dequantize
    from edgetune.train import data as D
    from edgetune.train.objectives import lm_targets
    model, _ = tiny
    txt = tmp_path / "t.jsonl"
    txt.write_text("\n".join(json.dumps({"text": ["ab cd ef gh ab ab cd", "ef ef gh ab cd cd"][i % 2]
                                         * 3}) for i in range(60)))
    m = edgetune.load(model)
    ts = build_trainable(m.net, "norms", layers="none", exact_head=True)
    assert [p.name for p in ts.head_params()] == ["norm:output_norm.weight"] and not ts.zo_params()
    ds = D.encode(D.load_jsonl(str(txt)), m, max_length=96)
    b = next(iter(ds.eval_batches("train", 4)))
    g = ts.head_params()[0]
    g.value[:] = np.linspace(0.5, 1.5, g.size, dtype=np.float32)   # not all ones: a real weight
    loss, grads = BatchPasses(m, ts).lm_exact(b, g)
    # reference: autograd through the final norm and the (dequantized) output matrix only
    padded, targets = lm_targets(b.input_ids, b.loss_masks)
    tokens, _ = m._pad(b.input_ids)
    h = torch.from_numpy(m.net.hidden(tokens))
    hs = torch.stack([h[i, padded[i][j]] for i, tg in enumerate(targets) for j in range(len(tg))])
    y = torch.tensor([t for tg in targets for t in tg])
    gt = torch.tensor(g.value, dtype=torch.float64, requires_grad=True)
    n = hs.double() * torch.rsqrt(hs.double().pow(2).mean(-1, keepdim=True) + m.config.rms_eps)
    ref = torch.nn.functional.cross_entropy((n * gt) @ torch.tensor(dequantize(m.net.output),
                                                                   dtype=torch.float64).T, y)
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=2e-3)       # the model's int8-activation logits
    np.testing.assert_allclose(grads[g.name], gt.grad.numpy(), rtol=2e-2,
                               atol=2e-2 * float(np.abs(gt.grad.numpy()).max()))
    # a run: the loss falls, replay gives the live state
    out = tmp_path / "x"
    run = finetune(make_config(flag_values=dict(
        model=model, data=str(txt), out=str(out), steps=30, batch=4, eval_every=10,
        eval_limit=4, test_limit=4, progress=False, method="norms", layers="none",
        head_grad="exact", head_lr=3e-2, loss_positions=4)))
    assert np.mean(run.losses[-5:]) < np.mean(run.losses[:5])
    replayed = apply_run(edgetune.load(model), str(out), step="last").state()
    with np.load(out / "state.npz") as z:
        np.testing.assert_array_equal(replayed["norm:output_norm.weight"],
                                      z["p:norm:output_norm.weight"])
    # the text recipe (no tuning flags) is exactly this: the final norm, exact gradient
    rc = make_config(flag_values=dict(model=model, data=str(txt))).resolved("text")
    assert (rc.method, rc.layers, rc.head_grad, rc.head_lr) == ("norms", "none", "exact", 3e-2)
    rc = make_config(flag_values=dict(model=model, data=str(txt))).resolved("classification")
    assert (rc.method, rc.head_grad, rc.head_lr) == ("head", "zo", 1e-3)
    with pytest.raises(EdgetuneError, match="add norms to --method"):
        finetune(make_config(flag_values=dict(model=model, data=str(txt), out=str(tmp_path / "y"),
                                              steps=2, progress=False, head_grad="exact",
                                              method="lora")))
