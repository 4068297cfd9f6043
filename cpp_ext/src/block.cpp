// block.cpp — a transformer block in one call (see block.h): the per-op kernels (ops.h, qgemm)
// composed in C++ over a persistent scratch arena, plus the fp32 LoRA terms.
#include "edgetune/block.h"

#include <algorithm>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "edgetune/ops.h"
#include "edgetune/thread_pool.h"

namespace edgetune {
namespace {

// Grows to the largest problem seen and stays: steady-state calls allocate nothing.
struct Arena {
    std::vector<float> x, qkv, att, o, gu, act, lora_t, lora_u;
    std::vector<Segment> segs;
    static void fit(std::vector<float>& v, int64_t n) {
        if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
    }
    int64_t bytes() const {
        size_t n = 0;
        for (const auto* v : {&x, &qkv, &att, &o, &gu, &act, &lora_t, &lora_u}) n += v->size();
        return static_cast<int64_t>(n * sizeof(float));
    }
};
Arena g_arena;
std::mutex g_arena_mutex;  // one block call at a time (the kernels' pool is shared anyway)

constexpr int64_t LORA_ROWS = 4;

// y[m, col0 + n] += scale * sum_r (sum_k x[m,k] a[r,k]) b[n,r]: t = x A^T then u = t B^T, both
// fp32 with a fixed summation order per element (thread-count independent).
void add_lora(const LoraTerm& l, const float* x, int64_t M, int64_t K, int64_t N, float* y, int64_t ldy,
              Arena& ar) {
    const int64_t R = l.rank;
    Arena::fit(ar.lora_t, M * R);
    Arena::fit(ar.lora_u, M * N);
    float* t = ar.lora_t.data();
    float* u = ar.lora_u.data();
    auto first = [&](int64_t task) {
        for (int64_t m = task * LORA_ROWS; m < std::min(M, (task + 1) * LORA_ROWS); ++m)
            for (int64_t r = 0; r < R; ++r) {
                const float* xr = x + m * K;
                const float* ar_ = l.a + r * K;
                float acc[8] = {};
                int64_t k = 0;
                for (; k + 8 <= K; k += 8)
                    for (int j = 0; j < 8; ++j) acc[j] += xr[k + j] * ar_[k + j];
                float s = 0.0f;
                for (int j = 0; j < 8; ++j) s += acc[j];
                for (; k < K; ++k) s += xr[k] * ar_[k];
                t[m * R + r] = s;
            }
    };
    parallel_for((M + LORA_ROWS - 1) / LORA_ROWS, first);
    auto second = [&](int64_t task) {
        for (int64_t m = task * LORA_ROWS; m < std::min(M, (task + 1) * LORA_ROWS); ++m) {
            const float* tr = t + m * R;
            float* yr = y + m * ldy;
            for (int64_t n = 0; n < N; ++n) {
                const float* br = l.b + n * R;
                float s = 0.0f;
                for (int64_t r = 0; r < R; ++r) s += tr[r] * br[r];
                const float v = l.scale * s;
                yr[n] = yr[n] + v;
            }
        }
    };
    parallel_for((M + LORA_ROWS - 1) / LORA_ROWS, second);
}

// out[m, j] = a[m, j] + b[m, j] (residual), rows of width D at strides lda/ldb, out contiguous.
void add_rows(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t M, int64_t D, float* out) {
    constexpr int64_t ROWS = 16;
    auto task = [&](int64_t t) {
        for (int64_t m = t * ROWS; m < std::min(M, (t + 1) * ROWS); ++m) {
            const float* ar = a + m * lda;
            const float* br = b + m * ldb;
            float* o = out + m * D;
            for (int64_t j = 0; j < D; ++j) o[j] = ar[j] + br[j];
        }
    };
    parallel_for((M + ROWS - 1) / ROWS, task);
}

// y[m, col + j] += bias[j] for j < N (a new value per element, as torch's q + b)
void add_bias(float* y, int64_t ldy, int64_t M, int64_t N, const float* bias) {
    for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < N; ++j) y[m * ldy + j] = y[m * ldy + j] + bias[j];
}

void check(const BlockConfig& c, const BlockWeights& w) {
    auto bad = [](const std::string& s) { throw std::invalid_argument("block_forward: " + s); };
    if (c.n_embd <= 0 || c.n_head <= 0 || c.n_head_kv <= 0 || c.n_head % c.n_head_kv || c.head_dim <= 0 ||
        c.n_head * c.head_dim != c.n_embd || c.n_ff <= 0 || c.rope_dim < 0 || c.rope_dim > c.head_dim ||
        c.rope_dim % 2)
        bad("inconsistent config (n_embd, heads, head_dim, n_ff, rope_dim)");
    const int64_t kv = c.n_head_kv * c.head_dim;
    const int64_t want[BM_COUNT][2] = {{c.n_embd, c.n_embd}, {kv, c.n_embd}, {kv, c.n_embd}, {c.n_embd, c.n_embd},
                                       {c.n_ff, c.n_embd},   {c.n_ff, c.n_embd}, {c.n_embd, c.n_ff}};
    static const char* names[BM_COUNT] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"};
    for (int i = 0; i < BM_COUNT; ++i) {
        if (w.w[i].N != want[i][0] || w.w[i].K != want[i][1])
            bad(std::string(names[i]) + " is [" + std::to_string(w.w[i].N) + ", " + std::to_string(w.w[i].K) +
                "], expected [" + std::to_string(want[i][0]) + ", " + std::to_string(want[i][1]) + "]");
        if (w.lora[i].a && (w.lora[i].rank <= 0 || !w.lora[i].b)) bad(std::string(names[i]) + ": bad LoRA term");
    }
    if (!w.attn_norm || !w.ffn_norm) bad("missing norm weights");
}

void block_locked(const BlockConfig& c, const BlockWeights& w, const float* h_in, float* h_out, int64_t B,
                  int64_t T, const float* cos, const float* sin, Path path, Arena& ar) {
    const int64_t M = B * T, D = c.n_embd, kv = c.n_head_kv * c.head_dim, F = c.n_ff;
    const int64_t nqkv = D + 2 * kv;
    Arena::fit(ar.x, M * D);
    Arena::fit(ar.qkv, M * nqkv);
    Arena::fit(ar.att, M * D);
    Arena::fit(ar.o, M * D);
    Arena::fit(ar.gu, M * 2 * F);
    Arena::fit(ar.act, M * F);
    float *x = ar.x.data(), *qkv = ar.qkv.data(), *att = ar.att.data(), *o = ar.o.data(), *gu = ar.gu.data(),
          *act = ar.act.data();

    // attention half
    rms_norm(h_in, M, D, D, w.attn_norm, c.rms_eps, x);
    std::vector<Segment>& segs = ar.segs;  // capacity kept across calls
    segs.clear();
    for (int i = BM_Q; i <= BM_V; ++i) {
        Segment s;
        s.w = w.w[i];
        s.p = w.p[i];
        s.col = i == BM_Q ? 0 : (i == BM_K ? D : D + kv);
        segs.push_back(s);
    }
    qgemm_multi(x, M, segs, qkv, nqkv, path);
    for (int i = BM_Q; i <= BM_V; ++i) {
        const int64_t col = segs[i].col, N = w.w[i].N;
        if (w.lora[i].a) add_lora(w.lora[i], x, M, D, N, qkv + col, nqkv, ar);
        if (w.bias[i]) add_bias(qkv + col, nqkv, M, N, w.bias[i]);
    }
    attention(qkv, qkv + D, qkv + D + kv, nqkv, nqkv, nqkv, B, T, c.n_head, c.n_head_kv, c.head_dim, cos, sin,
              c.rope_dim, c.neox, c.attn_scale, att);
    qgemm(att, M, w.w[BM_O], w.p[BM_O], o, path);
    if (w.lora[BM_O].a) add_lora(w.lora[BM_O], att, M, D, D, o, D, ar);
    add_rows(h_in, D, o, D, M, D, h_out);  // h_out may alias h_in: element-wise, read before write

    // MLP half
    rms_norm(h_out, M, D, D, w.ffn_norm, c.rms_eps, x);
    segs.clear();
    for (int i = BM_GATE; i <= BM_UP; ++i) {
        Segment s;
        s.w = w.w[i];
        s.p = w.p[i];
        s.col = i == BM_GATE ? 0 : F;
        segs.push_back(s);
    }
    qgemm_multi(x, M, segs, gu, 2 * F, path);
    if (w.lora[BM_GATE].a) add_lora(w.lora[BM_GATE], x, M, D, F, gu, 2 * F, ar);
    if (w.lora[BM_UP].a) add_lora(w.lora[BM_UP], x, M, D, F, gu + F, 2 * F, ar);
    silu_mul(gu, gu + F, M, F, 2 * F, act);
    qgemm(act, M, w.w[BM_DOWN], w.p[BM_DOWN], o, path);
    if (w.lora[BM_DOWN].a) add_lora(w.lora[BM_DOWN], act, M, F, D, o, D, ar);
    add_rows(h_out, D, o, D, M, D, h_out);
}

}  // namespace

void block_forward(const BlockConfig& c, const BlockWeights& w, const float* h_in, float* h_out, int64_t B,
                   int64_t T, const float* cos, const float* sin, Path path) {
    blocks_forward(c, &w, 1, h_in, h_out, B, T, cos, sin, path);
}

void blocks_forward(const BlockConfig& c, const BlockWeights* layers, int n, const float* h_in, float* h_out,
                    int64_t B, int64_t T, const float* cos, const float* sin, Path path) {
    if (B < 0 || T <= 0) throw std::invalid_argument("block_forward: B >= 0 and T > 0 required");
    for (int i = 0; i < n; ++i) check(c, layers[i]);
    if (n <= 0 || B == 0) {
        if (n <= 0 && h_out != h_in) std::copy(h_in, h_in + B * T * c.n_embd, h_out);
        return;
    }
    std::lock_guard<std::mutex> lk(g_arena_mutex);
    // layer 0 reads h_in; every later layer updates h_out in place (add_rows is element-wise)
    block_locked(c, layers[0], h_in, h_out, B, T, cos, sin, path, g_arena);
    for (int i = 1; i < n; ++i) block_locked(c, layers[i], h_out, h_out, B, T, cos, sin, path, g_arena);
}

int64_t block_arena_bytes() {
    std::lock_guard<std::mutex> lk(g_arena_mutex);
    return g_arena.bytes();
}

}  // namespace edgetune
