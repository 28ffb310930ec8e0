// In-L1 throughput of the ways to expand 16 bitmask-packed bf16 weights into a dense fp32 vector (one row
// of x, 4 rows of weights, K = 2048): the measurement behind kernels/cpu/impl.h's choice of a prefix-popcount
// vpermps over vexpandps (docs/benchmarks.md, "CPU decode"). Needs an AVX-512 (F, BW, VL, VPOPCNTDQ) CPU:
//   g++ -O3 -mavx2 -mfma -mpopcnt -mavx512f -mavx512bw -mavx512vl -mavx512vpopcntdq \
//       benchmarks/cpu_expand_microbench.cpp -o /tmp/expand && /tmp/expand
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>

#include <chrono>
#include <random>

constexpr int K = 2048, NB = 4, REPS = 20000;
alignas(64) uint16_t vals[NB][K + 64];
uint16_t masks[NB][K / 16];
alignas(64) float x[K];
alignas(16) uint8_t ctrl[256][16];

template <class F>
void run(const char* name, F f) {
  const auto t = std::chrono::steady_clock::now();
  float s = 0;
  for (int r = 0; r < REPS; ++r) s += f();
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  const double ns = dt * 1e9 / REPS / (K / 16) / NB;
  printf("%-34s %.3f ns per 16 weights (%.1f G weights/s)   [checksum %g]\n", name, ns, 16 / ns, s);
}

static inline __m512 widen(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }

template <class Expand>
float kernel(Expand expand) {
  __m512 acc[NB];
  const uint16_t* vp[NB];
  for (int i = 0; i < NB; ++i) acc[i] = _mm512_setzero_ps(), vp[i] = vals[i];
  for (int k = 0; k < K; k += 16) {
    const __m512 xv = _mm512_loadu_ps(x + k);
    for (int i = 0; i < NB; ++i) {
      const uint32_t m = masks[i][k / 16];
      acc[i] = _mm512_fmadd_ps(expand(vp[i], m), xv, acc[i]);
      vp[i] += __builtin_popcount(m);
    }
  }
  float s = 0;
  for (int i = 0; i < NB; ++i) s += _mm512_reduce_add_ps(acc[i]);
  return s;
}

int main() {
  std::mt19937 g(1);
  for (int i = 0; i < NB; ++i) {
    for (int k = 0; k < K + 64; ++k) vals[i][k] = 0x3f80 + (g() & 0x7f);
    for (int j = 0; j < K / 16; ++j) masks[i][j] = g() & g() & 0xffff;  // about 25% kept
  }
  for (int k = 0; k < K; ++k) x[k] = 1.0f / (k + 1);
  for (int b = 0; b < 256; ++b)
    for (int p = 0, c = 0; p < 8; ++p) {
      const bool on = (b >> p) & 1;
      ctrl[b][2 * p] = on ? 2 * c : 0x80, ctrl[b][2 * p + 1] = on ? 2 * c + 1 : 0x80, c += on;
    }
  const __m512i below = _mm512_setr_epi32(0, 1, 3, 7, 15, 31, 63, 127, 255, 511, 1023, 2047, 4095, 8191, 16383, 32767);
  run("dense (no expansion: the bound)", [&] {
    return kernel([&](const uint16_t*, uint32_t) { return widen(_mm256_loadu_si256((const __m256i*)vals[0])); });
  });
  run("vexpandps (AVX-512F)", [&] {
    return kernel([&](const uint16_t* vp, uint32_t m) {
      return _mm512_maskz_expand_ps((__mmask16)m, widen(_mm256_loadu_si256((const __m256i*)vp)));
    });
  });
  run("prefix vpopcntd + vpermps (used)", [&] {
    return kernel([&](const uint16_t* vp, uint32_t m) {
      const __m512i idx = _mm512_popcnt_epi32(_mm512_and_si512(_mm512_set1_epi32(m), below));
      return _mm512_maskz_permutexvar_ps((__mmask16)m, idx, widen(_mm256_loadu_si256((const __m256i*)vp)));
    });
  });
  run("pshufb table per 8 (AVX2 path)", [&] {
    return kernel([&](const uint16_t* vp, uint32_t m) {
      const __m128i lo = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)vp), _mm_load_si128((const __m128i*)ctrl[m & 0xff]));
      const __m128i hi = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)(vp + __builtin_popcount(m & 0xff))),
                                          _mm_load_si128((const __m128i*)ctrl[m >> 8]));
      return widen(_mm256_set_m128i(hi, lo));
    });
  });
}
