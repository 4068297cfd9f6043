"""benchmarks/amx_floor.py and benchmarks/torch_matmul.py keep their contracts: the last line, the
n/a path on a CPU without AMX, and the oneDNN ISA cap that the "torch bf16 without AMX" baselines
of qgemm.py and forward.py rely on (it must really change the kernel torch runs)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)
import torch_matmul  # noqa: E402

CONTRACT = re.compile(r"^amx_floor: ceiling_vs_torch_bf16=(n/a|[0-9]+\.[0-9]+)$")


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


HAS_AMX = {"amx_tile", "amx_int8", "amx_bf16"} <= cpu_flags()


def run_floor(*args) -> list:
    r = subprocess.run([sys.executable, os.path.join(BENCH, "amx_floor.py"), "--quick", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()


def test_amx_floor_last_line():
    lines = run_floor()
    m = CONTRACT.match(lines[-1])
    assert m, lines[-1]
    if not HAS_AMX:   # a CPU without AMX: the script says so instead of measuring
        assert m.group(1) == "n/a"
        return
    if m.group(1) == "n/a":   # AMX in the CPU flags, but a kernel that refuses the tile state
        assert "the OS refuses AMX tile state" in lines[0], lines
        return
    x = float(m.group(1))
    assert x > 0
    figures = {}
    for line in lines:
        c = re.match(r"^(\([abc]\)) .*?:\s+([0-9.]+) cycles", line)
        if c:
            figures[c.group(1)] = float(c.group(2))
    assert set(figures) == {"(a)", "(b)", "(c)"}, lines
    # no tile unit does a 16x16 tile K-step (8-16 k multiply-adds) per cycle: a figure under one
    # cycle would mean the compiler dropped the kernel
    assert all(v > 1 for v in figures.values()), figures
    # (b) does twice the work of (a) per store, so it cannot cost less than (a)'s instructions
    assert figures["(b)"] > figures["(a)"] * 0.5


def test_amx_floor_without_amx_says_na(tmp_path):
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Some CPU without AMX\n"
                    "flags\t\t: fpu sse sse2 avx avx2 avx512f avx512_bf16\n")
    lines = run_floor("--cpuinfo", str(fake))
    assert lines[-1] == "amx_floor: ceiling_vs_torch_bf16=n/a"
    assert "lacks amx_tile amx_int8 amx_bf16" in lines[0]


@pytest.mark.skipif(not HAS_AMX, reason="the ISA cap matters only on a CPU with AMX")
def test_no_amx_env_changes_torch_kernel():
    amx = torch_matmul.run(64, 256, 256, 1, "bf16", 1)
    no_amx = torch_matmul.run(64, 256, 256, 1, "bf16", 1, env=torch_matmul.NO_AMX_ENV)
    assert "amx" in amx["onednn_impl"], amx
    assert "amx" not in no_amx["onednn_impl"] and "avx512" in no_amx["onednn_impl"], no_amx
    assert no_amx["onednn_max_cpu_isa"] == "AVX512_CORE_BF16"
    assert amx["gflops"] > 0 and no_amx["gflops"] > 0


def test_baseline_serve_protocol():
    """baseline_forward.serve (forward.py's turn-taking): one warm-up, 'ready', then per request the
    best of N calls, 'done' ends with the best overall; a bad request is a clear error."""
    import io
    import json

    import baseline_forward
    calls = []
    out = io.StringIO()
    best = baseline_forward.serve(lambda: calls.append(1), io.StringIO("time 3\ntime 1\ndone\n"), out)
    lines = [json.loads(s) for s in out.getvalue().splitlines()]
    assert lines[0] == {"ready": True} and len(calls) == 1 + 3 + 1
    assert len(lines) == 3 and all(v["seconds"] >= 0 for v in lines[1:])
    assert best == min(v["seconds"] for v in lines[1:])
    with pytest.raises(SystemExit, match="bad request 'time x'"):
        baseline_forward.serve(lambda: None, io.StringIO("time x\n"), io.StringIO())
