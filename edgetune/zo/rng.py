"""Counter-based perturbation RNG: z = f(seed, tensor_id, index), the numpy twin of cpp_ext's rng.h.

Why counter-based: a ZO step never stores its perturbation.  Any kernel, on any thread, can
regenerate the exact z for element `index` of tensor `tensor_id` under step seed `seed`, so the
perturbed forward passes and the update all agree without writing memory.

Definition (bit-identical in C++ `edgetune::rng`, tested in tests/test_rng.py):

    mix(x)   = splitmix64 finalizer: x ^= x>>30; x *= 0xbf58476d1ce4e5b9; x ^= x>>27;
               x *= 0x94d049bb133111eb; x ^= x>>31           (all mod 2**64)
    key      = mix(seed ^ mix(tensor_id + GOLDEN))          GOLDEN = 0x9e3779b97f4a7c15
    bits(i)  = mix(key + (i + 1) * GOLDEN)
    rademacher(i) = +1.0 if bits(i) >> 63 == 0 else -1.0
    gaussian(i)   = Irwin–Hall sum of the four 16-bit fields u0..u3 of bits(i):
                    ((u0 + u1 + u2 + u3) - 131070) * C,  C = 1/sqrt(4 * (65536**2 - 1) / 12)
                    (mean 0, variance 1; exact in fp32 because the sum is an integer < 2**18).

The default distribution is Rademacher (+-1): it is the classic SPSA choice (Spall 1992), costs
one hash per element, and has no transcendental functions, so C++ and numpy agree bit for bit.
"""
from __future__ import annotations

import numpy as np

# bumped whenever the definition above changes: a seed log's header records it, and replaying a
# log made under another version would draw different z (edgetune/runlog.py refuses it)
RNG_VERSION = 1
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
GAUSS_C = np.float32(1.0 / np.sqrt(4.0 * (65536.0**2 - 1.0) / 12.0))
DISTRIBUTIONS = ("rademacher", "gaussian")


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def stream_key(seed: int, tensor_id: int) -> np.uint64:
    """The per-(seed, tensor) key; seed and tensor_id are taken mod 2**64."""
    with np.errstate(over="ignore"):
        s = np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)
        t = np.array([tensor_id & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)
        return _mix(s ^ _mix(t + GOLDEN))[0]


def bits(seed: int, tensor_id: int, index: np.ndarray) -> np.ndarray:
    """64 random bits for each element index (uint64 array, same shape as index)."""
    key = stream_key(seed, tensor_id)
    idx = np.asarray(index, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _mix(key + (idx + np.uint64(1)) * GOLDEN)


def perturbation(seed: int, tensor_id: int, n: int | tuple, dist: str = "rademacher",
                 offset: int = 0) -> np.ndarray:
    """z for elements offset..offset+size-1 of a tensor, float32, shaped like `n`."""
    shape = (n,) if isinstance(n, int) else tuple(n)
    size = int(np.prod(shape)) if shape else 1
    b = bits(seed, tensor_id, np.arange(offset, offset + size, dtype=np.uint64))
    if dist == "rademacher":
        z = np.where((b >> np.uint64(63)) == 0, np.float32(1.0), np.float32(-1.0))
    elif dist == "gaussian":
        m = np.uint64(0xFFFF)
        s = (b & m) + ((b >> np.uint64(16)) & m) + ((b >> np.uint64(32)) & m) + (b >> np.uint64(48))
        z = (s.astype(np.int64) - 131070).astype(np.float32) * GAUSS_C
    else:
        raise ValueError(f"unknown perturbation distribution {dist!r}; choose one of {DISTRIBUTIONS}")
    return z.astype(np.float32).reshape(shape)
