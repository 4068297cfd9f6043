// AMX throughput floors in TSC cycles per 16x16 output tile (benchmarks/amx_floor.py builds and runs this).
//
//   g++ -O3 -march=native -mamx-tile -mamx-int8 -mamx-bf16 amx_floor.cpp -o amx_floor -lpthread
//   ./amx_floor [passes]      prints `key value` lines, one per figure
//
// Every kernel works on a 2x2 block of 16x16 output tiles (C tiles 0-3, A tiles 4-5, B tiles 6-7:
// the blocking that needs the fewest tile loads, one per tile and K-step), with its operands
// resident in L1, so nothing but the tile unit limits it:
//   int8_k32_store    per 32-element group: TILEZERO, TDPBSSD with K=32, TILESTORED of the int32 sums
//                     (the least an exact per-group int4 kernel does before any fp32 epilogue);
//   int8_k32_nostore  the same TDPBSSDs accumulating over all groups, one store at the end;
//   int8_k64_store    per 64-element group: TDPBSSD with K=64 (the TMUL's full int8 width) + store;
//   bf16_k32_accum    TDPBF16PS (K=32 per instruction) accumulating over all K, one store at the end
//                     (what oneDNN's AMX brgemm does for torch's bf16 matmul);
//   int8_k32_epilogue  int8_k32_store plus the cheapest exact fp32 epilogue per group: for every
//                     16 outputs y = fma(float(dot), s·d, y) (cvt, mul, fma; q4_0 with signed codes
//                     and no mins — q4_1's mins add one more fma), y of the 32 x 32 block in L1;
//   bf16x2_accum      two TDPBF16PS per K-step accumulating over all K (weights exact as bf16 hi +
//                     lo, activations rounded to bf16): the cheapest kernel with exact int4 weights
//                     and no per-group epilogue;
//   avx512_dpbf16 / avx512_dpbusd  TSC cycles per VDPBF16PS / VPDPBUSD zmm (12 independent
//                     accumulators): the AVX-512 BF16 and int8-VNNI peaks of one core, for scale;
//   int8_k32_store_2threads  int8_k32_store on every CPU of the affinity mask at once (one thread
//                     each, started together), the slowest thread's figure.
// Best of many short repetitions (a few microseconds each), pinned to one CPU, timed with RDTSC.
// Also prints tsc_hz (RDTSC against CLOCK_MONOTONIC over 0.2 s).
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl: ARCH_REQ_XCOMP_PERM
constexpr long kXfeatureXtiledata = 18;

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// A tile: 16 rows x ka bytes; B tile (VNNI layout): kb rows x 64 bytes; C tiles 16 x 64 bytes.
void configure(int a_colsb, int b_rows) {
  TileConfig c;
  for (int t = 0; t < 4; ++t) { c.rows[t] = 16; c.colsb[t] = 64; }
  for (int t = 4; t < 6; ++t) { c.rows[t] = 16; c.colsb[t] = a_colsb; }
  for (int t = 6; t < 8; ++t) { c.rows[t] = b_rows; c.colsb[t] = 64; }
  asm volatile("" : : "r"(&c) : "memory");  // gcc 12 drops the stores above: LDTILECFG's read is invisible to it
  _tile_loadconfig(&c);
}

// Operands: `sets` distinct A/B operand sets (4 KB each: two A and two B tiles of up to 1 KB),
// cycled through over `steps` K-steps per repetition.  8 sets (32 KB) sit in L1; 256 sets (1 MB)
// in L2, as the activations of a real 512 x 4096 GEMM would at best.
struct Buffers {
  int sets, steps;
  int8_t* ab;                        // [sets][4][1024]: A0, A1, B0, B1
  alignas(64) int32_t c[2][4][256];  // double-buffered tile stores
  Buffers(int sets_, int steps_) : sets(sets_), steps(steps_) {
    ab = static_cast<int8_t*>(std::aligned_alloc(64, size_t(sets) * 4096));
  }
  ~Buffers() { std::free(ab); }
  const int8_t* a(int s, int i) const { return ab + size_t(s) * 4096 + i * 1024; }
  const int8_t* b(int s, int i) const { return ab + size_t(s) * 4096 + 2048 + i * 1024; }
};

inline uint64_t tsc_begin() { _mm_lfence(); uint64_t t = __rdtsc(); _mm_lfence(); return t; }
inline uint64_t tsc_end() { unsigned aux; uint64_t t = __rdtscp(&aux); _mm_lfence(); return t; }

struct NoEpilogue {
  void operator()(int, const int32_t (*)[256]) const {}
};

// int8, K = KB bytes per A row (32 or 64), zero + TDPBSSD + store for every group; then
// epi(g, sums of group g - 1) for g >= 1 (its tiles were stored one group ago, so it folds them
// while group g's tiles compute)
template <int KB, class Epi = NoEpilogue>
__attribute__((noinline)) void int8_per_group(Buffers& m, Epi epi = Epi()) {
  for (int g = 0, s = 0; g < m.steps; ++g, s = s + 1 == m.sets ? 0 : s + 1) {
    int32_t (*c)[256] = m.c[g & 1];
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    _tile_loadd(4, m.a(s, 0), KB);
    _tile_loadd(6, m.b(s, 0), 64);
    _tile_dpbssd(0, 4, 6);
    _tile_loadd(7, m.b(s, 1), 64);
    _tile_dpbssd(1, 4, 7);
    _tile_loadd(5, m.a(s, 1), KB);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
    _tile_stored(0, c[0], 64); _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64); _tile_stored(3, c[3], 64);
    if (g > 0) epi(g, m.c[(g - 1) & 1]);
  }
}

// the cheapest exact fp32 epilogue of the 32 x 32 block for one group's int32 sums p:
// y = fma(float(dot), s·d, y) per 16 outputs
struct ExactEpilogue {
  float (*y)[32];
  const float *sc, *d;
  void operator()(int g, const int32_t (*p)[256]) const {
    const __m512 s0 = _mm512_loadu_ps(sc + (g & 7) * 32), s1 = _mm512_loadu_ps(sc + (g & 7) * 32 + 16);
#pragma GCC unroll 4
    for (int r = 0; r < 32; ++r) {
      const __m512 dr = _mm512_set1_ps(d[(g & 7) * 32 + r]);
      const int t = r < 16 ? 0 : 2, i = r & 15;
      __m512 y0 = _mm512_load_ps(y[r]), y1 = _mm512_load_ps(y[r] + 16);
      y0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(p[t] + 16 * i)), _mm512_mul_ps(s0, dr), y0);
      y1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(p[t + 1] + 16 * i)), _mm512_mul_ps(s1, dr), y1);
      _mm512_store_ps(y[r], y0);
      _mm512_store_ps(y[r] + 16, y1);
    }
  }
};

// two TDPBF16PS per K-step into the same accumulators (weights as bf16 hi + lo), one store at the end
__attribute__((noinline)) void bf16x2_accumulate(Buffers& m) {
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (int g = 0, s = 0; g < m.steps; ++g, s = s + 1 == m.sets ? 0 : s + 1) {
    const int s2 = s + 1 == m.sets ? 0 : s + 1;  // the lo halves: another operand set
    _tile_loadd(4, m.a(s, 0), 64);
    _tile_loadd(5, m.a(s, 1), 64);
    _tile_loadd(6, m.b(s, 0), 64);
    _tile_loadd(7, m.b(s, 1), 64);
    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    _tile_loadd(6, m.b(s2, 0), 64);
    _tile_loadd(7, m.b(s2, 1), 64);
    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, m.c[0][0], 64); _tile_stored(1, m.c[0][1], 64);
  _tile_stored(2, m.c[0][2], 64); _tile_stored(3, m.c[0][3], 64);
}

// accumulate over all K-steps, one store at the end; BF16 selects TDPBF16PS over TDPBSSD
template <bool BF16, int KB>
__attribute__((noinline)) void accumulate(Buffers& m) {
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (int g = 0, s = 0; g < m.steps; ++g, s = s + 1 == m.sets ? 0 : s + 1) {
    _tile_loadd(4, m.a(s, 0), KB);
    _tile_loadd(6, m.b(s, 0), 64);
    if (BF16) _tile_dpbf16ps(0, 4, 6); else _tile_dpbssd(0, 4, 6);
    _tile_loadd(7, m.b(s, 1), 64);
    if (BF16) _tile_dpbf16ps(1, 4, 7); else _tile_dpbssd(1, 4, 7);
    _tile_loadd(5, m.a(s, 1), KB);
    if (BF16) { _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7); }
    else { _tile_dpbssd(2, 5, 6); _tile_dpbssd(3, 5, 7); }
  }
  _tile_stored(0, m.c[0][0], 64); _tile_stored(1, m.c[0][1], 64);
  _tile_stored(2, m.c[0][2], 64); _tile_stored(3, m.c[0][3], 64);
}

void fill(Buffers& m, bool bf16) {
  uint32_t x = 12345;
  auto next = [&x] { x = x * 1664525u + 1013904223u; return x >> 24; };
  const size_t n = size_t(m.sets) * 4096;
  for (size_t i = 0; i < n; i += (bf16 ? 2 : 1)) {
    if (bf16) {  // bf16 values in [1, 2): finite, no denormals
      uint16_t v = uint16_t(0x3f80 | (next() & 0x7f));
      std::memcpy(m.ab + i, &v, 2);
    } else {
      m.ab[i] = int8_t(next());
    }
  }
}

// best of `reps` runs of fn, in TSC cycles per 16x16 tile and K-step
template <class F>
double best_cycles(F fn, int reps, int steps) {
  uint64_t best = ~0ull;
  for (int r = 0; r < reps; ++r) {
    uint64_t t0 = tsc_begin();
    fn();
    uint64_t t = tsc_end() - t0;
    if (t < best) best = t;
  }
  return double(best) / (4.0 * steps);
}

// TSC cycles per VDPBF16PS (BF16) or VPDPBUSD zmm, 12 independent accumulators, best of reps
template <bool BF16>
__attribute__((noinline)) double avx512_dot_cycles(int reps) {
  __m512i acc[12];
  for (auto& a : acc) a = _mm512_setzero_si512();
  const __m512i x = _mm512_set1_epi16(0x3f80), y = _mm512_set1_epi16(0x3f00);
  constexpr int kIters = 256;
  uint64_t best = ~0ull;
  for (int r = 0; r < reps; ++r) {
    uint64_t t0 = tsc_begin();
    for (int it = 0; it < kIters; ++it) {
#pragma GCC unroll 12
      for (int i = 0; i < 12; ++i)
        acc[i] = BF16 ? _mm512_castps_si512(_mm512_dpbf16_ps(_mm512_castsi512_ps(acc[i]),
                                                             (__m512bh)x, (__m512bh)y))
                      : _mm512_dpbusd_epi32(acc[i], x, y);
      asm volatile("" : "+v"(acc[0]), "+v"(acc[6]));
    }
    uint64_t t = tsc_end() - t0;
    if (t < best) best = t;
  }
  alignas(64) int32_t keep[16];   // keep the sums alive
  for (auto& a : acc) _mm512_store_si512(keep, a);
  asm volatile("" : : "r"(keep) : "memory");
  return double(best) / (12.0 * kIters);
}

bool pin_to(int cpu) {
  cpu_set_t s;
  CPU_ZERO(&s);
  CPU_SET(cpu, &s);
  return sched_setaffinity(0, sizeof(s), &s) == 0;
}

double tsc_hz() {
  timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  uint64_t t0 = __rdtsc();
  timespec d{0, 200000000};
  nanosleep(&d, nullptr);
  clock_gettime(CLOCK_MONOTONIC, &b);
  uint64_t t1 = __rdtsc();
  double s = double(b.tv_sec - a.tv_sec) + 1e-9 * double(b.tv_nsec - a.tv_nsec);
  return double(t1 - t0) / s;
}

}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 300;
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 40;
  if (reps <= 0 || rounds <= 0) {
    std::fprintf(stderr, "amx_floor: usage: amx_floor [repetitions > 0] [rounds > 0]\n");
    return 2;
  }
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
    std::perror("amx_floor: arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) refused");
    return 3;
  }
  cpu_set_t allowed;
  sched_getaffinity(0, sizeof(allowed), &allowed);
  std::vector<int> cpus;
  for (int i = 0; i < CPU_SETSIZE; ++i) if (CPU_ISSET(i, &allowed)) cpus.push_back(i);
  if (cpus.empty() || !pin_to(cpus[0])) { std::fprintf(stderr, "amx_floor: cannot pin\n"); return 2; }
  std::printf("cpu %d\n", cpus[0]);
  std::printf("tsc_hz %.0f\n", tsc_hz());

  // 128 K-steps of 32 = K 4096 per repetition; m: int8 in L1, l2: int8 in L2, mb: bf16 in L1
  static Buffers m(8, 128), l2(256, 256), mb(8, 128);
  fill(m, false);
  fill(l2, false);
  fill(mb, true);
  // The VM's neighbours come and go: the kernels take turns over `rounds` rounds, with a pause
  // between rounds, and each keeps its best repetition over all of them.
  double k32 = 1e30, k32_nostore = 1e30, k32_l2 = 1e30, k64 = 1e30, bf16 = 1e30, k32_epi = 1e30, bf16x2 = 1e30;
  alignas(64) static float yblk[32][32];
  alignas(64) static float scl[8 * 32], dsc[8 * 32];
  for (int i = 0; i < 8 * 32; ++i) { scl[i] = 0.01f + 1e-4f * float(i); dsc[i] = 0.02f - 1e-5f * float(i); }
  const int reps_l2 = std::max(1, reps / 4);
  for (int r = 0; r < rounds; ++r) {
    configure(32, 8);    // int8, K = 32: A 16 x 32 bytes, B 8 x 64
    k32 = std::min(k32, best_cycles([] { int8_per_group<32>(m); }, reps, m.steps));
    k32_nostore = std::min(k32_nostore, best_cycles([] { accumulate<false, 32>(m); }, reps, m.steps));
    k32_l2 = std::min(k32_l2, best_cycles([] { int8_per_group<32>(l2); }, reps_l2, l2.steps));
    k32_epi = std::min(k32_epi, best_cycles([] { int8_per_group<32>(m, ExactEpilogue{yblk, scl, dsc}); }, reps, m.steps));
    configure(64, 16);   // int8, K = 64: A 16 x 64 bytes, B 16 x 64
    k64 = std::min(k64, best_cycles([] { int8_per_group<64>(m); }, reps, m.steps));
    // bf16, K = 32 (the same tile shapes): A 16 x 32 bf16, B 16 x (2 x 16) bf16
    bf16 = std::min(bf16, best_cycles([] { accumulate<true, 64>(mb); }, reps, mb.steps));
    bf16x2 = std::min(bf16x2, best_cycles([] { bf16x2_accumulate(mb); }, reps, mb.steps));
    timespec d{0, 10000000};
    nanosleep(&d, nullptr);
  }
  _tile_release();
  std::printf("int8_k32_store %.2f\n", k32);
  std::printf("int8_k32_nostore %.2f\n", k32_nostore);
  std::printf("int8_k32_store_l2 %.2f\n", k32_l2);
  std::printf("int8_k64_store %.2f\n", k64);
  std::printf("bf16_k32_accum %.2f\n", bf16);
  std::printf("int8_k32_epilogue %.2f\n", k32_epi);
  std::printf("bf16x2_accum %.2f\n", bf16x2);
  std::printf("checksum %.3g\n", double(yblk[3][5]));
  double dpbf16 = 1e30, dpbusd = 1e30;
  for (int r = 0; r < rounds; ++r) {
    dpbf16 = std::min(dpbf16, avx512_dot_cycles<true>(reps));
    dpbusd = std::min(dpbusd, avx512_dot_cycles<false>(reps));
  }
  std::printf("avx512_dpbf16 %.3f\n", dpbf16);
  std::printf("avx512_dpbusd %.3f\n", dpbusd);

  // int8_k32_store on every allowed CPU at once, one pinned thread each, started together
  const int nt = int(cpus.size());
  std::vector<double> per(nt, 1e30);
  std::atomic<int> ready{0};
  std::vector<std::thread> th;
  for (int t = 0; t < nt; ++t)
    th.emplace_back([&, t] {
      pin_to(cpus[t]);
      static thread_local Buffers mt(8, 128);
      fill(mt, false);
      configure(32, 8);
      for (int r = 0; r < rounds; ++r) {
        ready.fetch_add(1);
        while (ready.load() < nt * (r + 1)) {}
        per[t] = std::min(per[t], best_cycles([] { int8_per_group<32>(mt); }, reps, mt.steps));
      }
      _tile_release();
    });
  for (auto& x : th) x.join();
  std::printf("threads %d\n", nt);
  std::printf("int8_k32_store_%dthreads %.2f\n", nt, *std::max_element(per.begin(), per.end()));
  return 0;
}
