"""qgemm benchmark: edgetune int4 qgemm vs torch bf16 matmul, measured in the same run.

Main shape M=512, N=K=4096 (q4, offset 0, with mins, random codes); then the SmolLM2-135M shapes.
Every engine writes into a preallocated output (edgetune's out=, torch's out=) with the same
thread count.  Besides the bf16 headline, the main shape prints torch's fp32 matmul and its int8
GEMM (torch._int_mm: int8 x int8 -> int32, no scales, so an upper bound for any int8 path), and
torch's bf16 matmul without AMX (benchmarks/torch_matmul.py in its own process, with oneDNN capped
at AVX512_CORE_BF16: what torch runs on a CPU without AMX) against edgetune's best path and its
avx512 path.  The headline baseline stays torch's default (AMX where the CPU has it).  That
baseline is only as strong as this CPU's AVX-512 BF16: on the Sapphire Rapids VM it was measured on
(2026-12-01) one VDPBF16PS zmm issues every ~1.6 TSC cycles, ~82 GFLOP/s per core (amx_floor.py
prints it), well under the ~200 per core torch reached on Zen4 (FACTS.md).
edgetune's matrices are prepacked (kernels.prepack) as a loaded model's are; the main shape also
prints the same GEMM reading the unpacked codes.  Every engine runs in turn, --rounds times (default
3), and keeps its best round.
Prints GFLOP/s (2·M·N·K / time, best of several runs after warm-up) and ratios; the LAST line is
`qgemm: vs_torch_bf16=R` (edgetune int4 / torch bf16 GFLOP/s on the main shape).
Never pass/fail on time.  Usage: python benchmarks/qgemm.py [--quick] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# the user's own setting (if any), before edgetune's import chooses PASSIVE for this process
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_matmul  # noqa: E402
from edgetune import kernels  # noqa: E402
from edgetune.quant import QTensor  # noqa: E402
from torch_matmul import best_time  # noqa: E402  (one timing rule for every engine)


def best_time_after_torch(fn, torch_fn, reps: int) -> float:
    """Best time of fn when each run directly follows a torch op (as in a model forward): torch's
    OpenMP threads keep spinning after their op and compete with our pool for the cores."""
    best = float("inf")
    for _ in range(max(3, reps)):
        torch_fn()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def random_q4(n: int, k: int, seed: int = 0) -> QTensor:
    r = np.random.default_rng(seed)
    return QTensor("w", "q4", (n, k), codes=r.integers(0, 256, (n, k // 32, 16), dtype=np.uint8),
                   scales=(0.01 + 0.01 * r.random((n, k // 32))).astype(np.float32),
                   mins=(-0.08 * r.random((n, k // 32))).astype(np.float32), tensor_id=3)


def gflops(m, n, k, t):
    return 2.0 * m * n * k / t / 1e9


def bench_shape(m, n, k, reps, rounds, extra=False):
    qt = random_q4(n, k)
    codes_only = QTensor(qt.name, qt.kind, qt.shape, codes=qt.codes, scales=qt.scales, mins=qt.mins,
                         tensor_id=qt.tensor_id)
    kernels.prepack(qt)  # as every resident q4 matrix of a loaded model (a no-op where unused)
    x = torch.randn(m, k)
    xb, wb = x.to(torch.bfloat16), torch.randn(n, k).to(torch.bfloat16)
    out, outb = torch.empty(m, n), torch.empty(m, n, dtype=torch.bfloat16)
    wbt = wb.T
    fns = {"torch_bf16": lambda: torch.matmul(xb, wbt, out=outb),
           "edgetune_q4": lambda: kernels.qgemm(x, qt, out=out)}
    if extra:
        xf, wft = x.clone(), wb.float().T
        xi = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        wit = torch.randint(-127, 128, (n, k), dtype=torch.int8).T
        outi = torch.empty(m, n, dtype=torch.int32)
        p = kernels.Perturbation(seed=2**63 + 1, eps=1e-3, sign=1)
        pg = kernels.Perturbation(seed=2**63 + 1, eps=1e-3, sign=-1, dist="gaussian")
        fns.update({
            "torch_fp32": lambda: torch.matmul(xf, wft, out=out),
            "torch_int8_int_mm": lambda: torch._int_mm(xi, wit, out=outi),
            "edgetune_q4_perturbed": lambda: kernels.qgemm(x, qt, perturb=p, out=out),
            "edgetune_q4_perturbed_gauss": lambda: kernels.qgemm(x, qt, perturb=pg, out=out)})
        if qt.packed is not None:
            fns["edgetune_q4_codes_not_prepacked"] = lambda: kernels.qgemm(x, codes_only, out=out)
        for path in kernels.available_paths():
            if path not in (kernels.best_path(), "scalar"):
                fns[f"edgetune_q4_{path}"] = lambda path=path: kernels.qgemm(x, qt, out=out, path=path)
    # every engine in turn, `rounds` times; each keeps its best (a neighbour's burst on a shared
    # machine then slows one round, not one engine)
    times = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name] = min(times.get(name, float("inf")), best_time(fn, reps))
    if extra:
        small = torch.randn(m, 64)
        times["edgetune_q4_right_after_a_torch_op"] = best_time_after_torch(
            fns["edgetune_q4"], lambda: torch.nn.functional.silu(small), reps)
    return {name: gflops(m, n, k, t) for name, t in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="for every engine")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of every engine in turn, best round kept (1 with --quick)")
    args = ap.parse_args()
    reps = 3 if args.quick else 10
    rounds = 1 if args.quick else max(1, args.rounds)
    kernels.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    print(f"# threads: torch {torch.get_num_threads()}, edgetune {kernels.get_num_threads()}; "
          f"paths {kernels.available_paths()} (best {kernels.best_path()})")

    print("# SmolLM2-135M shapes (M, N, K): GFLOP/s edgetune q4 vs torch bf16")
    for m, n, k in [(512, 576, 576), (512, 192, 576), (512, 1536, 576), (512, 576, 1536),
                    (16, 49152, 576)]:
        r = bench_shape(m, n, k, reps, rounds)
        print(f"smollm2 M={m} N={n} K={k}: edgetune_q4 {r['edgetune_q4']:.1f}  "
              f"torch_bf16 {r['torch_bf16']:.1f}  ratio {r['edgetune_q4'] / r['torch_bf16']:.2f}")

    m, n, k = 512, 4096, 4096
    r = bench_shape(m, n, k, reps, rounds, extra=True)
    for name, g in r.items():
        print(f"main M={m} N={n} K={k}: {name} {g:.1f} GFLOP/s")
    for base in ("torch_fp32", "torch_int8_int_mm"):
        print(f"main: edgetune_q4 / {base} = {r['edgetune_q4'] / r[base]:.2f}")
    # informative: torch bf16 as on a CPU without AMX (own process, oneDNN capped at AVX-512 BF16)
    na = torch_matmul.run(m, n, k, args.threads, "bf16", reps, env=torch_matmul.NO_AMX_ENV,
                          omp_wait_policy=USER_OMP_WAIT_POLICY)
    print(f"main M={m} N={n} K={k}: {torch_matmul.NO_AMX_LABEL}: {na['gflops']:.1f} GFLOP/s "
          f"(own process, {na['threads']} threads, oneDNN {na['onednn_impl']}; "
          f"{na['gflops'] / r['torch_bf16']:.2f}x torch bf16 with AMX in this run)")
    avx512 = r.get("edgetune_q4_avx512",
                   r["edgetune_q4"] if kernels.best_path() == "avx512" else None)
    print(f"main: edgetune_q4 ({kernels.best_path()}) / torch_bf16_without_amx = "
          f"{r['edgetune_q4'] / na['gflops']:.2f}")
    if avx512 is not None:
        print(f"main: edgetune_q4_avx512 / torch_bf16_without_amx = {avx512 / na['gflops']:.2f}")
    print(f"qgemm: vs_torch_bf16={r['edgetune_q4'] / r['torch_bf16']:.2f}")


if __name__ == "__main__":
    main()
