// AVX2 + FMA build of impl.h (the baseline of every x86-64 machine served).
#pragma GCC target("avx2,fma,popcnt")
#define SDCPU_NS sdcpu_avx2
#define SDCPU_W 8
#include "impl.h"
