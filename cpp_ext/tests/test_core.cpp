// test_core.cpp — C++ tests of edgetune_core (run by ctest, and under qemu by run_arm.sh):
// RNG against values produced by edgetune/zo/rng.py, every SIMD path against the scalar
// reference, in-kernel perturbation against explicitly perturbed scales, thread-count invariance.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include "edgetune/qgemm.h"
#include "edgetune/rng.h"

using namespace edgetune;

static int g_failures = 0;
#define CHECK(cond, ...)                                   \
    do {                                                   \
        if (!(cond)) {                                     \
            ++g_failures;                                  \
            std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
            std::printf(__VA_ARGS__);                      \
            std::printf("\n");                             \
        }                                                  \
    } while (0)

// (seed, tensor_id, offset, dist, first 4 outputs as float32 bit patterns) from rng.py
struct RngCase {
    uint64_t seed, tensor_id, offset;
    int dist;
    uint32_t bits[4];
};
static const RngCase kRng[] = {
    {0u, 0u, 0u, 0, {0x3f800000u, 0x3f800000u, 0x3f800000u, 0x3f800000u}},
    {0u, 0u, 0u, 1, {0xbfce6358u, 0xbefca2c7u, 0xbfd017d2u, 0xbe840ab4u}},
    {12345u, 7u, 100u, 0, {0xbf800000u, 0xbf800000u, 0xbf800000u, 0xbf800000u}},
    {12345u, 7u, 100u, 1, {0x3f6cb587u, 0x3f7d5f92u, 0x3f104b72u, 0x3f677c63u}},
    {9223372036854775813u, 3u, 1099511627776u, 0, {0xbf800000u, 0xbf800000u, 0x3f800000u, 0xbf800000u}},
    {9223372036854775813u, 3u, 1099511627776u, 1, {0x3ef8caf9u, 0x401ee536u, 0xbf0e08f1u, 0x3fdea498u}},
    {18446744073709551615u, 18446744073709551615u, 0u, 0, {0xbf800000u, 0x3f800000u, 0x3f800000u, 0xbf800000u}},
    {18446744073709551615u, 18446744073709551615u, 0u, 1, {0x3ea5b1ecu, 0xc026ecb9u, 0xc00172e5u, 0x3f892212u}},
};

static void test_rng() {
    CHECK(rng::bits(rng::stream_key(12345, 7), 0) == 0x77cc4f93d5d28bb2ull, "bits(12345, 7, 0)");
    for (const RngCase& c : kRng) {
        float z[4];
        rng::perturbation(c.seed, c.tensor_id, 4, c.dist, c.offset, z);
        for (int i = 0; i < 4; ++i) {
            uint32_t b;
            std::memcpy(&b, &z[i], 4);
            CHECK(b == c.bits[i], "rng seed=%llu tid=%llu dist=%d i=%d: got %08x want %08x",
                  (unsigned long long)c.seed, (unsigned long long)c.tensor_id, c.dist, i, b, c.bits[i]);
        }
    }
}

// A random quantized matrix stored inside a larger byte buffer (row/block strides with gaps).
struct Case {
    int bits, group, offset;
    bool mins;
    int64_t M, N, K;
};

struct Data {
    std::vector<uint8_t> buf;
    std::vector<float> x, scales, mins;
    QMatrix w;
};

static Data make(const Case& c, std::mt19937& rng) {
    Data d;
    const int64_t NG = c.K / c.group;
    const int block_bytes = c.bits == 4 ? 16 : c.group;
    const int64_t bstride = block_bytes + 4;  // like GGUF Q4_1: 4 bytes of fp16 d, m before codes
    const int64_t rstride = NG * bstride + 8;
    d.buf.resize(c.N * rstride + 16);
    std::uniform_int_distribution<int> byte(0, 255);
    for (auto& b : d.buf) b = static_cast<uint8_t>(byte(rng));
    std::normal_distribution<float> nd(0.0f, 1.0f);
    d.x.resize(c.M * c.K);
    for (auto& v : d.x) v = nd(rng);
    d.scales.resize(c.N * NG);
    for (auto& v : d.scales) v = 0.01f + 0.05f * std::fabs(nd(rng));
    if (c.mins) {
        d.mins.resize(c.N * NG);
        for (auto& v : d.mins) v = 0.1f * nd(rng);
    }
    d.w.bits = c.bits;
    d.w.group = c.group;
    d.w.offset = c.offset;
    d.w.N = c.N;
    d.w.K = c.K;
    d.w.codes = d.buf.data() + 4;
    d.w.row_stride = rstride;
    d.w.block_stride = bstride;
    d.w.scales = d.scales.data();
    d.w.mins = c.mins ? d.mins.data() : nullptr;
    return d;
}

// ‖a - b‖ relative to the natural scale of int8-activation noise: sqrt(Σ_mn Σ_k x² w²)
static double noise_err(const std::vector<float>& a, const std::vector<float>& b, const Data& d, int64_t M) {
    const int64_t N = d.w.N, K = d.w.K;
    // dense W^T [K, N] = I_K · W^T through the scalar path
    std::vector<float> eye(K * K, 0.0f), wt(K * N);
    for (int64_t k = 0; k < K; ++k) eye[k * K + k] = 1.0f;
    qgemm(eye.data(), K, d.w, Perturbation(), wt.data(), Path::Scalar);
    double num = 0, den = 0;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
            const double e = double(a[m * N + n]) - b[m * N + n];
            num += e * e;
            for (int64_t k = 0; k < K; ++k) {
                const double t = double(d.x[m * K + k]) * wt[k * N + n];
                den += t * t;
            }
        }
    return std::sqrt(num / (den > 0 ? den : 1));
}

static double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
        den += double(b[i]) * b[i];
    }
    return std::sqrt(num / (den > 0 ? den : 1));
}

static void test_paths() {
    const Case cases[] = {
        {4, 32, 0, true, 1, 1, 32},    {4, 32, 8, false, 3, 5, 96},  {4, 32, 0, false, 7, 33, 576},
        {4, 32, 8, true, 16, 100, 1536}, {8, 32, 0, false, 5, 40, 256}, {8, 16, 0, true, 9, 31, 144},
        {8, 16, 0, false, 2, 7, 16},   {4, 32, 0, true, 37, 257, 1024},
    };
    for (Path path : available_paths()) {
        int ci = 0;
        for (const Case& c : cases) {
            std::mt19937 rng(1000 + ci++);  // same data for every path
            Data d = make(c, rng);
            std::vector<float> ref(c.M * c.N), y(c.M * c.N), y2(c.M * c.N);
            Perturbation none;
            qgemm(d.x.data(), c.M, d.w, none, ref.data(), Path::Scalar);
            qgemm(d.x.data(), c.M, d.w, none, y.data(), path);
            const double e = path == Path::Scalar ? rel_err(y, ref) : noise_err(y, ref, d, c.M);
            const double tol = path == Path::Scalar ? 1e-6 : 2e-2;  // int8 activations: ~0.6% noise
            CHECK(e < tol, "%s bits=%d G=%d off=%d mins=%d M=%lld N=%lld K=%lld: rel err %.3g", path_name(path),
                  c.bits, c.group, c.offset, (int)c.mins, (long long)c.M, (long long)c.N, (long long)c.K, e);

            // in-kernel perturbation == the same path on explicitly perturbed scales (bit-exact)
            for (int dist = 0; dist < 2; ++dist) {
                Perturbation p;
                p.active = true;
                p.seed = 0x8000000000000123ull;
                p.tensor_id = 17;
                p.eps_sign = -1e-2f;
                p.dist = dist;
                qgemm(d.x.data(), c.M, d.w, p, y.data(), path);
                const int64_t NG = c.K / c.group;
                std::vector<float> z(c.N * NG), s2(c.N * NG);
                rng::perturbation(p.seed, p.tensor_id, c.N * NG, dist, 0, z.data());
                for (size_t i = 0; i < s2.size(); ++i) {
                    const float t = p.eps_sign * z[i];
                    s2[i] = d.scales[i] + t;
                }
                QMatrix w2 = d.w;
                w2.scales = s2.data();
                qgemm(d.x.data(), c.M, w2, none, y2.data(), path);
                const double ep = rel_err(y, y2);
                CHECK(ep < 1e-6, "%s perturbed vs explicit (dist %d, N=%lld K=%lld): rel err %.3g", path_name(path),
                      dist, (long long)c.N, (long long)c.K, ep);
            }

            // thread-count invariance (bitwise)
            set_num_threads(1);
            qgemm(d.x.data(), c.M, d.w, none, y.data(), path);
            set_num_threads(2);
            qgemm(d.x.data(), c.M, d.w, none, y2.data(), path);
            set_num_threads(0);
            CHECK(std::memcmp(y.data(), y2.data(), sizeof(float) * y.size()) == 0,
                  "%s: 1 vs 2 threads differ (N=%lld K=%lld)", path_name(path), (long long)c.N, (long long)c.K);
        }
        std::printf("path %-7s ok so far (failures: %d)\n", path_name(path), g_failures);
    }
}

static void test_errors() {
    QMatrix w;
    w.bits = 4;
    w.group = 32;
    w.N = 4;
    w.K = 48;  // not a multiple of 32
    bool threw = false;
    try {
        qgemm_check(w, Path::Auto);
    } catch (const std::invalid_argument&) {
        threw = true;
    }
    CHECK(threw, "K=48 must be rejected");
}

int main() {
    test_rng();
    test_errors();
    test_paths();
    std::printf("%s (%d failures)\n", g_failures ? "FAILED" : "PASSED", g_failures);
    return g_failures ? 1 : 0;
}
