// ops_internal.h — what ops.cpp shares with its AVX-512 twin ops_avx512.cpp: the attention task's
// arguments and the SIMD entry points.  The AVX-512 functions compute every output element with
// the same operations in the same order as ops.cpp's portable loops (products and sums rounded
// separately: the library is built with -ffp-contract=off), so both paths are bit-identical.
#pragma once

#include <cstdint>

namespace edgetune {

struct AttnArgs {
    const float *q, *k, *v;
    int64_t ldq, ldk, ldv, B, T, H, Hkv, hd;
    const float *cos, *sin;
    int64_t rd;
    bool neox;
    float scale;
    float* out;
};

bool cpu_has_avx512f();
// attention for head_dim multiple of 16 up to 128 only (attention_avx512_ok)
bool attention_avx512_ok(const AttnArgs& a);
void attention_task_avx512(const AttnArgs& a, int64_t b, int64_t j);
void silu_rows_avx512(const float* g, const float* u, int64_t m0, int64_t m1, int64_t F, int64_t ld, float* out);
void rms_rows_avx512(const float* x, int64_t m0, int64_t m1, int64_t D, int64_t ldx, const float* w, float eps,
                     float* out);

}  // namespace edgetune
