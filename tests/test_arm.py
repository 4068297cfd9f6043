"""The NEON kernel path, cross-compiled for aarch64 and run under qemu (cpp_ext/tests/run_arm.sh)."""
import pathlib
import subprocess

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "cpp_ext" / "tests" / "run_arm.sh"


def test_arm_neon_under_qemu():
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    for line in out.splitlines():
        if line.startswith("SKIP:"):
            pytest.skip(line[len("SKIP:"):].strip())
    assert r.returncode == 0, out[-4000:]
    assert "path neon" in out and "ARM NEON tests PASSED" in out, out[-4000:]
