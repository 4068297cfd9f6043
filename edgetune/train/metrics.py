"""Measurements: accuracy on a split, RSS (current and peak, from /proc via psutil), plots."""
from __future__ import annotations

import numpy as np
import psutil

from .. import faults
from . import objectives, rundir


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size (VmHWM) of this process in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def predictions(model, ds, split: str, batch_size: int = 32, limit=None, passes=None) -> np.ndarray:
    """Predicted label (argmax over the verbalizer words) of the first `limit` examples of a
    split, in split order.  passes: a train/passes.BatchPasses to run them through (it caches
    a frozen body's features), else the model's own forward."""
    out = np.full(len(ds.examples(split, limit)), -1, dtype=np.int64)
    for b in ds.eval_batches(split, batch_size, limit):
        faults.reached("eval-batch")   # crash tests: kill inside an evaluation
        if passes is not None:
            out[b.indices] = passes.predict(b, split)
        else:
            out[b.indices] = objectives.predict(model, b.input_ids, b.answer_pos, ds.label_tokens)
    return out


def lm_nll(model, ds, split: str, batch_size: int = 16, limit=None, passes=None) -> tuple:
    """(summed next-token NLL in nats, token count) over the loss-mask tokens of the first
    `limit` examples of an LM split; perplexity = exp(sum / count)."""
    total, count = 0.0, 0
    for b in ds.eval_batches(split, batch_size, limit):
        n = sum(sum(m[1:]) for m in b.loss_masks)
        if not n:
            continue
        if passes is not None:
            mean = passes.lm_losses(b, [None])[0]
        else:
            mean = objectives.lm_loss(model, b.input_ids, b.loss_masks)
        total += mean * n
        count += n
    return total, count


def class_report(pred, ds, split: str) -> dict:
    """Accuracy, per-class recall and the majority-class baseline (majority of the train
    split's labels) of predictions for the first len(pred) examples of a split."""
    labels = np.array([e.label for e in ds.examples(split, len(pred))], dtype=np.int64)
    pred = np.asarray(pred)
    C = len(ds.dataset.labels)
    train_counts = np.bincount([r.label for r in ds.dataset.split("train")], minlength=C)
    maj = int(np.argmax(train_counts))
    recall = [float((pred[labels == c] == c).mean()) if (labels == c).any() else 0.0
              for c in range(C)]
    return {"n": int(len(labels)), "accuracy": float((pred == labels).mean()) if len(labels) else 0.0,
            "recall": recall, "majority_class": maj,
            "majority_acc": float((labels == maj).mean()) if len(labels) else 0.0}


def accuracy(pred, ds, split: str) -> float:
    """Share of predictions (for the first len(pred) examples of a split) equal to the labels."""
    labels = np.array([e.label for e in ds.examples(split, len(pred))], dtype=np.int64)
    return float((np.asarray(pred) == labels).mean()) if len(labels) else 0.0


def evaluate(model, ds, split: str, batch_size: int = 32, limit=None) -> float:
    """Classification accuracy (argmax over the verbalizer words) on a split."""
    return accuracy(predictions(model, ds, split, batch_size, limit), ds, split)


def plot_metrics(csv_path: str, png_path: str):
    """Loss and dev accuracy against step, from metrics.csv (its well-formed rows: a missing
    header or a torn line never fails the end of a run).  Written atomically (rundir.atomic_file)."""
    rows = rundir.read_metrics(csv_path)
    if not rows:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    loss = [(s, float(r["loss"])) for s, r in zip(steps, rows) if r["loss"]]
    if loss:
        ax[0].plot(*zip(*loss), marker="o")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("training loss (EMA)")
    acc = [(s, 100 * float(r["dev_acc"])) for s, r in zip(steps, rows) if r["dev_acc"]]
    if acc:
        ax[1].plot(*zip(*acc), marker="o", color="tab:green")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("dev accuracy (%)")
    fig.tight_layout()
    try:
        with rundir.atomic_file(png_path) as f:
            fig.savefig(f, format="png", dpi=90)
    finally:
        plt.close(fig)
