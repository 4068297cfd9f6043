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
void panel_rows(const uint8_t* panel, const float* sc, const float* me, const QuantAct& a,
                int64_t K, int64_t NG, int64_t m0, int64_t m1, float* y, int64_t ldy, int ncols) {
    const __mmask16 k0 = ncols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << ncols) - 1);
    const __mmask16 k1 = ncols >= 32 ? 0xFFFF : ncols <= 16 ? 0 : static_cast<__mmask16>((1u << (ncols - 16)) - 1);
    for (int64_t g0 = 0; g0 < NG; g0 += KCG) {
        const int64_t g1 = std::min(NG, g0 + KCG);
        const bool first = g0 == 0;
        int64_t m = m0;
        for (; m + MR <= m1; m += MR)
            microkernel<MR, QPG, ME>(panel, sc, me, a, K, NG, m, g0, g1, y, ldy, k0, k1, first);
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

}  // namespace

void qgemm_avx512(const Problem& pr) {
    const Segment seg{pr.w, pr.p, 0};
    qgemm_multi_avx512(pr.x, pr.M, &seg, 1, pr.y, pr.w.N);
}

// Several matrices sharing x (same K and group): one activation quantization, one parallel_for
// over the panels of all segments; segment s writes columns [col, col + N_s) of y (row stride ldy).
void qgemm_multi_avx512(const float* x, int64_t M, const Segment* segs, int nseg, float* yout, int64_t ldy) {
    const int64_t K = segs[0].w.K, NG = segs[0].w.n_groups();
    const int G = segs[0].w.group;

    // 1. quantize activations (rows in parallel)
    char* act = static_cast<char*>(thread_scratch(SCRATCH_ACT, M * K + 2 * sizeof(float) * M * NG + 64));
    QuantAct a;
    a.d = reinterpret_cast<float*>(act);
    a.sum = a.d + M * NG;
    a.q = reinterpret_cast<int8_t*>(a.sum + M * NG);
    constexpr int64_t QROWS = 16;
    auto quant = [&](int64_t t) {
        for (int64_t m = t * QROWS; m < std::min(M, (t + 1) * QROWS); ++m)
            quantize_row(x + m * K, K, G, a.q + m * K, a.d + m * NG, a.sum + m * NG);
    };
    parallel_for(ceil_div(M, QROWS), quant);

    // 2. panels of PW weight rows (segment by segment) x ranges of activation rows
    int64_t first_panel[17];
    uint64_t keys[16];
    first_panel[0] = 0;
    int64_t total_n = 0;
    for (int s = 0; s < nseg; ++s) {
        first_panel[s + 1] = first_panel[s] + ceil_div(segs[s].w.N, PW);
        keys[s] = rng::stream_key(segs[s].p.seed, segs[s].p.tensor_id);
        total_n += segs[s].w.N;
    }
    const Partition pt = partition(first_panel[nseg] * PW, M, PW, MR, pool_num_threads());
    auto task = [&](int64_t t) {
        const int64_t pi = t / pt.n_mtasks, mi = t % pt.n_mtasks;
        const int64_t m0 = mi * pt.m_per_task, m1 = std::min(M, m0 + pt.m_per_task);
        uint8_t* panel = static_cast<uint8_t*>(thread_scratch(SCRATCH_PANEL, NG * G * PW));
        float* sc = static_cast<float*>(thread_scratch(SCRATCH_SCALES, sizeof(float) * (2 * NG * PW + NG)));
        float* me = sc + NG * PW;
        float* tmp = me + NG * PW;
        const int64_t p1 = std::min(pt.n_panels, (pi + 1) * pt.panels_per_task);
        int s = 0;
        for (int64_t p = pi * pt.panels_per_task; p < p1; ++p) {
            while (p >= first_panel[s + 1]) ++s;
            const QMatrix& w = segs[s].w;
            const Problem pr{x, M, w, segs[s].p, nullptr};
            const bool has_me = w.bits == 8 || w.offset != 0 || w.mins != nullptr;
            const int64_t n0 = (p - first_panel[s]) * PW;
            const int ncols = static_cast<int>(std::min<int64_t>(PW, w.N - n0));
            repack_panel(w, n0, panel, 0x80);
            panel_scales(pr, keys[s], n0, sc, me, tmp, has_me);
            float* y = yout + segs[s].col + n0;
            if (G == 32) {
                if (has_me) panel_rows<8, true>(panel, sc, me, a, K, NG, m0, m1, y, ldy, ncols);
                else panel_rows<8, false>(panel, sc, me, a, K, NG, m0, m1, y, ldy, ncols);
            } else {
                panel_rows<4, true>(panel, sc, me, a, K, NG, m0, m1, y, ldy, ncols);
            }
        }
    };
    parallel_for(pt.tasks(), task);
    (void)total_n;
}

}  // namespace edgetune
