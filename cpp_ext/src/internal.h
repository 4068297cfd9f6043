// internal.h — helpers shared by the kernel paths: the problem struct, perturbed-scale rows,
// activation quantization, scratch memory, work partitioning.
//
// Everything here with a body lives in an anonymous namespace: each path's translation unit is
// compiled with its own -m flags, and an ordinary inline function would be emitted once per TU
// and merged by the linker — possibly keeping the AVX-512 copy for the scalar path.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "edgetune/qgemm.h"
#include "edgetune/rng.h"
#include "rng_ops_internal.h"

namespace edgetune {

struct Problem {
    const float* x;  // [M, K]
    int64_t M;
    QMatrix w;
    Perturbation p;
    float* y;  // [M, N]
};

// Per-thread 64-byte-aligned scratch that is reused across calls (slot = independent buffer).
// Defined in qgemm.cpp (plain x86-64 code).
void* thread_scratch(int slot, size_t bytes);
enum ScratchSlot { SCRATCH_PANEL = 0, SCRATCH_SCALES = 1, SCRATCH_ROW = 2, SCRATCH_ACT = 3, SCRATCH_XROW = 4 };
constexpr int kScratchSlots = 5;

// Activations quantized to int8 per group of G (shared by all the integer paths).
struct QuantAct {
    int8_t* q;    // [M, K]
    float* d;     // [M, K/G] scale
    float* sum;   // [M, K/G] d * sum(q): the group sum of the dequantized activations
};

// Path entry points (each in its own translation unit).  The SIMD paths share one driver
// (qgemm_driver.h): y[:, col_s + n) = x · W_s^T for every segment, row stride ldy.
void qgemm_scalar(const Problem& pr);
void qgemm_multi_avx2(const RowSource& src, int64_t M, const Segment* segs, int nseg, float* y, int64_t ldy);
void qgemm_multi_avx512(const RowSource& src, int64_t M, const Segment* segs, int nseg, float* y, int64_t ldy);
void qgemm_multi_amx(const RowSource& src, int64_t M, const Segment* segs, int nseg, float* y, int64_t ldy);
void qgemm_multi_neon(const RowSource& src, int64_t M, const Segment* segs, int nseg, float* y, int64_t ldy);
bool cpu_has_avx2();
bool cpu_has_avx512();
bool cpu_has_amx();  // AMX-INT8 in the CPU, enabled by the OS and granted to this process
bool cpu_has_neon_dotprod();

namespace {

// Perturbed scales of row n: out[g] = s[n,g] + eps_sign * z(n*G + g).  Written as a separate
// product and sum (the library is built with -ffp-contract=off) so it rounds exactly like numpy's
// `scales + np.float32(eps*sign) * z`.
inline void scale_row(const QMatrix& w, const Perturbation& p, uint64_t key, int64_t n, float* out) {
    const int64_t G = w.n_groups();
    const float* s = w.scales + n * G;
    if (!p.active) {
        std::memcpy(out, s, sizeof(float) * G);
        return;
    }
    // s[g] + eps_sign * z(n*G + g): rng_ops' loop, 8 lanes at a time where the CPU allows
    rng_add_scaled(out, s, G, p.eps_sign, key, p.dist, static_cast<uint64_t>(n) * static_cast<uint64_t>(G));
}

// Quantize one activation row to int8 per group of G: q = round(x / d), d = max|x| / 127.
inline void quantize_act_row(const float* x, int64_t K, int G, int8_t* q, float* d, float* sum) {
    for (int64_t g = 0; g < K / G; ++g) {
        const float* xg = x + g * G;
        float amax = 0.0f;
        for (int j = 0; j < G; ++j) amax = std::fmax(amax, std::fabs(xg[j]));
        const float dg = amax / 127.0f;
        const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int s = 0;
        for (int j = 0; j < G; ++j) {
            const int v = static_cast<int>(std::nearbyint(xg[j] * id));
            const int c = v > 127 ? 127 : (v < -127 ? -127 : v);
            q[g * G + j] = static_cast<int8_t>(c);
            s += c;
        }
        d[g] = dg;
        sum[g] = dg * static_cast<float>(s);
    }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The calling thread's K-float buffer for the rows src produces (nullptr for plain rows): the
// argument of src.row in every path's quantizer.
inline float* row_scratch(const RowSource& src, int64_t K) {
    return src.make ? static_cast<float*>(thread_scratch(SCRATCH_XROW, sizeof(float) * K)) : nullptr;
}

// QuantAct for M rows of K in this thread's SCRATCH_ACT buffer (d, sum, then q).
inline QuantAct quant_act_scratch(int64_t M, int64_t K, int64_t NG) {
    char* act = static_cast<char*>(thread_scratch(SCRATCH_ACT, M * K + 2 * sizeof(float) * M * NG + 64));
    QuantAct a;
    a.d = reinterpret_cast<float*>(act);
    a.sum = a.d + M * NG;
    a.q = reinterpret_cast<int8_t*>(a.sum + M * NG);
    return a;
}

// Split the work into (n-panel range) x (m range) tasks: enough tasks to keep every thread busy,
// preferring whole-M tasks (a repacked weight panel is then reused across all rows of x).
struct Partition {
    int64_t n_panels, panels_per_task, n_ptasks, m_per_task, n_mtasks;
    int64_t tasks() const { return n_ptasks * n_mtasks; }
};
inline Partition partition(int64_t N, int64_t M, int64_t panel, int64_t m_align, int threads) {
    Partition pt;
    pt.n_panels = ceil_div(N, panel);
    // several tasks per thread: tasks are claimed dynamically, so a thread slowed down by another
    // process (e.g. torch's OpenMP workers still spinning after their op) is compensated
    const int64_t want = threads <= 1 ? 1 : 8 * threads;
    // rounded down (at least `want` tasks): e.g. 18 panels on 2 threads are 18 tasks, 9 per thread,
    // not 9 tasks of 2 that leave one thread a task more (10% of the call idle on the other)
    pt.panels_per_task = std::max<int64_t>(1, pt.n_panels / want);
    pt.n_ptasks = ceil_div(pt.n_panels, pt.panels_per_task);
    int64_t mt = 1;
    if (pt.n_ptasks < 2 * threads && M >= 2 * m_align) mt = ceil_div(2 * threads, pt.n_ptasks);
    pt.m_per_task = ceil_div(ceil_div(M, mt), m_align) * m_align;
    pt.n_mtasks = ceil_div(M, pt.m_per_task);
    return pt;
}

}  // namespace
}  // namespace edgetune
