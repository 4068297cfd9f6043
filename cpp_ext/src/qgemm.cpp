// qgemm.cpp — qgemm() entry: argument checks, CPU dispatch, scratch memory, and the scalar
// reference path (plain fp32 dequantize-and-dot, no activation quantization).
#include <cstring>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "edgetune/qgemm.h"
#include "edgetune/thread_pool.h"
#include "internal.h"

namespace edgetune {

// ---------------------------------------------------------------------------------------------
// scratch

namespace {
struct Scratch {
    void* ptr = nullptr;
    size_t size = 0;
    ~Scratch() { std::free(ptr); }
};
thread_local Scratch t_scratch[kScratchSlots];
}  // namespace

void* thread_scratch(int slot, size_t bytes) {
    Scratch& s = t_scratch[slot];
    if (bytes > s.size) {
        std::free(s.ptr);
        s.size = (bytes + 4095) & ~size_t(4095);
        s.ptr = std::aligned_alloc(64, s.size);
        if (!s.ptr) throw std::bad_alloc();
    }
    return s.ptr;
}

// ---------------------------------------------------------------------------------------------
// CPU features and dispatch

#if !defined(EDGETUNE_HAVE_AVX2)
void qgemm_multi_avx2(const RowSource&, int64_t, const Segment*, int, float*, int64_t) {
    throw std::invalid_argument("qgemm: AVX2 path not compiled");
}
bool cpu_has_avx2() { return false; }
#endif
#if !defined(EDGETUNE_HAVE_AVX512)
void qgemm_multi_avx512(const RowSource&, int64_t, const Segment*, int, float*, int64_t) {
    throw std::invalid_argument("qgemm: AVX512 path not compiled");
}
bool cpu_has_avx512() { return false; }
#endif
#if !defined(EDGETUNE_HAVE_AMX)
void qgemm_multi_amx(const RowSource&, int64_t, const Segment*, int, float*, int64_t) {
    throw std::invalid_argument("qgemm: AMX path not compiled");
}
bool cpu_has_amx() { return false; }
#endif
#if !defined(EDGETUNE_HAVE_NEON)
void qgemm_multi_neon(const RowSource&, int64_t, const Segment*, int, float*, int64_t) {
    throw std::invalid_argument("qgemm: NEON path not compiled");
}
bool cpu_has_neon_dotprod() { return false; }
#endif

namespace {
using MultiFn = void (*)(const RowSource&, int64_t, const Segment*, int, float*, int64_t);
// The shared-driver entry of a SIMD path; nullptr for the scalar reference.
MultiFn multi_fn(Path p) {
    switch (p) {
        case Path::AVX2: return qgemm_multi_avx2;
        case Path::AVX512: return qgemm_multi_avx512;
        case Path::AMX: return qgemm_multi_amx;
        case Path::NEON: return qgemm_multi_neon;
        default: return nullptr;
    }
}
}  // namespace

std::vector<Path> available_paths() {
    std::vector<Path> v{Path::Scalar};
    if (cpu_has_avx2()) v.push_back(Path::AVX2);
    if (cpu_has_avx512()) v.push_back(Path::AVX512);
    if (cpu_has_amx()) v.push_back(Path::AMX);
    if (cpu_has_neon_dotprod()) v.push_back(Path::NEON);
    return v;
}

Path best_path() {
    static const Path best = available_paths().back();  // listed slowest to fastest
    return best;
}

const char* path_name(Path p) {
    switch (p) {
        case Path::Auto: return "auto";
        case Path::Scalar: return "scalar";
        case Path::AVX2: return "avx2";
        case Path::AVX512: return "avx512";
        case Path::NEON: return "neon";
        case Path::AMX: return "amx";
    }
    return "?";
}

Path path_from_name(const std::string& name) {
    for (Path p : {Path::Auto, Path::Scalar, Path::AVX2, Path::AVX512, Path::NEON, Path::AMX})
        if (name == path_name(p)) return p;
    throw std::invalid_argument("qgemm: unknown path '" + name +
                                "' (choose auto, scalar, avx2, avx512, amx, neon)");
}

int64_t prepack_q4_bytes(int64_t N, int64_t K) { return (N + 31) / 32 * 32 * (K / 32) * 16; }

void prepack_q4(const QMatrix& w, uint8_t* dst) {
    if (w.bits != 4 || w.group != 32 || w.K % 32 != 0 || w.N < 0)
        throw std::invalid_argument("prepack_q4: a q4 matrix with group 32 and K a multiple of 32 is required");
    const int64_t NG = w.n_groups(), P = (w.N + 31) / 32;
    auto task = [&](int64_t p) {
        for (int64_t g = 0; g < NG; ++g)
            for (int h = 0; h < 2; ++h) {
                uint8_t* o = dst + ((p * NG + g) * 2 + h) * 256;
                for (int n = 0; n < 16; ++n) {
                    const int64_t row = 32 * p + 16 * h + n;
                    for (int d = 0; d < 4; ++d) {
                        if (row < w.N) std::memcpy(o + d * 64 + 4 * n, w.block(row, g) + 4 * d, 4);
                        else std::memset(o + d * 64 + 4 * n, 0, 4);
                    }
                }
            }
    };
    parallel_for(P, task);
}

void set_num_threads(int n) { pool_set_num_threads(n); }
int get_num_threads() { return pool_num_threads(); }

void qgemm_check(const QMatrix& w, Path path) {
    const std::string shape = "W[N=" + std::to_string(w.N) + ", K=" + std::to_string(w.K) + "]";
    if (w.bits != 4 && w.bits != 8) throw std::invalid_argument("qgemm: bits must be 4 or 8");
    if (w.bits == 4 && w.group != 32) throw std::invalid_argument("qgemm: q4 group must be 32");
    if (w.bits == 8 && w.group != 16 && w.group != 32)
        throw std::invalid_argument("qgemm: q8 group must be 16 or 32, got " + std::to_string(w.group));
    if (w.N < 0 || w.K <= 0) throw std::invalid_argument("qgemm: bad shape " + shape);
    if (w.K % w.group != 0)
        throw std::invalid_argument("qgemm: K=" + std::to_string(w.K) + " of " + shape +
                                    " is not a multiple of the group size " + std::to_string(w.group));
    if (w.bits == 4 && (w.offset < 0 || w.offset > 15))
        throw std::invalid_argument("qgemm: q4 offset must be in 0..15");
    if (w.bits == 8 && w.offset != 0) throw std::invalid_argument("qgemm: q8 has no offset");
    if (w.N > 0 && (!w.codes || !w.scales)) throw std::invalid_argument("qgemm: null codes/scales");
    if (path != Path::Auto) {
        bool ok = false;
        for (Path p : available_paths()) ok = ok || p == path;
        if (!ok)
            throw std::invalid_argument(std::string("qgemm: path '") + path_name(path) +
                                        "' is not available on this CPU/build");
    }
}

void qgemm(const float* x, int64_t M, const QMatrix& w, const Perturbation& p, float* y, Path path) {
    qgemm_check(w, path);
    if (M < 0) throw std::invalid_argument("qgemm: M < 0");
    if (M == 0 || w.N == 0) return;
    if (const MultiFn f = multi_fn(path == Path::Auto ? best_path() : path)) {
        const Segment seg{w, p, 0};
        RowSource src;
        src.x = x;
        f(src, M, &seg, 1, y, w.N);
    } else {
        qgemm_scalar(Problem{x, M, w, p, y});
    }
}

void qgemm_multi(const float* x, int64_t M, const std::vector<Segment>& segs, float* y, int64_t ldy,
                 Path path) {
    RowSource src;
    src.x = x;
    qgemm_multi_rows(src, M, segs, y, ldy, path);
}

void qgemm_multi_rows(const RowSource& src, int64_t M, const std::vector<Segment>& segs, float* y, int64_t ldy,
                      Path path) {
    if (segs.empty()) return;
    if (segs.size() > static_cast<size_t>(kMaxSegments))
        throw std::invalid_argument("qgemm_multi: at most " + std::to_string(kMaxSegments) + " segments");
    int64_t cols = 0;
    for (const Segment& s : segs) {
        qgemm_check(s.w, path);
        if (s.w.K != segs[0].w.K || s.w.group != segs[0].w.group)
            throw std::invalid_argument("qgemm_multi: all segments must share K and the group size");
        if (s.col < 0 || s.col + s.w.N > ldy)
            throw std::invalid_argument("qgemm_multi: segment columns exceed the row stride of y");
        cols += s.w.N;
    }
    if (M < 0) throw std::invalid_argument("qgemm: M < 0");
    if (M == 0 || cols == 0) return;
    const Path p = path == Path::Auto ? best_path() : path;
    if (const MultiFn f = multi_fn(p)) {
        f(src, M, segs.data(), static_cast<int>(segs.size()), y, ldy);
        return;
    }
    // the scalar reference reads plain rows: produced rows are materialized first
    const int64_t K = segs[0].w.K;
    thread_local std::vector<float> xs;
    const float* x = src.x;
    if (src.make) {
        xs.resize(static_cast<size_t>(M * K));
        for (int64_t m = 0; m < M; ++m) src.make(src.ctx, m, xs.data() + m * K);
        x = xs.data();
    }
    // the scalar reference: one call per segment into a scratch buffer (kept per thread: no
    // allocation in the steady state), then scatter the columns
    thread_local std::vector<float> tmp;
    for (const Segment& s : segs) {
        if (s.w.N == 0) continue;
        tmp.resize(static_cast<size_t>(M * s.w.N));
        qgemm(x, M, s.w, s.p, tmp.data(), p);
        for (int64_t m = 0; m < M; ++m)
            std::memcpy(y + m * ldy + s.col, tmp.data() + m * s.w.N, sizeof(float) * s.w.N);
    }
}

// ---------------------------------------------------------------------------------------------
// scalar reference path: dequantize each weight row to fp32 with the (perturbed) scales, then
// dot it with every activation row (group partial sums in fp32, total in fp64).

void qgemm_scalar(const Problem& pr) {
    const QMatrix& w = pr.w;
    const int64_t K = w.K, N = w.N, G = w.group, NG = w.n_groups();
    const uint64_t key = rng::stream_key(pr.p.seed, pr.p.tensor_id);
    constexpr int64_t ROWS = 8;
    auto task = [&](int64_t t) {
        float* wrow = static_cast<float*>(thread_scratch(SCRATCH_ROW, sizeof(float) * (K + NG)));
        float* sc = wrow + K;
        const int64_t n1 = std::min(N, (t + 1) * ROWS);
        for (int64_t n = t * ROWS; n < n1; ++n) {
            scale_row(w, pr.p, key, n, sc);
            for (int64_t g = 0; g < NG; ++g) {
                const uint8_t* b = w.block(n, g);
                const float mn = w.mins ? w.mins[n * NG + g] : 0.0f;
                for (int64_t j = 0; j < G; ++j) {
                    int q;
                    if (w.bits == 4) q = (j < 16 ? (b[j] & 0x0F) : (b[j - 16] >> 4)) - w.offset;
                    else q = static_cast<int8_t>(b[j]);
                    wrow[g * G + j] = sc[g] * static_cast<float>(q) + mn;
                }
            }
            for (int64_t m = 0; m < pr.M; ++m) {
                const float* xm = pr.x + m * K;
                double acc = 0.0;
                for (int64_t g = 0; g < NG; ++g) {
                    float part = 0.0f;
                    for (int64_t j = 0; j < G; ++j) part += xm[g * G + j] * wrow[g * G + j];
                    acc += part;
                }
                pr.y[m * N + n] = static_cast<float>(acc);
            }
        }
    };
    parallel_for(ceil_div(N, ROWS), task);
}

}  // namespace edgetune
