// The CPU kernels, compiled once per instruction set: isa_avx2.cpp and isa_avx512.cpp each set a target
// pragma, SDCPU_NS (their namespace) and SDCPU_W (fp32 lanes of the main vector: 8 or 16), then include
// this file. Everything here has internal linkage except the three entry points declared in sd_cpu.h.
// Weights are bf16 (raw uint16 bits, widened exactly to fp32 by a 16-bit shift); x, accumulators and y are
// fp32. Each entry point computes output rows [n0, n1) for every row of x; ext.cpp splits N over threads.
#include <immintrin.h>
#include <stdint.h>

#include "sd_cpu.h"

namespace {

using sdcpu::DenseArgs;
using sdcpu::NM24Args;
using sdcpu::TiledArgs;

inline float bf2f(uint16_t h) {
  union { uint32_t u; float f; } c;
  c.u = static_cast<uint32_t>(h) << 16;
  return c.f;
}

// ---- 8-lane helpers (AVX2 + FMA; the AVX-512 build uses them too where 8 lanes suffice)
inline __m256 ld8_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline __m256 gather8(const float* base, const uint8_t* idx) {
  __m256i i = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(idx)));
  return _mm256_i32gather_ps(base, i, 4);
}

// ---- the main vector: W fp32 lanes
#if SDCPU_W == 16
typedef __m512 vf;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vld(const float* p) { return _mm512_loadu_ps(p); }
inline vf vld_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
inline vf vgather(const float* base, const uint8_t* idx) {
  return _mm512_i32gather_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx))), base, 4);
}
constexpr int kDenseMB = 6;  // rows of x per register block (32 vector registers: 4 x 6 accumulators)
#else
typedef __m256 vf;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vld(const float* p) { return _mm256_loadu_ps(p); }
inline vf vld_bf16(const uint16_t* p) { return ld8_bf16(p); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vf a) { return hsum8(a); }
inline vf vgather(const float* base, const uint8_t* idx) { return gather8(base, idx); }
constexpr int kDenseMB = 3;  // 16 vector registers: 4 x 3 accumulators + 3 x + 1 weight
#endif
constexpr int W = SDCPU_W;
constexpr int kDenseNB = 4;  // output rows per register block

// ================================================================================ dense bf16
// Register block: NB output rows x MB rows of x; one bf16 weight vector feeds MB FMAs, one x vector NB.
template <int NB, int MB>
inline void dense_tile(const DenseArgs& a, int64_t n, int64_t m0) {
  const int64_t K = a.K, N = a.N;
  const float* x = a.x + m0 * K;
  const uint16_t* w = a.w + n * K;
  vf acc[NB][MB];
  for (int i = 0; i < NB; ++i)
    for (int b = 0; b < MB; ++b) acc[i][b] = vzero();
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    vf xv[MB];
    for (int b = 0; b < MB; ++b) xv[b] = vld(x + b * K + k);
    for (int i = 0; i < NB; ++i) {
      vf wv = vld_bf16(w + i * K + k);
      for (int b = 0; b < MB; ++b) acc[i][b] = vfma(wv, xv[b], acc[i][b]);
    }
  }
  for (int i = 0; i < NB; ++i) {
    for (int b = 0; b < MB; ++b) {
      float s = vsum(acc[i][b]);
      for (int64_t kk = k; kk < K; ++kk) s += bf2f(w[i * K + kk]) * x[b * K + kk];
      if (a.bias) s += a.bias[n + i];
      a.y[(m0 + b) * N + n + i] = s;
    }
  }
}

template <int NB, int MB>
inline void dense_mb(const DenseArgs& a, int64_t n, int64_t m0, int mb) {
  if constexpr (MB > 1) {
    if (mb < MB) return dense_mb<NB, MB - 1>(a, n, m0, mb);
  }
  dense_tile<NB, MB>(a, n, m0);
}

template <int NB>
inline void dense_rows(const DenseArgs& a, int64_t n) {
  for (int64_t m0 = 0; m0 < a.M; m0 += kDenseMB) {
    const int64_t left = a.M - m0;
    dense_mb<NB, kDenseMB>(a, n, m0, static_cast<int>(left < kDenseMB ? left : kDenseMB));
  }
}

// ================================================================================ tiled CSR
// M == 1: gather x by the in-tile column (one gather per W values; x stays in L1).
inline void tiled_m1(const TiledArgs& a, int64_t n) {
  const int32_t* tp = a.tile_ptr + n * (a.T + 1);
  const int64_t rs = a.row_ptr[n];
  vf acc = vzero();
  __m256 acc8 = _mm256_setzero_ps(), acc8b = _mm256_setzero_ps();
  for (int64_t t = 0; t < a.T; ++t) {
    const float* xb = a.x + t * a.tile;
    int64_t j = rs + tp[t];
    const int64_t e = rs + tp[t + 1];
#if SDCPU_W == 16
    for (; j + 16 <= e; j += 16) acc = vfma(vld_bf16(a.vals + j), vgather(xb, a.cols + j), acc);
#else
    for (; j + 16 <= e; j += 16) {
      acc8 = _mm256_fmadd_ps(ld8_bf16(a.vals + j), gather8(xb, a.cols + j), acc8);
      acc8b = _mm256_fmadd_ps(ld8_bf16(a.vals + j + 8), gather8(xb, a.cols + j + 8), acc8b);
    }
#endif
    for (; j < e; j += 8) acc8 = _mm256_fmadd_ps(ld8_bf16(a.vals + j), gather8(xb, a.cols + j), acc8);
  }
#if SDCPU_W == 16
  float s = vsum(acc) + hsum8(_mm256_add_ps(acc8, acc8b));
#else
  float s = hsum8(_mm256_add_ps(_mm256_add_ps(acc, acc8), acc8b));
#endif
  if (a.bias) s += a.bias[n];
  a.y[n] = s;
}

// M > 1: x transposed [K, Mp]; per nonzero one broadcast value times Q vectors of 8 rows of x.
template <int Q>
inline void tiled_mq(const TiledArgs& a, int64_t n, int64_t c) {
  constexpr int S = Q == 1 ? 4 : (Q == 2 ? 2 : 1);  // independent accumulator sets (FMA latency)
  const int64_t Mp = a.Mp;
  const int32_t* tp = a.tile_ptr + n * (a.T + 1);
  const int64_t rs = a.row_ptr[n];
  __m256 acc[S][Q];
  for (int s = 0; s < S; ++s)
    for (int q = 0; q < Q; ++q) acc[s][q] = _mm256_setzero_ps();
  for (int64_t t = 0; t < a.T; ++t) {
    const float* xb = a.xt + t * a.tile * Mp + c;
    const int64_t e = rs + tp[t + 1];
    for (int64_t j = rs + tp[t]; j < e; j += 8) {  // segments are padded to 8
      alignas(32) float vb[8];  // 8 widened values, broadcast from L1 one by one
      _mm256_store_ps(vb, ld8_bf16(a.vals + j));
      for (int u = 0; u < 8; ++u) {
        const __m256 b = _mm256_broadcast_ss(vb + u);
        const float* xp = xb + static_cast<int64_t>(a.cols[j + u]) * Mp;
        for (int q = 0; q < Q; ++q) acc[u % S][q] = _mm256_fmadd_ps(b, _mm256_loadu_ps(xp + 8 * q), acc[u % S][q]);
      }
    }
  }
  const float bias = a.bias ? a.bias[n] : 0.0f;
  for (int q = 0; q < Q; ++q) {
    __m256 v = acc[0][q];
    for (int s = 1; s < S; ++s) v = _mm256_add_ps(v, acc[s][q]);
    alignas(32) float out[8];
    _mm256_store_ps(out, v);
    for (int l = 0; l < 8; ++l) {
      const int64_t m = c + 8 * q + l;
      if (m < a.M) a.y[m * a.N + n] = out[l] + bias;
    }
  }
}

// ================================================================================ 2:4
// One meta byte = 4 two-bit positions = 2 groups = 8 inputs. Lut24[b][p]: which of the 4 values lands on
// input p (0..3), with bit 31 set where input p is dropped (vpermps reads the low 3 bits; srai 31 -> mask).
struct Lut24 { int32_t idx[256][8]; };
constexpr Lut24 make_lut24() {
  Lut24 t{};
  for (int b = 0; b < 256; ++b) {
    for (int p = 0; p < 8; ++p) {
      const int g = p / 4, slot = p % 4;
      const int i0 = (b >> (4 * g)) & 3, i1 = (b >> (4 * g + 2)) & 3;
      int v = -1;
      if (i0 == slot) v = 2 * g;
      else if (i1 == slot) v = 2 * g + 1;
      t.idx[b][p] = v < 0 ? static_cast<int32_t>(0x80000000u) : v;
    }
  }
  return t;
}
alignas(64) constexpr Lut24 kLut24 = make_lut24();

inline __m256 expand24(__m256 vals, uint8_t byte, __m256i add) {
  const __m256i idx = _mm256_add_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(kLut24.idx[byte])), add);
  const __m256 drop = _mm256_castsi256_ps(_mm256_srai_epi32(idx, 31));
  return _mm256_andnot_ps(drop, _mm256_permutevar8x32_ps(vals, idx));
}

template <int MB>
inline void nm24_tile(const NM24Args& a, int64_t n, int64_t m0) {
  const int64_t K = a.K, N = a.N;
  const float* x = a.x + m0 * K;
  const uint16_t* v = a.vals + n * (K / 2);
  const uint8_t* mt = a.meta + n * a.meta_stride;
  const __m256i zero = _mm256_setzero_si256(), four = _mm256_set1_epi32(4);
  __m256 acc0[MB], acc1[MB];
  for (int b = 0; b < MB; ++b) acc0[b] = acc1[b] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 vv = ld8_bf16(v + k / 2);
    const __m256 w0 = expand24(vv, mt[k / 8], zero);
    const __m256 w1 = expand24(vv, mt[k / 8 + 1], four);
    for (int b = 0; b < MB; ++b) {
      acc0[b] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + b * K + k), acc0[b]);
      acc1[b] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + b * K + k + 8), acc1[b]);
    }
  }
  for (int b = 0; b < MB; ++b) {
    float s = hsum8(_mm256_add_ps(acc0[b], acc1[b]));
    for (int64_t j = k / 2; j < K / 2; ++j) {  // tail: fewer than 4 groups
      const int pos = (mt[j / 4] >> (2 * (j % 4))) & 3;
      s += bf2f(v[j]) * x[b * K + 4 * (j / 2) + pos];
    }
    if (a.bias) s += a.bias[n];
    a.y[(m0 + b) * N + n] = s;
  }
}

template <int MB>
inline void nm24_mb(const NM24Args& a, int64_t n, int64_t m0, int mb) {
  if constexpr (MB > 1) {
    if (mb < MB) return nm24_mb<MB - 1>(a, n, m0, mb);
  }
  nm24_tile<MB>(a, n, m0);
}

}  // namespace

namespace SDCPU_NS {

void dense_bf16(const sdcpu::DenseArgs& a, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kDenseNB <= n1; n += kDenseNB) dense_rows<kDenseNB>(a, n);
  for (; n < n1; ++n) dense_rows<1>(a, n);
}

void tiled(const sdcpu::TiledArgs& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    if (a.M == 1) {
      tiled_m1(a, n);
      continue;
    }
    for (int64_t c = 0; c < a.Mp; c += 32) {
      const int64_t q = (a.Mp - c) / 8;
      if (q >= 4) tiled_mq<4>(a, n, c);
      else if (q == 3) tiled_mq<3>(a, n, c);
      else if (q == 2) tiled_mq<2>(a, n, c);
      else tiled_mq<1>(a, n, c);
    }
  }
}

void nm24(const sdcpu::NM24Args& a, int64_t n0, int64_t n1) {
  constexpr int MB = SDCPU_W == 16 ? 6 : 4;  // rows of x per pass (2 accumulators each)
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m0 = 0; m0 < a.M; m0 += MB) {
      const int64_t left = a.M - m0;
      nm24_mb<MB>(a, n, m0, static_cast<int>(left < MB ? left : MB));
    }
}

}  // namespace SDCPU_NS
