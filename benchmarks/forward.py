"""End-to-end forward throughput on SmolLM2-135M, batch 16 x 32 tokens, one run, three runtimes.

    python benchmarks/forward.py [--batch 16] [--seq 32] [--repeats 5]

edgetune int4 (own kernels) vs a dense bf16 torch forward of the same (dequantized) weights built
by edgetune itself vs llama.cpp (llama-cpp-python) evaluating the same 16 sequences one by one.
All three compute logits for the last position of each sequence only.  Prints tokens/s for each;
the last line is `forward: vs_torch_bf16=R1 vs_llamacpp=R2` (ratios of edgetune's tokens/s).
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import edgetune  # noqa: E402
from edgetune import assets  # noqa: E402


def best_time(fn, repeats):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    path = assets.default_model_path()
    model = edgetune.load(path)
    rng = np.random.default_rng(0)
    batch = [list(rng.integers(100, model.config.n_vocab - 100, a.seq)) for _ in range(a.batch)]
    ntok = a.batch * a.seq
    # torch keeps its default thread count (all cores)

    t_et = best_time(lambda: model.logits(batch, positions=[-1]), a.repeats)
    tps_et = ntok / t_et
    print(f"edgetune int4     : {tps_et:8.1f} tok/s  ({t_et * 1e3:.1f} ms per batch)")

    dense = edgetune.load(path)
    dense.net.to_dense(torch.bfloat16)
    t_bf = best_time(lambda: dense.logits(batch, positions=[-1]), a.repeats)
    tps_bf = ntok / t_bf
    print(f"torch bf16 dense  : {tps_bf:8.1f} tok/s  ({t_bf * 1e3:.1f} ms per batch)")
    lg_et = model.logits(batch[:2], positions=[-1])
    lg_bf = dense.logits(batch[:2], positions=[-1])
    cos = float((lg_et * lg_bf).sum() / np.linalg.norm(lg_et) / np.linalg.norm(lg_bf))
    print(f"  (edgetune vs bf16 logits cosine {cos:.5f})")
    del dense

    import llama_cpp
    ll = llama_cpp.Llama(path, n_ctx=a.seq + 8, n_batch=a.seq, verbose=False,
                         n_threads=os.cpu_count() or 2)

    def run_ll():
        for seq in batch:
            ll.reset()
            ll.eval([int(t) for t in seq])
    t_ll = best_time(run_ll, max(1, a.repeats // 2))
    tps_ll = ntok / t_ll
    print(f"llama.cpp         : {tps_ll:8.1f} tok/s  ({t_ll * 1e3:.1f} ms per batch)")
    print(f"forward: vs_torch_bf16={tps_et / tps_bf:.2f} vs_llamacpp={tps_et / tps_ll:.2f}")


if __name__ == "__main__":
    main()
