"""The Java API (android/edgetune/src/main/java/org/edgetune) on the host JVM: libedgetune +
libedgetune_jni built for x86-64 with CMake, the API and tests/java/org/edgetune/CapiJniTest.java
compiled with javac (Debian's OpenJDK 17) and run with java on the real SmolLM2 GGUF — open,
tokenize, 3 logged steps with finite losses, predict, save, resume, cancel (listener and another
thread), errors as EdgeTuneException carrying edgetune's message (missing file, impossible
budget, existing log, unsupported method, bad batch), a stub Engine.  Python then replays the log
the JVM wrote into the state it saved.  The Android sample app is type-checked against
tests/android_stubs (the Gradle/Android SDK build cannot run here)."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time

import numpy as np
import pytest

import capi_util as U


def tools():
    javac = os.path.join(U.JAVA_HOME, "bin", "javac") if U.JAVA_HOME else ""
    java = os.path.join(U.JAVA_HOME, "bin", "java") if U.JAVA_HOME else ""
    if not (os.path.exists(javac) and os.path.exists(java)):
        javac, java = shutil.which("javac"), shutil.which("java")
    if not javac or not java:
        pytest.skip("no JDK (javac/java) found; Debian: apt-get install openjdk-17-jdk-headless")
    return javac, java


def sources(*roots):
    return sorted(f for r in roots for f in glob.glob(str(U.ROOT / r / "**" / "*.java"), recursive=True))


def test_java_api_on_the_host_jvm(smollm2_path, smollm2, tmp_path):
    javac, java = tools()
    build = U.host_build()
    assert (build / "libedgetune_jni.so").exists(), "CMake did not find JNI (set JAVA_HOME)"
    classes = tmp_path / "classes"
    r = subprocess.run([javac, "-Xlint:all", "-Werror", "-d", str(classes),
                        *sources("android/edgetune/src/main/java", "tests/java")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    enc = U.encoded(smollm2)
    tsv = tmp_path / "tweets.tsv"
    recs = [r_ for r_ in enc.dataset.records[:200] if "\t" not in r_.text and "\n" not in r_.text][:16]
    tsv.write_text("".join(f"{r_.label}\t{r_.text}\n" for r_ in recs), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    t0 = time.perf_counter()
    r = subprocess.run([java, f"-Djava.library.path={build}", "-cp", str(classes),
                        "org.edgetune.CapiJniTest", smollm2_path, str(tsv), str(out)],
                       capture_output=True, text=True, timeout=600)
    print(r.stdout + r.stderr, f"(java ran {time.perf_counter() - t0:.1f} s)")
    assert r.returncode == 0 and "JNI test PASSED" in r.stdout, r.stdout + r.stderr
    # the log the JVM wrote is edgetune's: Python replays it into the saved state
    _, records, ts, nxt = U.replay_log(smollm2_path, out / "seedlog.jsonl", enc.label_tokens)
    assert nxt == 3 and [x["step"] for x in records] == [0, 1, 2]
    assert all(np.isfinite(x["loss"]) for x in records)
    saved, step = U.load_npz_state(out / "state.npz")
    assert step == 3
    for k, v in ts.state().items():
        assert np.array_equal(saved[k], v), k


def test_sample_app_type_checks_against_android_stubs(tmp_path):
    javac, _ = tools()
    r = subprocess.run([javac, "-Xlint:all", "-Werror", "-d", str(tmp_path),
                        *sources("android/edgetune/src/main/java", "android/sample/src/main/java",
                                 "tests/android_stubs")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "org" / "edgetune" / "sample" / "MainActivity.class").exists()
