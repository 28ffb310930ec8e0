// AVX-512 (F, BW, VL, VPOPCNTDQ) build of impl.h: 16-lane loops; chosen only where the CPU has them.
#pragma GCC target("avx2,fma,popcnt,avx512f,avx512bw,avx512vl,avx512vpopcntdq")
#define SDCPU_NS sdcpu_avx512
#define SDCPU_W 16
#include "impl.h"
