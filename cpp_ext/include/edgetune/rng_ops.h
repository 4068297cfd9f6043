// rng_ops.h — bulk operations on the perturbation stream z(seed, tensor_id, i) (see rng.h):
// the ZO update regenerates z instead of storing it.
#pragma once

#include <cstdint>

namespace edgetune {

// out[i] += alpha * z(seed, tensor_id, offset + i) for i in [0, n), multi-threaded.  Rounds like
// numpy's `out += np.float32(alpha) * z` (product, then sum; no fused multiply-add).
void rng_axpy(float* out, int64_t n, float alpha, uint64_t seed, uint64_t tensor_id, int dist,
              uint64_t offset = 0);

// out[i] = z(seed, tensor_id, offset + i), multi-threaded.
void rng_fill(float* out, int64_t n, uint64_t seed, uint64_t tensor_id, int dist, uint64_t offset = 0);

}  // namespace edgetune
