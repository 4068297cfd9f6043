// rng_ops_internal.h — the AVX-512 twins of rng_ops.cpp's loops (rng_ops_avx512.cpp).  Each
// handles elements [0, n) of out whose stream indices are first, first + 1, ...; it stops at a
// multiple of 8 and returns how many it did (the caller finishes the tail with the scalar loop).
#pragma once

#include <cstdint>

namespace edgetune {

bool cpu_has_avx512dq();
int64_t rng_axpy_avx512(float* out, int64_t n, float alpha, uint64_t key, int dist, uint64_t first);
int64_t rng_fill_avx512(float* out, int64_t n, uint64_t key, int dist, uint64_t first);
int64_t rng_add_scaled_avx512(float* out, const float* s, int64_t n, float alpha, uint64_t key, int dist,
                              uint64_t first);

// out[i] = s[i] + alpha * z(key, first + i) for i < n, single-threaded (a weight row's perturbed
// scales in the GEMM paths: internal.h's scale_row).  Rounds like `s + alpha * z` in float32
// (product, then sum); the AVX-512 loop where the CPU has it, else the scalar one.
void rng_add_scaled(float* out, const float* s, int64_t n, float alpha, uint64_t key, int dist, uint64_t first);

}  // namespace edgetune
