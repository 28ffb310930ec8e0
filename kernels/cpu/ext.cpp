// Torch bindings of the CPU kernels (compiled without ISA flags): checks, threads, and the ISA choice.
// Kernels run on the ISA unit the caller names ("avx2" or "avx512"); the caller (kernels/_cpu_ext.py)
// picks it from the CPU's flags and SPARSEDIAL_CPU_ISA, and this file refuses one the CPU lacks.
// Threads: at::parallel_for over output rows, i.e. torch's intra-op threads of the calling thread.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <string>
#include <vector>

#include "sd_cpu.h"

namespace {

constexpr int64_t kGrain = 16;  // output rows per task at least

bool cpu_has(const std::string& isa) {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
  if (isa == "avx2") return avx2;
  if (isa == "avx512")
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vpopcntdq");
  return false;
}

bool use_512(const std::string& isa) {
  TORCH_CHECK(isa == "avx2" || isa == "avx512", "isa must be 'avx2' or 'avx512', got '", isa, "'");
  TORCH_CHECK(cpu_has(isa), "this CPU does not support the ", isa, " kernels");
  return isa == "avx512";
}

void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " inputs, the weight ", K);
}

const float* bias_ptr(const c10::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return nullptr;
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.scalar_type() == at::kFloat && b.is_contiguous() && b.numel() == N, "bias must be float32 [N]");
  return b.data_ptr<float>();
}

template <class T>
const T* ptr_of(const at::Tensor& t, at::ScalarType st, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == st && t.is_contiguous(), what, " has the wrong dtype or layout");
  return reinterpret_cast<const T*>(t.data_ptr());
}

template <class Args, class Fn>
void run_rows(const Args& a, int64_t N, Fn fn) {
  at::parallel_for(0, N, kGrain, [&](int64_t b, int64_t e) { fn(a, b, e); });
}

at::Tensor dense_bf16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                      const std::string& isa) {
  const bool wide = use_512(isa);
  TORCH_CHECK(w.dim() == 2, "w must be [N, K]");
  const int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  check_x(x, K);
  at::Tensor y = at::empty({M, N}, x.options());
  sdcpu::DenseArgs a{x.data_ptr<float>(), M, K, N, ptr_of<uint16_t>(w, at::kBFloat16, "w"), bias_ptr(bias, N),
                     y.data_ptr<float>()};
  if (M > 0) run_rows(a, N, wide ? sdcpu_avx512::dense_bf16 : sdcpu_avx2::dense_bf16);
  return y;
}

at::Tensor tiled(const at::Tensor& x, const at::Tensor& vals, const at::Tensor& cols, const at::Tensor& run_ptr,
                 int64_t N, int64_t K, int64_t tile,
                 const c10::optional<at::Tensor>& bias, const std::string& isa) {
  const bool wide = use_512(isa);
  check_x(x, K);
  const int64_t M = x.size(0), T = (K + tile - 1) / tile;
  TORCH_CHECK(tile >= 8 && tile <= 256, "tile must be in [8, 256]");
  TORCH_CHECK(run_ptr.numel() == N * T + 1, "run_ptr must have N * ceil(K / tile) + 1 entries");
  TORCH_CHECK(cols.numel() == vals.numel(), "cols and vals differ in length");
  const int32_t* rp = ptr_of<int32_t>(run_ptr, at::kInt, "run_ptr");
  TORCH_CHECK(rp[0] == 0 && rp[N * T] <= vals.numel(), "run_ptr does not fit the values");
  at::Tensor y = at::empty({M, N}, x.options());
  const int64_t Mp = (M + 7) / 8 * 8;
  at::Tensor xt;
  if (M > 1) {
    xt = at::zeros({K, Mp}, x.options());
    xt.narrow(1, 0, M).copy_(x.t());
  }
  sdcpu::TiledArgs a{x.data_ptr<float>(), M > 1 ? xt.data_ptr<float>() : nullptr, M, Mp, K, N, T, tile,
                     ptr_of<uint16_t>(vals, at::kBFloat16, "vals"), ptr_of<uint8_t>(cols, at::kByte, "cols"),
                     rp, bias_ptr(bias, N), y.data_ptr<float>()};
  if (M > 0) run_rows(a, N, wide ? sdcpu_avx512::tiled : sdcpu_avx2::tiled);
  return y;
}

at::Tensor bitmask(const at::Tensor& x, const at::Tensor& vals, const at::Tensor& masks, const at::Tensor& block_ptr,
                   int64_t N, int64_t K, const c10::optional<at::Tensor>& bias, const std::string& isa) {
  const bool wide = use_512(isa);
  check_x(x, K);
  TORCH_CHECK(K > 0 && N > 0, "the weight must have K > 0 inputs and N > 0 outputs");
  const int64_t R = sdcpu::kBitmaskRows, blocks = (N + R - 1) / R, G = (K + 15) / 16, M = x.size(0);
  TORCH_CHECK(masks.dim() == 3 && masks.size(0) == blocks && masks.size(1) == G && masks.size(2) == R,
              "masks must be [ceil(N / 4), ceil(K / 16), 4] 16-bit words");
  TORCH_CHECK(block_ptr.numel() == blocks + 1, "block_ptr must have ceil(N / 4) + 1 entries");
  const int64_t* bp = ptr_of<int64_t>(block_ptr, at::kLong, "block_ptr");
  TORCH_CHECK(vals.dim() == 1 && vals.numel() >= bp[blocks] + 16, "vals must hold the kept values + 16 padding entries");
  at::Tensor y = at::empty({M, N}, x.options());
  sdcpu::BitmaskArgs a{x.data_ptr<float>(), M, K, N, G, ptr_of<uint16_t>(vals, at::kBFloat16, "vals"),
                       ptr_of<uint16_t>(masks, at::kShort, "masks"), bp, bias_ptr(bias, N), y.data_ptr<float>()};
  if (M > 0)
    at::parallel_for(0, blocks, (kGrain + R - 1) / R,
                     [&](int64_t b, int64_t e) { (wide ? sdcpu_avx512::bitmask : sdcpu_avx2::bitmask)(a, b, e); });
  return y;
}

// True when a bitmask format is self-consistent (PackedBitmask checks it once, at construction): offsets
// start at 0 and each block's count equals its masks' popcount, no bit past K, vals covers it + 16. The
// kernel advances through vals by the popcounts, so a format failing this would read past vals.
bool bitmask_valid(const at::Tensor& vals, const at::Tensor& masks, const at::Tensor& block_ptr, int64_t N,
                   int64_t K) {
  const int64_t R = sdcpu::kBitmaskRows, blocks = (N + R - 1) / R, G = (K + 15) / 16;
  if (!(masks.dim() == 3 && masks.size(0) == blocks && masks.size(1) == G && masks.size(2) == R &&
        masks.scalar_type() == at::kShort && masks.is_contiguous() && block_ptr.scalar_type() == at::kLong &&
        block_ptr.is_contiguous() && block_ptr.numel() == blocks + 1 && vals.dim() == 1))
    return false;
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(masks.data_ptr<int16_t>());
  const int64_t* bp = block_ptr.data_ptr<int64_t>();
  const uint32_t tail = K % 16 ? (1u << (K % 16)) - 1 : 0xffffu;  // bits the last group may hold
  if (bp[0] != 0) return false;
  for (int64_t b = 0; b < blocks; ++b) {
    int64_t c = 0;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t r = 0; r < R; ++r) {
        const uint32_t w = mp[(b * G + g) * R + r];
        if ((g == G - 1 && (w & ~tail)) || (b * R + r >= N && w)) return false;
        c += __builtin_popcount(w);
      }
    if (bp[b + 1] - bp[b] != c) return false;
  }
  return vals.numel() >= bp[blocks] + 16;
}

// The bitmask packer (kernels/cpu_formats.py, pack_bitmask: same output as its torch path, in one pass per
// block instead of torch's transposes and masked_select): w fp32 [N, K] row-major, keep bool [N, K] row-major.
// Returns (values bf16 [L + 16], masks int16 [B, G, 4], block_ptr int64 [B + 1]); bf16 by round to nearest even.
std::vector<at::Tensor> pack_bitmask(const at::Tensor& w, const at::Tensor& keep) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous(), "w must be contiguous float32 [N, K]");
  TORCH_CHECK(keep.sizes() == w.sizes() && keep.scalar_type() == at::kBool && keep.is_contiguous(),
              "keep must be a contiguous bool tensor of w's shape");
  const int64_t N = w.size(0), K = w.size(1), R = sdcpu::kBitmaskRows, B = (N + R - 1) / R, G = (K + 15) / 16;
  at::Tensor masks = at::zeros({B, G, R}, w.options().dtype(at::kShort));
  at::Tensor counts = at::zeros({B + 1}, w.options().dtype(at::kLong));
  const bool* kp = keep.data_ptr<bool>();
  const float* wp = w.data_ptr<float>();
  uint16_t* mp = reinterpret_cast<uint16_t*>(masks.data_ptr<int16_t>());
  int64_t* cp = counts.data_ptr<int64_t>();
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t c = 0;
      for (int64_t r = 0; r < R && b * R + r < N; ++r) {
        const bool* row = kp + (b * R + r) * K;
        for (int64_t g = 0; g < G; ++g) {
          uint32_t word = 0;
          const int64_t k0 = 16 * g, k1 = k0 + 16 < K ? k0 + 16 : K;
          for (int64_t k = k0; k < k1; ++k) word |= static_cast<uint32_t>(row[k]) << (k - k0);
          mp[(b * G + g) * R + r] = static_cast<uint16_t>(word);
          c += __builtin_popcount(word);
        }
      }
      cp[b + 1] = c;
    }
  });
  for (int64_t b = 0; b < B; ++b) cp[b + 1] += cp[b];  // block_ptr
  at::Tensor values = at::zeros({cp[B] + 16}, w.options().dtype(at::kBFloat16));
  uint16_t* vp = reinterpret_cast<uint16_t*>(values.data_ptr());
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      uint16_t* out = vp + cp[b];
      for (int64_t g = 0; g < G; ++g)
        for (int64_t r = 0; r < R && b * R + r < N; ++r) {
          uint32_t word = mp[(b * G + g) * R + r];
          const float* src = wp + (b * R + r) * K + 16 * g;
          while (word) {
            const int j = __builtin_ctz(word);
            word &= word - 1;
            uint32_t u;
            std::memcpy(&u, src + j, 4);
            const bool nan = (u & 0x7fffffffu) > 0x7f800000u;  // quiet it, as torch's conversion does
            *out++ = static_cast<uint16_t>(nan ? (u >> 16) | 0x40u : (u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
          }
        }
    }
  });
  return {values, masks, counts};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_has", &cpu_has, "True when this CPU runs the kernels of `isa` ('avx2' or 'avx512')");
  m.def("dense_bf16", &dense_bf16);
  m.def("tiled", &tiled);
  m.def("bitmask", &bitmask);
  m.def("bitmask_valid", &bitmask_valid, "True when a bitmask format's masks, offsets and values agree");
  m.def("pack_bitmask", &pack_bitmask, "the bitmask format of w (float32) at the positions keep keeps");
}
