// qgemm_avx2.cpp — the AVX2+FMA path (built with -mavx2 -mfma, chosen at runtime when AVX-512 VNNI
// is missing).  Exact integer dot products with vpmaddwd on int16: a panel of 16 weight rows is
// repacked to int16 codes (q - offset for q4, q for q8) so one 256-bit vector holds 8 rows x 2
// consecutive k, multiplied by a broadcast pair of int8-quantized activations (widened to int16).
// Per group: y += s'·d·Σ(q·x) + m·sum.  (vpmaddubsw would be faster but saturates for q8.)
#include <immintrin.h>

#include <algorithm>

#include "edgetune/thread_pool.h"
#include "internal.h"
#include "qgemm_driver.h"

namespace edgetune {

bool cpu_has_avx2() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

namespace {

constexpr int PW = 16;  // panel width: two 8-lane tiles
constexpr int MR = 2;   // activation rows per microkernel call (16 ymm registers)

// Repack panel rows [n0, n0+PW) into int16 [NG][G/2 pairs][2 tiles][8 rows][2]; rows >= N are 0.
void repack_panel(const QMatrix& w, int64_t n0, int16_t* dst) {
    const int64_t NG = w.n_groups();
    const int G = w.group, P = G / 2;
    for (int r = 0; r < PW; ++r) {
        const int64_t n = n0 + r;
        const int t = r / 8, lane = r % 8;
        for (int64_t g = 0; g < NG; ++g) {
            int16_t* dg = dst + g * P * 2 * 16;
            for (int j = 0; j < G; ++j) {
                int v = 0;
                if (n < w.N) {
                    const uint8_t* b = w.block(n, g);
                    if (w.bits == 4) v = (j < 16 ? (b[j] & 0x0F) : (b[j - 16] >> 4)) - w.offset;
                    else v = static_cast<int8_t>(b[j]);
                }
                dg[((j / 2) * 2 + t) * 16 + lane * 2 + (j & 1)] = static_cast<int16_t>(v);
            }
        }
    }
}

template <int R, int P, bool MINS>
void microkernel(const int16_t* panel, const float* sc, const float* mn, const int16_t* xq, const float* ad,
                 const float* asum, int64_t K, int64_t NG, int64_t m0, float* y, int64_t ldy, int ncols) {
    constexpr int G = 2 * P;
    __m256 yacc[R][2];
    for (int i = 0; i < R; ++i) yacc[i][0] = yacc[i][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < NG; ++g) {
        __m256i acc[R][2];
        for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
        const int16_t* pw = panel + g * P * 32;
        for (int p = 0; p < P; ++p) {
            const __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(pw + p * 32));
            const __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(pw + p * 32 + 16));
            for (int i = 0; i < R; ++i) {
                int32_t xv;
                std::memcpy(&xv, xq + (m0 + i) * K + g * G + 2 * p, 4);
                const __m256i xb = _mm256_set1_epi32(xv);
                acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(w0, xb));
                acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(w1, xb));
            }
        }
        const __m256 s0 = _mm256_load_ps(sc + g * PW), s1 = _mm256_load_ps(sc + g * PW + 8);
        for (int i = 0; i < R; ++i) {
            const __m256 d = _mm256_set1_ps(ad[(m0 + i) * NG + g]);
            yacc[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i][0]), _mm256_mul_ps(s0, d), yacc[i][0]);
            yacc[i][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i][1]), _mm256_mul_ps(s1, d), yacc[i][1]);
        }
        if (MINS) {
            const __m256 e0 = _mm256_load_ps(mn + g * PW), e1 = _mm256_load_ps(mn + g * PW + 8);
            for (int i = 0; i < R; ++i) {
                const __m256 sx = _mm256_set1_ps(asum[(m0 + i) * NG + g]);
                yacc[i][0] = _mm256_fmadd_ps(e0, sx, yacc[i][0]);
                yacc[i][1] = _mm256_fmadd_ps(e1, sx, yacc[i][1]);
            }
        }
    }
    for (int i = 0; i < R; ++i) {
        float* yr = y + (m0 + i) * ldy;
        if (ncols == PW) {
            _mm256_storeu_ps(yr, yacc[i][0]);
            _mm256_storeu_ps(yr + 8, yacc[i][1]);
        } else {
            alignas(32) float tmp[PW];
            _mm256_store_ps(tmp, yacc[i][0]);
            _mm256_store_ps(tmp + 8, yacc[i][1]);
            for (int c = 0; c < ncols; ++c) yr[c] = tmp[c];
        }
    }
}

// Activations quantized to int8 per group (QuantAct), widened to int16 for vpmaddwd.
struct Avx2Act {
    const int16_t* xq;
    const float* d;
    const float* sum;
};

template <int P, bool MINS>
void panel_rows(const int16_t* panel, const float* sc, const float* mn, const Avx2Act& a, int64_t K, int64_t NG,
                int64_t m0, int64_t m1, float* y, int64_t ldy, int ncols, const NextPanel& next) {
    PanelPrefetcher pf(next, PW, ceil_div(m1 - m0, MR));
    int64_t m = m0;
    for (; m + MR <= m1; m += MR) {
        pf.step();
        microkernel<MR, P, MINS>(panel, sc, mn, a.xq, a.d, a.sum, K, NG, m, y, ldy, ncols);
    }
    if (m < m1) microkernel<1, P, MINS>(panel, sc, mn, a.xq, a.d, a.sum, K, NG, m, y, ldy, ncols);
}

// The avx2 microkernels in the shared driver (qgemm_driver.h).
struct Avx2Kernel {
    static constexpr int PW = ::edgetune::PW, MR = ::edgetune::MR;
    static constexpr bool UNSIGNED_CODES = false;  // int16 codes q - offset; the correction is m
    using Act = Avx2Act;
    using Panel = int16_t;

    static Act quantize(const RowSource& src, int64_t M, int64_t K, int G, const Segment*, int) {
        const int64_t NG = K / G;
        char* act = static_cast<char*>(thread_scratch(SCRATCH_ACT, 3 * M * K + 2 * sizeof(float) * M * NG + 64));
        float* ad = reinterpret_cast<float*>(act);
        float* asum = ad + M * NG;
        int16_t* xq16 = reinterpret_cast<int16_t*>(asum + M * NG);
        int8_t* xq8 = reinterpret_cast<int8_t*>(xq16 + M * K);
        auto quant = [&](int64_t m) {
            float* xb = row_scratch(src, K);
            quantize_act_row(src.row(m, K, xb), K, G, xq8 + m * K, ad + m * NG, asum + m * NG);
            for (int64_t k = 0; k < K; ++k) xq16[m * K + k] = xq8[m * K + k];
        };
        parallel_for(M, quant);
        return Avx2Act{xq16, ad, asum};
    }
    static size_t panel_bytes(int64_t NG, int G) { return sizeof(int16_t) * NG * G * PW; }
    static void repack(const QMatrix& w, int64_t n0, int16_t* dst) { repack_panel(w, n0, dst); }
    static void begin_task(int) {}
    static void end_task() {}
    static void rows(const int16_t* panel, const float* sc, const float* mn, bool mins, const Avx2Act& a,
                     const QMatrix& w, int64_t K, int64_t NG, int64_t, int64_t m0, int64_t m1, float* y,
                     int64_t ldy, int ncols, const NextPanel& next) {
        if (w.group == 32) {
            if (mins) panel_rows<16, true>(panel, sc, mn, a, K, NG, m0, m1, y, ldy, ncols, next);
            else panel_rows<16, false>(panel, sc, mn, a, K, NG, m0, m1, y, ldy, ncols, next);
        } else {
            if (mins) panel_rows<8, true>(panel, sc, mn, a, K, NG, m0, m1, y, ldy, ncols, next);
            else panel_rows<8, false>(panel, sc, mn, a, K, NG, m0, m1, y, ldy, ncols, next);
        }
    }
};

}  // namespace

void qgemm_multi_avx2(const RowSource& src, int64_t M, const Segment* segs, int nseg, float* y, int64_t ldy) {
    run_qgemm<Avx2Kernel>(src, M, segs, nseg, y, ldy);
}

}  // namespace edgetune
