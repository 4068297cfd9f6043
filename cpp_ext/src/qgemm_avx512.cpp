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

constexpr int PW = 32;                 // panel width (weight rows): two 16-lane tiles
constexpr int MR = EDGETUNE_MR;        // activation rows per microkernel call
constexpr int64_t KCG = EDGETUNE_KCG;  // groups per K chunk

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
void quantize_act_row_avx512(const float* x, int64_t K, int G, int8_t* q, float* d, float* sum) {
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
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * G), _mm512_cvtepi32_epi8(q0));
        if (G == 32) _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * G + 16), _mm512_cvtepi32_epi8(q1));
        d[g] = dg;
        sum[g] = dg * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
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
void quantize_16_groups(const float* x, int8_t* q, float* d, float* sum) {
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
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * G), _mm512_cvtepi32_epi8(q0));
        if (G == 32) {
            __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + g * G + 16), id));
            q1 = _mm512_min_epi32(_mm512_max_epi32(q1, lo), hi);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * G + 16), _mm512_cvtepi32_epi8(q1));
            q0 = _mm512_add_epi32(q0, q1);
        }
        sv[g] = q0;
    }
    const __m512i qs = reduce16(sv, [](__m512i a, __m512i b) { return _mm512_add_epi32(a, b); });
    _mm512_storeu_ps(d, dv);
    _mm512_storeu_ps(sum, _mm512_mul_ps(dv, _mm512_cvtepi32_ps(qs)));
}

void quantize_row(const float* x, int64_t K, int G, int8_t* q, float* d, float* sum) {
    const int64_t NG = K / G;
    int64_t g = 0;
    for (; g + 16 <= NG; g += 16) {
        if (G == 32) quantize_16_groups<32>(x + g * G, q + g * G, d + g, sum + g);
        else quantize_16_groups<16>(x + g * G, q + g * G, d + g, sum + g);
    }
    if (g < NG) quantize_act_row_avx512(x + g * G, K - g * G, G, q + g * G, d + g, sum + g);
}

// Repack panel rows [n0, n0+PW) into u8 [NG][QPG][2 tiles][64 B]; rows >= N become zeros.
void repack_panel(const QMatrix& w, int64_t n0, uint8_t* dst) {
    const int64_t NG = w.n_groups();
    const int QPG = w.group / 4;
    const __m512i lo4 = _mm512_set1_epi8(0x0F);
    const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
    const uint8_t* rows[16];
    for (int64_t g = 0; g < NG; ++g) {
        uint8_t* dg = dst + g * QPG * 128;
        for (int t = 0; t < 2; ++t) {
            for (int r = 0; r < 16; ++r) {
                const int64_t n = n0 + 16 * t + r;
                rows[r] = n < w.N ? w.block(n, g) : kZeroRow;
                // 16-32 row streams defeat the hardware prefetcher: fetch a few groups ahead
                if (n < w.N && g + 4 < NG) _mm_prefetch(reinterpret_cast<const char*>(w.block(n, g + 4)), _MM_HINT_T0);
            }
            __m512i o[4];
            transpose16x4(rows, o);
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

// Panel scales sc[g][PW] (perturbed) and group corrections me[g][PW] = m - off*sc.
void panel_scales(const Problem& pr, uint64_t key, int64_t n0, float* sc, float* me, float* tmp,
                  bool has_me) {
    const QMatrix& w = pr.w;
    const int64_t NG = w.n_groups();
    const float off = w.bits == 8 ? 128.0f : static_cast<float>(w.offset);
    for (int nn = 0; nn < PW; ++nn) {
        const int64_t n = n0 + nn;
        if (n >= w.N) {
            for (int64_t g = 0; g < NG; ++g) sc[g * PW + nn] = me[g * PW + nn] = 0.0f;
            continue;
        }
        scale_row(w, pr.p, key, n, tmp);
        for (int64_t g = 0; g < NG; ++g) sc[g * PW + nn] = tmp[g];
        if (has_me) {
            const float* mn = w.mins ? w.mins + n * NG : nullptr;
            for (int64_t g = 0; g < NG; ++g) {
                const float t = off * tmp[g];
                me[g * PW + nn] = (mn ? mn[g] : 0.0f) - t;
            }
        }
    }
}

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
            repack_panel(w, n0, panel);
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
