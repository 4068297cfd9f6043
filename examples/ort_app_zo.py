"""What an app does to fine-tune on the device with onnxruntime alone (no edgetune, no torch).

    python examples/ort_app_zo.py model.onnx examples.jsonl --labels 3524,9174,2731 --steps 20

model.onnx comes from `edgetune export --run RUN --format onnx --out model.onnx`, which also
writes model.onnx.data (weights) and model.onnx.trainable.safetensors (the trainable tensors'
values).  examples.jsonl holds pre-tokenized labelled examples, one per line:
    {"ids": [1, 2, ...], "label": 0}        (the answer is read at the last token)
as the app's own tokenizer would produce them.  --labels are the vocabulary ids of the label words.

Each step: draw a batch, draw a seed, feed theta + eps*z and theta - eps*z for every trainable
input (z: Rademacher, regenerated from the seed), g = (L+ - L-) / 2eps, theta -= lr * g * z.
Only inference runs: that is the whole point of zeroth-order training on a phone.  Scales are
perturbed relative to their tensor's mean magnitude, as edgetune does.  The tuned values are
written back to the .trainable.safetensors file (atomically) at the end.
"""
import argparse
import json
import os

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file, save_file


def load_examples(path):
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(np.asarray(r["ids"], np.int64), int(r["label"])) for r in rows]


def batch_feed(examples, labels):
    T = max(len(ids) for ids, _ in examples)
    tok = np.zeros((len(examples), T), np.int64)           # right padding
    for i, (ids, _) in enumerate(examples):
        tok[i, : len(ids)] = ids
    rows = np.array([i * T + len(ids) - 1 for i, (ids, _) in enumerate(examples)], np.int64)
    return {"input_ids": tok, "rows": rows, "vocab": np.asarray(labels, np.int64)}


def loss(sess, feed, theta, y):
    lg = sess.run(["logits"], {**feed, **theta})[0].astype(np.float64)   # [B, C]
    lg -= lg.max(-1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean()), float((lg.argmax(-1) == y).mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("examples")
    ap.add_argument("--labels", required=True, help="label words' vocabulary ids, comma-separated")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    labels = [int(x) for x in a.labels.split(",")]
    sess = ort.InferenceSession(a.model, providers=["CPUExecutionProvider"])
    side = a.model + ".trainable.safetensors"
    theta = load_file(side)
    # relative perturbation for scales (eps * mean |scale| of the tensor), absolute for the rest
    pscale = {k: float(np.abs(v).mean()) if k.startswith("scales:") else 1.0 for k, v in theta.items()}
    data = load_examples(a.examples)
    rng = np.random.default_rng(a.seed)
    for step in range(a.steps):
        idx = rng.choice(len(data), size=min(a.batch, len(data)), replace=False)
        ex = [data[i] for i in idx]
        feed, y = batch_feed(ex, labels), np.array([lab for _, lab in ex])
        seed = int(rng.integers(2**63))

        def z(k, v, j):
            return np.random.default_rng([seed, j]).choice(np.array([-1, 1], np.float32), size=v.shape)
        plus = {k: v + a.eps * pscale[k] * z(k, v, j) for j, (k, v) in enumerate(theta.items())}
        minus = {k: v - a.eps * pscale[k] * z(k, v, j) for j, (k, v) in enumerate(theta.items())}
        lp, _ = loss(sess, feed, plus, y)
        lm, _ = loss(sess, feed, minus, y)
        g = (lp - lm) / (2 * a.eps)
        g = max(-100.0, min(100.0, g))
        theta = {k: v - np.float32(a.lr * g * pscale[k]) * z(k, v, j)
                 for j, (k, v) in enumerate(theta.items())}
        print(f"step {step + 1}: loss {(lp + lm) / 2:.4f}  g {g:+.3f}", flush=True)
    tmp = side + ".tmp"
    save_file(theta, tmp)
    os.replace(tmp, side)
    print(f"updated {side}")


if __name__ == "__main__":
    main()
