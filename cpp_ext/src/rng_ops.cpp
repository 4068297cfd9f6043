// rng_ops.cpp — multi-threaded fill/axpy over the perturbation stream (see rng_ops.h).  The
// scalar loops define the results; on CPUs with AVX-512F/DQ the bulk of each chunk runs as
// rng_ops_avx512.cpp's bit-identical 8-lane version (off with ops_set_simd(false), see ops.h).
#include "edgetune/rng_ops.h"

#include <algorithm>

#include "edgetune/ops.h"
#include "edgetune/rng.h"
#include "edgetune/thread_pool.h"
#include "rng_ops_internal.h"

namespace edgetune {
namespace {
constexpr int64_t CHUNK = 1 << 16;  // elements per task: big enough to amortize dispatch

#if defined(EDGETUNE_HAVE_AVX512)
bool use_simd() {
    static const bool has = cpu_has_avx512dq();
    return has && ops_simd();
}
#endif
}

void rng_axpy(float* out, int64_t n, float alpha, uint64_t seed, uint64_t tensor_id, int dist,
              uint64_t offset) {
    const uint64_t key = rng::stream_key(seed, tensor_id);
#if defined(EDGETUNE_HAVE_AVX512)
    const bool simd = use_simd();
#endif
    auto task = [&](int64_t t) {
        const int64_t i1 = std::min(n, (t + 1) * CHUNK);
        int64_t i0 = t * CHUNK;
#if defined(EDGETUNE_HAVE_AVX512)
        if (simd) i0 += rng_axpy_avx512(out + i0, i1 - i0, alpha, key, dist, offset + static_cast<uint64_t>(i0));
#endif
        for (int64_t i = i0; i < i1; ++i) {
            const float d = alpha * rng::sample(key, offset + static_cast<uint64_t>(i), dist);
            out[i] = out[i] + d;
        }
    };
    parallel_for((n + CHUNK - 1) / CHUNK, task);
}

void rng_add_scaled(float* out, const float* s, int64_t n, float alpha, uint64_t key, int dist, uint64_t first) {
    int64_t i = 0;
#if defined(EDGETUNE_HAVE_AVX512)
    if (use_simd()) i = rng_add_scaled_avx512(out, s, n, alpha, key, dist, first);
#endif
    for (; i < n; ++i) {
        const float t = alpha * rng::sample(key, first + static_cast<uint64_t>(i), dist);
        out[i] = s[i] + t;
    }
}

void rng_fill(float* out, int64_t n, uint64_t seed, uint64_t tensor_id, int dist, uint64_t offset) {
    const uint64_t key = rng::stream_key(seed, tensor_id);
#if defined(EDGETUNE_HAVE_AVX512)
    const bool simd = use_simd();
#endif
    auto task = [&](int64_t t) {
        const int64_t i1 = std::min(n, (t + 1) * CHUNK);
        int64_t i0 = t * CHUNK;
#if defined(EDGETUNE_HAVE_AVX512)
        if (simd) i0 += rng_fill_avx512(out + i0, i1 - i0, key, dist, offset + static_cast<uint64_t>(i0));
#endif
        for (int64_t i = i0; i < i1; ++i) out[i] = rng::sample(key, offset + static_cast<uint64_t>(i), dist);
    };
    parallel_for((n + CHUNK - 1) / CHUNK, task);
}

}  // namespace edgetune
