"""AMX floor: the fastest an exact per-32-group int4 GEMM could be on this CPU, vs torch bf16.

    python benchmarks/amx_floor.py [--quick] [--threads N] [--cpuinfo /proc/cpuinfo]

edgetune keeps GGUF's numerics exact: every 32-element group has its own activation and weight
scales, so each 16x16 output tile needs one TDPBSSD with K=32 (half the TMUL's int8 width) and one
TILESTORED per group before any fp32 epilogue.  benchmarks/amx_floor.cpp (built here with g++ into
a temporary directory) measures, on one pinned thread with L1-resident operands, best of many short
repetitions, in TSC cycles per 16x16 output tile and K-step:
  (a) int8 TDPBSSD K=32 + the tile store per group, no epilogue at all (the floor);
  (b) the same with K=64 (the TMUL at full width), for reference;
  (c) AMX-BF16 TDPBF16PS accumulating over all K, one store at the end (what oneDNN runs for torch);
  (d) (a) plus the cheapest exact fp32 epilogue per group (cvt, mul, fma per 16 outputs: q4_0
      with signed codes; q4_1's mins add an fma), folding group g while group g+1's tiles compute;
  (e) exact int4 weights without a per-group epilogue: two TDPBF16PS per K-step (weights as
      bf16 hi + lo, activations rounded to bf16), accumulating over all K;
plus (a) without the stores, (a) with its operands in L2, (a) on all threads at once, and the
AVX-512 BF16 (VDPBF16PS) and int8-VNNI (VPDPBUSD) peaks of one core, for scale.
(a) becomes a GFLOP/s ceiling for --threads threads (2·16·16·32 flops per tile and group, TSC Hz
measured against CLOCK_MONOTONIC), set against torch's bf16 matmul 512x4096x4096 into a
preallocated out= with --threads threads in its own process (benchmarks/torch_matmul.py, torch's
defaults: AMX on).  edgetune's own q4 GEMM on the same shape is printed for comparison.
(d) and (e) become ceilings the same way and are printed against the same torch run (informative).
The LAST line is `amx_floor: ceiling_vs_torch_bf16=X` (ceiling of (a) / torch bf16 GFLOP/s);
X = n/a, exit 0, on a CPU (or OS) without AMX.  Never pass/fail on time.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

# the user's own setting (if any), before edgetune's import chooses PASSIVE for this process
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import torch_matmul  # noqa: E402  (imports no torch itself: torch runs in its own process)

SOURCE = os.path.join(HERE, "amx_floor.cpp")
FLOPS_PER_TILE_GROUP = 2 * 16 * 16 * 32
NEEDED_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")
M, N, K = 512, 4096, 4096


def cpu_info(path: str = "/proc/cpuinfo") -> tuple[set, str, float | None]:
    """(flags, model name, "cpu MHz") of the first CPU in a cpuinfo file (empty set if unreadable)."""
    flags, model, mhz = set(), "unknown CPU", None
    try:
        with open(path) as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "flags" and not flags:
                    flags = set(val.split())
                elif key == "model name" and model == "unknown CPU":
                    model = val.strip()
                elif key == "cpu MHz" and mhz is None:
                    mhz = float(val)
    except OSError:
        pass
    return flags, model, mhz


def not_available(why: str) -> None:
    print(f"# {why}: no AMX floor to measure here")
    print("amx_floor: ceiling_vs_torch_bf16=n/a")
    sys.exit(0)


def build_and_run(reps: int, rounds: int) -> dict:
    """Compile amx_floor.cpp into a temporary directory, run it, parse its `key value` lines."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise SystemExit(f"amx_floor.py: C++ compiler {cxx!r} not found (set CXX or install g++)")
    with tempfile.TemporaryDirectory(prefix="amx_floor_") as tmp:
        exe = os.path.join(tmp, "amx_floor")
        cmd = [cxx, "-O3", "-march=native", "-mamx-tile", "-mamx-int8", "-mamx-bf16", "-pthread",
               SOURCE, "-o", exe]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"amx_floor.py: compiling {SOURCE} failed ({' '.join(cmd)}):\n"
                             f"{r.stderr[-3000:]}")
        r = subprocess.run([exe, str(reps), str(rounds)], capture_output=True, text=True)
    if r.returncode == 3:   # arch_prctl(ARCH_REQ_XCOMP_PERM) refused: the kernel has no AMX state
        not_available(f"the OS refuses AMX tile state ({r.stderr.strip()})")
    if r.returncode != 0:
        raise SystemExit(f"amx_floor.py: {SOURCE} binary exited with {r.returncode}:\n"
                         f"{r.stdout[-2000:]}{r.stderr[-2000:]}")
    out = {}
    for line in r.stdout.splitlines():
        key, _, val = line.partition(" ")
        out[key] = float(val)
    return out


def edgetune_q4_gflops(threads: int, reps: int) -> tuple[float, str] | None:
    """edgetune's q4 qgemm (best path) on M x N x K, numpy in and out, or None without the
    extension."""
    import numpy as np

    sys.path.insert(0, os.path.join(HERE, ".."))
    from edgetune import kernels
    from edgetune.quant import QTensor
    if not kernels.HAVE_KERNELS:
        return None
    r = np.random.default_rng(0)   # random codes, scales and mins, as benchmarks/qgemm.py
    qt = QTensor("w", "q4", (N, K), codes=r.integers(0, 256, (N, K // 32, 16), dtype=np.uint8),
                 scales=(0.01 + 0.01 * r.random((N, K // 32))).astype(np.float32),
                 mins=(-0.08 * r.random((N, K // 32))).astype(np.float32), tensor_id=3)
    x = r.standard_normal((M, K), dtype=np.float32)
    out = np.empty((M, N), np.float32)
    kernels.set_num_threads(threads)
    t = torch_matmul.best_time(lambda: kernels.qgemm(x, qt, out=out), reps)
    return 2.0 * M * N * K / t / 1e9, kernels.best_path()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (for tests)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                    help="threads of the ceiling and of torch (default: all CPUs)")
    ap.add_argument("--cpuinfo", default="/proc/cpuinfo",
                    help="where to read the CPU flags (tests point it at a CPU without AMX)")
    a = ap.parse_args()
    if a.threads <= 0:
        ap.error("--threads must be positive")
    flags, model, mhz = cpu_info(a.cpuinfo)
    missing = [f for f in NEEDED_FLAGS if f not in flags]
    if missing:
        not_available(f"{model}: {a.cpuinfo} lacks {' '.join(missing)}")

    reps, rounds, torch_reps = (100, 5, 3) if a.quick else (300, 40, 30)
    f = build_and_run(reps, rounds)
    hz = f["tsc_hz"]
    cyc_a, nt = f["int8_k32_store"], int(f["threads"])
    cyc_a_all = f[f"int8_k32_store_{nt}threads"]

    def gf(cycles: float, threads: int = 1) -> float:   # GFLOP/s of one K=32 tile-step per `cycles`
        return threads * FLOPS_PER_TILE_GROUP * hz / cycles / 1e9

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# load average {load:.2f} (other processes on these CPUs make every figure noisier, "
          f"torch's 2-thread runs most)")
    print(f"# {model}; TSC {hz / 1e9:.3f} GHz measured against CLOCK_MONOTONIC "
          f"(/proc/cpuinfo cpu MHz {mhz})")
    print(f"# TSC cycles per 16x16 output tile per K-step, one thread pinned to cpu "
          f"{int(f['cpu'])}, operands in L1, best of {rounds} rounds x {reps} repetitions "
          f"(K=4096 each); GFLOP/s for one thread")
    print(f"(a) int8 TDPBSSD K=32 + TILESTORED per group, no epilogue : {cyc_a:6.2f} cycles  "
          f"{gf(cyc_a):7.1f} GFLOP/s")
    print(f"    (a) without the stores (not exact: sums across groups) : "
          f"{f['int8_k32_nostore']:6.2f} cycles  {gf(f['int8_k32_nostore']):7.1f} GFLOP/s")
    print(f"    (a) with its operands in L2 (1 MB)                      : "
          f"{f['int8_k32_store_l2']:6.2f} cycles  {gf(f['int8_k32_store_l2']):7.1f} GFLOP/s")
    print(f"(b) int8 TDPBSSD K=64 + TILESTORED per 64-group           : "
          f"{f['int8_k64_store']:6.2f} cycles  {gf(f['int8_k64_store'] / 2):7.1f} GFLOP/s "
          f"({f['int8_k64_store'] / 2:.2f} cycles per 32 of K)")
    print(f"(c) bf16 TDPBF16PS K=32, accumulate over all K, one store  : "
          f"{f['bf16_k32_accum']:6.2f} cycles  {gf(f['bf16_k32_accum']):7.1f} GFLOP/s")
    print(f"(d) (a) + exact fp32 epilogue (cvt, mul, fma per 16 outputs): "
          f"{f['int8_k32_epilogue']:6.2f} cycles  {gf(f['int8_k32_epilogue']):7.1f} GFLOP/s")
    print(f"(e) exact weights as bf16 hi+lo: 2 TDPBF16PS, accumulate     : "
          f"{f['bf16x2_accum']:6.2f} cycles  {gf(f['bf16x2_accum']):7.1f} GFLOP/s")
    print(f"    (a) on {nt} threads at once (slowest thread)             : {cyc_a_all:6.2f} cycles  "
          f"{gf(cyc_a_all, nt):7.1f} GFLOP/s for {nt} threads")
    dpbf16, dpbusd = f["avx512_dpbf16"], f["avx512_dpbusd"]
    print(f"AVX-512, one thread: VDPBF16PS zmm every {dpbf16:.2f} cycles = "
          f"{64 * hz / dpbf16 / 1e9:.1f} GFLOP/s bf16; VPDPBUSD zmm every {dpbusd:.2f} cycles = "
          f"{128 * hz / dpbusd / 1e9:.1f} GOP/s int8")
    ceiling = gf(cyc_a, a.threads)
    print(f"ceiling of (a) for {a.threads} threads: {a.threads} x {FLOPS_PER_TILE_GROUP} flops x "
          f"{hz / 1e9:.3f} GHz / {cyc_a:.2f} cycles = {ceiling:.1f} GFLOP/s "
          f"(bf16 (c) peak for {a.threads} threads: {gf(f['bf16_k32_accum'], a.threads):.1f})")

    tb = torch_matmul.run(M, N, K, a.threads, "bf16", torch_reps,
                          omp_wait_policy=USER_OMP_WAIT_POLICY)
    print(f"torch bf16 matmul {M}x{N}x{K} (out=, {tb['threads']} threads, own process, oneDNN "
          f"{tb['onednn_impl']}): {tb['gflops']:.1f} GFLOP/s ({tb['gflops'] / gf(f['bf16_k32_accum'], a.threads):.2f}"
          f" of the bf16 (c) peak)")
    et = edgetune_q4_gflops(a.threads, torch_reps)
    if et is None:
        print("edgetune q4: C++ extension not built, not measured")
    else:
        g, path = et
        print(f"edgetune q4 ({path} path) {M}x{N}x{K}, {a.threads} threads: {g:.1f} GFLOP/s = "
              f"{FLOPS_PER_TILE_GROUP * a.threads * hz / (g * 1e9):.1f} TSC cycles per tile-group "
              f"per thread ({g / ceiling:.2f} of the ceiling)")
    for key, what in (("int8_k32_epilogue", "(d) int8 with the exact epilogue"),
                      ("bf16x2_accum", "(e) exact weights as bf16 hi+lo")):
        c = gf(f[key], a.threads)
        print(f"informative: {what}: ceiling {c:.1f} GFLOP/s for {a.threads} threads = "
              f"{c / tb['gflops']:.2f}x torch bf16")
    print(f"amx_floor: ceiling_vs_torch_bf16={ceiling / tb['gflops']:.2f}")


if __name__ == "__main__":
    main()
