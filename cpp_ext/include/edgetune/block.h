// block.h — one transformer block of any architecture edgetune runs (llama, mistral, qwen2, qwen3,
// gemma3, phi3: edgetune/model/archs.py), or a range of blocks, in one call: RMSNorm, q/k/v GEMM
// (separate or fused, + qwen2 biases), per-head q/k RMSNorm (qwen3, gemma3), RoPE (normal/neox, any
// freq factors and attn_factor folded into the cos/sin tables, per layer if it has its own base),
// GQA causal attention (optionally a sliding window), output GEMM, optional post-attention norm,
// residual, RMSNorm, gate/up GEMM (separate or fused [gate; up]), SiLU or GELU(tanh) gate * up,
// down GEMM, optional post-FFN norm, residual.  Weights are the int4/int8 QMatrix codes with their
// in-kernel scale perturbation (or float32 rows for unquantized files); the small trainable tensors
// (norm weights, biases, LoRA A/B, sparse deltas) arrive as data, already perturbed.  Scratch
// comes from an arena owned by the core that only grows: no allocation per call in the steady state.
//
// Op order and arithmetic are those of the per-op pieces (ops.h + qgemm_multi/qgemm), so a block is
// bit-identical to them driven one by one (tests/reference_forward.py); LoRA terms are an fp32
// GEMM of their own (deterministic for any thread count).
#pragma once

#include <cstdint>

#include "edgetune/qgemm.h"

namespace edgetune {

enum Activation { ACT_SILU = 0, ACT_GELU_TANH = 1 };

struct BlockConfig {
    int64_t n_embd = 0, n_head = 0, n_head_kv = 0, head_dim = 0, n_ff = 0, rope_dim = 0;
    bool neox = false;   // RoPE pairs (i, i + rope_dim/2) instead of (2i, 2i+1)
    float rms_eps = 1e-5f;
    float attn_scale = 0.0f;  // usually 1/sqrt(head_dim)
    int act = ACT_SILU;       // the FFN gate's activation
    // q rows are n_head * head_dim wide: that may differ from n_embd (qwen3, gemma3: key_length)
    int64_t q_dim() const { return n_head * head_dim; }
};

// y[:, cols of the matrix] += scale * (x A^T) B^T; A [rank, K], B [N, rank], both C-contiguous.
struct LoraTerm {
    const float* a = nullptr;  // nullptr: no adapter on this matrix
    const float* b = nullptr;
    int64_t rank = 0;
    float scale = 0.0f;
};

// Sparse deltas (SensZOQ-style): for i = 0..n-1 in order, y[m, rows[i]] += x[m, cols[i]] * delta[i]
// (the product rounded to float32 first), every row m.  Added after the matrix's LoRA term.
struct SparseTerm {
    const int64_t* rows = nullptr;  // nullptr: no deltas on this matrix
    const int64_t* cols = nullptr;
    const float* delta = nullptr;
    int64_t n = 0;
};

enum BlockMatrix { BM_Q = 0, BM_K, BM_V, BM_O, BM_GATE, BM_UP, BM_DOWN, BM_COUNT };

struct BlockWeights {
    // Fused layouts (phi3): w[BM_Q] is attn_qkv [q_dim + 2 kv, n_embd] with w[BM_K].N = w[BM_V].N = 0;
    // w[BM_UP] is [gate; up] [2 n_ff, n_embd] with w[BM_GATE].N = 0.  A LoRA/sparse term of a fused
    // matrix acts on its whole output.
    QMatrix w[BM_COUNT];
    const float* dense[BM_COUNT] = {};  // non-null: the matrix is float32 [N, K] rows (w[i] gives N, K)
    Perturbation p[BM_COUNT];
    LoraTerm lora[BM_COUNT];
    SparseTerm sparse[BM_COUNT];
    double* input_sq[BM_COUNT] = {};  // non-null: += column sums of the matrix's input squared [K]
    const float* attn_norm = nullptr;  // [n_embd]
    const float* ffn_norm = nullptr;   // [n_embd]
    const float* bias[3] = {nullptr, nullptr, nullptr};  // q, k, v biases (qwen2) or nullptr
    const float* q_norm = nullptr;     // [head_dim]: RMSNorm over each q head before RoPE, or nullptr
    const float* k_norm = nullptr;     // [head_dim]: the same for k heads
    const float* post_attn_norm = nullptr;  // [n_embd]: RMSNorm of the attention branch (gemma3)
    const float* post_ffn_norm = nullptr;   // [n_embd]: RMSNorm of the FFN branch (gemma3)
    int64_t window = 0;  // > 0: sliding window, key j hidden from query p when p - j >= window
    const float* cos = nullptr;  // this layer's RoPE tables [T, rope_dim/2]; nullptr: the call's
    const float* sin = nullptr;
};

// h_out = block(h_in) for B sequences of T tokens (rows b*T + t, [B*T, n_embd] C-contiguous).
// cos/sin: [T, rope_dim/2].  h_out may equal h_in.  Throws std::invalid_argument on bad shapes.
void block_forward(const BlockConfig& c, const BlockWeights& w, const float* h_in, float* h_out, int64_t B,
                   int64_t T, const float* cos, const float* sin, Path path = Path::Auto);

// Layers [0, n) in order: h_out = block_{n-1}(... block_0(h_in)); one call for a layer range.
// keep_rows (optional, n_keep row indices into B*T, any order, repeats allowed): only those rows
// of the result are wanted, and h_out is [n_keep, n_embd] in that order.  The last layer then
// computes q/k/v and attention for every row (the kept rows attend to all earlier positions) but
// its o-projection, residual, FFN and their terms only for the kept rows (llama.cpp's output ids);
// each kept row is bit-identical to the same row of the full forward.  If the last layer has a
// calibration sum (input_sq) on o/gate/up/down, which must see every row, it runs in full.
// Throws std::invalid_argument on a keep row outside [0, B*T).
void blocks_forward(const BlockConfig& c, const BlockWeights* layers, int n, const float* h_in, float* h_out,
                    int64_t B, int64_t T, const float* cos, const float* sin, Path path = Path::Auto,
                    const int64_t* keep_rows = nullptr, int64_t n_keep = 0);

// Bytes the block arena holds now (it grows to the largest B*T seen, then stays).
int64_t block_arena_bytes();

// Rows the last layer of the latest blocks_forward call (with layers and rows) ran its
// o-projection and FFN on: B*T, or n_keep when it skipped the rows nobody reads.
int64_t block_last_ffn_rows();

// The block's own pieces beyond ops.h, exposed for the op-by-op reference:
// out[m, j] = gelu_tanh(g[m, j]) * u[m, j] (g, u rows at stride ld, out contiguous [M, F]), as
// g / (1 + exp(-2 sqrt(2/pi) (g + 0.044715 g^3))) * u: the same function, vectorizable;
void gelu_mul(const float* g, const float* u, int64_t M, int64_t F, int64_t ld, float* out);
// y[M, N] (row stride ldy) = x[M, K] · W^T for float32 W [N, K]: fp32, 16 lanes, fixed order.
void dense_gemm(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y, int64_t ldy);

}  // namespace edgetune
