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
// Blocking: 32 activation rows x one 32-row weight panel (2 x 2 tiles), 4 TDPs per group; the C
// tiles of GB groups are stored to an L1 buffer and folded into the fp32 block (32 x 32, L1) in
// one pass.  A TDP covers one group (K = 32 or 16), so every TDP costs a 1 KB tile store plus the
// fp32 epilogue: measured on a Sapphire Rapids VM, TMUL and AVX-512 work do not overlap there, and
// that epilogue (cvt, mul, fma, fma per 16 outputs and group) is what bounds this path.
// The next panel's codes are prefetched into L2 while the current one computes.
#include <immintrin.h>
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <string>

#include "edgetune/thread_pool.h"
#include "internal.h"
#include "qgemm_driver.h"
#include "qgemm_x86_panel.h"

namespace edgetune {

namespace {

#if defined(__linux__)
constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl: ARCH_REQ_XCOMP_PERM
constexpr long kXfeatureXtiledata = 18;
#endif

bool detect_amx() {
    // EDGETUNE_AMX=0 turns the path off (e.g. to compare with avx512 in a whole-model benchmark)
    const char* env = std::getenv("EDGETUNE_AMX");
    if (env && std::string(env) == "0") return false;
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
#if defined(__linux__)
    // Linux keeps the tile data disabled (XFD) until the process asks for it; without this a
    // tile instruction faults.  The permission is process-wide and asked for once.
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;  // no known way to ask this OS for the tile state: never risk a fault
#endif
}

// LDTILECFG's 64-byte memory operand.
struct alignas(64) TileConfig {
    uint8_t palette = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// 2 x 2 blocking: tmm0..3 C[2i+j] (16 x 16 int32: activation tile i x weight tile j), tmm4/5
// A[i] (16 activation rows x G bytes), tmm6/7 B[j] (G/4 rows x 64 bytes of the panel).
TileConfig tile_config(int G) {
    TileConfig c;
    for (int t = 0; t < 4; ++t) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    for (int i = 0; i < 2; ++i) {
        c.rows[4 + i] = 16;
        c.colsb[4 + i] = static_cast<uint16_t>(G);
        c.rows[6 + i] = static_cast<uint8_t>(G / 4);
        c.colsb[6 + i] = 64;
    }
    return c;
}

constexpr int TM = 16;  // activation rows per tile

// The quantized activations of the avx512 path (same values), laid out in A tiles: rows padded
// with zeros to a multiple of TM, q [M/TM][NG][TM][G] (one tile = TM·G contiguous bytes), and per
// (tile, group) the TM rows' d, sum = d·Σq and (q8 only) corr = 128·Σq, each [M/TM][NG][TM].
struct AmxAct {
    int8_t* q;
    float* d;
    float* sum;
    int32_t* corr;
};

constexpr int GB = 2;  // groups per epilogue pass (and per buffered batch of C tiles)

// The TMUL part of groups [g0, g0 + nb): for each group, MB x 2 TDPBSSD into C0..3 and their
// stores to cb[group][C tile][16 x 16].
template <int MB, int G>
__attribute__((always_inline)) inline void amx_groups(const int8_t* xq0, const int8_t* xq1, const uint8_t* panel,
                                                      int64_t g0, int nb, int32_t (*cb)[4][TM * 16]) {
    constexpr int64_t PSTRIDE = G / 4 * 128;  // panel bytes per group
    constexpr int64_t ATILE = TM * G;         // activation bytes per (tile, group)
    for (int k = 0; k < nb; ++k) {
        const int64_t g = g0 + k;
        _tile_loadd(4, xq0 + g * ATILE, G);
        _tile_loadd(6, panel + g * PSTRIDE, 128);
        _tile_zero(0);
        _tile_dpbssd(0, 4, 6);
        _tile_loadd(7, panel + g * PSTRIDE + 64, 128);
        _tile_zero(1);
        _tile_dpbssd(1, 4, 7);
        if (MB == 2) {
            _tile_loadd(5, xq1 + g * ATILE, G);
            _tile_zero(2);
            _tile_zero(3);
            _tile_dpbssd(2, 5, 6);
            _tile_dpbssd(3, 5, 7);
        }
        _tile_stored(0, cb[k][0], 64);
        _tile_stored(1, cb[k][1], 64);
        if (MB == 2) {
            _tile_stored(2, cb[k][2], 64);
            _tile_stored(3, cb[k][3], 64);
        }
    }
}

// The fp32 part of groups [g0, g0 + NB) for the 32 x 32 block: per output vector, the avx512
// path's operations in its order — y = fma(float(dot (+ corr)), s·d, y), then y = fma(e, sum, y).
template <int MB, int NB, bool ME, bool Q8, bool FIRST = false>
__attribute__((always_inline)) inline void epilogue(float (*yacc)[PW], const int32_t (*cb)[4][TM * 16],
                                                    const float* sc, const float* me, const float* const* dr,
                                                    const float* const* sr, const int32_t* const* cr, int64_t g0) {
    __m512 s[NB][2], e[NB][2];
    for (int k = 0; k < NB; ++k)
        for (int j = 0; j < 2; ++j) {
            s[k][j] = _mm512_load_ps(sc + (g0 + k) * PW + 16 * j);
            e[k][j] = ME ? _mm512_load_ps(me + (g0 + k) * PW + 16 * j) : _mm512_setzero_ps();
        }
    for (int ti = 0; ti < MB; ++ti) {
#pragma GCC unroll 4
        for (int i = 0; i < TM; ++i) {
            const int r = 16 * ti + i;
            for (int j = 0; j < 2; ++j) {
                __m512 y = FIRST ? _mm512_setzero_ps() : _mm512_load_ps(yacc[r] + 16 * j);
                for (int k = 0; k < NB; ++k) {
                    const int64_t gi = (g0 + k) * TM + i;
                    __m512i acc = _mm512_load_si512(cb[k][2 * ti + j] + 16 * i);
                    if (Q8) acc = _mm512_add_epi32(acc, _mm512_set1_epi32(cr[ti][gi]));
                    y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(s[k][j], _mm512_set1_ps(dr[ti][gi])), y);
                    if (ME) y = _mm512_fmadd_ps(e[k][j], _mm512_set1_ps(sr[ti][gi]), y);
                }
                _mm512_store_ps(yacc[r] + 16 * j, y);
            }
        }
    }
}

// y[16·MB activation rows from tile mt, the panel's 32 columns] = Σ_g epilogue(dot_g); rows < nrows
// and columns < ncols stored.  The TMUL computes batch b+1 while the vector units fold batch b.
template <int MB, int G, bool ME, bool Q8>
void panel_block(const uint8_t* panel, const float* sc, const float* me, const AmxAct& aa, int64_t NG,
                 int64_t mt, int nrows, float* y, int64_t ldy, int ncols) {
    alignas(64) int32_t cbuf[2][GB][4][TM * 16];
    alignas(64) float yacc[2 * TM][PW];
    // the output block's lines are fetched into L2 now, so that its stores at the end do not wait
    // for memory (rows ldy apart, often a multiple of 4 KB: such a burst of misses measured up to
    // 40% of the time)
    for (int r = 0; r < nrows; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(y + r * ldy), _MM_HINT_T1);
        if (ncols > 16) _mm_prefetch(reinterpret_cast<const char*>(y + r * ldy + 16), _MM_HINT_T1);
    }
    const int8_t* xq0 = aa.q + mt * NG * TM * G;
    const int8_t* xq1 = xq0 + NG * TM * G;
    const int64_t t1 = MB == 2 ? mt + 1 : mt;
    const float* dr[2] = {aa.d + mt * NG * TM, aa.d + t1 * NG * TM};
    const float* sr[2] = {aa.sum + mt * NG * TM, aa.sum + t1 * NG * TM};
    const int32_t* cr[2] = {aa.corr + mt * NG * TM, aa.corr + t1 * NG * TM};
    amx_groups<MB, G>(xq0, xq1, panel, 0, static_cast<int>(std::min<int64_t>(GB, NG)), cbuf[0]);
    for (int64_t g0 = 0, b = 0; g0 < NG; g0 += GB, ++b) {
        const int64_t g1 = g0 + GB;
        if (g1 < NG)
            amx_groups<MB, G>(xq0, xq1, panel, g1, static_cast<int>(std::min<int64_t>(GB, NG - g1)),
                          cbuf[(b + 1) & 1]);
        // the first batch starts from zero accumulators (as the avx512 path does) instead of
        // loading them; a last batch may hold fewer groups
        if (g1 > NG) {
            if (g0 == 0) epilogue<MB, 1, ME, Q8, true>(yacc, cbuf[b & 1], sc, me, dr, sr, cr, g0);
            else epilogue<MB, 1, ME, Q8>(yacc, cbuf[b & 1], sc, me, dr, sr, cr, g0);
        } else if (g0 == 0) {
            epilogue<MB, GB, ME, Q8, true>(yacc, cbuf[b & 1], sc, me, dr, sr, cr, g0);
        } else {
            epilogue<MB, GB, ME, Q8>(yacc, cbuf[b & 1], sc, me, dr, sr, cr, g0);
        }
    }
    const __mmask16 k0 = ncols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << ncols) - 1);
    const __mmask16 k1 = ncols >= 32 ? 0xFFFF : ncols <= 16 ? 0 : static_cast<__mmask16>((1u << (ncols - 16)) - 1);
    for (int r = 0; r < nrows; ++r) {
        _mm512_mask_storeu_ps(y + r * ldy, k0, _mm512_load_ps(yacc[r]));
        _mm512_mask_storeu_ps(y + r * ldy + 16, k1, _mm512_load_ps(yacc[r] + 16));
    }
}

template <int G, bool ME, bool Q8>
void panel_rows_amx(const uint8_t* panel, const float* sc, const float* me, const AmxAct& aa, int64_t NG,
                    int64_t m0, int64_t m1, float* y, int64_t ldy, int ncols, const NextPanel& next) {
    PanelPrefetcher pf(next, PW, ceil_div(m1 - m0, 2 * TM));
    for (int64_t m = m0; m < m1; m += 2 * TM) {
        pf.step();
        const int nrows = static_cast<int>(std::min<int64_t>(2 * TM, m1 - m));
        if (nrows > TM) panel_block<2, G, ME, Q8>(panel, sc, me, aa, NG, m / TM, nrows, y + m * ldy, ldy, ncols);
        else panel_block<1, G, ME, Q8>(panel, sc, me, aa, NG, m / TM, nrows, y + m * ldy, ldy, ncols);
    }
}

// The amx microkernels in the shared driver (qgemm_driver.h).
struct AmxKernel {
    static constexpr int PW = ::edgetune::PW, MR = TM;
    static constexpr bool UNSIGNED_CODES = true;  // the avx512 path's convention (see the top)
    using Act = AmxAct;
    using Panel = uint8_t;

    // the avx512 path's quantize_row, written into the tile layout (one tile of TM rows per task)
    static Act quantize(const RowSource& src, int64_t M, int64_t K, int G, const Segment* segs, int nseg) {
        const int64_t NG = K / G, MT = ceil_div(M, TM);
        bool any_q8 = false;
        for (int s = 0; s < nseg; ++s) any_q8 = any_q8 || segs[s].w.bits == 8;
        char* act = static_cast<char*>(
            thread_scratch(SCRATCH_ACT, MT * TM * K + (2 * sizeof(float) + sizeof(int32_t)) * MT * TM * NG + 64));
        AmxAct aa;
        aa.d = reinterpret_cast<float*>(act);
        aa.sum = aa.d + MT * TM * NG;
        aa.corr = reinterpret_cast<int32_t*>(aa.sum + MT * TM * NG);
        aa.q = reinterpret_cast<int8_t*>(aa.corr + MT * TM * NG);
        auto quant = [&](int64_t mt) {
            int8_t* q = aa.q + mt * NG * TM * G;
            float* xb = row_scratch(src, K);
            const int64_t tg = mt * NG * TM;  // index of (tile, group 0, row 0) in d/sum/corr
            for (int i = 0; i < TM; ++i) {
                const int64_t m = mt * TM + i;
                if (m < M) {
                    // straight into the tile layout: group g of row i at q[(g·TM + i)·G]
                    quantize_row(src.row(m, K, xb), K, G, q + i * G, aa.d + tg + i, aa.sum + tg + i, TM * G, TM);
                } else {  // padding rows: all zero
                    for (int64_t g = 0; g < NG; ++g) {
                        std::memset(q + (g * TM + i) * G, 0, G);
                        aa.d[tg + g * TM + i] = aa.sum[tg + g * TM + i] = 0.0f;
                    }
                }
                if (any_q8)
                    for (int64_t g = 0; g < NG; ++g) {
                        const int8_t* qg = q + (g * TM + i) * G;
                        int32_t s = 0;
                        for (int j = 0; j < G; ++j) s += qg[j];
                        aa.corr[tg + g * TM + i] = 128 * s;
                    }
            }
        };
        parallel_for(MT, quant);
        return aa;
    }
    static size_t panel_bytes(int64_t NG, int G) { return NG * G * PW; }
    // q8 codes stay signed for TDPBSSD (the 128·Σx term restores the avx512 path's unsigned dot)
    static void repack(const QMatrix& w, int64_t n0, uint8_t* dst) { repack_panel(w, n0, dst, 0); }
    // every thread (pool workers and the caller) configures its own tiles, per task: other code
    // on the same thread (e.g. oneDNN in torch) may have loaded another configuration
    static void begin_task(int G) {
        static const TileConfig c32 = tile_config(32), c16 = tile_config(16);
        _tile_loadconfig(G == 32 ? &c32 : &c16);
    }
    static void end_task() { _tile_release(); }
    static void rows(const uint8_t* panel, const float* sc, const float* me, bool has_me, const AmxAct& aa,
                     const QMatrix& w, int64_t, int64_t NG, int64_t, int64_t m0, int64_t m1, float* y,
                     int64_t ldy, int ncols, const NextPanel& next) {
        if (w.group == 32) {
            if (w.bits == 8) panel_rows_amx<32, true, true>(panel, sc, me, aa, NG, m0, m1, y, ldy, ncols, next);
            else if (has_me) panel_rows_amx<32, true, false>(panel, sc, me, aa, NG, m0, m1, y, ldy, ncols, next);
            else panel_rows_amx<32, false, false>(panel, sc, me, aa, NG, m0, m1, y, ldy, ncols, next);
        } else {
            panel_rows_amx<16, true, true>(panel, sc, me, aa, NG, m0, m1, y, ldy, ncols, next);  // q8 only
        }
    }
};

}  // namespace

bool cpu_has_amx() {
    static const bool ok = detect_amx();
    return ok;
}

void qgemm_multi_amx(const RowSource& src, int64_t M, const Segment* segs, int nseg, float* y, int64_t ldy) {
    run_qgemm<AmxKernel>(src, M, segs, nseg, y, ldy);
}

}  // namespace edgetune
