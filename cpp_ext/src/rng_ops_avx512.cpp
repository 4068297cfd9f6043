// rng_ops_avx512.cpp — rng_ops.cpp's loops on 8 lanes of 64-bit counters (built with
// -mavx512f -mavx512dq: vpmullq does splitmix64's multiplies).  Integer hashing is exact, and
// each float is produced by the operations of rng.h in the same order, so the results are
// bit-identical to the scalar loops.
#include <immintrin.h>

#include "edgetune/rng.h"
#include "rng_ops_internal.h"

namespace edgetune {

bool cpu_has_avx512dq() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
}

namespace {

inline __m512i mix8(__m512i x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi64(x, 30));
    x = _mm512_mullo_epi64(x, _mm512_set1_epi64(static_cast<long long>(0xBF58476D1CE4E5B9ull)));
    x = _mm512_xor_si512(x, _mm512_srli_epi64(x, 27));
    x = _mm512_mullo_epi64(x, _mm512_set1_epi64(static_cast<long long>(0x94D049BB133111EBull)));
    return _mm512_xor_si512(x, _mm512_srli_epi64(x, 31));
}

// z for 8 consecutive counters whose pre-mix values are c (= key + (index + 1) * GOLDEN)
inline __m256 sample8(__m512i c, int dist) {
    const __m512i b = mix8(c);
    if (dist == rng::GAUSSIAN) {
        const __m512i m16 = _mm512_set1_epi64(0xFFFF);
        __m512i s = _mm512_and_si512(b, m16);
        s = _mm512_add_epi64(s, _mm512_and_si512(_mm512_srli_epi64(b, 16), m16));
        s = _mm512_add_epi64(s, _mm512_and_si512(_mm512_srli_epi64(b, 32), m16));
        s = _mm512_add_epi64(s, _mm512_srli_epi64(b, 48));
        const __m256i s32 = _mm256_sub_epi32(_mm512_cvtepi64_epi32(s), _mm256_set1_epi32(131070));
        return _mm256_mul_ps(_mm256_cvtepi32_ps(s32), _mm256_set1_ps(rng::GAUSS_C));  // exact convert, one rounding
    }
    // the top 32 bits, narrowed: their sign bit is bit 63
    const __m256i hi = _mm512_cvtepi64_epi32(_mm512_srli_epi64(b, 32));
    const __m256i f = _mm256_or_si256(_mm256_and_si256(hi, _mm256_set1_epi32(static_cast<int>(0x80000000u))),
                                      _mm256_set1_epi32(0x3F800000));
    return _mm256_castsi256_ps(f);
}

}  // namespace

int64_t rng_axpy_avx512(float* out, int64_t n, float alpha, uint64_t key, int dist, uint64_t first) {
    const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    // counters first + lane + 1, times GOLDEN, plus key (all mod 2^64, as rng::bits)
    __m512i c = _mm512_add_epi64(
        _mm512_set1_epi64(static_cast<long long>(key)),
        _mm512_mullo_epi64(_mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(first + 1)), lane),
                           _mm512_set1_epi64(static_cast<long long>(rng::GOLDEN))));
    const __m512i step = _mm512_set1_epi64(static_cast<long long>(8 * rng::GOLDEN));
    const __m256 a = _mm256_set1_ps(alpha);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 z = sample8(c, dist);
        c = _mm512_add_epi64(c, step);
        _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(out + i), _mm256_mul_ps(a, z)));
    }
    return i;
}

int64_t rng_add_scaled_avx512(float* out, const float* s, int64_t n, float alpha, uint64_t key, int dist,
                              uint64_t first) {
    const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    __m512i c = _mm512_add_epi64(
        _mm512_set1_epi64(static_cast<long long>(key)),
        _mm512_mullo_epi64(_mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(first + 1)), lane),
                           _mm512_set1_epi64(static_cast<long long>(rng::GOLDEN))));
    const __m512i step = _mm512_set1_epi64(static_cast<long long>(8 * rng::GOLDEN));
    const __m256 a = _mm256_set1_ps(alpha);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 z = sample8(c, dist);
        c = _mm512_add_epi64(c, step);
        _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(s + i), _mm256_mul_ps(a, z)));
    }
    return i;
}

int64_t rng_fill_avx512(float* out, int64_t n, uint64_t key, int dist, uint64_t first) {
    const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    __m512i c = _mm512_add_epi64(
        _mm512_set1_epi64(static_cast<long long>(key)),
        _mm512_mullo_epi64(_mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(first + 1)), lane),
                           _mm512_set1_epi64(static_cast<long long>(rng::GOLDEN))));
    const __m512i step = _mm512_set1_epi64(static_cast<long long>(8 * rng::GOLDEN));
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(out + i, sample8(c, dist));
        c = _mm512_add_epi64(c, step);
    }
    return i;
}

}  // namespace edgetune
