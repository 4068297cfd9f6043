#!/usr/bin/env bash
# run_arm.sh — cross-compile edgetune_core + its C++ tests for aarch64 (NEON + dotprod, static)
# and run them under qemu-aarch64-static: the NEON path against the scalar reference, the RNG
# against values produced by edgetune/zo/rng.py.  Prints "SKIP: <reason>" and exits 0 only when
# the cross compiler or qemu is missing and cannot be installed.
set -euo pipefail
CPP_EXT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${EDGETUNE_ARM_BUILD:-$CPP_EXT/../build/arm}"

have_tools() { command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64-static >/dev/null; }

if ! have_tools; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "installing g++-aarch64-linux-gnu qemu-user-static ..."
        (apt-get update -qq || true) >/dev/null 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            g++-aarch64-linux-gnu qemu-user-static >/dev/null 2>&1 || true
    fi
    if ! have_tools; then
        echo "SKIP: aarch64-linux-gnu-g++ or qemu-aarch64-static not found and could not be installed"
        exit 0
    fi
fi
if ! command -v cmake >/dev/null; then
    echo "SKIP: cmake not found"
    exit 0
fi

cmake -S "$CPP_EXT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_TOOLCHAIN_FILE="$CPP_EXT/cmake/aarch64-linux-gnu.cmake" \
    -DEDGETUNE_PYTHON=OFF -DEDGETUNE_TESTS=ON >/dev/null
cmake --build "$BUILD" -j"$(nproc)"
file "$BUILD/test_core" 2>/dev/null || true
rc=0
log="$(ctest --test-dir "$BUILD" --output-on-failure -V 2>&1)" || rc=$?
printf '%s\n' "$log" | grep -E "path |PASSED|FAIL|Passed|Failed" || printf '%s\n' "$log"
if [ "$rc" != 0 ]; then echo "ARM NEON tests FAILED"; exit "$rc"; fi
if ! printf '%s\n' "$log" | grep -q "path neon"; then
    echo "ARM NEON tests FAILED: the NEON path was not exercised (no dotprod under qemu?)"
    exit 1
fi
echo "ARM NEON tests PASSED"
