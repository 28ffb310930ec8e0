// Plain argument structs shared by ext.cpp (no ISA flags) and the ISA translation units (isa_*.cpp).
// No inline functions here: the ISA units are compiled for AVX2 / AVX-512 and must not emit code that the
// linker could pick for the baseline unit (ODR), so they include only this header and <immintrin.h>.
#pragma once
#include <stdint.h>

namespace sdcpu {

// y[M, N] = x[M, K] @ W[N, K]^T (+ bias); W bf16 row-major (raw uint16 bits), fp32 accumulate.
struct DenseArgs {
  const float* x; int64_t M, K, N;
  const uint16_t* w;
  const float* bias;  // nullptr: none
  float* y;
};

// Values + one-byte column (kernels/formats.py, PackedCols): row n's kept weights split by K-tiles of
// `tile` inputs; run (n, t) holds the values vals[run_ptr[n * T + t] ... run_ptr[n * T + t + 1]) with
// their column inside the tile in `cols`; every run is padded to a multiple of 8 entries (value 0,
// column 0). x for M == 1 is read directly; for M > 1 `xt` is x transposed [K, Mp] (Mp = M
// rounded up to 8, zero padded).
struct TiledArgs {
  const float* x; const float* xt; int64_t M, Mp, K, N, T, tile;
  const uint16_t* vals; const uint8_t* cols; const int32_t* run_ptr;
  const float* bias;
  float* y;
};

// Bitmask, in blocks of kBitmaskRows output rows (N padded up to a whole block with empty rows): per block
// and per 16 inputs g, the rows' 16-bit masks side by side (masks[(blk * G + g) * 4 + i]; bit j: input
// 16 g + j of row i is kept; inputs past K are 0 bits), and the kept values, bf16, in the order block, g,
// row, input, from vals + block_ptr[blk]; `vals` holds 16 entries past the end (kernels load 16 values
// from any position).
constexpr int kBitmaskRows = 4;
struct BitmaskArgs {
  const float* x; int64_t M, K, N, G;
  const uint16_t* vals; const uint16_t* masks; const int64_t* block_ptr;
  const float* bias;
  float* y;
};

}  // namespace sdcpu

#define SDCPU_DECLARE(NS)                                                        \
  namespace NS {                                                                 \
  void dense_bf16(const sdcpu::DenseArgs& a, int64_t n0, int64_t n1);            \
  void tiled(const sdcpu::TiledArgs& a, int64_t n0, int64_t n1);                 \
  void bitmask(const sdcpu::BitmaskArgs& a, int64_t b0, int64_t b1);             \
  }

SDCPU_DECLARE(sdcpu_avx2)
SDCPU_DECLARE(sdcpu_avx512)
