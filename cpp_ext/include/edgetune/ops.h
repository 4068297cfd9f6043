// ops.h — the small non-GEMM pieces of a transformer block in C++ (on the kernel thread pool, so a
// forward pass does not bounce between torch's OpenMP pool and ours): RMSNorm, SiLU(g)*u, and
// causal attention with RoPE applied on the fly.  All fp32, row-major, deterministic for any
// thread count (each output element is computed by one task in a fixed order).
#pragma once

#include <cstdint>

namespace edgetune {

// out[m, :] = (x[m, :] * rsqrt(mean(x[m, :]^2) + eps)) * w;  x rows at stride ldx, out contiguous.
void rms_norm(const float* x, int64_t M, int64_t D, int64_t ldx, const float* w, float eps, float* out);

// The residual add and the RMSNorm after it in one pass over the rows: sum[m, :] = a[m, :] + b[m, :]
// (a, b rows at strides lda/ldb, sum contiguous [M, D]; sum may be a when lda == D), then
// out[m, :] = rms_norm(sum[m, :]) as above — the same float32 operations in the same order as the
// add followed by rms_norm, so bit-identical to them.
void add_rms_norm(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t M, int64_t D, const float* w,
                  float eps, float* sum, float* out);

// out[m, j] = silu(g[m, j]) * u[m, j], j < F;  g, u rows at stride ld, out contiguous [M, F].
void silu_mul(const float* g, const float* u, int64_t M, int64_t F, int64_t ld, float* out);
// One row of silu_mul on the calling thread (same operations, same SIMD choice: same bits).
void silu_mul_row(const float* g, const float* u, int64_t F, float* out);

// Causal self-attention of B sequences of T tokens.  q/k/v: token rows (b*T + t) at strides
// ldq/ldk/ldv, head h at columns [h*hd, (h+1)*hd); q has H heads, k/v Hkv heads (GQA: q head h
// uses kv head h / (H/Hkv)).  RoPE (cos/sin [T, rope_dim/2]) rotates the first rope_dim dims of q
// and k: neox=false pairs (2i, 2i+1), neox=true pairs (i, i + rope_dim/2).  out [B*T, H*hd].
// window > 0: a sliding window, key j hidden from query p when p - j >= window (0: plain causal).
void attention(const float* q, const float* k, const float* v, int64_t ldq, int64_t ldk, int64_t ldv,
               int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t hd, const float* cos, const float* sin,
               int64_t rope_dim, bool neox, float scale, float* out, int64_t window = 0);

// The row kernels above run as AVX-512 intrinsics on CPUs that have AVX-512F, else as portable
// loops; both are bit-identical.  ops_set_simd(false) forces the loops (tests compare the two);
// ops_set_simd(true) restores the default.  Returns whether the intrinsics are now used.
bool ops_simd();
bool ops_set_simd(bool on);

}  // namespace edgetune
