// block.h — one llama-family transformer block (or a range of blocks) in one call: RMSNorm, fused
// q/k/v GEMM (+ qwen2 biases), RoPE (normal/neox, any freq factors folded into cos/sin), GQA causal
// attention, residual, RMSNorm, fused gate/up GEMM, SiLU*up, down GEMM, residual.  Weights are the
// int4/int8 QMatrix codes with their in-kernel scale perturbation; the small trainable tensors
// (norm weights, biases, LoRA A/B) arrive as data, already perturbed.  Scratch comes from an arena
// owned by the core that only grows: no allocation per call in the steady state.
//
// Op order and arithmetic are those of the per-op path (ops.h + qgemm_multi/qgemm), so a block is
// bit-identical to it; LoRA terms are an fp32 GEMM of their own (deterministic for any thread count).
#pragma once

#include <cstdint>

#include "edgetune/qgemm.h"

namespace edgetune {

struct BlockConfig {
    int64_t n_embd = 0, n_head = 0, n_head_kv = 0, head_dim = 0, n_ff = 0, rope_dim = 0;
    bool neox = false;   // RoPE pairs (i, i + rope_dim/2) instead of (2i, 2i+1)
    float rms_eps = 1e-5f;
    float attn_scale = 0.0f;  // usually 1/sqrt(head_dim)
};

// y[:, cols of the matrix] += scale * (x A^T) B^T; A [rank, K], B [N, rank], both C-contiguous.
struct LoraTerm {
    const float* a = nullptr;  // nullptr: no adapter on this matrix
    const float* b = nullptr;
    int64_t rank = 0;
    float scale = 0.0f;
};

enum BlockMatrix { BM_Q = 0, BM_K, BM_V, BM_O, BM_GATE, BM_UP, BM_DOWN, BM_COUNT };

struct BlockWeights {
    QMatrix w[BM_COUNT];
    Perturbation p[BM_COUNT];
    LoraTerm lora[BM_COUNT];
    const float* attn_norm = nullptr;  // [n_embd]
    const float* ffn_norm = nullptr;   // [n_embd]
    const float* bias[3] = {nullptr, nullptr, nullptr};  // q, k, v biases (qwen2) or nullptr
};

// h_out = block(h_in) for B sequences of T tokens (rows b*T + t, [B*T, n_embd] C-contiguous).
// cos/sin: [T, rope_dim/2].  h_out may equal h_in.  Throws std::invalid_argument on bad shapes.
void block_forward(const BlockConfig& c, const BlockWeights& w, const float* h_in, float* h_out, int64_t B,
                   int64_t T, const float* cos, const float* sin, Path path = Path::Auto);

// Layers [0, n) in order: h_out = block_{n-1}(... block_0(h_in)); one call for a layer range.
void blocks_forward(const BlockConfig& c, const BlockWeights* layers, int n, const float* h_in, float* h_out,
                    int64_t B, int64_t T, const float* cos, const float* sin, Path path = Path::Auto);

// Bytes the block arena holds now (it grows to the largest B*T seen, then stays).
int64_t block_arena_bytes();

}  // namespace edgetune
