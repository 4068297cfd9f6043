"""End-to-end forward throughput on SmolLM2-135M, batch 16 x 32 tokens, three runtimes, one run.

    python benchmarks/forward.py [--threads N] [--batch 16] [--seq 32] [--repeats 2] [--rounds 6]

edgetune int4 (own kernels, this process) vs a dense bf16 torch llama forward of the same
dequantized weights vs llama.cpp (llama-cpp-python) on the same GGUF.  Every engine runs with the
same explicit thread count (--threads, default all cores).  The engines take turns call by call:
--rounds rounds, each giving every engine --repeats timed calls (after one warm-up each), and each
engine's best call counts.  On a shared machine a neighbour's burst slows whichever engine runs at
that moment (measured here: torch's 16x32 batch took 209, 368 and 328 ms in three back-to-back
runs of the old one-engine-after-the-other script), so taking turns gives every engine the same
quiet moments.  All compute logits for the last position of each sequence only.  The two baselines
run in their own processes (benchmarks/baseline_forward.py --serve, timed on request): torch with
its default OpenMP settings (not the OMP_WAIT_POLICY=PASSIVE that edgetune sets for itself),
llama.cpp with all sequences in one llama_batch (distinct seq_ids, n_batch = n_ubatch >= 512).
Informative, not in the contract line: the same torch baseline once more with oneDNN capped at
AVX-512 BF16 (torch_matmul.NO_AMX_ENV: torch bf16 as on a CPU without AMX).  Prints tokens/s for
each; the last line is `forward: vs_torch_bf16=R1 vs_llamacpp=R2` (ratios of edgetune's tokens/s;
R1 against torch's default, with AMX where the CPU has it).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# the user's own setting (if any), before edgetune's import chooses PASSIVE for this process
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import edgetune  # noqa: E402
from edgetune import assets, kernels  # noqa: E402
from baseline_forward import batch_tokens, time_calls  # noqa: E402
from torch_matmul import NO_AMX_ENV, NO_AMX_LABEL  # noqa: E402


class Baseline:
    """One baseline engine in its own process (baseline_forward.py --serve), timed on request so
    that the engines take turns call by call."""

    def __init__(self, engine: str, a, path: str, logits_file: str, errfile, extra_env=None):
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)
        if USER_OMP_WAIT_POLICY is not None:
            env["OMP_WAIT_POLICY"] = USER_OMP_WAIT_POLICY
        env.update(extra_env or {})
        cmd = [sys.executable, os.path.join(HERE, "baseline_forward.py"), engine, "--model", path,
               "--threads", str(a.threads), "--batch", str(a.batch), "--seq", str(a.seq),
               "--save-logits", logits_file, "--serve"]
        self.engine, self.errfile = engine, errfile
        # stderr to a file: llama.cpp logs a lot, and an unread pipe would block it
        self.p = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=errfile, text=True)
        self._reply("ready")

    def _reply(self, key):
        while True:
            line = self.p.stdout.readline()
            if not line:
                self.p.wait()
                self.errfile.seek(0)
                raise SystemExit(f"{self.engine} baseline failed (exit {self.p.returncode}):\n"
                                 f"{self.errfile.read()[-3000:]}")
            if line.startswith("{"):
                r = json.loads(line)
                if key in r:
                    return r

    def time(self, n: int) -> float:
        self.p.stdin.write(f"time {n}\n")
        self.p.stdin.flush()
        return self._reply("seconds")["seconds"]

    def finish(self) -> dict:
        self.p.stdin.write("done\n")
        self.p.stdin.close()
        r = self._reply("engine")
        self.p.wait()
        return r


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per engine per turn")
    ap.add_argument("--rounds", type=int, default=6,
                    help="turns of every engine; each engine's best call over all its turns counts")
    a = ap.parse_args()
    if a.rounds < 1 or a.repeats < 1:
        raise SystemExit("forward.py: --rounds and --repeats must be >= 1")
    path = assets.default_model_path()
    kernels.set_num_threads(a.threads)
    model = edgetune.load(path)
    batch = batch_tokens(model.config.n_vocab, a.batch, a.seq)
    ntok = a.batch * a.seq
    print(f"# {a.batch} x {a.seq} tokens, {a.threads} threads for every engine; the engines take "
          f"turns ({a.rounds} rounds of {a.repeats} timed calls each, after one warm-up), best call "
          f"of each engine kept")
    et_fn = lambda: model.logits(batch, positions=[-1])  # noqa: E731
    et_fn()
    lg_et = model.logits(batch[:2], positions=[-1])[:, 0]
    engines = (("torch", "torch", "torch bf16 dense  ", None),
               ("llamacpp", "llamacpp", "llama.cpp batched ", None),
               ("torch_no_amx", "torch", "torch bf16 no AMX ", NO_AMX_ENV))
    best = {}   # key -> (seconds, info)
    with tempfile.TemporaryDirectory() as tmp:
        servers = {}
        try:
            for key, engine, label, env in engines:
                err = open(os.path.join(tmp, f"{key}.err"), "w+")
                servers[key] = Baseline(engine, a, path, os.path.join(tmp, f"{key}.npy"), err, env)
            for rnd in range(a.rounds):
                line = []
                for key in ("edgetune",) + tuple(k for k, *_ in engines):
                    time.sleep(0.2)  # the previous engine's worker threads stop spinning
                    t = time_calls(et_fn, a.repeats) if key == "edgetune" else servers[key].time(a.repeats)
                    best[key] = min(best.get(key, (t, "")), (t, ""), key=lambda v: v[0])
                    line.append(f"{key} {t * 1e3:.1f}")
                print(f"# round {rnd + 1}: ms per batch: " + ", ".join(line))
            for key, *_ in engines:
                r = servers.pop(key).finish()
                best[key] = (best[key][0], ", ".join(f"{k} {v}" for k, v in r.items()
                                                       if k not in ("engine", "seconds")))
                print(f"  (edgetune vs {key} last-position logits cosine "
                      f"{cosine(lg_et, np.load(os.path.join(tmp, f'{key}.npy'))):.5f})")
        finally:
            for srv in servers.values():
                srv.p.kill()
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
