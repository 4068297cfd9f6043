// qgemm.h — public C++ API of the quantized GEMM y[M,N] = x[M,K] · W^T with W int4/int8 codes +
// fp32 group scales (+ mins), optionally perturbing the scales on the fly (ZO training).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace edgetune {

// Kernel implementations; Auto picks the fastest one the CPU supports.
enum class Path : int { Auto = 0, Scalar = 1, AVX2 = 2, AVX512 = 3, NEON = 4, AMX = 5 };

// A quantized weight matrix W [N, K] (layouts of edgetune/quant.py).
//   q4: codes uint8 [N, K/32, 16]; byte j of block b = element 32b+j (low nibble) |
//       element 32b+j+16 (high nibble);  w = s*(q - offset) + m
//   q8: codes int8 [N, K/G, G], G in {16, 32};  w = s*q + m
// Codes may be strided by row and by block (bytes); a block's bytes are contiguous.
struct QMatrix {
    int bits = 4;                   // 4 or 8
    const uint8_t* codes = nullptr;
    int64_t N = 0, K = 0;
    int group = 32;                 // q4: always 32
    int64_t row_stride = 0;         // bytes between rows
    int64_t block_stride = 0;       // bytes between blocks (groups) of a row
    const float* scales = nullptr;  // [N, K/group] C-contiguous
    const float* mins = nullptr;    // [N, K/group] C-contiguous, or nullptr (= 0)
    int offset = 0;                 // q4 only: 0 or 8
    // q4 only, optional: the codes in prepack_q4's layout (built once at load); the AVX-512 and AMX
    // paths then read whole panels with 4 aligned loads per 16 rows and group instead of gathering
    // 16-byte blocks from 32 rows.  Must hold the same codes as `codes` (which other paths read).
    const uint8_t* packed = nullptr;

    int64_t n_groups() const { return K / group; }
    const uint8_t* block(int64_t n, int64_t g) const { return codes + n * row_stride + g * block_stride; }
};

// Scale perturbation: scale s[n,g] is read as s[n,g] + eps_sign * z(seed, tensor_id, n*(K/G)+g).
struct Perturbation {
    bool active = false;
    uint64_t seed = 0;
    uint64_t tensor_id = 0;
    float eps_sign = 0.0f;  // eps * sign, rounded to float32 once (as the numpy reference does)
    int dist = 0;           // 0 rademacher, 1 gaussian
};

// Throws std::invalid_argument on bad shapes/arguments.  x: [M, K] C-contiguous; y: [M, N]
// C-contiguous.  Deterministic: results do not depend on the thread count.
void qgemm(const float* x, int64_t M, const QMatrix& w, const Perturbation& p, float* y,
           Path path = Path::Auto);

// One matrix of a fused call: segment s computes y[:, col, col + w.N) = x · W_s^T (own codes,
// scales, mins, perturbation).  All segments of one call share K and the group size.
struct Segment {
    QMatrix w;
    Perturbation p;
    int64_t col = 0;
};
constexpr int kMaxSegments = 16;

// Fused y = x · [W_0; W_1; ...]^T: activations are quantized once and one parallel loop covers the
// panels of every segment.  y: [M, ldy] C-contiguous; bit-identical to separate qgemm() calls.
void qgemm_multi(const float* x, int64_t M, const std::vector<Segment>& segs, float* y, int64_t ldy,
                 Path path = Path::Auto);

// The prepacked q4 layout: panels of 32 rows (rows >= N are zeros), per panel and group two
// halves of 16 rows, per half 4 x 64 bytes: chunk d holds, for row n = 0..15 of the half, bytes
// 4d..4d+3 of that row's 16-byte code block (still two 4-bit codes per byte, as stored).
// byte index = (((panel·NG + g)·2 + half)·4 + d)·64 + 4n + b  holds block(32·panel + 16·half + n, g)[4d + b].
int64_t prepack_q4_bytes(int64_t N, int64_t K);
void prepack_q4(const QMatrix& w, uint8_t* dst);  // w.bits == 4; dst: prepack_q4_bytes(N, K) bytes

// The rows of a GEMM input: x (C-contiguous [M, K]) or, when make is set, row m produced on
// demand into a K-float buffer — e.g. silu(gate)·up of an MLP, so that its [M, K] floats are never
// written out and read back (the quantizer reads each row once, straight from L1).
struct RowSource {
    const float* x = nullptr;
    void (*make)(const void* ctx, int64_t m, float* row) = nullptr;
    const void* ctx = nullptr;
    const float* row(int64_t m, int64_t K, float* buf) const {
        if (!make) return x + m * K;
        make(ctx, m, buf);
        return buf;
    }
};

// qgemm_multi on rows from a RowSource (bit-identical to qgemm_multi on the materialized rows).
void qgemm_multi_rows(const RowSource& src, int64_t M, const std::vector<Segment>& segs, float* y, int64_t ldy,
                      Path path = Path::Auto);

// Validation only (same checks as qgemm), so callers can report errors before releasing locks.
void qgemm_check(const QMatrix& w, Path path);

std::vector<Path> available_paths();  // always contains Scalar
Path best_path();
const char* path_name(Path p);
Path path_from_name(const std::string& name);  // throws std::invalid_argument

void set_num_threads(int n);  // n <= 0: number of cores
int get_num_threads();

}  // namespace edgetune
