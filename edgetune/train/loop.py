"""The ZO fine-tuning loop: `edgetune finetune` / `edgetune.finetune(config) -> Run`.

finetune() runs five phases a reader can follow top to bottom: setup (recipe, memory plan,
model, data, trainable set) -> start_or_resume (run directory, or snapshot + log replay) ->
zero_shot (test and step-0 dev accuracy) -> train (the step loop) -> finish (best dev step,
test score there, summary).

One step (train_step): draw a batch, derive the step seed from (run seed, step), evaluate the
loss under every perturbation of the step at once (train/passes.py: frozen blocks once, the rest
layer by layer; fused into the int4 kernels for scales), turn the losses into projected
gradients (zo/estimator.py), update, append the step to the seed log.  Every `eval_every` steps
the dev accuracy and RSS go to metrics.csv and the best dev state to best.npz; every
`snapshot_every` steps the trainable and optimizer state are written atomically.  `--resume`
loads the last snapshot and replays the seed log's tail.  Nothing is ever selected on test.

Run directory:
  config.json      the resolved configuration
  seedlog.jsonl    the step records (zo/seedlog.py); its header identifies the set (runlog.py)
  mask.npz         sparse runs: the chosen weights' indices (checksum in the log header)
  state.npz        the last snapshot (trainable + optimizer state, its step) — atomic rename
  best.npz         the state at the best dev evaluation (what eval/export use by default)
  metrics.csv      step, loss, lr, dev_acc, rss_mb, elapsed_s, tokens_per_s
  metrics.png      loss and accuracy curves
  summary.json     zero-shot / best-step test accuracy, per-class recall, majority-class
                   baseline, best dev step, dev curve, peak RSS, timings
  model.onnx(.data)  --backend onnxruntime only: the graph the sessions run (trainables as inputs)
"""
from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np

from .. import assets, faults
from ..config import TrainConfig
from ..errors import EdgetuneError
from ..zo import rng
from ..zo import head_grad
from ..zo.estimator import estimate_from
from ..zo.head_grad import HeadAdam
from ..zo.optim import ZOOptimizer, lr_at
from ..zo.seedlog import SeedLog, read_log
from ..zo.trainable import build_trainable
from ..runlog import (StepBatches, apply_record, build_set, load_snapshot, open_dataset,  # noqa: F401
                      replay, save_snapshot, step_seed)
from .. import runlog
from . import objectives, rundir
from .metrics import peak_rss_mb, rss_mb


@dataclass
class Run:
    out: str
    config: TrainConfig
    zero_shot_acc: float | None = None
    final_acc: float | None = None
    dev_curve: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    peak_rss_mb: float = 0.0
    seconds: float = 0.0
    steps_done: int = 0
    skipped: int = 0
    model: object = None
    trainable: object = None
    best_step: int | None = None
    report: dict = field(default_factory=dict)   # test accuracy, recalls, majority baseline
    dev_curve_s: list = field(default_factory=list)   # (training seconds, dev accuracy)
    zero_shot_ppl: float | None = None

    def summary(self) -> dict:
        return {"zero_shot_test_acc": self.zero_shot_acc, "final_test_acc": self.final_acc,
                "zero_shot_test_ppl": self.zero_shot_ppl,
                "best_step": self.best_step, "test_report": self.report,
                "peak_rss_mb": round(self.peak_rss_mb, 1), "seconds": round(self.seconds, 1),
                "steps": self.steps_done, "skipped_steps": self.skipped,
                "dev_curve": self.dev_curve, "dev_curve_s": self.dev_curve_s}

    def report_text(self, labels) -> str:
        r = self.report
        lines = [f"test split, {r['n']} examples (the fine-tuned state is the best dev step, "
                 f"{self.best_step}):",
                 f"  majority class ({labels[r['majority_class']]}) {100 * r['majority_acc']:.1f}%"]
        if self.zero_shot_acc is not None:
            lines.append(f"  zero-shot                 {100 * self.zero_shot_acc:.1f}%")
        rec = "  ".join(f"{lab} {100 * v:.1f}%" for lab, v in zip(labels, r["recall"]))
        lines.append(f"  fine-tuned                {100 * r['accuracy']:.1f}%   recall: {rec}")
        return "\n".join(lines)


def prepare_run_dir(cfg: TrainConfig) -> bool:
    """Create/check the run directory before any work.  Returns True when resuming."""
    out = cfg.out
    exists = os.path.isdir(out) and any(os.scandir(out))
    if cfg.resume:   # False: killed before its first log record -> start at step 0
        return rundir.resume_point(out)
    if exists:
        if not cfg.overwrite:
            raise EdgetuneError(f"{out}: run directory exists and is not empty; pass --resume to "
                                f"continue it or --overwrite to replace it")
        shutil.rmtree(out)
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise EdgetuneError(f"{out}: cannot write the run directory ({e.strerror})") from None
    return False


@dataclass
class Session:
    """Everything a fine-tune holds while it runs; built by setup(), used by the phases."""
    cfg: TrainConfig
    model_path: str
    plan: object
    streamed: list
    model: object
    ds: object
    task: str
    objective: str
    batches: object
    ts: object
    opt: ZOOptimizer
    hopt: object                 # HeadAdam for --head-grad exact, else None
    passes: object               # train/passes.BatchPasses (native backend), else None
    fwd: object                  # what runs the forward passes: the Model, or an OrtModel
    run: Run
    resuming: bool = False
    t_start: float = 0.0
    prev: dict = field(default_factory=dict)
    log: object = None
    metrics: object = None       # rundir.MetricsCSV
    loss_ema: float | None = None
    best: tuple = (None, -math.inf)   # (step, dev score) of the best dev evaluation so far
    loop_t0: float = 0.0         # perf_counter when the current training-time segment began


def setup(config) -> Session:
    """Phase 1: resolve the recipe, plan memory, load the model and data, build the set."""
    from ..config import make_config
    from ..model.lm import load
    from . import data as datamod
    from .passes import BatchPasses

    cfg = config if isinstance(config, TrainConfig) else make_config(flag_values=config)
    cfg.validate()
    model_path = assets.resolve_model(cfg.model, quant=cfg.quant, group_size=cfg.group_size,
                                      progress=cfg.progress)
    if not os.path.exists(model_path):
        raise EdgetuneError(f"{model_path}: model file not found")
    plan, streamed = plan_memory(cfg, model_path)   # an impossible budget fails here, before work
    resuming = prepare_run_dir(cfg)
    t_start = time.perf_counter()
    if cfg.threads:
        from .. import kernels
        kernels.set_num_threads(cfg.threads)
    model = load(model_path, streamed_layers=streamed)
    ds = datamod.encode(open_dataset(cfg), model, max_length=cfg.max_length, chat=cfg.chat)
    task = ds.dataset.kind
    cfg = cfg.resolved(task)
    objective = cfg.objective if cfg.objective != "auto" else (
        "classification" if task == "classification" else "lm")
    if objective in ("classification", "accuracy") and task != "classification":
        raise EdgetuneError(f"objective {objective!r} needs a labelled dataset ({cfg.data} is {task})")
    if cfg.head_grad == "exact" and objective != "classification" and not (
            objective == "lm" and task != "classification"):
        raise EdgetuneError("--head-grad exact trains the label words' head (classification "
                            "objective) or, on text data, the final output norm (lm objective); "
                            f"not the {objective!r} objective on {task} data")
    batches = StepBatches(ds, cfg.batch, cfg.seed, cfg.train_limit)
    # a resumed sparse run continues on its stored mask, never on a recomputed one
    ts = build_set(model, cfg, ds, batches, mask=runlog.stored_mask(cfg.out) if resuming else None)
    opt = ZOOptimizer(ts.zo_params(), cfg.optimizer, weight_decay=cfg.weight_decay,
                      momentum=cfg.momentum, dist=cfg.dist)
    hopt = HeadAdam(ts.head_params()) if cfg.head_grad == "exact" else None
    run = Run(cfg.out, cfg, model=model, trainable=ts)
    fwd, passes = model, None
    if cfg.backend == "onnxruntime":
        from ..backends.ort import OrtModel
        t0 = time.perf_counter()
        fwd = OrtModel.for_training(model, ts, os.path.join(cfg.out, "model.onnx"), cfg.threads)
        if cfg.progress:
            print(f"onnxruntime backend: {cfg.out}/model.onnx written and loaded in "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)
    else:
        passes = BatchPasses(model, ts, ds.label_tokens if task == "classification" else None)
    if cfg.progress:
        print(describe_recipe(cfg, ts, model), flush=True)
    return Session(cfg, model_path, plan, streamed, model, ds, task, objective, batches, ts, opt,
                   hopt, passes, fwd, run, resuming, t_start)


def describe_recipe(cfg: TrainConfig, ts, model) -> str:
    """One line a user can check: what trains, how, and what a step costs."""
    from .passes import step_cost
    n = model.config.n_layer
    passes = 0 if not ts.zo_params() else (2 * cfg.q if cfg.estimator == "two_point" else cfg.q + 1)
    f = ts.first_layer
    cost = "~0 after each example's first forward (frozen body: features cached)" \
        if ts.frozen_body else f"{step_cost(n, f, max(passes, 1)):.2f} forwards"
    blocks = "none" if f >= n else (f"{f}-{n - 1}" if ts.layers else "none")
    how = ("exact head gradient (Adam)" + (" + " if ts.zo_params() else "")) \
        if ts.exact_head else ""
    if ts.zo_params():
        how += f"ZO {cfg.estimator}, q={cfg.q}"
    return (f"recipe: method {','.join(ts.methods)} ({ts.n_params():,} values), blocks {blocks}, "
            f"{how}, lr {cfg.lr:g} {cfg.schedule}, eps {cfg.eps:g}, batch {cfg.batch}; "
            f"step cost {cost}")


def start_or_resume(s: Session) -> int:
    """Phase 2: write config.json and open the log and metrics for a new run, or restore the
    snapshot + replay the log's tail for --resume.  Returns the first step to run.
    Every file is absent or complete at every instant (train/rundir.py)."""
    cfg = s.cfg
    summary_path = os.path.join(cfg.out, "summary.json")
    records, changed = [], []
    if s.resuming:
        header, records, _ = read_log(os.path.join(cfg.out, "seedlog.jsonl"))
        if header is None:
            raise EdgetuneError(f"{cfg.out}: seed log has no valid header; cannot resume")
        runlog.check_header(header, s.ts, cfg.out)   # set, tensor ids, RNG/log version, rows
        # before SeedLog truncates a damaged tail: refuse when that would lose logged steps
        runlog.check_log_intact(os.path.join(cfg.out, "seedlog.jsonl"), records,
                                runlog.snapshot_step(cfg.out))
        changed = trajectory_changes(header.get("config", {}), cfg)
        if changed and not cfg.accept_config_change:
            raise EdgetuneError(
                f"{cfg.out}: --resume with settings that change the run's trajectory: "
                + "; ".join(f"{k} was {a!r}, now {b!r}" for k, a, b in changed)
                + ". Resume with the original values, or pass --accept-config-change to continue "
                  "anyway (the change is recorded in the seed log; the result is then not the "
                  "uninterrupted run's)")
        s.prev = rundir.read_summary(summary_path)
        s.run.dev_curve_s = [tuple(x) for x in s.prev.get("dev_curve_s", [])]
    else:
        rundir.atomic_write_json(os.path.join(cfg.out, "config.json"), rundir.run_config(cfg))
        faults.reached("after-config")
    mask = None if s.resuming else runlog.save_mask(cfg.out, s.ts)   # sparse: mask.npz
    s.log = SeedLog(os.path.join(cfg.out, "seedlog.jsonl"),
                    header={"config": rundir.run_config(cfg),
                            "model": os.path.basename(s.model_path),
                            **runlog.header_fields(s.ts, mask)})
    # zero-shot is measured on the untuned state: before a resume loads the snapshot, and again by
    # a resume when the first process was killed before saving it
    zero_shot(s, first=not s.resuming or rundir.needs_zero_shot(cfg, s.task, s.prev))
    start = 0
    if s.resuming:
        snap_step = load_snapshot(cfg.out, s.ts, s.opt, s.hopt)
        start = replay(records, s.ts, s.opt, snap_step, s.hopt)
    if s.resuming and changed:
        s.log.append({"type": "config", "at_step": start,
                      "changed": {k: [a, b] for k, a, b in changed}})
    # header written durably; a resume heals the file and keeps the rows the log reaches
    s.metrics = rundir.MetricsCSV(os.path.join(cfg.out, "metrics.csv"), upto_step=start)
    s.run.skipped = sum(r.get("type") == "skip" for r in records)
    s.loss_ema = rundir.loss_ema(records)
    if s.resuming:   # the dev curve and its best step, as every process of the run wrote them
        s.run.dev_curve = s.metrics.dev_curve()
        for step, score in s.run.dev_curve:
            if score >= s.best[1] or s.best[0] is None:   # ties: the later step, as live
                s.best = (step, score)
    return start


# settings that never change which updates a run makes (evaluation, I/O, threads: the kernels
# give identical results for any thread count)
NEUTRAL_SETTINGS = {"out", "resume", "overwrite", "progress", "threads", "eval_every",
                    "eval_limit", "test_limit", "zero_shot", "final_test", "snapshot_every",
                    "accept_config_change", "memory", "stream_layers"}


def trajectory_changes(logged: dict, cfg: TrainConfig) -> list:
    """(key, logged, now) for every setting that differs from the logged run's and can change
    its updates.  --steps may grow only when the schedule does not depend on it."""
    now = cfg.to_dict()
    out = []
    for k, v in logged.items():
        if k in NEUTRAL_SETTINGS or k not in now or now[k] == v:
            continue
        if k == "steps" and now.get("schedule") == "constant" and not now.get("budget"):
            continue
        out.append((k, v, now[k]))
    return out


def perplexity_on(s: Session, split: str, limit=None):
    """(perplexity, mean NLL) of the current state on an LM split's loss tokens."""
    from .metrics import lm_nll
    total, count = lm_nll(s.fwd, s.ds, split, s.cfg.batch, limit, s.passes)
    mean = total / max(count, 1)
    return math.exp(mean), mean


def accuracy_on(s: Session, split: str, limit=None):
    """Accuracy of the current state on a split (None for a task without labels)."""
    if s.task != "classification":
        return None
    from .metrics import accuracy, predictions
    return accuracy(predictions(s.fwd, s.ds, split, s.cfg.batch, limit, s.passes), s.ds, split)


def zero_shot(s: Session, first: bool):
    """The untuned model's test score (kept across --resume; measured again by a resume when the
    first process was killed before saving it) and, on a new run, its dev score (step 0 of the dev
    curve: the best step can be 'no training at all')."""
    cfg = s.cfg
    s.run.zero_shot_acc = s.prev.get("zero_shot_test_acc")
    s.run.zero_shot_ppl = s.prev.get("zero_shot_test_ppl")
    if first and cfg.zero_shot and s.task == "classification":
        s.run.zero_shot_acc = accuracy_on(s, "test", cfg.test_limit or None)
        print(f"zero-shot test accuracy: {100 * s.run.zero_shot_acc:.1f}%", flush=True)
    elif first and cfg.zero_shot and not s.resuming:
        s.run.zero_shot_ppl = perplexity_on(s, "test", cfg.test_limit or None)[0]
        print(f"zero-shot test perplexity: {s.run.zero_shot_ppl:.3f}", flush=True)
    if first:
        write_summary(s)


def dev_step_zero(s: Session, start: int):
    """The step-0 dev evaluation (counted as training time: --budget includes it), unless an
    earlier process of the run already wrote it."""
    if start != 0 or not s.cfg.eval_limit or s.metrics.rows:
        return
    t0 = time.perf_counter()
    s.loop_t0 = t0
    evaluate_dev(s, 0, None, s.cfg.lr, 0.0)
    s.prev["train_seconds"] = s.prev.get("train_seconds", 0.0) + time.perf_counter() - t0


def evaluate_dev(s: Session, done: int, loss_ema, lr: float, tps: float):
    """Dev accuracy at step `done` -> metrics.csv, the dev curve, best.npz when it improves."""
    cfg = s.cfg
    dev = accuracy_on(s, "dev", cfg.eval_limit) if cfg.eval_limit else None
    nll = None
    # the score the best step maximises: dev accuracy, or minus the dev NLL for an LM task
    score = dev
    if s.task != "classification" and cfg.eval_limit:
        nll = perplexity_on(s, "dev", cfg.eval_limit)[1]
        score = -nll
    if score is not None:
        s.run.dev_curve.append((done, score))
        t = s.prev.get("train_seconds", 0.0) + time.perf_counter() - s.loop_t0
        s.run.dev_curve_s.append((round(t, 2), score))
        if score >= s.best[1]:   # ties go to the later, more trained step
            s.best = (done, score)
            save_snapshot(cfg.out, done, s.ts, s.opt, s.hopt, name="best.npz")
    s.metrics.append([done, f"{loss_ema:.6f}" if loss_ema is not None else "", f"{lr:.3e}",
                      "" if dev is None else f"{dev:.4f}", f"{rss_mb():.1f}",
                      f"{time.perf_counter() - s.t_start:.1f}", f"{tps:.1f}",
                      "" if nll is None else f"{nll:.5f}"])
    return dev


def step_losses(s: Session, batch):
    """losses_fn for the estimator: every pass of one step on `batch` at once."""
    if s.passes is None:   # onnxruntime backend: its own forward, pass by pass
        if s.objective == "lm":
            return lambda ps: [objectives.lm_loss(s.fwd, batch.input_ids, batch.loss_masks, p)
                               for p in ps]
        metric = "ce" if s.objective == "classification" else "accuracy"
        return lambda ps: objectives.classification_losses(
            s.fwd, batch.input_ids, batch.answer_pos, batch.labels, s.ds.label_tokens, ps, metric)
    if s.objective == "lm":
        return lambda ps: s.passes.lm_losses(batch, ps)
    metric = "ce" if s.objective == "classification" else "accuracy"

    def fn(ps):
        losses, lg, x = s.passes.class_losses(batch, ps, "train", metric)
        return losses, (lg, x, ps)
    return fn


def train_step(s: Session, step: int, lr: float) -> dict:
    """One step: every pass of the batch, the ZO estimate (+ the exact head gradient), the
    update, the seed-log record.  This is the function benchmarks time."""
    cfg = s.cfg
    batch = s.batches.get(step)
    seed = step_seed(cfg.seed, step)
    if s.objective == "lm" and cfg.loss_positions > 0:
        batch = objectives.sample_loss_positions(batch, cfg.loss_positions, seed)
    rec = {"type": "step", "step": step, "lr": lr}
    if s.ts.zo_params():
        est = estimate_from(step_losses(s, batch), seed, cfg.eps, cfg.q, cfg.estimator,
                            cfg.clip if cfg.clip > 0 else None, cfg.dist,
                            need_base=s.hopt is not None)
        if not est.finite:  # abort the step, not the run
            return {"type": "skip", "step": step, "seeds": [str(x) for x in est.seeds],
                    "reason": f"non-finite loss or gradient (lp={est.lp}, lm={est.lm})"}
        rec.update({"seeds": [str(x) for x in est.seeds], "g": est.g, "loss": est.loss,
                    "lp": est.lp})
        # two-point: the -eps losses; one-sided kinds: L(theta) once (not repeated q times)
        rec.update({"lm": est.lm} if cfg.estimator == "two_point" else {"l0": est.base_loss})
        extra = est.extra
    elif s.objective == "lm":   # only the exact final norm trains: one unperturbed pass
        extra = s.passes.lm_exact(batch, s.hopt.params[0])
        rec["loss"] = extra[0]
    else:   # only the exact head trains: one unperturbed pass
        losses, lg, x = s.passes.class_losses(batch, [None], "train")
        rec["loss"] = losses[0]
        extra = (lg, x, [None])
    if s.hopt is not None:
        if s.objective == "lm":   # with a ZO body: one more, unperturbed, pass for the gradient
            grads = (s.passes.lm_exact(batch, s.hopt.params[0]) if s.ts.zo_params()
                     else extra)[1]
        else:
            lg, x, ps = extra
            grads = head_grad.gradients(x, lg[ps.index(None)], batch.labels, s.hopt.params)
        rec["hg"] = head_grad.encode(grads, s.hopt.params)
        rec["hlr"] = cfg.head_lr * lr / cfg.lr if cfg.lr else cfg.head_lr
    apply_record(rec, s.opt, s.hopt)
    return rec


def train(s: Session, start: int):
    """Phase 4: the step loop — log every step, evaluate dev every eval_every steps (best kept),
    snapshot every snapshot_every; stop at --steps or when --budget seconds are spent."""
    cfg = s.cfg
    run = s.run
    bar = None
    if cfg.progress and cfg.steps > start:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc="finetune", unit="step", dynamic_ncols=True)
    tokens_done, t_loop = 0, time.perf_counter()
    s.loop_t0 = t_loop
    # the lr of the last logged step: the row of an evaluation redone after a resume (no step run
    # yet in this process) carries the lr its step was trained with, as in an uninterrupted run
    last = [r for r in s.log.records if r.get("type") in ("step", "skip")]
    loss_ema, done, lr = s.loss_ema, start, last[-1].get("lr", cfg.lr) if last else cfg.lr
    if (start > s.metrics.last_step() and cfg.eval_every and start % cfg.eval_every == 0
            and start != cfg.steps):   # killed between logging an evaluated step and its row
        evaluate_dev(s, start, loss_ema, lr, 0.0)
    budget_left = cfg.budget - s.prev.get("train_seconds", 0.0) if cfg.budget else None
    for step in range(start, cfg.steps):
        elapsed = time.perf_counter() - t_loop
        if budget_left is not None:
            if elapsed >= budget_left:
                break
            # the schedule follows whichever limit is nearer: the time budget, or --steps when
            # they run out first (a fast machine must still anneal the lr by its last step)
            frac = max((s.prev.get("train_seconds", 0.0) + elapsed) / cfg.budget,
                       step / max(cfg.steps, 1))
            lr = lr_at(int(frac * 10**6), cfg.lr, 10**6, cfg.schedule,
                       cfg.warmup * 10**6 // max(cfg.steps, 1))
        else:
            lr = lr_at(step, cfg.lr, cfg.steps, cfg.schedule, cfg.warmup)
        rec = train_step(s, step, lr)
        s.log.append(rec)
        faults.reached("step-logged")
        if rec["type"] == "skip":
            run.skipped += 1
        else:
            run.losses.append(rec["loss"])
            loss_ema = rec["loss"] if loss_ema is None else 0.9 * loss_ema + 0.1 * rec["loss"]
        batch_tokens = sum(len(x) for x in s.batches.get(step).input_ids)
        tokens_done += batch_tokens
        done = step + 1
        tps = tokens_done / max(time.perf_counter() - t_loop, 1e-9)
        if bar is not None:
            bar.set_postfix(loss=f"{loss_ema:.4f}" if loss_ema is not None else "nan",
                            lr=f"{lr:.1e}", best=f"{100 * max(s.best[1], 0):.1f}%",
                            rss=f"{peak_rss_mb():.0f}MB")
            bar.update(1)
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            evaluate_dev(s, done, loss_ema, lr, tps)
        if cfg.snapshot_every and done % cfg.snapshot_every == 0:
            s.log.sync()
            save_snapshot(cfg.out, done, s.ts, s.opt, s.hopt)
        run.steps_done = done
    if bar is not None:
        bar.close()
    run.steps_done = max(run.steps_done, start)
    if not run.dev_curve or run.dev_curve[-1][0] != run.steps_done:
        evaluate_dev(s, run.steps_done, loss_ema, lr, tokens_done / max(
            time.perf_counter() - t_loop, 1e-9))
    s.log.sync()
    save_snapshot(cfg.out, run.steps_done, s.ts, s.opt, s.hopt)
    s.prev["train_seconds"] = s.prev.get("train_seconds", 0.0) + time.perf_counter() - t_loop
    s.log.close()
    s.metrics.close()


def finish(s: Session) -> Run:
    """Phase 5: select the best dev step (never test), score the test split there, write
    summary.json and metrics.png, print the table."""
    from .metrics import class_report, plot_metrics
    cfg, run = s.cfg, s.run
    best_step = s.best[0] if s.best[0] is not None else run.steps_done
    if best_step != run.steps_done:
        load_snapshot(cfg.out, s.ts, ZOOptimizer(s.ts.zo_params(), cfg.optimizer, dist=cfg.dist),
                      HeadAdam(s.ts.head_params()) if s.hopt is not None else None,
                      name="best.npz")
    run.best_step = best_step
    if not cfg.final_test:
        run.report = None
    elif s.task == "classification":
        from .metrics import predictions
        pred = predictions(s.fwd, s.ds, "test", cfg.batch, cfg.test_limit or None, s.passes)
        run.report = class_report(pred, s.ds, "test")
        run.final_acc = run.report["accuracy"]
    else:
        ppl, nll = perplexity_on(s, "test", cfg.test_limit or None)
        run.report = {"perplexity": ppl, "nll": nll, "zero_shot_perplexity": run.zero_shot_ppl}
    run.peak_rss_mb = peak_rss_mb()
    run.seconds = time.perf_counter() - s.t_start
    faults.reached("before-summary")
    write_summary(s)
    plot_metrics(os.path.join(cfg.out, "metrics.csv"), os.path.join(cfg.out, "metrics.png"))
    if s.plan is not None and cfg.progress:
        print(s.plan.table())
    if run.report and s.task == "classification":
        print(run.report_text(s.ds.dataset.labels), flush=True)
    elif run.report:
        zs = run.zero_shot_ppl
        print(f"test perplexity (best dev step {best_step}): {run.report['perplexity']:.3f}"
              + (f"  (zero-shot {zs:.3f})" if zs else ""), flush=True)
    print(f"peak RSS (VmHWM): {run.peak_rss_mb:.0f} MB"
          + (f" (plan predicted {s.plan.peak / 2**20:.0f} MB; {len(s.streamed)} of "
             f"{s.model.config.n_layer} layers streamed)" if s.plan is not None else ""), flush=True)
    s.model.net.close()
    return run


def write_summary(s: Session):
    out = s.run.summary()
    out["best"] = list(s.best)
    out["train_seconds"] = round(s.prev.get("train_seconds", 0.0), 2)
    out["recipe"] = {k: getattr(s.cfg, k) for k in ("method", "layers", "estimator", "q", "lr",
                                                    "eps", "schedule", "head_grad", "batch")}
    rundir.atomic_write_json(os.path.join(s.cfg.out, "summary.json"), out)


def finetune(config: TrainConfig | dict) -> Run:
    """Python API: run (or resume) a fine-tune; returns the Run with accuracies and peak RSS.

    The phases, in order: setup -> start_or_resume (zero_shot inside it) -> dev_step_zero ->
    train -> finish."""
    s = setup(config)
    start = start_or_resume(s)      # (measures the zero-shot score on the untuned state)
    dev_step_zero(s, start)
    train(s, start)
    return finish(s)


def plan_memory(cfg: TrainConfig, model_path: str):
    """The memory plan for --memory / --stream-layers, made from the file header before loading.
    Returns (plan or None, streamed layer indices)."""
    if not cfg.memory and not cfg.stream_layers:
        return None, []
    from ..formats.gguf_reader import GGUFFile
    from ..memory.budget import make_plan, parse_size
    g = GGUFFile(model_path)
    budget = parse_size(cfg.memory) if cfg.memory else None
    r = cfg.resolved("lm" if cfg.objective == "lm" else "classification")
    plan = make_plan(g, budget, batch=cfg.batch, seq=cfg.max_length, method=r.method,
                     optimizer=cfg.optimizer, lora_rank=cfg.lora_rank,
                     lora_targets=tuple(t.strip() for t in cfg.lora_targets.split(",")),
                     sparse_fraction=cfg.sparse_fraction,
                     full_vocab_logits=cfg.objective == "lm", layers=r.layers,
                     passes=2 * r.q if r.estimator == "two_point" else r.q + 1,
                     pool=max(r.train_limit, 0))
    streamed = list(plan.streamed)
    if cfg.stream_layers:
        n = len(plan.layer_bytes)
        if cfg.stream_layers.strip() == "all":
            streamed = list(range(n))
        else:
            try:
                streamed = sorted({int(x) for x in cfg.stream_layers.split(",") if x.strip()})
            except ValueError:
                raise EdgetuneError(f"--stream-layers: expected 'all' or layer indices, got "
                                    f"{cfg.stream_layers!r}") from None
            if any(not 0 <= i < n for i in streamed):
                raise EdgetuneError(f"--stream-layers: the model has layers 0..{n - 1}")
    if cfg.progress:
        print(plan.table(), flush=True)
    return plan, streamed
