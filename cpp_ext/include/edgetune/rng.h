// rng.h — the counter-based perturbation RNG z = f(seed, tensor_id, index); bit-identical twin of
// edgetune/zo/rng.py (see its docstring for the definition).  Header-only and always inlined so
// that translation units compiled with different -m flags never share an out-of-line copy.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) || defined(__clang__)
#define EDGETUNE_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define EDGETUNE_ALWAYS_INLINE inline
#endif

namespace edgetune {
namespace rng {

constexpr uint64_t GOLDEN = 0x9E3779B97F4A7C15ull;
// 1 / sqrt(4 * (65536^2 - 1) / 12) in float64 (the Irwin-Hall sum of four uniform 16-bit fields has
// variance 4*(65536^2-1)/12), rounded to float32 exactly as rng.py does.
constexpr float GAUSS_C = static_cast<float>(2.6428997921303014e-05);

enum Dist : int { RADEMACHER = 0, GAUSSIAN = 1 };

// splitmix64 finalizer
EDGETUNE_ALWAYS_INLINE uint64_t mix(uint64_t x) {
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// per-(seed, tensor) key
EDGETUNE_ALWAYS_INLINE uint64_t stream_key(uint64_t seed, uint64_t tensor_id) {
    return mix(seed ^ mix(tensor_id + GOLDEN));
}

// 64 random bits for element `index` of the stream
EDGETUNE_ALWAYS_INLINE uint64_t bits(uint64_t key, uint64_t index) {
    return mix(key + (index + 1) * GOLDEN);
}

// +-1.0f from the top bit, built as float bits: branch-free (a branch on a random bit mispredicts
// half the time, which made regenerating z 4x slower than the Gaussian)
EDGETUNE_ALWAYS_INLINE float rademacher(uint64_t b) {
    const uint32_t u = 0x3F800000u | (static_cast<uint32_t>(b >> 63) << 31);
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

EDGETUNE_ALWAYS_INLINE float gaussian(uint64_t b) {
    const int64_t s = static_cast<int64_t>((b & 0xFFFF) + ((b >> 16) & 0xFFFF) +
                                           ((b >> 32) & 0xFFFF) + (b >> 48));
    // the integer sum is exact in float32 (< 2^18), so one rounding: the product
    return static_cast<float>(s - 131070) * GAUSS_C;
}

EDGETUNE_ALWAYS_INLINE float sample(uint64_t key, uint64_t index, int dist) {
    const uint64_t b = bits(key, index);
    return dist == GAUSSIAN ? gaussian(b) : rademacher(b);
}

// z for elements offset..offset+n-1 of tensor `tensor_id` under step seed `seed`
EDGETUNE_ALWAYS_INLINE void perturbation(uint64_t seed, uint64_t tensor_id, int64_t n, int dist, uint64_t offset,
                         float* out) {
    const uint64_t key = stream_key(seed, tensor_id);
    for (int64_t i = 0; i < n; ++i) out[i] = sample(key, offset + static_cast<uint64_t>(i), dist);
}

}  // namespace rng
}  // namespace edgetune
