// ops.cpp — RMSNorm, SiLU*up, causal attention with RoPE (see ops.h).  Plain C++ written so the
// compiler vectorizes it (no reductions that need reassociation); on x86-64 every entry point is
// cloned for AVX-512 / AVX2 / baseline and picked at load time (target_clones).  These loops
// define the arithmetic; on CPUs with AVX-512F the row kernels run as ops_avx512.cpp's
// bit-identical intrinsics instead (ops_set_simd(false) forces the loops, for tests).
#include "edgetune/ops.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "edgetune/thread_pool.h"
#include "ops_internal.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ET_CLONES
#endif

namespace edgetune {
namespace {

constexpr int64_t ROWS_PER_TASK = 8;

ET_CLONES void rms_rows(const float* x, int64_t m0, int64_t m1, int64_t D, int64_t ldx, const float* w, float eps,
                        float* out) {
    for (int64_t m = m0; m < m1; ++m) {
        const float* xr = x + m * ldx;
        float acc[16] = {};
        int64_t i = 0;
        for (; i + 16 <= D; i += 16)
            for (int j = 0; j < 16; ++j) acc[j] += xr[i + j] * xr[i + j];
        float ss = 0.0f;
        for (int j = 0; j < 16; ++j) ss += acc[j];
        for (; i < D; ++i) ss += xr[i] * xr[i];
        const float r = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
        float* o = out + m * D;
        for (int64_t j = 0; j < D; ++j) o[j] = (xr[j] * r) * w[j];
    }
}

// rms_rows of the row sum = a + b, written as it is formed: the squares are accumulated from the
// rounded sums in rms_rows' lane order (16 partial sums, summed in lane order, then the tail)
ET_CLONES void add_rms_rows(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m0, int64_t m1,
                            int64_t D, const float* w, float eps, float* sum, float* out) {
    for (int64_t m = m0; m < m1; ++m) {
        const float* ar = a + m * lda;
        const float* br = b + m * ldb;
        float* sr = sum + m * D;
        float acc[16] = {};
        int64_t i = 0;
        for (; i + 16 <= D; i += 16)
            for (int j = 0; j < 16; ++j) {
                const float v = ar[i + j] + br[i + j];
                sr[i + j] = v;
                acc[j] += v * v;
            }
        float ss = 0.0f;
        for (int j = 0; j < 16; ++j) ss += acc[j];
        for (; i < D; ++i) {
            const float v = ar[i] + br[i];
            sr[i] = v;
            ss += v * v;
        }
        const float r = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
        float* o = out + m * D;
        for (int64_t j = 0; j < D; ++j) o[j] = (sr[j] * r) * w[j];
    }
}

ET_CLONES void silu_rows(const float* g, const float* u, int64_t m0, int64_t m1, int64_t F, int64_t ld, float* out) {
    for (int64_t m = m0; m < m1; ++m) {
        const float* gr = g + m * ld;
        const float* ur = u + m * ld;
        float* o = out + m * F;
        for (int64_t j = 0; j < F; ++j) {
            const float x = gr[j];
            o[j] = x / (1.0f + exp_approx(-x)) * ur[j];
        }
    }
}

// rotate one head row (hd floats) into dst; pairs as described in ops.h

ET_CLONES void attention_task(const AttnArgs& a, int64_t b, int64_t j) {
    const int64_t T = a.T, hd = a.hd, half = a.rd / 2;
    thread_local std::vector<float> buf;
    buf.resize(static_cast<size_t>(hd * T + 2 * hd + T));
    float* kt = buf.data();       // [hd][T]: roped keys, transposed
    float* qr = kt + hd * T;      // one roped query row
    float* tmp = qr + hd;         // one roped key row
    float* sc = tmp + hd;         // scores [T]
    for (int64_t u = 0; u < T; ++u) {
        rope_row(a.k + (b * T + u) * a.ldk + j * hd, tmp, a.cos + u * half, a.sin + u * half, hd, a.rd, a.neox);
        for (int64_t d = 0; d < hd; ++d) kt[d * T + u] = tmp[d];
    }
    const int64_t group = a.H / a.Hkv;
    for (int64_t hh = 0; hh < group; ++hh) {
        const int64_t h = j * group + hh;
        for (int64_t t = 0; t < T; ++t) {
            rope_row(a.q + (b * T + t) * a.ldq + h * hd, qr, a.cos + t * half, a.sin + t * half, hd, a.rd, a.neox);
            const int64_t lo = a.window > 0 ? std::max<int64_t>(0, t - a.window + 1) : 0, n = t + 1;
            for (int64_t u = lo; u < n; ++u) sc[u] = 0.0f;
            for (int64_t d = 0; d < hd; ++d) {
                const float qd = qr[d];
                const float* kr = kt + d * T;
                for (int64_t u = lo; u < n; ++u) sc[u] += qd * kr[u];
            }
            float mx = -INFINITY;
            for (int64_t u = lo; u < n; ++u) {
                sc[u] *= a.scale;
                mx = sc[u] > mx ? sc[u] : mx;
            }
            for (int64_t u = lo; u < n; ++u) sc[u] = exp_approx(sc[u] - mx);
            float sum = 0.0f;
            for (int64_t u = lo; u < n; ++u) sum += sc[u];
            const float inv = 1.0f / sum;
            float* o = a.out + (b * T + t) * (a.H * hd) + h * hd;
            for (int64_t d = 0; d < hd; ++d) o[d] = 0.0f;
            for (int64_t u = lo; u < n; ++u) {
                const float p = sc[u] * inv;
                const float* vr = a.v + (b * T + u) * a.ldv + j * hd;
                for (int64_t d = 0; d < hd; ++d) o[d] += p * vr[d];
            }
        }
    }
}

#if defined(EDGETUNE_HAVE_AVX512)
bool simd_default() { return cpu_has_avx512f(); }
#else
bool simd_default() { return false; }
#endif
std::atomic<bool> g_simd{simd_default()};

}  // namespace

bool ops_simd() { return g_simd.load(std::memory_order_relaxed); }

bool ops_set_simd(bool on) {
    g_simd.store(on && simd_default(), std::memory_order_relaxed);
    return ops_simd();
}

namespace {
// rows [m0, m1) of an element-wise op, ROWS_PER_TASK rows per task: rows(m0, m1, simd) runs the
// AVX-512 twin when simd (ops_simd(), read once per call), else the portable loop
template <class Rows>
void by_rows(int64_t M, Rows rows) {
#if defined(EDGETUNE_HAVE_AVX512)
    const bool simd = ops_simd();
#else
    const bool simd = false;
#endif
    auto task = [&](int64_t t) { rows(t * ROWS_PER_TASK, std::min(M, (t + 1) * ROWS_PER_TASK), simd); };
    parallel_for((M + ROWS_PER_TASK - 1) / ROWS_PER_TASK, task);
}
}  // namespace

void rms_norm(const float* x, int64_t M, int64_t D, int64_t ldx, const float* w, float eps, float* out) {
    by_rows(M, [&](int64_t m0, int64_t m1, bool simd) {
#if defined(EDGETUNE_HAVE_AVX512)
        if (simd) return rms_rows_avx512(x, m0, m1, D, ldx, w, eps, out);
#endif
        (void)simd;
        rms_rows(x, m0, m1, D, ldx, w, eps, out);
    });
}

void add_rms_norm(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t M, int64_t D, const float* w,
                  float eps, float* sum, float* out) {
    by_rows(M, [&](int64_t m0, int64_t m1, bool simd) {
#if defined(EDGETUNE_HAVE_AVX512)
        if (simd) return add_rms_rows_avx512(a, lda, b, ldb, m0, m1, D, w, eps, sum, out);
#endif
        (void)simd;
        add_rms_rows(a, lda, b, ldb, m0, m1, D, w, eps, sum, out);
    });
}

void silu_mul_row(const float* g, const float* u, int64_t F, float* out) {
#if defined(EDGETUNE_HAVE_AVX512)
    if (ops_simd()) return silu_rows_avx512(g, u, 0, 1, F, F, out);
#endif
    silu_rows(g, u, 0, 1, F, F, out);
}

void silu_mul(const float* g, const float* u, int64_t M, int64_t F, int64_t ld, float* out) {
    by_rows(M, [&](int64_t m0, int64_t m1, bool simd) {
#if defined(EDGETUNE_HAVE_AVX512)
        if (simd) return silu_rows_avx512(g, u, m0, m1, F, ld, out);
#endif
        (void)simd;
        silu_rows(g, u, m0, m1, F, ld, out);
    });
}

void attention(const float* q, const float* k, const float* v, int64_t ldq, int64_t ldk, int64_t ldv,
               int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t hd, const float* cos, const float* sin,
               int64_t rope_dim, bool neox, float scale, float* out, int64_t window) {
    // a window that hides nothing is plain causal attention (the same result, the fast kernel)
    const AttnArgs a{q, k, v, ldq, ldk, ldv, B, T, H, Hkv, hd, cos, sin, rope_dim, neox, scale, out,
                     window > 0 && window < T ? window : 0};
#if defined(EDGETUNE_HAVE_AVX512)
    const bool simd = ops_simd() && attention_avx512_ok(a);   // the intrinsics: no window
#endif
    auto task = [&](int64_t t) {
#if defined(EDGETUNE_HAVE_AVX512)
        if (simd) return attention_task_avx512(a, t / Hkv, t % Hkv);
#endif
        attention_task(a, t / Hkv, t % Hkv);
    };
    parallel_for(B * Hkv, task);
}

}  // namespace edgetune
