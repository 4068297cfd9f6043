"""Crash safety: SIGKILL `edgetune finetune` at random points (and mid-record, mid-snapshot),
resume with --resume each time; the final state and loss curve equal an uninterrupted run's."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from edgetune.zo.seedlog import read_log
from tests.conftest import LONG
from tests.test_train import tiny  # noqa: F401  (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 300  # 20 kills x <= ~12 steps each stay well inside the run


def cmd(tiny, out, resume=False):
    model, data = tiny
    c = [sys.executable, "-m", "edgetune", "finetune", "--model", model, "--data", data,
         "--verbalizer", "a=a,b=b", "--out", str(out), "--steps", str(STEPS), "--batch", "8",
         "--lr", "1e-3", "--eps", "1e-2", "--method", "scales,norms,lora", "--eval-every", "0",
         "--eval-limit", "8", "--test-limit", "8", "--snapshot-every", "3", "--no-progress",
         "--no-zero-shot"]
    return c + (["--resume"] if resume else [])


def run(c, env=None, timeout=300):
    return subprocess.run(c, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def final_state(out):
    with np.load(os.path.join(out, "state.npz")) as z:
        return {k: z[k].copy() for k in z.files}


def records(out):
    _, recs, _ = read_log(os.path.join(out, "seedlog.jsonl"))
    return recs


def test_sigkill_anywhere_then_resume_is_bit_identical(tiny, tmp_path):
    ref = tmp_path / "ref"
    r = run(cmd(tiny, ref))
    assert r.returncode == 0, r.stderr[-2000:]
    ref_state, ref_recs = final_state(ref), records(ref)
    assert len(ref_recs) == STEPS

    out = tmp_path / "killed"
    rnd = random.Random(1234)
    kills = 0
    n_kills = 30 if LONG else 20
    # injected faults first: torn log record, snapshot temp written but not renamed
    for fault in ("log-mid-record:7", "snapshot-before-rename:2", "log-mid-record:3"):
        env = dict(os.environ, EDGETUNE_FAULT=fault)
        first = not (out / "seedlog.jsonl").exists()
        r = run(cmd(tiny, out, resume=not first), env=env)
        assert r.returncode == -signal.SIGKILL, (fault, r.returncode, r.stderr[-1000:])
        kills += 1
    while kills < n_kills:
        before = len(records(out))
        p = subprocess.Popen(cmd(tiny, out, resume=True), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        # kill after a random number (0-10) of new steps has been logged, so the progress per
        # kill does not depend on how fast this machine is; 0 = somewhere in start-up
        target = before + rnd.randint(0, 10)
        deadline = time.monotonic() + (rnd.uniform(0.2, 1.5) if target == before else 120)
        while (p.poll() is None and time.monotonic() < deadline
               and (target == before or len(records(out)) < target)):
            time.sleep(0.005)
        if p.poll() is not None:           # finished before we could kill it: start over
            p.wait()
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        after = records(out)
        assert len(after) >= before        # a kill never loses a step that was already logged
        for f in os.listdir(out):          # no file is left corrupt
            if f == "state.npz":
                final_state(out)
            if f == "config.json":
                json.loads((out / f).read_text())
    r = run(cmd(tiny, out, resume=True))
    assert r.returncode == 0, r.stderr[-2000:]
    print(f'kills: {kills}')
    assert kills >= 20
    got = final_state(out)
    assert records(out) == ref_recs       # same seeds, gradients, lrs and losses, step by step
    assert set(got) == set(ref_state)
    for k in ref_state:
        np.testing.assert_array_equal(got[k], ref_state[k], err_msg=k)
