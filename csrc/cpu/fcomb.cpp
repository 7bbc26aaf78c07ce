// CPU kernel of the fused sampling head (csrc/include/fcomb.h). One task per (image, run of pixels); each
// tile of `base` is loaded once and reused for all K samples, and nothing of size K x C x H x W is ever
// written: the output is the only large store.
//
// float32 at the common widths (8, 16, 32 channels) runs a register-blocked micro-kernel per instruction
// set: pixels are the vector lanes, a tile is NV native vectors (AVX-512: 2 x 16 pixels, AVX2: 2 x 8,
// baseline SSE2: 2 x 4), and each hidden layer is computed OB output channels at a time, so that OB x NV
// accumulators plus the NV input vectors stay in registers (AVX2 and SSE2 have 16 vector registers,
// AVX-512 32) while each weight is broadcast once per tile. The first version kept a whole C x 16-pixel
// activation in 64-byte vectors: fine in AVX-512's 32 registers, but on AVX2 each of them is two halves and
// 16 channels spill, which made K = 50 cost 2.25x K = 1 at B = 16 (issue [cpu-speed]) against 1.2x.
// Every build sums each dot product in the same order (bias first, then channel 0, 1, ...), as the torch
// reference does; only FMA contraction (avx2, avx512) rounds differently from the baseline's mul + add.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_isa.h"
#include "cpu_math.h"
#include "fcomb.h"

namespace harmonizer_fast {
namespace {

// Pixels per task: a multiple of every build's tile (32 pixels), a few hundred so that two or more threads
// balance; the tasks are (image, pixel run) pairs.
constexpr int64_t kTaskPixels = 512;
constexpr int64_t kMaxTile = 32;

#if defined(__GNUC__)
// Vectors never cross a non-inlined call boundary (each build's wrapper is flattened), so the ABI note
// GCC gives for wide vectors is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

template <int V>
struct Vec {
  typedef float type __attribute__((vector_size(sizeof(float) * V)));
};

template <typename vec>
__attribute__((always_inline)) inline vec vrelu(vec v) {  // NaN passes through, as in relu()
  const vec zero = {};
  return v < zero ? zero : v;
}

// Micro-kernel geometry of one build: V lanes per vector, NV vectors per pixel tile, OB output channels
// per register block, C channels; VecExp: the sigmoid on the tile's vectors (exp_vec) rather than a loop
// over its pixels, for the builds where GCC leaves that loop scalar (AVX2, SSE2: at B = 16 it was a quarter
// of the AVX2 head's time). AVX-512 keeps the loop, which GCC vectorizes with masks, 4% faster on Zen 4.
template <int V, int NV, int OB, int C, bool VecExp>
struct HeadTile {
  using vec = typename Vec<V>::type;
  static constexpr int P = V * NV;  // pixels per tile
  static_assert(C % OB == 0, "the output block must divide the channels");
  static_assert(P <= kMaxTile && kTaskPixels % P == 0, "a task is whole tiles");

  // out[o] = relu(b[o] + sum_c w[o, c] in[c]) for all C outputs; in/out are C x NV vectors. With `last`,
  // the outputs are not stored but folded into the final dot product: res = lb + sum_o lw[o] out[o].
  template <bool Last>
  __attribute__((always_inline)) static inline void layer(const vec* __restrict__ in, vec* __restrict__ out,
                                                          const float* __restrict__ w, const float* __restrict__ b,
                                                          const float* __restrict__ lw, vec* __restrict__ res) {
    for (int o0 = 0; o0 < C; o0 += OB) {
      vec acc[OB][NV];
#pragma GCC unroll 16
      for (int i = 0; i < OB; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] = vec{} + b[o0 + i];
      for (int c = 0; c < C; ++c) {
        vec hv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) hv[v] = in[c * NV + v];
#pragma GCC unroll 16
        for (int i = 0; i < OB; ++i) {
          const float wv = w[(o0 + i) * C + c];
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[i][v] += wv * hv[v];
        }
      }
#pragma GCC unroll 16
      for (int i = 0; i < OB; ++i) {
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          if constexpr (Last) {
            res[v] += lw[o0 + i] * vrelu(acc[i][v]);
          } else {
            out[(o0 + i) * NV + v] = vrelu(acc[i][v]);
          }
        }
      }
    }
  }

  // Pixels [p0, p1) of one image (p1 - p0 a multiple of P, or the image's end) for all k samples.
  static void run(const float* __restrict__ base, int64_t pixels, int64_t p0, int64_t p1, int64_t k_count,
                  const float* __restrict__ bias, const float* __restrict__ hw, const float* __restrict__ hb,
                  const float* __restrict__ lw, float lb, int64_t layers, float* __restrict__ out) {
    alignas(64) vec tile[C * NV];  // the base tile, zero-padded past the image's end
    alignas(64) vec h[C * NV], g[C * NV];
    alignas(64) float e[P];
    for (int64_t q = p0; q < p1; q += P) {
      const int64_t n = std::min<int64_t>(P, pixels - q);
      for (int c = 0; c < C; ++c) {
        float* dst = reinterpret_cast<float*>(tile + c * NV);
        std::memcpy(dst, base + c * pixels + q, static_cast<size_t>(n) * sizeof(float));
        for (int64_t p = n; p < P; ++p) dst[p] = 0.0f;
      }
      for (int64_t k = 0; k < k_count; ++k) {
        const float* bk = bias + k * C;
        for (int c = 0; c < C; ++c) {
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) h[c * NV + v] = vrelu(tile[c * NV + v] + bk[c]);
        }
        vec res[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) res[v] = vec{} + lb;
        if (layers == 0) {
          for (int c = 0; c < C; ++c) {
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) res[v] += lw[c] * h[c * NV + v];
          }
        } else {
          vec* src = h;
          vec* dst = g;
          for (int64_t l = 0; l + 1 < layers; ++l) {
            layer<false>(src, dst, hw + l * C * C, hb + l * C, lw, res);
            std::swap(src, dst);
          }
          layer<true>(src, dst, hw + (layers - 1) * C * C, hb + (layers - 1) * C, lw, res);
        }
        if constexpr (VecExp) {
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) res[v] = 1.0f / (1.0f + exp_vec(-res[v]));
          std::memcpy(e, res, sizeof(e));
        } else {
          std::memcpy(e, res, sizeof(e));
          for (int p = 0; p < P; ++p) e[p] = 1.0f / (1.0f + exp_vectorizable(-e[p]));
        }
        std::memcpy(out + k * pixels + q, e, static_cast<size_t>(n) * sizeof(float));
      }
    }
  }
};

// One wrapper per build, each with its native vector width and register blocking.
#define HF_FCOMB_BUILD(attr, suffix, V, NV, OB, VE)                                                           \
  template <int C>                                                                                            \
  attr void run_##suffix(const float* base, int64_t pixels, int64_t p0, int64_t p1, int64_t k,                \
                         const float* bias, const float* hw, const float* hb, const float* lw, float lb,      \
                         int64_t layers, float* out) {                                                        \
    HeadTile<V, NV, std::min(OB, C), C, VE>::run(base, pixels, p0, p1, k, bias, hw, hb, lw, lb, layers, out); \
  }
HF_FCOMB_BUILD(HF_TARGET_AVX512, avx512, 16, 2, 8, false)
HF_FCOMB_BUILD(HF_TARGET_AVX2, avx2, 8, 2, 4, true)
HF_FCOMB_BUILD(__attribute__((flatten)), baseline, 4, 2, 4, true)
#undef HF_FCOMB_BUILD

template <int C>
void run_f32(const float* base, int64_t pixels, int64_t p0, int64_t p1, int64_t k, const float* bias,
             const float* hw, const float* hb, const float* lw, float lb, int64_t layers, float* out) {
  switch (cpu_isa()) {
    case CpuIsa::Avx512: return run_avx512<C>(base, pixels, p0, p1, k, bias, hw, hb, lw, lb, layers, out);
    case CpuIsa::Avx2: return run_avx2<C>(base, pixels, p0, p1, k, bias, hw, hb, lw, lb, layers, out);
    default: return run_baseline<C>(base, pixels, p0, p1, k, bias, hw, hb, lw, lb, layers, out);
  }
}

// The register-blocked path for float32 at C channels, or null.
using RunF32 = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, const float*, const float*, const float*,
                        const float*, float, int64_t, float*);
RunF32 f32_path(int64_t c) {
  switch (c) {
    case 8: return run_f32<8>;
    case 16: return run_f32<16>;
    case 32: return run_f32<32>;
    default: return nullptr;
  }
}
#endif

constexpr int64_t kLanes = 16;

// Any dtype and width: one block of kLanes pixels (n <= kLanes valid) for one sample; h, g are c x kLanes
// scratch tiles.
template <typename T>
inline void mlp_block_impl(const T* __restrict__ base_blk, int64_t pixels, int64_t n, const T* __restrict__ bias,
                           const T* __restrict__ hw, const T* __restrict__ hb, const T* __restrict__ lw, T lb,
                           int64_t c, int64_t layers, T* __restrict__ h, T* __restrict__ g, T* __restrict__ out) {
  for (int64_t ch = 0; ch < c; ++ch) {
    const T bch = bias[ch];
    for (int64_t p = 0; p < kLanes; ++p) {
      h[ch * kLanes + p] = relu<T>((p < n ? base_blk[ch * pixels + p] : T(0)) + bch);
    }
  }
  for (int64_t l = 0; l < layers; ++l) {
    const T* w = hw + l * c * c;
    for (int64_t o = 0; o < c; ++o) {
      T acc[kLanes];
      for (int64_t p = 0; p < kLanes; ++p) acc[p] = hb[l * c + o];
      for (int64_t ch = 0; ch < c; ++ch) {
        const T wv = w[o * c + ch];
        for (int64_t p = 0; p < kLanes; ++p) acc[p] += wv * h[ch * kLanes + p];
      }
      for (int64_t p = 0; p < kLanes; ++p) g[o * kLanes + p] = relu<T>(acc[p]);
    }
    std::swap(h, g);
  }
  T acc[kLanes];
  for (int64_t p = 0; p < kLanes; ++p) acc[p] = lb;
  for (int64_t ch = 0; ch < c; ++ch) {
    const T wv = lw[ch];
    for (int64_t p = 0; p < kLanes; ++p) acc[p] += wv * h[ch * kLanes + p];
  }
  for (int64_t p = 0; p < n; ++p) out[p] = sigmoid<T>(acc[p]);
}
HF_ISA_CLONES(mlp_block, mlp_block_impl)

// Pixels [p0, p1) of one image for all k samples, kLanes pixels at a time.
template <typename T>
void run_generic(const T* base, int64_t pixels, int64_t p0, int64_t p1, int64_t k_count, const T* bias, const T* hw,
                 const T* hb, const T* lw, T lb, int64_t c, int64_t layers, T* scratch, T* out) {
  for (int64_t q = p0; q < p1; q += kLanes) {
    const int64_t n = std::min(kLanes, pixels - q);
    for (int64_t k = 0; k < k_count; ++k) {
      mlp_block(base + q, pixels, n, bias + k * c, hw, hb, lw, lb, c, layers, scratch, scratch + c * kLanes,
                out + k * pixels + q);
    }
  }
}

// The register-blocked path where there is one (float32 at 8, 16 or 32 channels); false otherwise.
template <typename T>
bool run_fast(const T*, int64_t, int64_t, int64_t, int64_t, const T*, const T*, const T*, const T*, T, int64_t,
              int64_t, T*) {
  return false;
}
#if defined(__GNUC__)
bool run_fast(const float* base, int64_t pixels, int64_t p0, int64_t p1, int64_t k, const float* bias,
              const float* hw, const float* hb, const float* lw, float lb, int64_t c, int64_t layers, float* out) {
  const RunF32 run = f32_path(c);
  if (run == nullptr) return false;
  run(base, pixels, p0, p1, k, bias, hw, hb, lw, lb, layers, out);
  return true;
}
#endif

}  // namespace

void fcomb_head_cpu(const at::Tensor& base, const at::Tensor& bias, const at::Tensor& hidden_w,
                    const at::Tensor& hidden_b, const at::Tensor& last_w, const at::Tensor& last_b, at::Tensor& out,
                    const FcombArgs& a) {
  const int64_t tasks_per_image = (a.pixels + kTaskPixels - 1) / kTaskPixels;
  AT_DISPATCH_FLOATING_TYPES(base.scalar_type(), "fcomb_head", [&] {
    using T = scalar_t;
    const T* bp = base.const_data_ptr<T>();
    const T* zp = bias.const_data_ptr<T>();
    const T* hw = hidden_w.const_data_ptr<T>();
    const T* hb = hidden_b.const_data_ptr<T>();
    const T* lw = last_w.const_data_ptr<T>();
    const T lb = last_b.const_data_ptr<T>()[0];
    T* op = out.mutable_data_ptr<T>();
    at::parallel_for(0, a.b * tasks_per_image, 1, [&](int64_t t0, int64_t t1) {
      std::vector<T> scratch;  // the generic path's tiles, allocated only if that path runs
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t bi = t / tasks_per_image;
        const int64_t p0 = (t % tasks_per_image) * kTaskPixels, p1 = std::min(a.pixels, p0 + kTaskPixels);
        const T* img = bp + bi * a.c * a.pixels;
        const T* bias_i = zp + bi * a.k * a.c;
        T* out_i = op + bi * a.k * a.pixels;
        if (run_fast(img, a.pixels, p0, p1, a.k, bias_i, hw, hb, lw, lb, a.c, a.layers, out_i)) continue;
        if (scratch.empty()) scratch.resize(static_cast<size_t>(2 * a.c * kLanes));
        run_generic(img, a.pixels, p0, p1, a.k, bias_i, hw, hb, lw, lb, a.c, a.layers, scratch.data(), out_i);
      }
    });
  });
}

}  // namespace harmonizer_fast
