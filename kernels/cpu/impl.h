// The CPU kernels, compiled once per instruction set: isa_avx2.cpp and isa_avx512.cpp each set a target
// pragma, SDCPU_NS (their namespace) and SDCPU_W (fp32 lanes of the main vector: 8 or 16), then include
// this file. Everything here has internal linkage except the four entry points declared in sd_cpu.h.
// Weights are bf16 (raw uint16 bits, widened exactly to fp32 by a 16-bit shift); x, accumulators and y are
// fp32. Each entry point computes output rows [n0, n1) (bitmask: blocks of 4 rows [b0, b1)) for every row
// of x; ext.cpp splits them over threads.
#include <immintrin.h>
#include <stdint.h>
#include <cstring>

#include "sd_cpu.h"

namespace {

using sdcpu::DenseArgs;
using sdcpu::BitmaskArgs;
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
  const int32_t* rp = a.run_ptr + n * a.T;
  vf acc = vzero();
  __m256 acc8 = _mm256_setzero_ps(), acc8b = _mm256_setzero_ps();
  for (int64_t t = 0; t < a.T; ++t) {
    const float* xb = a.x + t * a.tile;
    int64_t j = rp[t];
    const int64_t e = rp[t + 1];
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
  const int32_t* rp = a.run_ptr + n * a.T;
  __m256 acc[S][Q];
  for (int s = 0; s < S; ++s)
    for (int q = 0; q < Q; ++q) acc[s][q] = _mm256_setzero_ps();
  for (int64_t t = 0; t < a.T; ++t) {
    const float* xb = a.xt + t * a.tile * Mp + c;
    const int64_t e = rp[t + 1];
    for (int64_t j = rp[t]; j < e; j += 8) {  // segments are padded to 8
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

// ================================================================================ bitmask (expand)
// Blocks of 4 output rows; per 16 inputs, the block's 4 mask words (one 8-byte load) and, right after the
// previous group's, the kept values of its rows one after the other: one strictly sequential stream per
// block (four interleaved row streams measured 3x slower from DRAM: the prefetchers lose them).
// Each row's values are widened and expanded into a dense vector (zeros at dropped inputs) that feeds MB
// rows of x like the dense kernel's weight vector: the bytes read scale with the kept weights (2 per value
// + 1/8 per input), the FMAs stay dense. AVX-512: lane j takes value popcount(mask & (2^j - 1)) (vpopcntd
// on the broadcast mask) through one zero-masked vpermps (vexpandps does the same in one instruction but
// measured 2.7x slower on the AMD EPYC of docs/benchmarks.md). AVX2: per 8 inputs a pshufb control from a
// 256-entry table (one per mask byte) places the values, then the 8 words are widened.
constexpr int kBmRows = sdcpu::kBitmaskRows;
// The 4 rows' 16-bit masks of group g as one 64-bit word (row i in bits 16 i ..; memcpy: no aliasing UB)
inline uint64_t masks4(const uint16_t* mp, int64_t g) {
  uint64_t m;
  std::memcpy(&m, mp + g * kBmRows, sizeof m);
  return m;
}
#if SDCPU_W == 16
// Rows r0 .. r0 + NR of block `blk` times rows m0 .. m0 + MB of x, weights expanded in registers.
template <int NR, int MB>
inline void bitmask_tile(const BitmaskArgs& a, int64_t blk, int r0, int64_t m0, int rows) {
  const int64_t K = a.K, G = a.G;
  const float* x = a.x + m0 * K;
  const uint16_t* gp = a.vals + a.block_ptr[blk];  // the current group's first value
  const uint16_t* mp = a.masks + blk * G * kBmRows;
  const uint64_t before = r0 ? (uint64_t{1} << (16 * r0)) - 1 : 0;  // mask bits of the rows before r0
  vf acc[NR][MB];
  for (int i = 0; i < NR; ++i)
    for (int b = 0; b < MB; ++b) acc[i][b] = vzero();
  const __m512i below = _mm512_setr_epi32(0, 1, 3, 7, 15, 31, 63, 127, 255, 511, 1023, 2047, 4095, 8191, 16383, 32767);
  const int64_t full = K / 16;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k = 16 * g;
    vf xv[MB];
    if (g < full) {
      for (int b = 0; b < MB; ++b) xv[b] = vld(x + b * K + k);
    } else {
      const __mmask16 t = static_cast<__mmask16>((1u << (K - k)) - 1);
      for (int b = 0; b < MB; ++b) xv[b] = _mm512_maskz_loadu_ps(t, x + b * K + k);
    }
    const uint64_t m4 = masks4(mp, g);
    const uint16_t* vp = gp + __builtin_popcountll(m4 & before);
    gp += __builtin_popcountll(m4);
    for (int i = 0; i < NR; ++i) {
      const uint32_t m = static_cast<uint32_t>(m4 >> (16 * (r0 + i))) & 0xffff;
      const vf v = vld_bf16(vp);
      vp += __builtin_popcount(m);
      const __m512i idx = _mm512_popcnt_epi32(_mm512_and_si512(_mm512_set1_epi32(static_cast<int>(m)), below));
      const vf w = _mm512_maskz_permutexvar_ps(static_cast<__mmask16>(m), idx, v);
      for (int b = 0; b < MB; ++b) acc[i][b] = vfma(w, xv[b], acc[i][b]);
    }
  }
  for (int i = 0; i < NR && r0 + i < rows; ++i)
    for (int b = 0; b < MB; ++b) {
      const int64_t n = blk * kBmRows + r0 + i;
      float s = vsum(acc[i][b]);
      if (a.bias) s += a.bias[n];
      a.y[(m0 + b) * a.N + n] = s;
    }
}
constexpr int kBmMB = 4;
#else
struct LutExpand { uint8_t c[256][16]; };
constexpr LutExpand make_lut_expand() {
  LutExpand t{};
  for (int b = 0; b < 256; ++b) {
    int cnt = 0;
    for (int p = 0; p < 8; ++p) {
      const bool on = (b >> p) & 1;
      t.c[b][2 * p] = on ? static_cast<uint8_t>(2 * cnt) : 0x80;
      t.c[b][2 * p + 1] = on ? static_cast<uint8_t>(2 * cnt + 1) : 0x80;
      cnt += on;
    }
  }
  return t;
}
alignas(64) constexpr LutExpand kLutExpand = make_lut_expand();

inline __m256 bm_next8(const uint16_t*& vp, uint32_t byte) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(vp));
  const __m128i e = _mm_shuffle_epi8(raw, _mm_load_si128(reinterpret_cast<const __m128i*>(kLutExpand.c[byte])));
  vp += __builtin_popcount(byte);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(e), 16));
}
template <int NR, int MB>
inline void bitmask_tile(const BitmaskArgs& a, int64_t blk, int r0, int64_t m0, int rows) {
  const int64_t K = a.K, G = a.G;
  const float* x = a.x + m0 * K;
  const uint16_t* gp = a.vals + a.block_ptr[blk];
  const uint16_t* mp = a.masks + blk * G * kBmRows;
  const uint64_t before = r0 ? (uint64_t{1} << (16 * r0)) - 1 : 0;
  __m256 acc[NR][MB];
  for (int i = 0; i < NR; ++i)
    for (int b = 0; b < MB; ++b) acc[i][b] = _mm256_setzero_ps();
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t g = 0; g < G; ++g) {
    const uint64_t m4 = masks4(mp, g);
    // the group's values are row 0's, row 1's...: the second half of a row starts after its first half
    const uint16_t* rv[NR];
    const uint16_t* vp = gp + __builtin_popcountll(m4 & before);
    gp += __builtin_popcountll(m4);
    for (int i = 0; i < NR; ++i) {
      rv[i] = vp;
      vp += __builtin_popcount(static_cast<uint32_t>(m4 >> (16 * (r0 + i))) & 0xffff);
    }
    for (int h = 0; h < 2; ++h) {
      const int64_t k = 16 * g + 8 * h;
      if (k >= K) break;
      __m256 xv[MB];
      if (k + 8 <= K) {
        for (int b = 0; b < MB; ++b) xv[b] = _mm256_loadu_ps(x + b * K + k);
      } else {
        const __m256i t = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(K - k)), lanes);
        for (int b = 0; b < MB; ++b) xv[b] = _mm256_maskload_ps(x + b * K + k, t);
      }
      for (int i = 0; i < NR; ++i) {
        const __m256 w = bm_next8(rv[i], static_cast<uint32_t>(m4 >> (16 * (r0 + i) + 8 * h)) & 0xff);
        for (int b = 0; b < MB; ++b) acc[i][b] = _mm256_fmadd_ps(w, xv[b], acc[i][b]);
      }
    }
  }
  for (int i = 0; i < NR && r0 + i < rows; ++i)
    for (int b = 0; b < MB; ++b) {
      const int64_t n = blk * kBmRows + r0 + i;
      float s = hsum8(acc[i][b]);
      if (a.bias) s += a.bias[n];
      a.y[(m0 + b) * a.N + n] = s;
    }
}
constexpr int kBmMB = 2;
#endif

// Direct (register) passes for small M: NR rows of the block per pass so NR x M accumulators fit the
// registers; 2 passes of 2 rows re-read the block's bytes from L1 but expand each weight once.
template <int NR, int MB>
inline void bitmask_direct(const BitmaskArgs& a, int64_t blk, int rows) {
  for (int r0 = 0; r0 < kBmRows; r0 += NR) bitmask_tile<NR, MB>(a, blk, r0, 0, rows);
}

inline void bitmask_small(const BitmaskArgs& a, int64_t blk, int rows) {
  switch (a.M) {
    case 1: return bitmask_direct<4, 1>(a, blk, rows);
    case 2: return bitmask_direct<4, 2>(a, blk, rows);
#if SDCPU_W == 16
    case 3: return bitmask_direct<4, 3>(a, blk, rows);
    case 4: return bitmask_direct<4, 4>(a, blk, rows);
    case 5: return bitmask_direct<2, 5>(a, blk, rows);
    case 6: return bitmask_direct<2, 6>(a, blk, rows);
    case 7: return bitmask_direct<2, 7>(a, blk, rows);
    default: return bitmask_direct<2, 8>(a, blk, rows);
#else
    case 3: return bitmask_direct<2, 3>(a, blk, rows);
    default: return bitmask_direct<2, 4>(a, blk, rows);
#endif
  }
}
constexpr int64_t kBmSmallMax = SDCPU_W == 16 ? 8 : 4;  // more rows of x: the scratch path

// More rows of x than one register pass holds: the block's weights are expanded once per chunk of kBmChunk
// inputs into an fp32 scratch in L1 ([4][kBmChunk]), then every pass of MB rows of x runs the dense FMA loop
// on it (instead of expanding the same weights again for each pass); partial sums go to y per chunk.
constexpr int64_t kBmChunk = 512;

inline void bitmask_expand_chunk(const uint16_t*& vp, const uint16_t* mp, int64_t g0, int64_t g1, float* ws) {
  for (int64_t g = g0; g < g1; ++g) {
    const uint64_t m4 = masks4(mp, g);
    const int64_t o = 16 * (g - g0);
#if SDCPU_W == 16
    const __m512i below = _mm512_setr_epi32(0, 1, 3, 7, 15, 31, 63, 127, 255, 511, 1023, 2047, 4095, 8191, 16383, 32767);
    for (int i = 0; i < kBmRows; ++i) {
      const uint32_t m = static_cast<uint32_t>(m4 >> (16 * i)) & 0xffff;
      const vf v = vld_bf16(vp);
      vp += __builtin_popcount(m);
      const __m512i idx = _mm512_popcnt_epi32(_mm512_and_si512(_mm512_set1_epi32(static_cast<int>(m)), below));
      _mm512_storeu_ps(ws + i * kBmChunk + o, _mm512_maskz_permutexvar_ps(static_cast<__mmask16>(m), idx, v));
    }
#else
    for (int i = 0; i < kBmRows; ++i) {
      const uint32_t m = static_cast<uint32_t>(m4 >> (16 * i)) & 0xffff;
      const uint16_t* rv = vp;
      vp += __builtin_popcount(m);
      _mm256_storeu_ps(ws + i * kBmChunk + o, bm_next8(rv, m & 0xff));
      _mm256_storeu_ps(ws + i * kBmChunk + o + 8, bm_next8(rv, m >> 8));
    }
#endif
  }
}

template <int MB>
inline void bitmask_scratch_pass(const BitmaskArgs& a, const float* ws, int64_t blk, int64_t k0, int64_t kc,
                                 int64_t m0, int rows, bool first) {
  const int64_t K = a.K;
  const float* x = a.x + m0 * K + k0;
  vf acc[kBmRows][MB];
  for (int i = 0; i < kBmRows; ++i)
    for (int b = 0; b < MB; ++b) acc[i][b] = vzero();
  int64_t k = 0;
  for (; k + W <= kc; k += W) {
    vf xv[MB];
    for (int b = 0; b < MB; ++b) xv[b] = vld(x + b * K + k);
    for (int i = 0; i < kBmRows; ++i) {
      const vf w = vld(ws + i * kBmChunk + k);
      for (int b = 0; b < MB; ++b) acc[i][b] = vfma(w, xv[b], acc[i][b]);
    }
  }
  for (int i = 0; i < rows; ++i)
    for (int b = 0; b < MB; ++b) {
      const int64_t n = blk * kBmRows + i;
      float s = vsum(acc[i][b]);
      for (int64_t kk = k; kk < kc; ++kk) s += ws[i * kBmChunk + kk] * x[b * K + kk];
      float* out = a.y + (m0 + b) * a.N + n;
      if (first) *out = s + (a.bias ? a.bias[n] : 0.0f);
      else *out += s;
    }
}

template <int MB>
inline void bitmask_scratch_mb(const BitmaskArgs& a, const float* ws, int64_t blk, int64_t k0, int64_t kc,
                               int64_t m0, int mb, int rows, bool first) {
  if constexpr (MB > 1) {
    if (mb < MB) return bitmask_scratch_mb<MB - 1>(a, ws, blk, k0, kc, m0, mb, rows, first);
  }
  bitmask_scratch_pass<MB>(a, ws, blk, k0, kc, m0, rows, first);
}

inline void bitmask_scratch(const BitmaskArgs& a, int64_t blk, int rows) {
  alignas(64) float ws[kBmRows * kBmChunk];
  const uint16_t* vp = a.vals + a.block_ptr[blk];
  const uint16_t* mp = a.masks + blk * a.G * kBmRows;
  for (int64_t k0 = 0; k0 < a.K; k0 += kBmChunk) {
    const int64_t kc = a.K - k0 < kBmChunk ? a.K - k0 : kBmChunk;
    const int64_t g0 = k0 / 16, g1 = (k0 + kc + 15) / 16;
    bitmask_expand_chunk(vp, mp, g0, g1, ws);
    for (int64_t m0 = 0; m0 < a.M; m0 += kBmMB) {
      const int64_t left = a.M - m0;
      bitmask_scratch_mb<kBmMB>(a, ws, blk, k0, kc, m0, static_cast<int>(left < kBmMB ? left : kBmMB), rows,
                                k0 == 0);
    }
  }
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

void bitmask(const sdcpu::BitmaskArgs& a, int64_t b0, int64_t b1) {
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t left_rows = a.N - blk * kBmRows;
    const int rows = static_cast<int>(left_rows < kBmRows ? left_rows : kBmRows);
    if (a.M > kBmSmallMax) bitmask_scratch(a, blk, rows);
    else bitmask_small(a, blk, rows);
  }
}

}  // namespace SDCPU_NS
