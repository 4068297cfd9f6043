"""The C API on arm64 for real: cpp_ext cross-compiled with aarch64-linux-gnu-g++ (NEON dotprod
kernels, a static capi_driver) and run under qemu-aarch64-static on the embedded SmolLM2 GGUF.

  * logits at every position of two tweet prompts vs the Python engine on x86: cosine >= 0.999
    per position, top-1 agreement >= 0.95 (different kernels: NEON vs AVX-512 round differently);
  * a 5-step ZO run (scales and LoRA of the top 2 blocks, q=2, normalized) writes a seed log whose seeds
    and lr equal the Python run's exactly; each step's losses agree within 1e-3 and its projected
    gradients within the bound those loss differences allow (U.compare_records: for the
    normalized estimator |dg| <= 2 d (1 + |g|) / s, s the spread of the step's losses), Python
    estimating each step from the state the ARM log reached before it;
  * Python replays that log into exactly the state the ARM trainer saved (the update is plain
    IEEE arithmetic on regenerated z: bit-identical across ISAs).

qemu is slow (~0.3 GMAC/s here): 16-token prompts, batch 2, one run.  Skips with the reason when the cross compiler or
qemu is missing and apt-get cannot install them (as tests/test_arm.py does)."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import numpy as np
import pytest

import capi_util as U

STEPS, BATCH, Q, LR, LIMIT, SEED = 5, 2, 2, 0.01, 64, 3
MAXLEN = 16          # prompts cut to their last 16 tokens (both engines): qemu runs ~0.2-0.4 GMAC/s here


def arm_tools():
    have = lambda: all(shutil.which(t) for t in ("aarch64-linux-gnu-g++", "aarch64-linux-gnu-gcc",
                                                   "qemu-aarch64-static"))
    if not have() and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run("(apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                       "--no-install-recommends g++-aarch64-linux-gnu qemu-user-static", shell=True,
                       capture_output=True, timeout=900)
    if not have():
        pytest.skip("aarch64-linux-gnu-g++/gcc or qemu-aarch64-static not found and could not be installed")
    if not shutil.which("cmake"):
        pytest.skip("cmake not found")


def qemu(build, *args, timeout=900):
    t0 = time.perf_counter()
    r = subprocess.run(["qemu-aarch64-static", str(build / "capi_driver"), *map(str, args)],
                       capture_output=True, text=True, timeout=timeout)
    return r, time.perf_counter() - t0


def test_capi_on_arm64_under_qemu(smollm2_path, smollm2, tmp_path):
    arm_tools()
    t_start = time.perf_counter()
    build = U.cmake_build(U.ROOT / "build" / "capi-arm",
                          f"-DCMAKE_TOOLCHAIN_FILE={U.CPP_EXT / 'cmake' / 'aarch64-linux-gnu.cmake'}")
    t_build = time.perf_counter() - t_start
    info = subprocess.run(["file", str(build / "capi_driver")], capture_output=True, text=True).stdout
    assert "aarch64" in info or "ARM" in info, info
    enc = U.encoded(smollm2, MAXLEN)

    # logits vs the Python engine
    seqs = [list(e.input_ids)[:12] for e in enc.examples("dev", 2)]
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("".join(" ".join(map(str, s)) + "\n" for s in seqs))
    r, t_logits = qemu(build, "logits", smollm2_path, ids_file, tmp_path / "lg.bin")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "kernels neon" in r.stdout, r.stdout        # the NEON dotprod path, not the scalar one
    got = np.fromfile(tmp_path / "lg.bin", np.float32)
    o, cos, agree = 0, [], []
    for s in seqs:
        a = got[o:o + len(s) * 49152].reshape(len(s), -1)
        o += len(s) * 49152
        ref = np.asarray(smollm2.logits([s], positions=list(range(len(s)))))[0]
        cos += list((a * ref).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(ref, axis=-1))
        agree += list(a.argmax(-1) == ref.argmax(-1))
    assert o == got.size
    print(f"arm64 logits: {len(cos)} positions, min cosine {min(cos):.6f}, top-1 agreement "
          f"{100 * np.mean(agree):.1f}% ({t_logits:.1f} s under qemu)")
    assert min(cos) >= 0.999 and np.mean(agree) >= 0.95

    # a 5-step run, compared with Python and replayed by it
    bf, log, state = tmp_path / "batches.txt", tmp_path / "seedlog.jsonl", tmp_path / "state.npz"
    U.write_batch_file(bf, enc.label_tokens, U.step_batches(enc, BATCH, SEED, LIMIT), STEPS)
    r, t_train = qemu(build, "train", smollm2_path, bf, log, state, "method=scales,lora", "layers=top:2",
                      f"q={Q}", f"lr={LR}", "eps=0.001", "estimator=normalized", f"seed={SEED}",
                      f"steps={STEPS}")
    assert r.returncode == 0, r.stdout + r.stderr
    print(r.stdout.strip())
    from edgetune.zo.seedlog import read_log
    header, c_recs, _ = read_log(log)
    assert header is not None and len(c_recs) == STEPS
    py_recs, ts, _ = U.python_run(smollm2_path, lambda m: U.encoded(m, MAXLEN), method="scales,lora", layers="top:2", steps=STEPS,
                                  batch=BATCH, q=Q, lr=LR, eps=1e-3, estimator="normalized", seed=SEED,
                                  limit=LIMIT, follow=c_recs)
    import json
    assert header["trainable"] == json.loads(json.dumps(ts.describe()))
    d, ratio = U.compare_records(c_recs, py_recs, loss_atol=1e-3, eps=1e-3)
    print(f"arm64 vs Python, 5 steps: seeds identical; worst loss difference {d:.3g}; worst |dg| at "
          f"{100 * ratio:.0f}% of its bound ({t_train:.1f} s under qemu)")
    _, _, ts2, nxt = U.replay_log(smollm2_path, log, enc.label_tokens)
    saved, step = U.load_npz_state(state)
    assert nxt == STEPS and step == STEPS
    for k, v in ts2.state().items():
        assert np.array_equal(saved[k], v), k
    print(f"arm64 C API test: build {t_build:.1f} s, qemu {t_logits + t_train:.1f} s, "
          f"total {time.perf_counter() - t_start:.1f} s")
