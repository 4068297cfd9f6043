"""What an app does to fine-tune on the device with onnxruntime alone (no edgetune, no torch),
writing a seed log that edgetune replays.

    python examples/ort_app_zo.py model.onnx examples.jsonl --labels 3524,9174,2731 --steps 20

model.onnx comes from `edgetune export --run RUN --format onnx --out model.onnx`, which also
writes model.onnx.data (weights) and model.onnx.trainable.safetensors (the trainable tensors'
values; its metadata holds each tensor's RNG id and perturbation factor pscale).
examples.jsonl holds pre-tokenized labelled examples, one per line:
    {"ids": [1, 2, ...], "label": 0}        (the answer is read at the last token)
as the app's own tokenizer would produce them.  --labels are the vocabulary ids of the label words.

Each step is edgetune's two-point ZO step (MeZO; `--estimator two_point --q 1`): the step seed is
edgetune's (run seed, step) -> seed, z its counter-based RNG (copied below from
edgetune/zo/rng.py, 20 lines of numpy), every trainable input is fed theta +- eps*pscale*z,
g = clip((L+ - L-) / 2eps), and theta += float32(-lr * g * pscale) * z.  Only inference runs.
Each step is appended to a seed log in edgetune's format (--log, default MODEL.seedlog.jsonl),
so `edgetune.runlog.replay` reproduces the app's tuned values bit for bit from the exported run
(tests/test_onnx.py checks it).  The tuned values are written back to the .trainable.safetensors
file (atomically) at the end.
"""
import argparse
import json
import math
import os
import zlib

import numpy as np
import onnxruntime as ort
from safetensors import safe_open
from safetensors.numpy import save_file

# ---- edgetune's perturbation RNG (edgetune/zo/rng.py), bit for bit --------------------------
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
GAUSS_C = np.float32(1.0 / np.sqrt(4.0 * (65536.0**2 - 1.0) / 12.0))


def _mix(x):
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def stream_key(seed, tensor_id):
    with np.errstate(over="ignore"):
        s = np.array([seed & 0xFFFFFFFFFFFFFFFF], np.uint64)
        t = np.array([tensor_id & 0xFFFFFFFFFFFFFFFF], np.uint64)
        return int(_mix(s ^ _mix(t + GOLDEN))[0])


def perturbation(seed, tensor_id, shape, dist="rademacher"):
    n = int(np.prod(shape)) if shape else 1
    with np.errstate(over="ignore"):
        b = _mix(np.uint64(stream_key(seed, tensor_id)) + (np.arange(n, dtype=np.uint64) + np.uint64(1)) * GOLDEN)
    if dist == "rademacher":
        z = np.where((b >> np.uint64(63)) == 0, np.float32(1.0), np.float32(-1.0))
    else:
        m = np.uint64(0xFFFF)
        s = (b & m) + ((b >> np.uint64(16)) & m) + ((b >> np.uint64(32)) & m) + (b >> np.uint64(48))
        z = (s.astype(np.int64) - 131070).astype(np.float32) * GAUSS_C
    return z.astype(np.float32).reshape(shape)


def step_seed(run_seed, step):          # edgetune.runlog.step_seed
    return stream_key(run_seed, 0x5EED_0000_0000 + step)


# ---- edgetune's seed log (edgetune/zo/seedlog.py): canonical JSON + CRC32 per line ------------
def _canonical(rec):
    return json.dumps(rec, sort_keys=True, separators=(",", ":"), allow_nan=True).encode("utf-8")


def append_record(f, rec, sync=False):
    f.write(_canonical(dict(rec, crc=zlib.crc32(_canonical(rec)))) + b"\n")
    f.flush()
    if sync:
        os.fsync(f.fileno())


# ---- the app ----------------------------------------------------------------------------------
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
    ap.add_argument("--clip", type=float, default=100.0)
    ap.add_argument("--seed", type=int, default=0, help="run seed: step seeds and batch order")
    ap.add_argument("--log", help="seed log to write (default MODEL.seedlog.jsonl; must not exist)")
    a = ap.parse_args(argv)
    labels = [int(x) for x in a.labels.split(",")]
    sess = ort.InferenceSession(a.model, providers=["CPUExecutionProvider"])
    side = a.model + ".trainable.safetensors"
    with safe_open(side, "np") as f:
        meta = f.metadata() or {}
        theta = {k: f.get_tensor(k) for k in f.keys()}
    if "edgetune.trainable" not in meta:
        raise SystemExit(f"{side}: no tensor ids/pscales in its metadata; re-export the run with "
                         f"this edgetune (`edgetune export --format onnx`)")
    ids_pscale = json.loads(meta["edgetune.trainable"])
    dist = meta.get("edgetune.dist", "rademacher")
    log_path = a.log or a.model + ".seedlog.jsonl"
    if os.path.exists(log_path):
        raise SystemExit(f"{log_path}: exists; choose another --log")
    data = load_examples(a.examples)
    order = np.random.default_rng(a.seed)
    methods = meta.get("methods", "").split(",")
    header = {"type": "header", "version": 2, "model": os.path.basename(a.model),
              "tensor_ids": {k: int(ids_pscale[k][0]) for k in theta}, "rng_version": 1,
              "head_rows": labels if ("head" in methods or "bias" in methods) else None, "mask": None,
              "config": {"method": meta.get("methods", ""), "estimator": "two_point", "q": 1,
                         "optimizer": "sgd", "lr": a.lr, "eps": a.eps, "clip": a.clip,
                         "schedule": "constant", "steps": a.steps, "seed": a.seed, "dist": dist,
                         "engine": "onnxruntime-app"},
              "trainable": {k: [int(theta[k].size), float(ids_pscale[k][1])] for k in theta}}
    with open(log_path, "wb") as logf:
        append_record(logf, header, sync=True)
        for step in range(a.steps):
            idx = order.choice(len(data), size=min(a.batch, len(data)), replace=False)
            ex = [data[i] for i in idx]
            feed, y = batch_feed(ex, labels), np.array([lab for _, lab in ex])
            seed = step_seed(a.seed, step)
            z = {k: perturbation(seed, ids_pscale[k][0], v.shape, dist) for k, v in theta.items()}
            ps = {k: ids_pscale[k][1] for k in theta}
            plus = {k: v + np.float32(a.eps * ps[k]) * z[k] for k, v in theta.items()}
            minus = {k: v + np.float32(-a.eps * ps[k]) * z[k] for k, v in theta.items()}
            lp, _ = loss(sess, feed, plus, y)
            lm, _ = loss(sess, feed, minus, y)
            g = (lp - lm) / (2.0 * a.eps)
            if not (math.isfinite(lp) and math.isfinite(lm) and math.isfinite(g)):
                append_record(logf, {"type": "skip", "step": step, "seeds": [str(seed)],
                                     "reason": "non-finite loss"})
                continue
            g = max(-a.clip, min(a.clip, g)) if a.clip > 0 else g
            lr32 = float(np.float32(a.lr))
            for k, v in theta.items():   # edgetune's SGD update: theta += float32(-lr*g*pscale/q) * z
                v += np.float32(-lr32 * g * ps[k] / 1) * z[k]
            append_record(logf, {"type": "step", "step": step, "seeds": [str(seed)], "g": [g],
                                 "lr": a.lr, "loss": (lp + lm) / 2, "lp": [lp], "lm": [lm]},
                          sync=(step + 1) % 10 == 0)
            print(f"step {step + 1}: loss {(lp + lm) / 2:.4f}  g {g:+.3f}", flush=True)
        os.fsync(logf.fileno())
    tmp = side + ".tmp"
    save_file(theta, tmp, metadata=meta)
    os.replace(tmp, side)
    print(f"updated {side}; seed log {log_path}")


if __name__ == "__main__":
    main()
