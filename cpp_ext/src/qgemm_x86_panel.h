// qgemm_x86_panel.h — the AVX-512 pieces shared by the avx512 and amx paths: activation
// quantization and weight-panel repacking (VNNI layout).  Include only from
// translation units compiled with -mavx512f/bw/vl/dq (everything here is TU-local, see internal.h).
#pragma once

#include <immintrin.h>

#include <cstring>

#include "internal.h"

namespace edgetune {
namespace {

constexpr int PW = 32;  // panel width (weight rows): two 16-lane tiles

alignas(64) const uint8_t kZeroRow[64] = {};

// 16 rows x 16 bytes -> out[d]: lane n = bytes 4d..4d+3 of row n (a 16x4 transpose of dwords).
inline void transpose16x4(const uint8_t* const* rows, __m512i out[4]) {
    __m512i z[4];
    for (int i = 0; i < 4; ++i) {
        __m512i v = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[4 * i])));
        v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[4 * i + 1])), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[4 * i + 2])), 2);
        v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[4 * i + 3])), 3);
        z[i] = v;
    }
    // level 1: lanes l<8 hold dword d0 of rows 0..7, lanes l>=8 dword d0+1 (bit 4 picks 2nd source)
    const __m512i ia0 = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
    const __m512i ia1 = _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31);
    const __m512i p01 = _mm512_permutex2var_epi32(z[0], ia0, z[1]);
    const __m512i q01 = _mm512_permutex2var_epi32(z[0], ia1, z[1]);
    const __m512i p23 = _mm512_permutex2var_epi32(z[2], ia0, z[3]);
    const __m512i q23 = _mm512_permutex2var_epi32(z[2], ia1, z[3]);
    // level 2: rows 0..7 from the first source, rows 8..15 from the second
    const __m512i ib0 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const __m512i ib1 = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    out[0] = _mm512_permutex2var_epi32(p01, ib0, p23);
    out[1] = _mm512_permutex2var_epi32(p01, ib1, p23);
    out[2] = _mm512_permutex2var_epi32(q01, ib0, q23);
    out[3] = _mm512_permutex2var_epi32(q01, ib1, q23);
}

// quantize_act_row (internal.h) vectorized: identical results (same float ops, round-half-even).
// qs: bytes between groups' codes in q; ds: floats between groups in d and sum (contiguous by
// default; the amx path writes its tile layout directly with qs = 16·G, ds = 16).
void quantize_act_row_avx512(const float* x, int64_t K, int G, int8_t* q, float* d, float* sum, int64_t qs = -1,
                             int64_t ds = 1) {
    if (qs < 0) qs = G;
    const __m512 sign = _mm512_set1_ps(-0.0f);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    for (int64_t g = 0; g < K / G; ++g) {
        const float* xg = x + g * G;
        const __m512 v0 = _mm512_loadu_ps(xg);
        const __m512 v1 = G == 32 ? _mm512_loadu_ps(xg + 16) : _mm512_setzero_ps();
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1)));
        const float dg = amax / 127.0f;
        const __m512 id = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));
        __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
        q0 = _mm512_min_epi32(_mm512_max_epi32(q0, lo), hi);
        q1 = _mm512_min_epi32(_mm512_max_epi32(q1, lo), hi);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * qs), _mm512_cvtepi32_epi8(q0));
        if (G == 32) _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * qs + 16), _mm512_cvtepi32_epi8(q1));
        d[g * ds] = dg;
        sum[g * ds] = dg * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
    }
}

// Horizontal reduction of 16 vectors at once: lane j of the result = op over all lanes of v[j].
// Each level pairs vectors and keeps the order (lanes 0-7 from the first, 8-15 from the second).
template <class V, class Op>
inline V reduce16(V* v, Op op) {
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for (int n = 16; n > 1; n /= 2)
        for (int i = 0; i < n / 2; ++i) {
            const __m512i a = reinterpret_cast<const __m512i&>(v[2 * i]);
            const __m512i b = reinterpret_cast<const __m512i&>(v[2 * i + 1]);
            const __m512i e = _mm512_permutex2var_epi32(a, ev, b), o = _mm512_permutex2var_epi32(a, od, b);
            v[i] = op(reinterpret_cast<const V&>(e), reinterpret_cast<const V&>(o));
        }
    return v[0];
}

// 16 groups of one activation row at a time (same results as quantize_act_row_avx512): the
// per-group max and sum reductions are batched, which removes their latency chains.
template <int G>
void quantize_16_groups(const float* x, int8_t* q, float* d, float* sum, int64_t qs = G, int64_t ds = 1) {
    const __m512 sign = _mm512_set1_ps(-0.0f);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    __m512 m[16];
    for (int g = 0; g < 16; ++g) {
        __m512 a = _mm512_andnot_ps(sign, _mm512_loadu_ps(x + g * G));
        if (G == 32) a = _mm512_max_ps(a, _mm512_andnot_ps(sign, _mm512_loadu_ps(x + g * G + 16)));
        m[g] = a;
    }
    const __m512 amax = reduce16(m, [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); });
    const __m512 dv = _mm512_div_ps(amax, _mm512_set1_ps(127.0f));
    const __m512 idv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(amax, _mm512_setzero_ps(), _CMP_GT_OQ),
                                           _mm512_set1_ps(127.0f), amax);
    __m512i sv[16];
    for (int g = 0; g < 16; ++g) {
        const __m512 id = _mm512_permutexvar_ps(_mm512_set1_epi32(g), idv);
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + g * G), id));
        q0 = _mm512_min_epi32(_mm512_max_epi32(q0, lo), hi);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * qs), _mm512_cvtepi32_epi8(q0));
        if (G == 32) {
            __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + g * G + 16), id));
            q1 = _mm512_min_epi32(_mm512_max_epi32(q1, lo), hi);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * qs + 16), _mm512_cvtepi32_epi8(q1));
            q0 = _mm512_add_epi32(q0, q1);
        }
        sv[g] = q0;
    }
    const __m512i qsum = reduce16(sv, [](__m512i a, __m512i b) { return _mm512_add_epi32(a, b); });
    const __m512 sv_f = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(qsum));
    if (ds == 1) {
        _mm512_storeu_ps(d, dv);
        _mm512_storeu_ps(sum, sv_f);
    } else {
        const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(static_cast<int>(ds)));
        _mm512_i32scatter_ps(d, idx, dv, 4);
        _mm512_i32scatter_ps(sum, idx, sv_f, 4);
    }
}

// qs, ds: as quantize_act_row_avx512
void quantize_row(const float* x, int64_t K, int G, int8_t* q, float* d, float* sum, int64_t qs = -1,
                  int64_t ds = 1) {
    if (qs < 0) qs = G;
    const int64_t NG = K / G;
    int64_t g = 0;
    for (; g + 16 <= NG; g += 16) {
        if (G == 32) quantize_16_groups<32>(x + g * G, q + g * qs, d + g * ds, sum + g * ds, qs, ds);
        else quantize_16_groups<16>(x + g * G, q + g * qs, d + g * ds, sum + g * ds, qs, ds);
    }
    if (g < NG) quantize_act_row_avx512(x + g * G, K - g * G, G, q + g * qs, d + g * ds, sum + g * ds, qs, ds);
}

// Repack panel rows [n0, n0+PW) into bytes [NG][QPG][2 tiles][64 B] (16 rows x 4 consecutive k per
// 64 B: the VNNI layout, also the layout of an AMX B tile); rows >= N become zeros.  q4: the raw
// nibbles 0..15; q8: the codes XOR q8_xor (0x80: unsigned q+128 for vpdpbusd; 0: signed as stored).
void repack_panel(const QMatrix& w, int64_t n0, uint8_t* dst, uint8_t q8_xor) {
    const int64_t NG = w.n_groups();
    const int QPG = w.group / 4;
    const __m512i lo4 = _mm512_set1_epi8(0x0F);
    const __m512i sign = _mm512_set1_epi8(static_cast<char>(q8_xor));
    const uint8_t* rows[16];
    // panels are PW = 32 rows, the prepacked layout's panel (n0 is a multiple of 32)
    const uint8_t* pk = w.packed && w.bits == 4 ? w.packed + (n0 / 32) * NG * 512 : nullptr;
    for (int64_t g = 0; g < NG; ++g) {
        uint8_t* dg = dst + g * QPG * 128;
        for (int t = 0; t < 2; ++t) {
            for (int r = 0; r < 16 && !pk; ++r) {
                const int64_t n = n0 + 16 * t + r;
                rows[r] = n < w.N ? w.block(n, g) : kZeroRow;
                // 16-32 row streams defeat the hardware prefetcher: fetch a few groups ahead
                if (n < w.N && g + 4 < NG) _mm_prefetch(reinterpret_cast<const char*>(w.block(n, g + 4)), _MM_HINT_T0);
            }
            __m512i o[4];
            if (pk) {  // prepacked at load: the transpose's result as stored
                for (int d = 0; d < 4; ++d) o[d] = _mm512_loadu_si512(pk + (g * 2 + t) * 256 + d * 64);
            } else {
                transpose16x4(rows, o);
            }
            if (w.bits == 4) {
                for (int d = 0; d < 4; ++d) {
                    _mm512_store_si512(dg + d * 128 + t * 64, _mm512_and_si512(o[d], lo4));
                    _mm512_store_si512(dg + (d + 4) * 128 + t * 64,
                                       _mm512_and_si512(_mm512_srli_epi32(o[d], 4), lo4));
                }
            } else {
                for (int d = 0; d < 4; ++d)
                    _mm512_store_si512(dg + d * 128 + t * 64, _mm512_xor_si512(o[d], sign));
                if (w.group == 32) {
                    for (int r = 0; r < 16; ++r) rows[r] += 16;
                    transpose16x4(rows, o);
                    for (int d = 0; d < 4; ++d)
                        _mm512_store_si512(dg + (d + 4) * 128 + t * 64, _mm512_xor_si512(o[d], sign));
                }
            }
        }
    }
}

}  // namespace
}  // namespace edgetune
