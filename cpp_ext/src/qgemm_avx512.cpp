// qgemm_avx512.cpp — the AVX-512 VNNI path (built with -mavx512f/bw/vl/dq/vnni, chosen at runtime).
//
// Scheme (like llama.cpp's Q4 x Q8 dot products, but blocked as a GEMM):
//  * activations are quantized to int8 per group (scale d, group sum sum = d*Σq);
//  * a panel of 32 weight rows is repacked to unsigned bytes so that one 64-byte vector holds
//    16 rows x 4 consecutive k: vpdpbusd(u8 codes, s8 x broadcast) then yields 16 rows' partial
//    dot products.  q8 codes become unsigned by flipping the sign bit (u = q + 128);
//  * per group: y += s'·d·Σ(u·x) + (m - off·s')·sum, off = q4 offset or 128 for q8, where
//    s' are the (perturbed) scales of the panel, computed into a small scratch — never written
//    back.  The repacked panel is reused across all activation rows of the task.
#include <immintrin.h>

#include <algorithm>

#include "edgetune/thread_pool.h"
#include "internal.h"
#include "qgemm_driver.h"
#include "qgemm_x86_panel.h"

namespace edgetune {

bool cpu_has_avx512() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni");
}

// Tunables (overridable with -D for experiments).  Measured on Zen4: MR 4..6 perform alike;
// K-blocking the panel for L1 only hurt (L2 feeds the panel fast enough), so it is off by default.
#ifndef EDGETUNE_MR
#define EDGETUNE_MR 4
#endif
#ifndef EDGETUNE_KCG
#define EDGETUNE_KCG (1 << 30)
#endif

namespace {

constexpr int MR = EDGETUNE_MR;        // activation rows per microkernel call
constexpr int64_t KCG = EDGETUNE_KCG;  // groups per K chunk

// y[m0..m0+R, panel] (+)= Σ_{g in [g0,g1)} ... for R <= MR activation rows.
template <int R, int QPG, bool ME>
void microkernel(const uint8_t* panel, const float* sc, const float* me, const QuantAct& a,
                 int64_t K, int64_t NG, int64_t m0, int64_t g0, int64_t g1, float* y, int64_t ldy,
                 __mmask16 k0, __mmask16 k1, bool first) {
    constexpr int G = 4 * QPG;
    __m512 yacc[R][2];
    for (int i = 0; i < R; ++i) {
        if (first) {
            yacc[i][0] = _mm512_setzero_ps();
            yacc[i][1] = _mm512_setzero_ps();
        } else {
            yacc[i][0] = _mm512_maskz_loadu_ps(k0, y + (m0 + i) * ldy);
            yacc[i][1] = _mm512_maskz_loadu_ps(k1, y + (m0 + i) * ldy + 16);
        }
    }
    const int8_t* xr[R];
    const float* dr[R];
    const float* sr[R];
    for (int i = 0; i < R; ++i) {
        xr[i] = a.q + (m0 + i) * K;
        dr[i] = a.d + (m0 + i) * NG;
        sr[i] = a.sum + (m0 + i) * NG;
    }
    for (int64_t g = g0; g < g1; ++g) {
        __m512i acc[R][2];
        for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
        const uint8_t* pw = panel + g * QPG * 128;
#pragma GCC unroll 8
        for (int q = 0; q < QPG; ++q) {
            const __m512i w0 = _mm512_load_si512(pw + q * 128);
            const __m512i w1 = _mm512_load_si512(pw + q * 128 + 64);
            for (int i = 0; i < R; ++i) {
                int32_t xv;
                std::memcpy(&xv, xr[i] + g * G + 4 * q, 4);
                const __m512i xb = _mm512_set1_epi32(xv);
                acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], w0, xb);
                acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], w1, xb);
            }
        }
        const __m512 s0 = _mm512_load_ps(sc + g * PW);
        const __m512 s1 = _mm512_load_ps(sc + g * PW + 16);
        for (int i = 0; i < R; ++i) {
            const __m512 d = _mm512_set1_ps(dr[i][g]);
            yacc[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][0]), _mm512_mul_ps(s0, d), yacc[i][0]);
            yacc[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][1]), _mm512_mul_ps(s1, d), yacc[i][1]);
        }
        if (ME) {
            const __m512 e0 = _mm512_load_ps(me + g * PW);
            const __m512 e1 = _mm512_load_ps(me + g * PW + 16);
            for (int i = 0; i < R; ++i) {
                const __m512 sx = _mm512_set1_ps(sr[i][g]);
                yacc[i][0] = _mm512_fmadd_ps(e0, sx, yacc[i][0]);
                yacc[i][1] = _mm512_fmadd_ps(e1, sx, yacc[i][1]);
            }
        }
    }
    for (int i = 0; i < R; ++i) {
        _mm512_mask_storeu_ps(y + (m0 + i) * ldy, k0, yacc[i][0]);
        _mm512_mask_storeu_ps(y + (m0 + i) * ldy + 16, k1, yacc[i][1]);
    }
}

template <int QPG, bool ME>
void panel_rows(const uint8_t* panel, const float* sc, const float* me, const QuantAct& a, int64_t K,
                int64_t NG, int64_t m0, int64_t m1, float* y, int64_t ldy, int ncols, const NextPanel& next) {
    const __mmask16 k0 = ncols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << ncols) - 1);
    const __mmask16 k1 = ncols >= 32 ? 0xFFFF : ncols <= 16 ? 0 : static_cast<__mmask16>((1u << (ncols - 16)) - 1);
    PanelPrefetcher pf(next, PW, ceil_div(NG, KCG) * ceil_div(m1 - m0, MR));
    for (int64_t g0 = 0; g0 < NG; g0 += KCG) {
        const int64_t g1 = std::min(NG, g0 + KCG);
        const bool first = g0 == 0;
        int64_t m = m0;
        for (; m + MR <= m1; m += MR) {
            pf.step();
            microkernel<MR, QPG, ME>(panel, sc, me, a, K, NG, m, g0, g1, y, ldy, k0, k1, first);
        }
        switch (m1 - m) {
            case 5: microkernel<5, QPG, ME>(panel, sc, me, a, K, NG, m, g0, g1, y, ldy, k0, k1, first); break;
            case 4: microkernel<4, QPG, ME>(panel, sc, me, a, K, NG, m, g0, g1, y, ldy, k0, k1, first); break;
            case 3: microkernel<3, QPG, ME>(panel, sc, me, a, K, NG, m, g0, g1, y, ldy, k0, k1, first); break;
            case 2: microkernel<2, QPG, ME>(panel, sc, me, a, K, NG, m, g0, g1, y, ldy, k0, k1, first); break;
            case 1: microkernel<1, QPG, ME>(panel, sc, me, a, K, NG, m, g0, g1, y, ldy, k0, k1, first); break;
            default: break;
        }
    }
}

// The avx512 microkernels in the shared driver (qgemm_driver.h).
struct Avx512Kernel {
    static constexpr int PW = ::edgetune::PW, MR = ::edgetune::MR;
    static constexpr bool UNSIGNED_CODES = true;  // vpdpbusd: u8 codes x s8 activations
    using Act = QuantAct;
    using Panel = uint8_t;

    static Act quantize(const RowSource& src, int64_t M, int64_t K, int G, const Segment*, int) {
        const int64_t NG = K / G;
        const QuantAct a = quant_act_scratch(M, K, NG);
        constexpr int64_t QROWS = 16;
        auto quant = [&](int64_t t) {
            float* xb = row_scratch(src, K);
            for (int64_t m = t * QROWS; m < std::min(M, (t + 1) * QROWS); ++m)
                quantize_row(src.row(m, K, xb), K, G, a.q + m * K, a.d + m * NG, a.sum + m * NG);
        };
        parallel_for(ceil_div(M, QROWS), quant);
        return a;
    }
    static size_t panel_bytes(int64_t NG, int G) { return NG * G * PW; }
    static void repack(const QMatrix& w, int64_t n0, uint8_t* dst) { repack_panel(w, n0, dst, 0x80); }
    static void begin_task(int) {}
    static void end_task() {}
    static void rows(const uint8_t* panel, const float* sc, const float* me, bool has_me, const QuantAct& a,
                     const QMatrix& w, int64_t K, int64_t NG, int64_t, int64_t m0, int64_t m1, float* y,
                     int64_t ldy, int ncols, const NextPanel& next) {
        if (w.group == 32) {
            if (has_me) panel_rows<8, true>(panel, sc, me, a, K, NG, m0, m1, y, ldy, ncols, next);
            else panel_rows<8, false>(panel, sc, me, a, K, NG, m0, m1, y, ldy, ncols, next);
        } else {
            panel_rows<4, true>(panel, sc, me, a, K, NG, m0, m1, y, ldy, ncols, next);  // q8: always
        }
    }
};

}  // namespace

// Several matrices sharing x (same K and group); segment s writes columns [col, col + N_s) of y
// (row stride ldy).
void qgemm_multi_avx512(const RowSource& src, int64_t M, const Segment* segs, int nseg, float* y, int64_t ldy) {
    run_qgemm<Avx512Kernel>(src, M, segs, nseg, y, ldy);
}

}  // namespace edgetune
