"""Peak memory and step time of ZO steps on synthetic Llama-2-7B / 13B int4 models.

    python benchmarks/memory.py [--steps 2] [--batch 4] [--seq 64] [--cache DIR] [--cold]

Builds llama2-7b and llama2-13b shaped Q4_0 GGUFs with `edgetune synth` (cached in --cache between
runs), warms the page cache, then runs ZO steps (train.loop.train_step, the step `finetune` runs:
both perturbed passes per layer and the update) in a separate process per configuration, on texts
of --seq tokens, and reports each one's peak RSS
(VmHWM) and seconds per step:
  7B resident (scales), 7B streamed (scales), 7B streamed (lora), 13B streamed (scales), 13B streamed (lora)
The last line is
  memory: rss7b_resident_gb=A rss7b_stream_gb=B rss13b_stream_gb=C stream_slowdown=S
with B and C the larger of the scales/lora runs, S = streamed / resident seconds per step (7B,
scales, warm page cache, same run).  --cold adds a 7B streamed run whose page cache is dropped
before the model loads (posix_fadvise DONTNEED on the whole file) and after every layer read, and
reports its second step (the first one after warm-up) with the bytes that step read from storage
(/proc/self/io read_bytes): reads that truly miss, the honest flash-read cost.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

STEP_SCRIPT = r"""
import json, os, sys, time
from edgetune.config import make_config
from edgetune.formats.gguf_reader import GGUFFile
from edgetune.memory.budget import make_plan
from edgetune.train.loop import setup, train_step
from edgetune.train.metrics import peak_rss_mb
path, stream, method, steps, batch, seq, cold, data, out = sys.argv[1:10]
stream, steps, batch, seq, cold = stream == "1", int(steps), int(batch), int(seq), cold == "1"
def storage_read():      # bytes this process read from the block device (not the page cache)
    with open("/proc/self/io") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("read_bytes"))
if cold:                # the file leaves the page cache before anything is loaded
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
g = GGUFFile(path)
plan = make_plan(g, None, batch=batch, seq=seq, method=method)
t0 = time.perf_counter()
# the real training step (train.loop.train_step, as `finetune` runs it): the MeZO pair, lr 1e-6
s = setup(make_config(flag_values=dict(
    model=path, data=data, verbalizer="a=a,b=b", out=out, overwrite=True, method=method,
    batch=batch, max_length=seq, estimator="two_point", q=1, lr=1e-6, eps=1e-3, progress=False,
    stream_layers="all" if stream else "", zero_shot=False, train_limit=2 * batch)))
if stream and cold:
    s.model.net.stream.drop_cache = True
load_s = time.perf_counter() - t0
times, reads = [], []
for step in range(steps + 1):       # step 0 warms up (first touch of every page / buffer)
    r0, t = storage_read(), time.perf_counter()
    train_step(s, step, s.cfg.lr)
    times.append(time.perf_counter() - t)
    reads.append((storage_read() - r0) / 2**20)
s.model.net.close()
pm = make_plan(g, plan.minimum if stream else None, batch=batch, seq=seq, method=method)
print(json.dumps({"peak_mb": peak_rss_mb(), "step_s": min(times[1:]) if steps else times[0],
                  "step1_s": times[min(1, steps)], "step1_read_mb": reads[min(1, steps)],
                  "first_step_s": times[0], "load_s": load_s, "predicted_mb": pm.peak / 2**20}))
"""


def ensure_model(shape, cache):
    from edgetune.synth import write_synthetic
    path = os.path.join(cache, f"{shape}-q4_0.gguf")
    if not os.path.exists(path):
        print(f"writing {path} (edgetune synth, once) ...", flush=True)
        write_synthetic(shape, "q4_0", path, progress=False)
    return path


def warm(path):
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def run(path, stream, method, a, cold=False):
    script = os.path.join(a.cache, "step.py")
    with open(script, "w") as f:
        f.write(STEP_SCRIPT)
    data = os.path.join(a.cache, "data.jsonl")   # texts of at least --seq tokens, labels a/b
    with open(data, "w") as f:
        for i in range(4 * a.batch):
            words = " ".join(["ab", "cd", "ef", "gh"][(i * 7 + k) % 4] for k in range(a.seq + 16))
            f.write(json.dumps({"text": words, "label": "ab"[i % 2]}) + "\n")
    r = subprocess.run([sys.executable, script, path, "1" if stream else "0", method,
                        str(a.steps if not cold else 1), str(a.batch), str(a.seq),
                        "1" if cold else "0", data, os.path.join(a.cache, "run")],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"step run failed ({path}, stream={stream}, {method}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--cache", default=os.path.join(ROOT, "benchmarks", "out", "cache"),
                    help="where the synthetic GGUFs are kept between runs")
    ap.add_argument("--cold", action="store_true", help="also time a cold-cache streamed 7B step")
    a = ap.parse_args()
    os.makedirs(a.cache, exist_ok=True)
    p7 = ensure_model("llama2-7b", a.cache)
    p13 = ensure_model("llama2-13b", a.cache)
    res = {}
    for name, path, stream, method in [("7b_resident_scales", p7, False, "scales"),
                                       ("7b_stream_scales", p7, True, "scales"),
                                       ("7b_stream_lora", p7, True, "lora"),
                                       ("13b_stream_scales", p13, True, "scales"),
                                       ("13b_stream_lora", p13, True, "lora")]:
        warm(path)
        r = run(path, stream, method, a)
        res[name] = r
        print(f"{name:20s} peak {r['peak_mb'] / 1024:6.2f} GB (plan {r['predicted_mb'] / 1024:5.2f}) "
              f"step {r['step_s']:7.2f} s  (first {r['first_step_s']:.2f} s, load {r['load_s']:.1f} s)",
              flush=True)
    if a.cold:
        r = run(p7, True, "scales", a, cold=True)
        res["7b_stream_scales_cold"] = r
        print(f"7b streamed, cold page cache: step {r['step1_s']:.2f} s, {r['step1_read_mb']:.0f} MB "
              f"read from storage during it (first step {r['first_step_s']:.2f} s; warm streamed "
              f"{res['7b_stream_scales']['step_s']:.2f} s)")
    os.makedirs(os.path.join(ROOT, "benchmarks", "out"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "out", "memory.json"), "w") as f:
        json.dump(res, f, indent=2)
    A = res["7b_resident_scales"]["peak_mb"] / 1024
    B = max(res["7b_stream_scales"]["peak_mb"], res["7b_stream_lora"]["peak_mb"]) / 1024
    C = max(res["13b_stream_scales"]["peak_mb"], res["13b_stream_lora"]["peak_mb"]) / 1024
    S = res["7b_stream_scales"]["step_s"] / res["7b_resident_scales"]["step_s"]
    print(f"memory: rss7b_resident_gb={A:.2f} rss7b_stream_gb={B:.2f} rss13b_stream_gb={C:.2f} "
          f"stream_slowdown={S:.2f}")


if __name__ == "__main__":
    main()
