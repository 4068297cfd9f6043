// ops_avx512.cpp — AVX-512 twins of ops.cpp's row kernels (built with -mavx512f..., chosen at run
// time).  Each output element gets exactly the operations of the portable loop, in the same order
// (separate products and sums, sequential reductions where ops.cpp has them), so the two paths are
// bit-identical; the speed comes from doing 16 independent elements per instruction and from
// keeping several query rows in flight to hide the latency of the sequential sums.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "ops_internal.h"

namespace edgetune {

bool cpu_has_avx512f() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

bool attention_avx512_ok(const AttnArgs& a) { return a.window == 0 && a.hd % 16 == 0 && a.hd <= 128 && a.hd > 0; }

namespace {

inline __m512 set1(float v) { return _mm512_set1_ps(v); }

// ops.cpp's exp_approx on 16 lanes: the same clamps (written so NaN passes through as there),
// the same round-to-nearest trick, the same polynomial in the same order.
inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(set1(-87.0f), x);  // = x < -87 ? -87 : x
    x = _mm512_min_ps(set1(88.0f), x);   // = x > 88 ? 88 : x
    const __m512 t = _mm512_mul_ps(x, set1(1.44269504088896341f));
    const __m512 fi = _mm512_sub_ps(_mm512_add_ps(t, set1(12582912.0f)), set1(12582912.0f));
    __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(fi, set1(0.693359375f)));
    r = _mm512_sub_ps(r, _mm512_mul_ps(fi, set1(-2.12194440e-4f)));
    __m512 p = set1(1.9875691500e-4f);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), set1(1.3981999507e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), set1(8.3334519073e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), set1(4.1665795894e-2f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), set1(1.6666665459e-1f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), set1(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(p, _mm512_mul_ps(r, r)), r), set1(1.0f));
    const __m512i e = _mm512_add_epi32(_mm512_cvttps_epi32(fi), _mm512_set1_epi32(127));
    return _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(e, 23)));
}

inline __mmask16 head_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }

// ops.cpp's rope_row.  Normal pairs (2i, 2i+1): dst = x*cc + swap(x)*ss with cc = (c, c),
// ss = (-s, s) per pair — x1*c + x2*(-s) is exactly x1*c - x2*s, and x2*c + x1*s exactly
// x1*s + x2*c.  neox pairs (i, i + rd/2) are contiguous halves.  ccss: [rd] cc then [rd] ss for
// this position (normal) — built once per task.
inline void rope_row16(const float* src, float* dst, const float* c, const float* s, const float* ccss, int64_t hd,
                       int64_t rd, bool neox) {
    const int64_t h2 = rd / 2;
    if (neox) {
        int64_t i = 0;
        for (; i + 16 <= h2; i += 16) {  // full vectors: plain loads/stores (they forward to later loads)
            const __m512 x1 = _mm512_loadu_ps(src + i), x2 = _mm512_loadu_ps(src + i + h2);
            const __m512 cv = _mm512_loadu_ps(c + i), sv = _mm512_loadu_ps(s + i);
            _mm512_storeu_ps(dst + i, _mm512_sub_ps(_mm512_mul_ps(x1, cv), _mm512_mul_ps(x2, sv)));
            _mm512_storeu_ps(dst + i + h2, _mm512_add_ps(_mm512_mul_ps(x1, sv), _mm512_mul_ps(x2, cv)));
        }
        for (; i < h2; i += 16) {
            const __mmask16 m = head_mask(h2 - i);
            const __m512 x1 = _mm512_maskz_loadu_ps(m, src + i), x2 = _mm512_maskz_loadu_ps(m, src + i + h2);
            const __m512 cv = _mm512_maskz_loadu_ps(m, c + i), sv = _mm512_maskz_loadu_ps(m, s + i);
            _mm512_mask_storeu_ps(dst + i, m, _mm512_sub_ps(_mm512_mul_ps(x1, cv), _mm512_mul_ps(x2, sv)));
            _mm512_mask_storeu_ps(dst + i + h2, m, _mm512_add_ps(_mm512_mul_ps(x1, sv), _mm512_mul_ps(x2, cv)));
        }
    } else {
        int64_t i = 0;
        for (; i + 16 <= rd; i += 16) {
            const __m512 x = _mm512_loadu_ps(src + i);
            const __m512 xs = _mm512_permute_ps(x, 0xB1);
            _mm512_storeu_ps(dst + i, _mm512_add_ps(_mm512_mul_ps(x, _mm512_loadu_ps(ccss + i)),
                                                    _mm512_mul_ps(xs, _mm512_loadu_ps(ccss + rd + i))));
        }
        for (; i < rd; i += 16) {
            const __mmask16 m = head_mask(rd - i);
            const __m512 x = _mm512_maskz_loadu_ps(m, src + i);
            const __m512 xs = _mm512_permute_ps(x, 0xB1);  // swap within pairs
            const __m512 r = _mm512_add_ps(_mm512_mul_ps(x, _mm512_maskz_loadu_ps(m, ccss + i)),
                                           _mm512_mul_ps(xs, _mm512_maskz_loadu_ps(m, ccss + rd + i)));
            _mm512_mask_storeu_ps(dst + i, m, r);
        }
    }
    for (int64_t i = rd; i < hd; ++i) dst[i] = src[i];
}

// cc/ss of position t for normal RoPE (see rope_row16)
inline void rope_tables(const float* c, const float* s, int64_t rd, float* ccss) {
    for (int64_t i = 0; i < rd / 2; ++i) {
        ccss[2 * i] = c[i];
        ccss[2 * i + 1] = c[i];
        ccss[rd + 2 * i] = -s[i];
        ccss[rd + 2 * i + 1] = s[i];
    }
}

constexpr int R = 4;  // query rows (consecutive positions of one head) in flight

// Scores of R query rows against key columns [u0, u0 + 16*C): sc[r][u] = (sum_d q[r][d]*k[d][u])
// * scale, the sum in order d = 0..hd-1 starting from 0 (ops.cpp's order).
template <int C>
inline void scores(const float* qr, int64_t hd, const float* kt, int64_t Tp, int64_t u0, float scale, float* sc) {
    __m512 acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t d = 0; d < hd; ++d) {
        const float* kr = kt + d * Tp + u0;
        __m512 kv[C];
        for (int c = 0; c < C; ++c) kv[c] = _mm512_loadu_ps(kr + 16 * c);
        for (int r = 0; r < R; ++r) {
            const __m512 qd = set1(qr[r * hd + d]);
            for (int c = 0; c < C; ++c) acc[r][c] = _mm512_add_ps(acc[r][c], _mm512_mul_ps(qd, kv[c]));
        }
    }
    const __m512 sv = set1(scale);
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) _mm512_storeu_ps(sc + r * Tp + u0 + 16 * c, _mm512_mul_ps(acc[r][c], sv));
}

// out rows r < nr: o[r][:] = sum_{u < n[r]} p[r][u] * v[u][:], in order u = 0.. from 0 (ops.cpp's
// order), p[r][u] = e[r][u] * inv[r].  NV = hd / 16 accumulators per row, RO rows at a time
// sharing each loaded v row.
template <int NV, int RO>
inline void weighted_sum(const float* sc, int64_t Tp, const float* inv, const int64_t* n, int nr, const float* v,
                         int64_t ldv, float* const* out) {
    __m512 acc[RO][NV];
    for (int r = 0; r < RO; ++r)
        for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_setzero_ps();
    int64_t nmax = 0;
    for (int r = 0; r < nr; ++r) nmax = std::max(nmax, n[r]);
    for (int64_t u = 0; u < nmax; ++u) {
        const float* vr = v + u * ldv;
        __m512 vv[NV];
        for (int i = 0; i < NV; ++i) vv[i] = _mm512_loadu_ps(vr + 16 * i);
        for (int r = 0; r < RO; ++r) {
            if (r >= nr || u >= n[r]) continue;
            const __m512 p = set1(sc[r * Tp + u] * inv[r]);
            for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_add_ps(acc[r][i], _mm512_mul_ps(p, vv[i]));
        }
    }
    for (int r = 0; r < nr && r < RO; ++r)
        for (int i = 0; i < NV; ++i) _mm512_storeu_ps(out[r] + 16 * i, acc[r][i]);
}

template <int NV>
void attention_task_nv(const AttnArgs& a, int64_t b, int64_t j) {
    constexpr int RO = NV <= 4 ? 4 : 2;
    const int64_t T = a.T, hd = a.hd, half = a.rd / 2, Tp = (T + 15) / 16 * 16, rd = a.rd;
    thread_local std::vector<float> buf;
    buf.resize(static_cast<size_t>(hd * Tp + R * hd + R * Tp + hd + 2 * rd * T));
    float* kt = buf.data();    // [hd][Tp]: roped keys, transposed, zero columns past T
    float* qr = kt + hd * Tp;  // [R][hd] roped query rows
    float* sc = qr + R * hd;   // [R][Tp] scores, then exp
    float* tmp = sc + R * Tp;  // one roped key row
    float* tab = tmp + hd;     // [T][2*rd] normal-RoPE tables
    if (!a.neox)
        for (int64_t u = 0; u < T; ++u) rope_tables(a.cos + u * half, a.sin + u * half, rd, tab + u * 2 * rd);
    for (int64_t u = 0; u < T; ++u) {
        rope_row16(a.k + (b * T + u) * a.ldk + j * hd, tmp, a.cos + u * half, a.sin + u * half, tab + u * 2 * rd,
                   hd, rd, a.neox);
        for (int64_t d = 0; d < hd; ++d) kt[d * Tp + u] = tmp[d];
    }
    for (int64_t d = 0; d < hd; ++d)
        for (int64_t u = T; u < Tp; ++u) kt[d * Tp + u] = 0.0f;
    std::fill(qr, qr + R * hd, 0.0f);
    const float* vbase = a.v + (b * T) * a.ldv + j * hd;
    const int64_t group = a.H / a.Hkv;
    for (int64_t hh = 0; hh < group; ++hh) {
        const int64_t h = j * group + hh;
        for (int64_t t0 = 0; t0 < T; t0 += R) {
            const int nr = static_cast<int>(std::min<int64_t>(R, T - t0));
            for (int r = 0; r < nr; ++r) {
                const int64_t t = t0 + r;
                rope_row16(a.q + (b * T + t) * a.ldq + h * hd, qr + r * hd, a.cos + t * half, a.sin + t * half,
                           tab + t * 2 * rd, hd, rd, a.neox);
            }
            // scores for keys [0, t0 + nr): blocks of 16 columns, up to 4 blocks per pass
            const int64_t nb = (t0 + nr + 15) / 16;
            for (int64_t blk = 0; blk < nb; blk += 4) {
                const int64_t c = std::min<int64_t>(4, nb - blk);
                const int64_t u0 = blk * 16;
                if (c == 4) scores<4>(qr, hd, kt, Tp, u0, a.scale, sc);
                else if (c == 3) scores<3>(qr, hd, kt, Tp, u0, a.scale, sc);
                else if (c == 2) scores<2>(qr, hd, kt, Tp, u0, a.scale, sc);
                else scores<1>(qr, hd, kt, Tp, u0, a.scale, sc);
            }
            // softmax per row: max (exact in any order), exp, then the sequential sum of ops.cpp
            int64_t n[R];
            float sum[R], inv[R];
            for (int r = 0; r < nr; ++r) {
                n[r] = t0 + r + 1;
                float* s = sc + r * Tp;
                __m512 mv = set1(-INFINITY);
                for (int64_t u = 0; u < n[r]; u += 16)
                    mv = _mm512_mask_max_ps(mv, head_mask(n[r] - u), _mm512_loadu_ps(s + u), mv);
                const __m512 mx = set1(_mm512_reduce_max_ps(mv));
                for (int64_t u = 0; u < n[r]; u += 16) {
                    const __mmask16 m = head_mask(n[r] - u);
                    _mm512_storeu_ps(s + u, _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_loadu_ps(s + u), mx))));
                }
                sum[r] = 0.0f;
            }
            // rows in lock step (independent dependency chains); each row stops at its own n
            for (int64_t u = 0; u < n[nr - 1]; ++u)
                for (int r = 0; r < nr; ++r)
                    if (u < n[r]) sum[r] += sc[r * Tp + u];
            for (int r = 0; r < nr; ++r) inv[r] = 1.0f / sum[r];
            float* outs[R];
            for (int r = 0; r < nr; ++r) outs[r] = a.out + (b * T + t0 + r) * (a.H * hd) + h * hd;
            for (int r0 = 0; r0 < nr; r0 += RO)
                weighted_sum<NV, RO>(sc + r0 * Tp, Tp, inv + r0, n + r0, std::min(RO, nr - r0), vbase, a.ldv,
                                     outs + r0);
        }
    }
}

}  // namespace

void attention_task_avx512(const AttnArgs& a, int64_t b, int64_t j) {
    switch (a.hd / 16) {
        case 1: return attention_task_nv<1>(a, b, j);
        case 2: return attention_task_nv<2>(a, b, j);
        case 3: return attention_task_nv<3>(a, b, j);
        case 4: return attention_task_nv<4>(a, b, j);
        case 5: return attention_task_nv<5>(a, b, j);
        case 6: return attention_task_nv<6>(a, b, j);
        case 7: return attention_task_nv<7>(a, b, j);
        default: return attention_task_nv<8>(a, b, j);
    }
}

void silu_rows_avx512(const float* g, const float* u, int64_t m0, int64_t m1, int64_t F, int64_t ld, float* out) {
    const __m512 one = set1(1.0f);
    for (int64_t m = m0; m < m1; ++m) {
        const float* gr = g + m * ld;
        const float* ur = u + m * ld;
        float* o = out + m * F;
        for (int64_t j = 0; j < F; j += 16) {
            const __mmask16 k = head_mask(F - j);
            const __m512 x = _mm512_maskz_loadu_ps(k, gr + j);
            const __m512 nx = _mm512_castsi512_ps(  // -x: flip the sign bit, as the scalar negation
                _mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32(static_cast<int>(0x80000000u))));
            const __m512 e = exp16(nx);
            const __m512 y = _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), _mm512_maskz_loadu_ps(k, ur + j));
            _mm512_mask_storeu_ps(o + j, k, y);
        }
    }
}

namespace {
// the 16 lanes of acc summed in lane order from 0 (ops.cpp's sequential sum of its acc[16])
inline float lanes_sum(__m512 acc) {
    alignas(64) float a16[16];
    _mm512_store_ps(a16, acc);
    float ss = 0.0f;
    for (int j = 0; j < 16; ++j) ss += a16[j];
    return ss;
}

// o[j] = (x[j] * r) * w[j]: the RMSNorm's output row
inline void norm_row(const float* x, float r, const float* w, int64_t D, float* o) {
    const __m512 rv = set1(r);
    for (int64_t j = 0; j < D; j += 16) {
        const __mmask16 k = head_mask(D - j);
        const __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + j), rv),
                                       _mm512_maskz_loadu_ps(k, w + j));
        _mm512_mask_storeu_ps(o + j, k, y);
    }
}
}  // namespace

void rms_rows_avx512(const float* x, int64_t m0, int64_t m1, int64_t D, int64_t ldx, const float* w, float eps,
                     float* out) {
    for (int64_t m = m0; m < m1; ++m) {
        const float* xr = x + m * ldx;
        __m512 acc = _mm512_setzero_ps();  // lane j = ops.cpp's acc[j]
        int64_t i = 0;
        for (; i + 16 <= D; i += 16) {
            const __m512 v = _mm512_loadu_ps(xr + i);
            acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
        }
        float ss = lanes_sum(acc);
        for (; i < D; ++i) ss += xr[i] * xr[i];
        norm_row(xr, 1.0f / std::sqrt(ss / static_cast<float>(D) + eps), w, D, out + m * D);
    }
}

void add_rms_rows_avx512(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m0, int64_t m1, int64_t D,
                         const float* w, float eps, float* sum, float* out) {
    for (int64_t m = m0; m < m1; ++m) {
        const float* ar = a + m * lda;
        const float* br = b + m * ldb;
        float* sr = sum + m * D;
        __m512 acc = _mm512_setzero_ps();  // lane j = ops.cpp's acc[j]
        int64_t i = 0;
        for (; i + 16 <= D; i += 16) {
            const __m512 v = _mm512_add_ps(_mm512_loadu_ps(ar + i), _mm512_loadu_ps(br + i));
            _mm512_storeu_ps(sr + i, v);
            acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
        }
        float ss = lanes_sum(acc);
        for (; i < D; ++i) {
            const float v = ar[i] + br[i];
            sr[i] = v;
            ss += v * v;
        }
        norm_row(sr, 1.0f / std::sqrt(ss / static_cast<float>(D) + eps), w, D, out + m * D);
    }
}

}  // namespace edgetune
