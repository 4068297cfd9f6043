// qgemm_neon.cpp — the AArch64 NEON path with the dot-product extension (SDOT; armv8.2-a+dotprod).
// A panel of 8 weight rows is repacked to int8 codes (q - offset for q4, q for q8) so one 128-bit
// vector holds 4 rows x 4 consecutive k; vdotq_laneq_s32 multiplies it by 4 int8 activations
// picked from a 16-byte register.  Per group: y += s'·d·Σ(q·x) + m·sum.
#if defined(__aarch64__)

#include <arm_neon.h>

#include <algorithm>
#if defined(__linux__)
#include <sys/auxv.h>
#endif

#include "edgetune/thread_pool.h"
#include "internal.h"
#include "qgemm_driver.h"

namespace edgetune {

bool cpu_has_neon_dotprod() {
#if defined(__linux__)
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#else
    return true;  // built with +dotprod for this target
#endif
}

namespace {

constexpr int PW = 8;  // panel width: two 4-lane tiles
constexpr int MR = 4;

// Repack panel rows [n0, n0+PW) into int8 [NG][G/4 quads][2 tiles][4 rows][4]; rows >= N are 0.
void repack_panel(const QMatrix& w, int64_t n0, int8_t* dst) {
    const int64_t NG = w.n_groups();
    const int G = w.group, Q = G / 4;
    for (int r = 0; r < PW; ++r) {
        const int64_t n = n0 + r;
        const int t = r / 4, lane = r % 4;
        for (int64_t g = 0; g < NG; ++g) {
            int8_t* dg = dst + g * Q * 32;
            const uint8_t* b = n < w.N ? w.block(n, g) : nullptr;
            for (int j = 0; j < G; ++j) {
                int v = 0;
                if (b) {
                    if (w.bits == 4) v = (j < 16 ? (b[j] & 0x0F) : (b[j - 16] >> 4)) - w.offset;
                    else v = static_cast<int8_t>(b[j]);
                }
                dg[((j / 4) * 2 + t) * 16 + lane * 4 + (j & 3)] = static_cast<int8_t>(v);
            }
        }
    }
}

template <int R, int Q, bool MINS>
void microkernel(const int8_t* panel, const float* sc, const float* mn, const QuantAct& a, int64_t K,
                 int64_t NG, int64_t m0, float* y, int64_t ldy, int ncols) {
    constexpr int G = 4 * Q;
    float32x4_t yacc[R][2];
    for (int i = 0; i < R; ++i) yacc[i][0] = yacc[i][1] = vdupq_n_f32(0.0f);
    for (int64_t g = 0; g < NG; ++g) {
        int32x4_t acc[R][2];
        for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = vdupq_n_s32(0);
        const int8_t* pw = panel + g * Q * 32;
        for (int q4 = 0; q4 < Q; q4 += 4) {  // 16 activations = 4 quads per register
            int8x16_t xv[R];
            for (int i = 0; i < R; ++i) xv[i] = vld1q_s8(a.q + (m0 + i) * K + g * G + 4 * q4);
#define EDGETUNE_QUAD(L)                                                          \
    {                                                                             \
        const int8x16_t w0 = vld1q_s8(pw + (q4 + L) * 32);                        \
        const int8x16_t w1 = vld1q_s8(pw + (q4 + L) * 32 + 16);                   \
        for (int i = 0; i < R; ++i) {                                             \
            acc[i][0] = vdotq_laneq_s32(acc[i][0], w0, xv[i], L);                 \
            acc[i][1] = vdotq_laneq_s32(acc[i][1], w1, xv[i], L);                 \
        }                                                                         \
    }
            EDGETUNE_QUAD(0) EDGETUNE_QUAD(1) EDGETUNE_QUAD(2) EDGETUNE_QUAD(3)
#undef EDGETUNE_QUAD
        }
        const float32x4_t s0 = vld1q_f32(sc + g * PW), s1 = vld1q_f32(sc + g * PW + 4);
        for (int i = 0; i < R; ++i) {
            const float d = a.d[(m0 + i) * NG + g];
            yacc[i][0] = vfmaq_f32(yacc[i][0], vcvtq_f32_s32(acc[i][0]), vmulq_n_f32(s0, d));
            yacc[i][1] = vfmaq_f32(yacc[i][1], vcvtq_f32_s32(acc[i][1]), vmulq_n_f32(s1, d));
        }
        if (MINS) {
            const float32x4_t e0 = vld1q_f32(mn + g * PW), e1 = vld1q_f32(mn + g * PW + 4);
            for (int i = 0; i < R; ++i) {
                const float sx = a.sum[(m0 + i) * NG + g];
                yacc[i][0] = vfmaq_n_f32(yacc[i][0], e0, sx);
                yacc[i][1] = vfmaq_n_f32(yacc[i][1], e1, sx);
            }
        }
    }
    for (int i = 0; i < R; ++i) {
        float tmp[PW];
        vst1q_f32(tmp, yacc[i][0]);
        vst1q_f32(tmp + 4, yacc[i][1]);
        float* yr = y + (m0 + i) * ldy;
        for (int c = 0; c < ncols; ++c) yr[c] = tmp[c];
    }
}

template <int Q, bool MINS>
void panel_rows(const int8_t* panel, const float* sc, const float* mn, const QuantAct& a, int64_t K, int64_t NG,
                int64_t m0, int64_t m1, float* y, int64_t ldy, int ncols, const NextPanel& next) {
    PanelPrefetcher pf(next, PW, ceil_div(m1 - m0, MR));
    int64_t m = m0;
    for (; m + MR <= m1; m += MR) {
        pf.step();
        microkernel<MR, Q, MINS>(panel, sc, mn, a, K, NG, m, y, ldy, ncols);
    }
    for (; m < m1; ++m) microkernel<1, Q, MINS>(panel, sc, mn, a, K, NG, m, y, ldy, ncols);
}

// The neon microkernels in the shared driver (qgemm_driver.h).
struct NeonKernel {
    static constexpr int PW = ::edgetune::PW, MR = ::edgetune::MR;
    static constexpr bool UNSIGNED_CODES = false;  // int8 codes q - offset; the correction is m
    using Act = QuantAct;
    using Panel = int8_t;

    static Act quantize(const RowSource& src, int64_t M, int64_t K, int G, const Segment*, int) {
        const int64_t NG = K / G;
        const QuantAct a = quant_act_scratch(M, K, NG);
        auto quant = [&](int64_t m) {
            float* xb = row_scratch(src, K);
            quantize_act_row(src.row(m, K, xb), K, G, a.q + m * K, a.d + m * NG, a.sum + m * NG);
        };
        parallel_for(M, quant);
        return a;
    }
    static size_t panel_bytes(int64_t NG, int G) { return NG * G * PW; }
    static void repack(const QMatrix& w, int64_t n0, int8_t* dst) { repack_panel(w, n0, dst); }
    static void begin_task(int) {}
    static void end_task() {}
    static void rows(const int8_t* panel, const float* sc, const float* mn, bool mins, const QuantAct& a,
                     const QMatrix& w, int64_t K, int64_t NG, int64_t, int64_t m0, int64_t m1, float* y,
                     int64_t ldy, int ncols, const NextPanel& next) {
        if (w.group == 32) {
            if (mins) panel_rows<8, true>(panel, sc, mn, a, K, NG, m0, m1, y, ldy, ncols, next);
            else panel_rows<8, false>(panel, sc, mn, a, K, NG, m0, m1, y, ldy, ncols, next);
        } else {
            if (mins) panel_rows<4, true>(panel, sc, mn, a, K, NG, m0, m1, y, ldy, ncols, next);
            else panel_rows<4, false>(panel, sc, mn, a, K, NG, m0, m1, y, ldy, ncols, next);
        }
    }
};

}  // namespace

void qgemm_multi_neon(const RowSource& src, int64_t M, const Segment* segs, int nseg, float* y, int64_t ldy) {
    run_qgemm<NeonKernel>(src, M, segs, nseg, y, ldy);
}

}  // namespace edgetune

#endif  // __aarch64__
