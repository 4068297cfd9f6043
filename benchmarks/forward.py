"""End-to-end forward throughput on SmolLM2-135M, batch 16 x 32 tokens, three runtimes, one run.

    python benchmarks/forward.py [--threads N] [--batch 16] [--seq 32] [--repeats 5] [--rounds 3]

edgetune int4 (own kernels, this process) vs a dense bf16 torch llama forward of the same
dequantized weights vs llama.cpp (llama-cpp-python) on the same GGUF.  Every engine runs with the
same explicit thread count (--threads, default all cores) and the same best-of-N (--repeats after
one warm-up) in each of --rounds rounds that run every engine in turn, keeping each engine's best
round (on a shared machine a neighbour's burst slows whichever engine runs then; measured here:
torch's 16x32 batch took 209, 368 and 328 ms in three back-to-back runs); all compute logits for the last position of each sequence only.  The two baselines
run in their own processes (benchmarks/baseline_forward.py): torch with its default OpenMP settings
(not the OMP_WAIT_POLICY=PASSIVE that edgetune sets for itself), llama.cpp with all sequences in
one llama_batch (distinct seq_ids, n_batch = n_ubatch >= 512).  Informative, not in the contract
line: the same torch baseline once more with oneDNN capped at AVX-512 BF16 (torch_matmul.NO_AMX_ENV:
torch bf16 as on a CPU without AMX).  Prints tokens/s for each; the last line is
`forward: vs_torch_bf16=R1 vs_llamacpp=R2` (ratios of edgetune's tokens/s; R1 against torch's
default, with AMX where the CPU has it).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

# the user's own setting (if any), before edgetune's import chooses PASSIVE for this process
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import edgetune  # noqa: E402
from edgetune import assets, kernels  # noqa: E402
from baseline_forward import batch_tokens, best_time  # noqa: E402
from torch_matmul import NO_AMX_ENV, NO_AMX_LABEL  # noqa: E402


def run_baseline(engine: str, a, path: str, logits_file: str, extra_env=None) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if USER_OMP_WAIT_POLICY is not None:
        env["OMP_WAIT_POLICY"] = USER_OMP_WAIT_POLICY
    env.update(extra_env or {})
    cmd = [sys.executable, os.path.join(HERE, "baseline_forward.py"), engine, "--model", path,
           "--threads", str(a.threads), "--batch", str(a.batch), "--seq", str(a.seq),
           "--repeats", str(a.repeats), "--save-logits", logits_file]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{engine} baseline failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of every engine in turn; each engine keeps its best round (a shared "
                         "machine slows whichever engine runs in a noisy moment)")
    a = ap.parse_args()
    if a.rounds < 1 or a.repeats < 1:
        raise SystemExit("forward.py: --rounds and --repeats must be >= 1")
    path = assets.default_model_path()
    kernels.set_num_threads(a.threads)
    model = edgetune.load(path)
    batch = batch_tokens(model.config.n_vocab, a.batch, a.seq)
    ntok = a.batch * a.seq
    print(f"# {a.batch} x {a.seq} tokens, {a.threads} threads for every engine, best of "
          f"{a.repeats} after one warm-up, {a.rounds} rounds of all engines in turn, best round kept")
    lg_et = model.logits(batch[:2], positions=[-1])[:, 0]
    engines = (("torch", "torch", "torch bf16 dense  ", None),
               ("llamacpp", "llamacpp", "llama.cpp batched ", None),
               ("torch_no_amx", "torch", "torch bf16 no AMX ", NO_AMX_ENV))
    best = {}   # key -> (seconds, info)
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(a.rounds):
            t_et = best_time(lambda: model.logits(batch, positions=[-1]), a.repeats)
            best["edgetune"] = min(best.get("edgetune", (t_et, None)), (t_et, None), key=lambda v: v[0])
            line = [f"edgetune {t_et * 1e3:.1f}"]
            for key, engine, label, env in engines:
                f = os.path.join(tmp, f"{key}.npy")
                r = run_baseline(engine, a, path, f, env)
                if rnd == 0:
                    print(f"  (edgetune vs {key} last-position logits cosine "
                          f"{cosine(lg_et, np.load(f)):.5f})")
                info = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("engine", "seconds"))
                if key not in best or r["seconds"] < best[key][0]:
                    best[key] = (r["seconds"], info)
                line.append(f"{key} {r['seconds'] * 1e3:.1f}")
            print(f"# round {rnd + 1}: ms per batch: " + ", ".join(line))
    t_et = best["edgetune"][0]
    tps_et = ntok / t_et
    print(f"edgetune int4     : {tps_et:8.1f} tok/s  ({t_et * 1e3:.1f} ms per batch, "
          f"{kernels.get_num_threads()} threads)")
    tps = {}
    for key, engine, label, env in engines:
        sec, info = best[key]
        tps[key] = ntok / sec
        print(f"{label}: {tps[key]:8.1f} tok/s  ({sec * 1e3:.1f} ms per batch; {info}; own process)")
    print(f"informative: {NO_AMX_LABEL}: edgetune / it = {tps_et / tps['torch_no_amx']:.2f} "
          f"(it runs at {tps['torch_no_amx'] / tps['torch']:.2f}x torch bf16 with AMX here)")
    print(f"forward: vs_torch_bf16={tps_et / tps['torch']:.2f} "
          f"vs_llamacpp={tps_et / tps['llamacpp']:.2f}")


if __name__ == "__main__":
    main()
