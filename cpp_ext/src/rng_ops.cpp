// rng_ops.cpp — multi-threaded fill/axpy over the perturbation stream (see rng_ops.h).
#include "edgetune/rng_ops.h"

#include <algorithm>

#include "edgetune/rng.h"
#include "edgetune/thread_pool.h"

namespace edgetune {
namespace {
constexpr int64_t CHUNK = 1 << 16;  // elements per task: big enough to amortize dispatch
}

void rng_axpy(float* out, int64_t n, float alpha, uint64_t seed, uint64_t tensor_id, int dist,
              uint64_t offset) {
    const uint64_t key = rng::stream_key(seed, tensor_id);
    auto task = [&](int64_t t) {
        const int64_t i1 = std::min(n, (t + 1) * CHUNK);
        for (int64_t i = t * CHUNK; i < i1; ++i) {
            const float d = alpha * rng::sample(key, offset + static_cast<uint64_t>(i), dist);
            out[i] = out[i] + d;
        }
    };
    parallel_for((n + CHUNK - 1) / CHUNK, task);
}

void rng_fill(float* out, int64_t n, uint64_t seed, uint64_t tensor_id, int dist, uint64_t offset) {
    const uint64_t key = rng::stream_key(seed, tensor_id);
    auto task = [&](int64_t t) {
        const int64_t i1 = std::min(n, (t + 1) * CHUNK);
        for (int64_t i = t * CHUNK; i < i1; ++i) out[i] = rng::sample(key, offset + static_cast<uint64_t>(i), dist);
    };
    parallel_for((n + CHUNK - 1) / CHUNK, task);
}

}  // namespace edgetune
