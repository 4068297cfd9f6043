// qgemm_amx.cpp — the AMX-INT8 path (built with -mamx-tile -mamx-int8 + the AVX-512 flags; chosen
// at runtime only when the CPU has AMX-INT8 and the kernel grants this process the tile state).
//
// Bit-identical to the avx512 path, by construction:
//  * the same int8 activations (quantize_row) and the same weight panel (repack_panel, VNNI layout
//    = an AMX B tile: 16 weight rows x 4 consecutive k per 64-byte row);
//  * one TDPBSSD per (16 activation rows, 16 weight rows, group): A tile = 16 rows x G bytes of
//    activations, B tile = G/4 rows of the panel.  It yields the exact int32 dot per (row, group)
//    that vpdpbusd yields in the avx512 path: q4 nibbles 0..15 are the same numbers signed or
//    unsigned; q8 codes stay signed here and the avx512 path's Σ(q+128)·x is restored exactly in
//    int32 by adding 128·Σx per (row, group);
//  * the same fp32 epilogue per group, in the same order: y = fma(float(dot), s'·d, y), then
//    y = fma(m - off·s', d·Σq, y) (see qgemm_avx512.cpp).
// Each C tile is stored to a small L1 buffer per group and folded into 16 zmm accumulators while
// the TMUL already computes the next group into the other C tile.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cpuid.h>

#include <algorithm>

#include "edgetune/thread_pool.h"
#include "internal.h"
#include "qgemm_x86_panel.h"

namespace edgetune {

namespace {

constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl: ARCH_REQ_XCOMP_PERM
constexpr long kXfeatureXtiledata = 18;

bool detect_amx() {
    if (!cpu_has_avx512()) return false;
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE
    if (__get_cpuid_max(0, nullptr) < 7) return false;
    __cpuid_count(7, 0, a, b, c, d);
    if (!(d & (1u << 24)) || !(d & (1u << 25))) return false;  // AMX-TILE, AMX-INT8
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    const uint64_t xcr0 = (static_cast<uint64_t>(hi) << 32) | lo;
    if ((xcr0 & (3ull << 17)) != (3ull << 17)) return false;  // OS manages XTILECFG + XTILEDATA
    // Linux keeps the tile data disabled (XFD) until the process asks for it; without this a
    // tile instruction faults.  The permission is process-wide and asked for once.
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

// LDTILECFG's 64-byte memory operand.
struct alignas(64) TileConfig {
    uint8_t palette = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// tmm0/1: C (16 x 16 int32), tmm2/3: A (16 activation rows x G bytes), tmm4/5: B (G/4 x 64 bytes);
// two of each so that group g+1 is computed while group g's epilogue runs.
TileConfig tile_config(int G) {
    TileConfig c;
    for (int t = 0; t < 2; ++t) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
        c.rows[2 + t] = 16;
        c.colsb[2 + t] = static_cast<uint16_t>(G);
        c.rows[4 + t] = static_cast<uint8_t>(G / 4);
        c.colsb[4 + t] = 64;
    }
    return c;
}

constexpr int TM = 16;  // activation rows per tile

// Activations for the AMX path: those of the avx512 path, rows padded with zeros to a multiple of
// TM, plus (q8 only) corr[m, g] = 128·Σ_j q[m, gG+j].
struct AmxAct {
    QuantAct a;
    int32_t* corr;
};

// y[m0..m0+16, 16 columns at tile t of the panel] = Σ_g epilogue(dot_g); rows < nrows and the
// columns in kmask are stored.
template <int G, bool ME, bool Q8>
void tile_16x16(const uint8_t* panel, int t, const float* sc, const float* me, const AmxAct& aa,
                int64_t K, int64_t NG, int64_t m0, int nrows, float* y, int64_t ldy, __mmask16 kmask) {
    constexpr int QPG = G / 4;
    const QuantAct& a = aa.a;
    alignas(64) int32_t cbuf[2][TM * 16];
    __m512 yacc[TM];
#pragma GCC unroll 16
    for (int i = 0; i < TM; ++i) yacc[i] = _mm512_setzero_ps();
    const int8_t* xq = a.q + m0 * K;
    const float* dr = a.d + m0 * NG;
    const float* sr = a.sum + m0 * NG;
    const int32_t* cr = Q8 ? aa.corr + m0 * NG : nullptr;
    const uint8_t* pw = panel + t * 64;
    constexpr int64_t PSTRIDE = QPG * 128;  // panel bytes per group

    auto epilogue = [&](int64_t g, const int32_t* cb) {
        const __m512 s = _mm512_load_ps(sc + g * PW + t * 16);
        __m512 e;
        if (ME) e = _mm512_load_ps(me + g * PW + t * 16);
#pragma GCC unroll 16
        for (int i = 0; i < TM; ++i) {
            __m512i acc = _mm512_load_si512(cb + i * 16);
            if (Q8) acc = _mm512_add_epi32(acc, _mm512_set1_epi32(cr[i * NG + g]));
            const __m512 d = _mm512_set1_ps(dr[i * NG + g]);
            yacc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(s, d), yacc[i]);
            if (ME) yacc[i] = _mm512_fmadd_ps(e, _mm512_set1_ps(sr[i * NG + g]), yacc[i]);
        }
    };

    // software pipeline over groups: C tile 0 holds even groups, C tile 1 odd ones
    _tile_zero(0);
    _tile_loadd(2, xq, K);
    _tile_loadd(4, pw, 128);
    _tile_dpbssd(0, 2, 4);
    for (int64_t g = 0; g < NG; g += 2) {
        const bool odd = g + 1 < NG;
        if (odd) {
            _tile_zero(1);
            _tile_loadd(3, xq + (g + 1) * G, K);
            _tile_loadd(5, pw + (g + 1) * PSTRIDE, 128);
            _tile_dpbssd(1, 3, 5);
        }
        _tile_stored(0, cbuf[0], 64);
        if (g + 2 < NG) {
            _tile_zero(0);
            _tile_loadd(2, xq + (g + 2) * G, K);
            _tile_loadd(4, pw + (g + 2) * PSTRIDE, 128);
            _tile_dpbssd(0, 2, 4);
        }
        epilogue(g, cbuf[0]);
        if (odd) {
            _tile_stored(1, cbuf[1], 64);
            epilogue(g + 1, cbuf[1]);
        }
    }
    for (int i = 0; i < nrows; ++i) _mm512_mask_storeu_ps(y + (m0 + i) * ldy, kmask, yacc[i]);
}

template <int G, bool ME, bool Q8>
void panel_rows_amx(const uint8_t* panel, const float* sc, const float* me, const AmxAct& aa,
                    int64_t K, int64_t NG, int64_t M, int64_t m0, int64_t m1, float* y, int64_t ldy,
                    int ncols) {
    for (int64_t m = m0; m < m1; m += TM) {
        const int nrows = static_cast<int>(std::min<int64_t>(TM, M - m));
        for (int t = 0; t < 2 && 16 * t < ncols; ++t) {
            const int c = ncols - 16 * t;
            const __mmask16 k = c >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << c) - 1);
            tile_16x16<G, ME, Q8>(panel, t, sc, me, aa, K, NG, m, nrows, y + 16 * t, ldy, k);
        }
    }
}

}  // namespace

bool cpu_has_amx() {
    static const bool ok = detect_amx();
    return ok;
}

void qgemm_amx(const Problem& pr) {
    const Segment seg{pr.w, pr.p, 0};
    qgemm_multi_amx(pr.x, pr.M, &seg, 1, pr.y, pr.w.N);
}

// Same driver as qgemm_multi_avx512 (one activation quantization, one parallel loop over the
// panels of all segments), with activation rows in tiles of 16.
void qgemm_multi_amx(const float* x, int64_t M, const Segment* segs, int nseg, float* yout, int64_t ldy) {
    const int64_t K = segs[0].w.K, NG = segs[0].w.n_groups();
    const int G = segs[0].w.group;
    const int64_t MP = ceil_div(M, TM) * TM;
    bool any_q8 = false;
    for (int s = 0; s < nseg; ++s) any_q8 = any_q8 || segs[s].w.bits == 8;

    // 1. quantize activations (rows in parallel); padded rows are zero
    char* act = static_cast<char*>(
        thread_scratch(SCRATCH_ACT, MP * K + (2 * sizeof(float) + sizeof(int32_t)) * MP * NG + 64));
    AmxAct aa;
    QuantAct& a = aa.a;
    a.d = reinterpret_cast<float*>(act);
    a.sum = a.d + MP * NG;
    aa.corr = reinterpret_cast<int32_t*>(a.sum + MP * NG);
    a.q = reinterpret_cast<int8_t*>(aa.corr + MP * NG);
    if (MP > M) {
        std::memset(a.d + M * NG, 0, sizeof(float) * (MP - M) * NG);
        std::memset(a.sum + M * NG, 0, sizeof(float) * (MP - M) * NG);
        std::memset(aa.corr + M * NG, 0, sizeof(int32_t) * (MP - M) * NG);
        std::memset(a.q + M * K, 0, (MP - M) * K);
    }
    constexpr int64_t QROWS = 16;
    auto quant = [&](int64_t t) {
        for (int64_t m = t * QROWS; m < std::min(M, (t + 1) * QROWS); ++m) {
            int8_t* q = a.q + m * K;
            quantize_row(x + m * K, K, G, q, a.d + m * NG, a.sum + m * NG);
            if (any_q8)
                for (int64_t g = 0; g < NG; ++g) {
                    int32_t s = 0;
                    for (int j = 0; j < G; ++j) s += q[g * G + j];
                    aa.corr[m * NG + g] = 128 * s;
                }
        }
    };
    parallel_for(ceil_div(M, QROWS), quant);

    // 2. panels of PW weight rows (segment by segment) x ranges of activation tiles
    int64_t first_panel[kMaxSegments + 1];
    uint64_t keys[kMaxSegments];
    first_panel[0] = 0;
    for (int s = 0; s < nseg; ++s) {
        first_panel[s + 1] = first_panel[s] + ceil_div(segs[s].w.N, PW);
        keys[s] = rng::stream_key(segs[s].p.seed, segs[s].p.tensor_id);
    }
    const Partition pt = partition(first_panel[nseg] * PW, M, PW, TM, pool_num_threads());
    const TileConfig cfg = tile_config(G);
    auto task = [&](int64_t t) {
        // every thread (pool workers and the caller) configures its own tiles, per task: other
        // code on the same thread (e.g. oneDNN in torch) may have loaded another configuration
        _tile_loadconfig(&cfg);
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
            const bool q8 = w.bits == 8;
            const bool has_me = q8 || w.offset != 0 || w.mins != nullptr;
            const int64_t n0 = (p - first_panel[s]) * PW;
            const int ncols = static_cast<int>(std::min<int64_t>(PW, w.N - n0));
            repack_panel(w, n0, panel, 0);
            panel_scales(pr, keys[s], n0, sc, me, tmp, has_me);
            float* y = yout + segs[s].col + n0;
            if (G == 32) {
                if (q8) panel_rows_amx<32, true, true>(panel, sc, me, aa, K, NG, M, m0, m1, y, ldy, ncols);
                else if (has_me) panel_rows_amx<32, true, false>(panel, sc, me, aa, K, NG, M, m0, m1, y, ldy, ncols);
                else panel_rows_amx<32, false, false>(panel, sc, me, aa, K, NG, M, m0, m1, y, ldy, ncols);
            } else {
                panel_rows_amx<16, true, true>(panel, sc, me, aa, K, NG, M, m0, m1, y, ldy, ncols);
            }
        }
        _tile_release();
    };
    parallel_for(pt.tasks(), task);
}

}  // namespace edgetune
