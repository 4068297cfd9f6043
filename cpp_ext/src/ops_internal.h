// ops_internal.h — what ops.cpp shares with its AVX-512 twin ops_avx512.cpp: the attention task's
// arguments and the SIMD entry points.  The AVX-512 functions compute every output element with
// the same operations in the same order as ops.cpp's portable loops (products and sums rounded
// separately: the library is built with -ffp-contract=off), so both paths are bit-identical.
#pragma once

#include <cstdint>
#include <cstring>

namespace edgetune {

struct AttnArgs {
    const float *q, *k, *v;
    int64_t ldq, ldk, ldv, B, T, H, Hkv, hd;
    const float *cos, *sin;
    int64_t rd;
    bool neox;
    float scale;
    float* out;
    int64_t window = 0;  // > 0: query t sees keys max(0, t - window + 1) .. t (sliding window)
};

// the scalar exp and RoPE row that ops.cpp's loops and block.cpp's GELU use (one definition)
// exp(x) for float (Cephes expf: range reduction by ln 2, degree-6 polynomial; ~1 ulp), written
// branch-free so loops over it vectorize.
inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float t = x * 1.44269504088896341f;
    const float fi = (t + 12582912.0f) - 12582912.0f;  // round to nearest integer
    float r = x - fi * 0.693359375f;
    r = r - fi * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const int32_t e = static_cast<int32_t>(fi) + 127;
    const uint32_t bits = static_cast<uint32_t>(e) << 23;
    float sc;
    std::memcpy(&sc, &bits, 4);
    return p * sc;
}

inline void rope_row(const float* src, float* dst, const float* c, const float* s, int64_t hd, int64_t rd,
                     bool neox) {
    const int64_t h2 = rd / 2;
    if (neox) {
        for (int64_t i = 0; i < h2; ++i) {
            const float x1 = src[i], x2 = src[i + h2];
            dst[i] = x1 * c[i] - x2 * s[i];
            dst[i + h2] = x1 * s[i] + x2 * c[i];
        }
    } else {
        for (int64_t i = 0; i < h2; ++i) {
            const float x1 = src[2 * i], x2 = src[2 * i + 1];
            dst[2 * i] = x1 * c[i] - x2 * s[i];
            dst[2 * i + 1] = x1 * s[i] + x2 * c[i];
        }
    }
    for (int64_t i = rd; i < hd; ++i) dst[i] = src[i];
}


bool cpu_has_avx512f();
// attention for head_dim multiple of 16 up to 128 only (attention_avx512_ok)
bool attention_avx512_ok(const AttnArgs& a);
void attention_task_avx512(const AttnArgs& a, int64_t b, int64_t j);
void silu_rows_avx512(const float* g, const float* u, int64_t m0, int64_t m1, int64_t F, int64_t ld, float* out);
void rms_rows_avx512(const float* x, int64_t m0, int64_t m1, int64_t D, int64_t ldx, const float* w, float eps,
                     float* out);
void add_rms_rows_avx512(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m0, int64_t m1, int64_t D,
                         const float* w, float eps, float* sum, float* out);

}  // namespace edgetune
