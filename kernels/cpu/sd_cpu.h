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

// Tiled CSR: row n's nonzeros are split by K-tiles of `tile` inputs; tile t of row n holds the values
// vals[row_ptr[n] + tile_ptr[n * (T + 1) + t] ...  + tile_ptr[n * (T + 1) + t + 1]) with their column
// inside the tile in `cols` (one byte); every (row, tile) segment is padded to a multiple of 8 entries
// (value 0, column 0). x for M == 1 is read directly; for M > 1 `xt` is x transposed [K, Mp] (Mp = M
// rounded up to 8, zero padded).
struct TiledArgs {
  const float* x; const float* xt; int64_t M, Mp, K, N, T, tile;
  const uint16_t* vals; const uint8_t* cols; const int32_t* tile_ptr; const int64_t* row_ptr;
  const float* bias;
  float* y;
};

// 2:4: vals [N, K/2] bf16; meta bytes, row stride `meta_stride` bytes; byte i of a row holds the 2-bit
// in-group positions of values 4i..4i+3 (value j of the row sits at input 4 * (j / 2) + idx_j).
struct NM24Args {
  const float* x; int64_t M, K, N;
  const uint16_t* vals; const uint8_t* meta; int64_t meta_stride;
  const float* bias;
  float* y;
};

}  // namespace sdcpu

#define SDCPU_DECLARE(NS)                                                        \
  namespace NS {                                                                 \
  void dense_bf16(const sdcpu::DenseArgs& a, int64_t n0, int64_t n1);            \
  void tiled(const sdcpu::TiledArgs& a, int64_t n0, int64_t n1);                 \
  void nm24(const sdcpu::NM24Args& a, int64_t n0, int64_t n1);                   \
  }

SDCPU_DECLARE(sdcpu_avx2)
SDCPU_DECLARE(sdcpu_avx512)
