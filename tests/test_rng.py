"""The C++ RNG (cpp_ext rng.h via _kernels.rng_perturbation) equals edgetune.zo.rng bit for bit."""
import numpy as np
import pytest

from edgetune import kernels
from edgetune.zo import rng

pytestmark = pytest.mark.skipif(not kernels.HAVE_KERNELS, reason="edgetune._kernels not built")

SEEDS = [0, 1, 12345, 2**32 + 7, 2**63 - 1, 2**63, 2**63 + 12345, 2**64 - 1]
TENSOR_IDS = [0, 1, 7, 2**40 + 3, 2**64 - 1]
OFFSETS = [0, 1, 1000, 2**40]


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
@pytest.mark.parametrize("seed", SEEDS)
def test_cpp_rng_matches_numpy(seed, dist):
    for tid in TENSOR_IDS:
        for off in OFFSETS:
            want = rng.perturbation(seed, tid, 257, dist, off)
            got = kernels._kernels.rng_perturbation(seed, tid, 257, kernels.DISTS[dist], off)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32),
                                          err_msg=f"seed={seed} tid={tid} off={off} {dist}")


def test_rng_statistics():
    z = kernels._kernels.rng_perturbation(3, 5, 200_000, 1, 0)
    assert abs(z.mean()) < 0.01 and abs(z.var() - 1.0) < 0.01
    r = kernels._kernels.rng_perturbation(3, 5, 200_000, 0, 0)
    assert set(np.unique(r)) == {-1.0, 1.0} and abs(r.mean()) < 0.01


def test_rng_offset_is_a_window():
    full = kernels._kernels.rng_perturbation(2**63 + 9, 4, 100, 1, 0)
    part = kernels._kernels.rng_perturbation(2**63 + 9, 4, 30, 1, 50)
    np.testing.assert_array_equal(full[50:80], part)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_rng_axpy_matches_numpy(dist):
    r = np.random.default_rng(0)
    base = r.standard_normal((300, 50)).astype(np.float32)
    for seed, tid, alpha in [(1, 2, 1e-3), (2**63 + 3, 2**64 - 1, -0.37), (99, 0, 1e-7)]:
        want = base.copy()
        want += np.float32(alpha) * rng.perturbation(seed, tid, want.shape, dist)
        got = base.copy()
        assert kernels.rng_axpy(got, alpha, seed, tid, dist) is got
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    z = kernels.rng_perturbation(2**63 + 1, 5, (70_000, 3), dist, 11)  # several pool tasks
    np.testing.assert_array_equal(z, rng.perturbation(2**63 + 1, 5, (70_000, 3), dist, 11))
    with pytest.raises(ValueError):
        kernels.rng_axpy(base.astype(np.float64), 1.0, 1, 2, dist)
