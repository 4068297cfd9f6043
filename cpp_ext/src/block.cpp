// block.cpp — a transformer block in one call (see block.h): the per-op kernels (ops.h, qgemm)
// composed in C++ over a persistent scratch arena, plus the block's own small pieces: fp32 LoRA
// terms, sparse deltas, per-head q/k norms, GELU(tanh) gate, sliding-window attention, fp32 rows
// for unquantized matrices, and the calibration sums of the sparse mask.
#include "edgetune/block.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "edgetune/ops.h"
#include "edgetune/thread_pool.h"
#include "ops_internal.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ET_CLONES
#endif

namespace edgetune {
namespace {

// Grows to the largest problem seen and stays: steady-state calls allocate nothing.
struct Arena {
    std::vector<float> x, qkv, qn, kn, tmp, att, o, o2, gu, act, lora_t, lora_u, h, kept_att, kept_h;
    std::vector<Segment> segs;
    static void fit(std::vector<float>& v, int64_t n) {
        if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
    }
    int64_t bytes() const {
        size_t n = 0;
        for (const auto* v : {&x, &qkv, &qn, &kn, &tmp, &att, &o, &o2, &gu, &act, &lora_t, &lora_u, &h, &kept_att,
                              &kept_h})
            n += v->size();
        return static_cast<int64_t>(n * sizeof(float));
    }
};
Arena g_arena;
std::mutex g_arena_mutex;  // one block call at a time (the kernels' pool is shared anyway)
int64_t g_ffn_rows = 0;    // rows the last layer of the latest call ran after its attention

constexpr int64_t LORA_ROWS = 4;
constexpr int64_t ROWS = 16;

// y[m, col0 + n] += scale * sum_r (sum_k x[m,k] a[r,k]) b[n,r]: t = x A^T then u = t B^T, both
// fp32 with a fixed summation order per element (thread-count independent).
void add_lora(const LoraTerm& l, const float* x, int64_t M, int64_t K, int64_t N, float* y, int64_t ldy,
              Arena& ar) {
    const int64_t R = l.rank;
    Arena::fit(ar.lora_t, M * R);
    float* t = ar.lora_t.data();
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

// y[m, rows[i]] += x[m, cols[i]] * delta[i], i in order (torch's index_add of the reference);
// rows of y at stride ldy, x contiguous [M, K].
void add_sparse(const SparseTerm& s, const float* x, int64_t M, int64_t K, float* y, int64_t ldy) {
    auto task = [&](int64_t t) {
        for (int64_t m = t * ROWS; m < std::min(M, (t + 1) * ROWS); ++m) {
            const float* xr = x + m * K;
            float* yr = y + m * ldy;
            for (int64_t i = 0; i < s.n; ++i) {
                const float c = xr[s.cols[i]] * s.delta[i];
                yr[s.rows[i]] = yr[s.rows[i]] + c;
            }
        }
    };
    parallel_for((M + ROWS - 1) / ROWS, task);
}

// acc[j] += sum_m x[m, j]^2 in float64, rows in order (the sparse mask's calibration statistics)
void add_input_sq(const float* x, int64_t M, int64_t K, double* acc) {
    constexpr int64_t COLS = 64;
    auto task = [&](int64_t t) {
        const int64_t j0 = t * COLS, j1 = std::min(K, (t + 1) * COLS);
        for (int64_t m = 0; m < M; ++m) {
            const float* xr = x + m * K;
            for (int64_t j = j0; j < j1; ++j) {
                const double v = static_cast<double>(xr[j]);
                acc[j] += v * v;
            }
        }
    };
    parallel_for((K + COLS - 1) / COLS, task);
}

// out[m, j] = a[m, j] + b[m, j] (residual), rows of width D at strides lda/ldb, out contiguous.
void add_rows(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t M, int64_t D, float* out) {
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

// dst [M, n] contiguous = columns [0, n) of src rows at stride lds
void copy_cols(const float* src, int64_t lds, int64_t M, int64_t n, float* dst) {
    for (int64_t m = 0; m < M; ++m) std::memcpy(dst + m * n, src + m * lds, static_cast<size_t>(n) * sizeof(float));
}

// dst [n, D] contiguous = rows idx[0..n) of src [*, D]
void gather_rows(const float* src, const int64_t* idx, int64_t n, int64_t D, float* dst) {
    for (int64_t i = 0; i < n; ++i)
        std::memcpy(dst + i * D, src + idx[i] * D, static_cast<size_t>(D) * sizeof(float));
}



ET_CLONES void gelu_rows(const float* g, const float* u, int64_t m0, int64_t m1, int64_t F, int64_t ld, float* out) {
    // GELU(tanh) = 0.5 x (1 + tanh(b (x + k x^3))) = x / (1 + exp(-2 b (x + k x^3))): the same
    // function without 1 + tanh's cancellation, and branch-free exp, so the loop vectorizes
    // (std::tanh per element cost ~100 ns here: 119 ms for one [512, 2048] gate)
    const float kBeta2 = static_cast<float>(2.0 * 0.7978845608028654), kKappa = 0.044715f;  // 2 sqrt(2/pi)
    for (int64_t m = m0; m < m1; ++m) {
        const float* gr = g + m * ld;
        const float* ur = u + m * ld;
        float* o = out + m * F;
        for (int64_t j = 0; j < F; ++j) {
            const float x = gr[j];
            const float x3 = x * x * x;
            const float e = exp_approx(-(kBeta2 * (x + kKappa * x3)));
            o[j] = x / (1.0f + e) * ur[j];
        }
    }
}

ET_CLONES void dense_rows(const float* x, int64_t m0, int64_t m1, int64_t K, const float* w, int64_t n0,
                          int64_t n1, float* y, int64_t ldy) {
    for (int64_t m = m0; m < m1; ++m) {
        const float* xr = x + m * K;
        for (int64_t n = n0; n < n1; ++n) {
            const float* wr = w + n * K;
            float acc[16] = {};
            int64_t k = 0;
            for (; k + 16 <= K; k += 16)
                for (int j = 0; j < 16; ++j) acc[j] += xr[k + j] * wr[k + j];
            float s = 0.0f;
            for (int j = 0; j < 16; ++j) s += acc[j];
            for (; k < K; ++k) s += xr[k] * wr[k];
            y[m * ldy + n] = s;
        }
    }
}

const char* const kNames[BM_COUNT] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"};

bool fused_qkv(const BlockWeights& w) { return w.w[BM_K].N == 0 && w.w[BM_V].N == 0; }
bool fused_gate_up(const BlockWeights& w) { return w.w[BM_GATE].N == 0; }

void check(const BlockConfig& c, const BlockWeights& w) {
    auto bad = [](const std::string& s) { throw std::invalid_argument("block_forward: " + s); };
    if (c.n_embd <= 0 || c.n_head <= 0 || c.n_head_kv <= 0 || c.n_head % c.n_head_kv || c.head_dim <= 0 ||
        c.n_ff <= 0 || c.rope_dim < 0 || c.rope_dim > c.head_dim || c.rope_dim % 2)
        bad("inconsistent config (n_embd, heads, head_dim, n_ff, rope_dim)");
    if (c.act != ACT_SILU && c.act != ACT_GELU_TANH) bad("unknown activation " + std::to_string(c.act));
    const int64_t D = c.n_embd, qd = c.q_dim(), kv = c.n_head_kv * c.head_dim, F = c.n_ff;
    const bool fq = fused_qkv(w), fg = fused_gate_up(w);
    const int64_t want[BM_COUNT][2] = {{fq ? qd + 2 * kv : qd, D}, {fq ? 0 : kv, D}, {fq ? 0 : kv, D}, {D, qd},
                                       {fg ? 0 : F, D}, {fg ? 2 * F : F, D}, {D, F}};
    for (int i = 0; i < BM_COUNT; ++i) {
        if (w.w[i].N != want[i][0] || (w.w[i].N && w.w[i].K != want[i][1]))
            bad(std::string(kNames[i]) + " is [" + std::to_string(w.w[i].N) + ", " + std::to_string(w.w[i].K) +
                "], expected [" + std::to_string(want[i][0]) + ", " + std::to_string(want[i][1]) + "]" +
                (fq || fg ? " (fused layout)" : ""));
        if (w.w[i].N == 0 && (w.lora[i].a || w.sparse[i].rows || w.input_sq[i] || w.dense[i]))
            bad(std::string(kNames[i]) + " is absent (fused layout) but has terms");
        if (w.lora[i].a && (w.lora[i].rank <= 0 || !w.lora[i].b)) bad(std::string(kNames[i]) + ": bad LoRA term");
        if (w.sparse[i].n < 0 || (w.sparse[i].n > 0 && (!w.sparse[i].rows || !w.sparse[i].cols || !w.sparse[i].delta)))
            bad(std::string(kNames[i]) + ": bad sparse term");
    }
    if (!w.attn_norm || !w.ffn_norm) bad("missing norm weights");
    if (!w.q_norm != !w.k_norm) bad("q and k head norms come together");
    if (!w.cos != !w.sin) bad("a layer's RoPE tables come as cos and sin together");
}

// y[:, col_i ...] = x · W_i^T for the listed matrices (absent ones skipped): float32 rows through
// dense_gemm, codes through qgemm_multi, one call per run of equal bits and group (= separate calls)
void gemm_mats(const BlockWeights& w, std::initializer_list<int> mats, const int64_t* cols, const float* x,
               int64_t M, float* y, int64_t ldy, Path path, Arena& ar) {
    std::vector<Segment>& segs = ar.segs;  // capacity kept across calls
    segs.clear();
    auto flush = [&] {
        if (!segs.empty()) qgemm_multi(x, M, segs, y, ldy, path);
        segs.clear();
    };
    int j = 0;
    for (int i : mats) {
        const int64_t col = cols[j++];
        if (w.w[i].N == 0) continue;
        if (w.dense[i]) {
            dense_gemm(x, M, w.w[i].K, w.dense[i], w.w[i].N, y + col, ldy);
            continue;
        }
        if (!segs.empty() && (segs[0].w.bits != w.w[i].bits || segs[0].w.group != w.w[i].group)) flush();
        Segment s;
        s.w = w.w[i];
        s.p = w.p[i];
        s.col = col;
        segs.push_back(s);
    }
    flush();
}

// whether matrix i has a trainable-set term (LoRA, sparse deltas, calibration sums): they read its
// input as floats
bool has_terms(const BlockWeights& w, int i) {
    return w.input_sq[i] || w.lora[i].a || w.sparse[i].n > 0;
}

// The MLP's activation rows act(gate)·up, one at a time (the down projection's RowSource)
struct ActRows {
    const float *g, *u;
    int64_t ld, F;
    bool gelu;
    static void make(const void* ctx, int64_t m, float* row) {
        const ActRows& a = *static_cast<const ActRows*>(ctx);
        if (a.gelu) gelu_rows(a.g + m * a.ld, a.u + m * a.ld, 0, 1, a.F, a.F, row);
        else silu_mul_row(a.g + m * a.ld, a.u + m * a.ld, a.F, row);
    }
};

// what the trainable set adds to matrix i's output y (LoRA, then sparse deltas, as the reference's
// linear_extra), and the calibration sums of its input x [M, K]
void matrix_terms(const BlockWeights& w, int i, const float* x, int64_t M, float* y, int64_t ldy, Arena& ar) {
    if (w.w[i].N == 0) return;
    const int64_t K = w.w[i].K, N = w.w[i].N;
    if (w.input_sq[i]) add_input_sq(x, M, K, w.input_sq[i]);
    if (w.lora[i].a) add_lora(w.lora[i], x, M, K, N, y, ldy, ar);
    if (w.sparse[i].n > 0) add_sparse(w.sparse[i], x, M, K, y, ldy);
}

// What a block_locked call does besides h_out = block(h_in) (blocks_forward sets it per layer):
struct LayerIO {
    bool x_ready = false;             // ar.x already holds rms_norm(h_in, attn_norm) (see next_norm)
    const float* next_norm = nullptr;  // non-null: the last residual add also leaves rms_norm(h_out,
                                       // next_norm) in ar.x, the next layer's attention input
    const int64_t* keep = nullptr;     // non-null: only rows keep[0..n_keep) of the attention output
    int64_t n_keep = 0;                // go on (o, residual, MLP); h_out is [n_keep, D] in that order
};

void block_locked(const BlockConfig& c, const BlockWeights& w, const float* h_in, float* h_out, int64_t B,
                  int64_t T, const float* cos, const float* sin, Path path, Arena& ar, const LayerIO& io) {
    const int64_t M = B * T, D = c.n_embd, qd = c.q_dim(), kv = c.n_head_kv * c.head_dim, F = c.n_ff;
    const int64_t hd = c.head_dim, nqkv = qd + 2 * kv;
    const int64_t Mk = io.keep ? io.n_keep : M;  // rows after the attention
    Arena::fit(ar.x, std::max(M, Mk) * D);        // (resize keeps a ready x)
    Arena::fit(ar.qkv, M * nqkv);
    Arena::fit(ar.att, M * qd);
    Arena::fit(ar.o, Mk * D);
    Arena::fit(ar.gu, Mk * 2 * F);
    Arena::fit(ar.act, Mk * F);
    if (w.q_norm) {
        Arena::fit(ar.qn, M * qd);
        Arena::fit(ar.kn, M * kv);
        Arena::fit(ar.tmp, M * std::max(qd, kv));
    }
    if (w.post_attn_norm || w.post_ffn_norm) Arena::fit(ar.o2, Mk * D);
    if (io.keep) {
        Arena::fit(ar.kept_att, Mk * qd);
        Arena::fit(ar.kept_h, Mk * D);
    }
    float *x = ar.x.data(), *qkv = ar.qkv.data(), *att = ar.att.data(), *o = ar.o.data(), *gu = ar.gu.data(),
          *act = ar.act.data();

    // attention half: q | k | v columns of qkv (one fused matrix or three), every row
    if (!io.x_ready) rms_norm(h_in, M, D, D, w.attn_norm, c.rms_eps, x);
    const int64_t qkv_cols[3] = {0, qd, qd + kv};
    gemm_mats(w, {BM_Q, BM_K, BM_V}, qkv_cols, x, M, qkv, nqkv, path, ar);
    for (int i = BM_Q; i <= BM_V; ++i) matrix_terms(w, i, x, M, qkv + qkv_cols[i], nqkv, ar);
    for (int i = 0; i < 3; ++i)
        if (w.bias[i]) add_bias(qkv + qkv_cols[i], nqkv, M, i == 0 ? qd : kv, w.bias[i]);
    const float *q = qkv, *k = qkv + qd;
    int64_t ldq = nqkv, ldk = nqkv;
    if (w.q_norm) {  // RMSNorm over each head (rows of head_dim) before RoPE
        copy_cols(qkv, nqkv, M, qd, ar.tmp.data());
        rms_norm(ar.tmp.data(), M * c.n_head, hd, hd, w.q_norm, c.rms_eps, ar.qn.data());
        copy_cols(qkv + qd, nqkv, M, kv, ar.tmp.data());
        rms_norm(ar.tmp.data(), M * c.n_head_kv, hd, hd, w.k_norm, c.rms_eps, ar.kn.data());
        q = ar.qn.data();
        k = ar.kn.data();
        ldq = qd;
        ldk = kv;
    }
    const float* lc = w.cos ? w.cos : cos;
    const float* ls = w.sin ? w.sin : sin;
    attention(q, k, qkv + qd + kv, ldq, ldk, nqkv, B, T, c.n_head, c.n_head_kv, hd, lc, ls, c.rope_dim, c.neox,
              c.attn_scale, att, w.window);

    // from here on, Mk rows: every row, or the kept ones (row results do not depend on the others:
    // activations are quantized per row, every later op is per row)
    const float* a_in = att;  // attention output rows that go on
    const float* res = h_in;  // and their residual rows (read before h_out is written: it may alias)
    if (io.keep) {
        gather_rows(att, io.keep, Mk, qd, ar.kept_att.data());
        gather_rows(h_in, io.keep, Mk, D, ar.kept_h.data());
        a_in = ar.kept_att.data();
        res = ar.kept_h.data();
    }
    const int64_t o_col = 0;
    gemm_mats(w, {BM_O}, &o_col, a_in, Mk, o, D, path, ar);
    matrix_terms(w, BM_O, a_in, Mk, o, D, ar);
    const float* branch = o;
    if (w.post_attn_norm) {
        rms_norm(o, Mk, D, D, w.post_attn_norm, c.rms_eps, ar.o2.data());
        branch = ar.o2.data();
    }
    // residual + the FFN's RMSNorm in one pass (h_out may alias res: element-wise, read before write)
    add_rms_norm(res, D, branch, D, Mk, D, w.ffn_norm, c.rms_eps, h_out, x);

    // MLP half: gate | up columns of gu (one fused [gate; up] matrix or two)
    const int64_t gu_cols[2] = {0, fused_gate_up(w) ? 0 : F};
    gemm_mats(w, {BM_GATE, BM_UP}, gu_cols, x, Mk, gu, 2 * F, path, ar);
    for (int i = BM_GATE; i <= BM_UP; ++i) matrix_terms(w, i, x, Mk, gu + gu_cols[i - BM_GATE], 2 * F, ar);
    if (!w.dense[BM_DOWN] && !has_terms(w, BM_DOWN)) {
        // nothing reads the [Mk, F] activations but the down projection's quantizer: it makes
        // each row from gu on its own thread (same operations: bit-identical) instead of a pass
        // writing them out and a second one reading them back
        const ActRows rows{gu, gu + F, 2 * F, F, c.act == ACT_GELU_TANH};
        RowSource src;
        src.make = ActRows::make;
        src.ctx = &rows;
        ar.segs.clear();
        Segment s;
        s.w = w.w[BM_DOWN];
        s.p = w.p[BM_DOWN];
        ar.segs.push_back(s);
        qgemm_multi_rows(src, Mk, ar.segs, o, D, path);
    } else {
        if (c.act == ACT_GELU_TANH)
            gelu_mul(gu, gu + F, Mk, F, 2 * F, act);
        else
            silu_mul(gu, gu + F, Mk, F, 2 * F, act);
        gemm_mats(w, {BM_DOWN}, &o_col, act, Mk, o, D, path, ar);
        matrix_terms(w, BM_DOWN, act, Mk, o, D, ar);
    }
    branch = o;
    if (w.post_ffn_norm) {
        rms_norm(o, Mk, D, D, w.post_ffn_norm, c.rms_eps, ar.o2.data());
        branch = ar.o2.data();
    }
    if (io.next_norm)  // the next layer's attention RMSNorm in the same pass
        add_rms_norm(h_out, D, branch, D, Mk, D, io.next_norm, c.rms_eps, h_out, x);
    else
        add_rows(h_out, D, branch, D, Mk, D, h_out);
}

}  // namespace

void gelu_mul(const float* g, const float* u, int64_t M, int64_t F, int64_t ld, float* out) {
    constexpr int64_t R = 8;
    auto task = [&](int64_t t) { gelu_rows(g, u, t * R, std::min(M, (t + 1) * R), F, ld, out); };
    parallel_for((M + R - 1) / R, task);
}


void dense_gemm(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y, int64_t ldy) {
    constexpr int64_t NB = 32;
    const int64_t nb = (N + NB - 1) / NB, mb = (M + ROWS - 1) / ROWS;
    auto task = [&](int64_t t) {
        const int64_t i = t / nb, j = t % nb;
        dense_rows(x, i * ROWS, std::min(M, (i + 1) * ROWS), K, w, j * NB, std::min(N, (j + 1) * NB), y, ldy);
    };
    parallel_for(mb * nb, task);
}

void block_forward(const BlockConfig& c, const BlockWeights& w, const float* h_in, float* h_out, int64_t B,
                   int64_t T, const float* cos, const float* sin, Path path) {
    blocks_forward(c, &w, 1, h_in, h_out, B, T, cos, sin, path);
}

void blocks_forward(const BlockConfig& c, const BlockWeights* layers, int n, const float* h_in, float* h_out,
                    int64_t B, int64_t T, const float* cos, const float* sin, Path path, const int64_t* keep_rows,
                    int64_t n_keep) {
    if (B < 0 || T <= 0) throw std::invalid_argument("block_forward: B >= 0 and T > 0 required");
    for (int i = 0; i < n; ++i) check(c, layers[i]);
    const int64_t M = B * T, D = c.n_embd;
    if (keep_rows) {
        if (n_keep < 0) throw std::invalid_argument("block_forward: n_keep < 0");
        for (int64_t i = 0; i < n_keep; ++i)
            if (keep_rows[i] < 0 || keep_rows[i] >= M)
                throw std::invalid_argument("block_forward: keep row " + std::to_string(keep_rows[i]) +
                                            " is outside the " + std::to_string(M) + " rows (B*T)");
    }
    if (n <= 0 || B == 0) {
        if (n > 0) return;  // B == 0: no rows (and no kept rows)
        if (keep_rows) {    // no layer: the kept rows of h_in (through a copy: h_out may alias h_in)
            std::vector<float> kept(static_cast<size_t>(n_keep * D));
            gather_rows(h_in, keep_rows, n_keep, D, kept.data());
            std::copy(kept.begin(), kept.end(), h_out);
        } else if (h_out != h_in) {
            std::copy(h_in, h_in + M * D, h_out);
        }
        return;
    }
    std::lock_guard<std::mutex> lk(g_arena_mutex);
    Arena& ar = g_arena;
    // The last layer computes only the kept rows after its attention, unless a calibration sum
    // must see every row of its o/gate/up/down inputs: then it runs in full and the kept rows are
    // copied out (the sums and the kept rows are the same either way).
    bool skip = keep_rows != nullptr;
    for (int i = BM_O; i <= BM_DOWN; ++i)
        if (layers[n - 1].input_sq[i]) skip = false;
    float* h = h_out;  // the full rows between layers (h_out holds only the kept ones)
    if (keep_rows && (n > 1 || !skip)) {
        Arena::fit(ar.h, M * D);
        h = ar.h.data();
    }
    // layer 0 reads h_in; every later layer updates h in place (element-wise), its attention
    // RMSNorm already done by the previous layer's last residual add
    const float* cur = h_in;
    for (int i = 0; i < n; ++i) {
        LayerIO io;
        io.x_ready = i > 0;
        io.next_norm = i + 1 < n ? layers[i + 1].attn_norm : nullptr;
        float* dst = h;
        if (i + 1 == n && skip) {
            io.keep = keep_rows;
            io.n_keep = n_keep;
            dst = h_out;
        }
        block_locked(c, layers[i], cur, dst, B, T, cos, sin, path, ar, io);
        cur = dst;
    }
    if (keep_rows && !skip) gather_rows(h, keep_rows, n_keep, D, h_out);
    g_ffn_rows = skip ? n_keep : M;
}

int64_t block_arena_bytes() {
    std::lock_guard<std::mutex> lk(g_arena_mutex);
    return g_arena.bytes();
}

int64_t block_last_ffn_rows() {
    std::lock_guard<std::mutex> lk(g_arena_mutex);
    return g_ffn_rows;
}

}  // namespace edgetune
