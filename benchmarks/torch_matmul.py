"""torch matmul throughput in its own process: the baseline that amx_floor.py and qgemm.py start.

    python benchmarks/torch_matmul.py --m 512 --n 4096 --k 4096 --threads 2 [--dtype bf16] [--reps 10]

Times torch.matmul(x, w.T, out=preallocated) with best_time below (two warm-ups, then the best of
>= --reps runs and >= 0.3 s) under torch.set_num_threads(--threads), then runs the matmul once
more with oneDNN's verbose mode on (which names the kernel oneDNN picked, e.g.
brg_matmul:avx10_1_512_amx or brg_matmul:avx512_core_bf16), and prints one JSON line
{"gflops", "seconds", "threads", "dtype", "onednn_max_cpu_isa"}; run() adds "onednn_impl" and
"onednn_isa" from the verbose lines.  Imports torch only, so torch runs with whatever OpenMP and
oneDNN settings the environment gives it: the callers start it with torch's defaults (no
OMP_WAIT_POLICY from edgetune) or, for the "without AMX" baseline, with NO_AMX_ENV (oneDNN then
runs its AVX-512 BF16 kernels, as on a CPU without AMX; the old DNNL_ name is set too, for older
oneDNN builds).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# the oneDNN ISA cap that makes torch's bf16 matmul run as on a CPU without AMX (e.g. AMD Zen4)
NO_AMX_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "DNNL_MAX_CPU_ISA": "AVX512_CORE_BF16"}
NO_AMX_LABEL = "torch bf16 without AMX (as on a CPU without AMX, e.g. the AMD Zen4 the brief names)"


def best_time(fn, reps: int, min_time: float = 0.3) -> float:
    """Best wall time of fn over >= reps runs (and >= min_time seconds) after two warm-up runs."""
    fn()
    fn()  # warm-up (also sizes the scratch buffers)
    best, i = float("inf"), 0
    t_end = time.perf_counter() + min_time
    while (i < reps or time.perf_counter() < t_end) and i < 50 * reps:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        i += 1
    return best


def run(m: int, n: int, k: int, threads: int, dtype: str = "bf16", reps: int = 10,
        env: dict | None = None, omp_wait_policy: str | None = None) -> dict:
    """Start this script in a fresh process and return its JSON result.  The child's environment
    is this one without OMP_WAIT_POLICY (that edgetune's import sets for its own process), plus
    omp_wait_policy if given (the user's own setting) and `env`."""
    child = dict(os.environ)
    child.pop("OMP_WAIT_POLICY", None)
    if omp_wait_policy is not None:
        child["OMP_WAIT_POLICY"] = omp_wait_policy
    child.update(env or {})
    cmd = [sys.executable, os.path.abspath(__file__), "--m", str(m), "--n", str(n), "--k", str(k),
           "--threads", str(threads), "--dtype", dtype, "--reps", str(reps)]
    r = subprocess.run(cmd, env=child, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"torch matmul baseline ({' '.join(cmd[1:])}, env {env}) failed:\n"
                         f"{r.stderr[-3000:]}")
    res, impl, isa = None, None, None
    for line in r.stdout.splitlines():   # oneDNN's verbose lines (C stdio) and our JSON, any order
        if line.startswith("{"):
            res = json.loads(line)
        elif line.startswith("onednn_verbose") and ",exec," in line and ",matmul," in line:
            impl = line.split(",")[6]
        elif line.startswith("onednn_verbose") and ",isa:" in line:
            isa = line.split(",isa:", 1)[1]
    if res is None:
        raise SystemExit(f"torch matmul baseline ({' '.join(cmd[1:])}) printed no result:\n"
                         f"{r.stdout[-2000:]}")
    return {**res, "onednn_impl": impl or "not oneDNN", "onednn_isa": isa or "unknown"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    if min(a.m, a.n, a.k, a.threads, a.reps) <= 0:
        ap.error("--m, --n, --k, --threads and --reps must be positive")
    import torch
    torch.set_num_threads(a.threads)
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    x, w = torch.randn(a.m, a.k).to(dt), torch.randn(a.n, a.k).to(dt)
    out, wt = torch.empty(a.m, a.n, dtype=dt), w.T
    t = best_time(lambda: torch.matmul(x, wt, out=out), a.reps)
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        torch.matmul(x, wt, out=out)   # names oneDNN's kernel (nothing if torch skips oneDNN)
    print(json.dumps({"gflops": 2.0 * a.m * a.n * a.k / t / 1e9, "seconds": t,
                      "threads": torch.get_num_threads(), "dtype": a.dtype,
                      "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA")}))


if __name__ == "__main__":
    main()
