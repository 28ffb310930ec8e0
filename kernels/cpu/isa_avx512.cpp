// AVX-512 (F, BW, VL) build of impl.h: 16-lane dense and gather loops; chosen only where the CPU has them.
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl")
#define SDCPU_NS sdcpu_avx512
#define SDCPU_W 16
#include "impl.h"
