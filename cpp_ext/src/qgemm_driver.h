// qgemm_driver.h — the driver every SIMD path shares: activations quantized once, one parallel loop
// over (panels of PW weight rows of all segments) x (ranges of activation rows), and per panel the
// repack of the codes, the (perturbed) scales and the per-group correction term; only the
// microkernels (and the layouts they want) differ per instruction set.
//
// A path supplies a Kernel type:
//   static constexpr int PW, MR;           panel width; activation-row alignment of the tasks
//   static constexpr bool UNSIGNED_CODES;  codes repacked unsigned (q4 nibbles, q8 q+128): the
//                                          correction is m - off·s'; else codes are q - offset and
//                                          the correction is the plain min m
//   using Act, Panel;                      quantized activations; repacked code element type
//   static Act quantize(src, M, K, G, segs, nseg) (runs its own parallel_for; row m = src.row(m, ...))
//   static size_t panel_bytes(NG, G);  static void repack(w, n0, Panel* dst)
//   static void begin_task(G), end_task()         per-thread state (AMX tile configuration)
//   static void rows(panel, sc, corr, has_corr, act, w, K, NG, M, m0, m1, y, ldy, ncols, next)
// Body in an anonymous namespace: each path's translation unit instantiates it with its own -m
// flags (see internal.h).
#pragma once

#include <algorithm>

#include "edgetune/thread_pool.h"
#include "internal.h"

namespace edgetune {
namespace {

// The panel a task computes after the current one: its code rows are fetched into L2 a few rows
// at a time while the current panel computes (a repack otherwise stalls on memory: 16-32 row
// streams defeat the hardware prefetcher).
struct NextPanel {
    const QMatrix* w = nullptr;
    int64_t n0 = 0;
};

inline void prefetch_panel_rows(const NextPanel& next, int pw, int64_t r0, int64_t r1) {
    if (!next.w) return;
    const QMatrix& w = *next.w;
    if (w.packed && w.bits == 4) {  // one contiguous run of NG·512 bytes: its share [r0, r1) of pw
        const int64_t bytes = w.n_groups() * 512;
        const char* base = reinterpret_cast<const char*>(w.packed + (next.n0 / 32) * bytes);
        const int64_t b1 = std::min<int64_t>(bytes, bytes * std::min<int64_t>(r1, pw) / pw);
        for (int64_t b = bytes * r0 / pw / 64 * 64; b < b1; b += 64) __builtin_prefetch(base + b, 0, 2);
        return;
    }
    const int64_t bytes = (w.n_groups() - 1) * w.block_stride + (w.bits == 4 ? 16 : w.group);
    for (int64_t r = r0; r < std::min<int64_t>(r1, pw) && next.n0 + r < w.N; ++r) {
        const char* row = reinterpret_cast<const char*>(w.block(next.n0 + r, 0));
        for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 0, 2);
    }
}

// Spreads prefetch_panel_rows over the `steps` microkernel calls of a panel.
struct PanelPrefetcher {
    const NextPanel& next;
    int pw;
    int64_t per_step, done = 0;
    PanelPrefetcher(const NextPanel& n, int panel_width, int64_t steps)
        : next(n), pw(panel_width), per_step(ceil_div(panel_width, std::max<int64_t>(steps, 1))) {}
    void step() {
        if (!next.w || done >= pw) return;
        prefetch_panel_rows(next, pw, done, done + per_step);
        done += per_step;
    }
};

// Panel scales sc[g][PW] (perturbed; 0 for rows >= N) and corrections corr[g][PW]:
// m - off·s' with off = the q4 offset or 128 for q8 (unsigned codes), else the min m (0 without).
template <int PW>
void panel_scales(const QMatrix& w, const Perturbation& p, uint64_t key, int64_t n0, bool unsigned_codes,
                  float* sc, float* corr, float* tmp) {
    const int64_t NG = w.n_groups();
    const float off = w.bits == 8 ? 128.0f : static_cast<float>(w.offset);
    for (int nn = 0; nn < PW; ++nn) {
        const int64_t n = n0 + nn;
        if (n >= w.N) {
            for (int64_t g = 0; g < NG; ++g) sc[g * PW + nn] = corr[g * PW + nn] = 0.0f;
            continue;
        }
        scale_row(w, p, key, n, tmp);
        for (int64_t g = 0; g < NG; ++g) sc[g * PW + nn] = tmp[g];
        const float* mn = w.mins ? w.mins + n * NG : nullptr;
        if (unsigned_codes) {
            for (int64_t g = 0; g < NG; ++g) {
                const float t = off * tmp[g];
                corr[g * PW + nn] = (mn ? mn[g] : 0.0f) - t;
            }
        } else {
            for (int64_t g = 0; g < NG; ++g) corr[g * PW + nn] = mn ? mn[g] : 0.0f;
        }
    }
}

// y[:, col_s + n) = x · W_s^T for every segment s (all share K and the group size).
template <class Kernel>
void run_qgemm(const RowSource& src, int64_t M, const Segment* segs, int nseg, float* yout, int64_t ldy) {
    constexpr int PW = Kernel::PW;
    using Panel = typename Kernel::Panel;
    const int64_t K = segs[0].w.K, NG = segs[0].w.n_groups();
    const int G = segs[0].w.group;

    const typename Kernel::Act act = Kernel::quantize(src, M, K, G, segs, nseg);

    int64_t first_panel[kMaxSegments + 1];
    uint64_t keys[kMaxSegments];
    first_panel[0] = 0;
    for (int s = 0; s < nseg; ++s) {
        first_panel[s + 1] = first_panel[s] + ceil_div(segs[s].w.N, PW);
        keys[s] = rng::stream_key(segs[s].p.seed, segs[s].p.tensor_id);
    }
    const Partition pt = partition(first_panel[nseg] * PW, M, PW, Kernel::MR, pool_num_threads());
    auto task = [&](int64_t t) {
        Kernel::begin_task(G);
        const int64_t pi = t / pt.n_mtasks, mi = t % pt.n_mtasks;
        const int64_t m0 = mi * pt.m_per_task, m1 = std::min(M, m0 + pt.m_per_task);
        Panel* panel = static_cast<Panel*>(thread_scratch(SCRATCH_PANEL, Kernel::panel_bytes(NG, G)));
        float* sc = static_cast<float*>(thread_scratch(SCRATCH_SCALES, sizeof(float) * (2 * NG * PW + NG)));
        float* corr = sc + NG * PW;
        float* tmp = corr + NG * PW;
        const int64_t p1 = std::min(pt.n_panels, (pi + 1) * pt.panels_per_task);
        int s = 0;
        for (int64_t p = pi * pt.panels_per_task; p < p1; ++p) {
            while (p >= first_panel[s + 1]) ++s;
            const QMatrix& w = segs[s].w;
            const int64_t n0 = (p - first_panel[s]) * PW;
            const int ncols = static_cast<int>(std::min<int64_t>(PW, w.N - n0));
            const bool has_corr = Kernel::UNSIGNED_CODES ? (w.bits == 8 || w.offset != 0 || w.mins != nullptr)
                                                         : w.mins != nullptr;
            Kernel::repack(w, n0, panel);
            panel_scales<PW>(w, segs[s].p, keys[s], n0, Kernel::UNSIGNED_CODES, sc, corr, tmp);
            NextPanel next;
            if (p + 1 < p1) {
                const int s1 = p + 1 >= first_panel[s + 1] ? s + 1 : s;
                next.w = &segs[s1].w;
                next.n0 = (p + 1 - first_panel[s1]) * PW;
            }
            Kernel::rows(panel, sc, corr, has_corr, act, w, K, NG, M, m0, m1, yout + segs[s].col + n0, ldy,
                         ncols, next);
        }
        Kernel::end_task();
    };
    parallel_for(pt.tasks(), task);
}

}  // namespace
}  // namespace edgetune
