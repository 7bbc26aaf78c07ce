// CPU kernel of the fused sampling head (csrc/include/fcomb.h). One task per (image, run of pixels); each
// 16-pixel block of `base` is loaded once and reused for all K samples, and the whole MLP runs on a
// channels x 16 register tile (the pixel loop is the vector lane), so nothing of size K x C x H x W is
// ever written: the output is the only large store.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "cpu_math.h"
#include "fcomb.h"

namespace harmonizer_fast {
namespace {

constexpr int64_t kLanes = 16;

#if defined(__GNUC__)
// float32 with the common widths (8, 16, 32 channels): the activations of 16 pixels live in C vector
// registers (GCC vector extensions: one AVX-512 register, or two AVX2 halves), each weight is broadcast
// once per 16 pixels, and the sigmoid uses the vectorizable exp. Measured on this project's 2-core
// AVX-512 machine: about 10x the scalar-tile loop below.
typedef float vf16 __attribute__((vector_size(64)));
// vf16 never crosses a non-inlined call boundary, so the ABI note GCC gives for 64-byte vectors is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

__attribute__((always_inline)) inline vf16 vrelu(vf16 v) {  // NaN passes through, as in relu()
  const vf16 zero = {};
  return v < zero ? zero : v;
}

template <int C>
inline void mlp_block_f32_impl(std::integral_constant<int, C>, const float* __restrict__ base_blk, int64_t pixels, int64_t n,
                                   const float* __restrict__ bias, const float* __restrict__ hw,
                                   const float* __restrict__ hb, const float* __restrict__ lw, float lb,
                                   int64_t layers, float* __restrict__ out) {
  vf16 h[C];
  for (int c = 0; c < C; ++c) {
    vf16 v = {};
    if (n == kLanes) {
      std::memcpy(&v, base_blk + c * pixels, sizeof(v));
    } else {
      for (int64_t p = 0; p < n; ++p) v[p] = base_blk[c * pixels + p];
    }
    h[c] = vrelu(v + bias[c]);
  }
  for (int64_t l = 0; l < layers; ++l) {
    const float* w = hw + l * C * C;
    vf16 g[C];
    for (int o = 0; o < C; ++o) {
      vf16 acc = vf16{} + hb[l * C + o];
      for (int c = 0; c < C; ++c) acc += w[o * C + c] * h[c];
      g[o] = vrelu(acc);
    }
    for (int c = 0; c < C; ++c) h[c] = g[c];
  }
  vf16 acc = vf16{} + lb;
  for (int c = 0; c < C; ++c) acc += lw[c] * h[c];
  float e[kLanes];
  for (int p = 0; p < kLanes; ++p) e[p] = 1.0f / (1.0f + exp_vectorizable(-acc[p]));
  std::memcpy(out, e, static_cast<size_t>(n) * sizeof(float));
}
HF_ISA_CLONES(mlp_block_f32, mlp_block_f32_impl)
#endif

// One block of kLanes pixels (n <= kLanes valid) for one sample: h, g are c x kLanes scratch tiles.
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

// One block of pixels for one sample: the generic tile loop, or the vector path for float32.
template <typename T>
void sample_block(const T* base_blk, int64_t pixels, int64_t n, const T* bias, const T* hw, const T* hb, const T* lw,
                  T lb, int64_t c, int64_t layers, T* scratch, T* out) {
  mlp_block(base_blk, pixels, n, bias, hw, hb, lw, lb, c, layers, scratch, scratch + c * kLanes, out);
}

#if defined(__GNUC__)
void sample_block(const float* base_blk, int64_t pixels, int64_t n, const float* bias, const float* hw,
                  const float* hb, const float* lw, float lb, int64_t c, int64_t layers, float* scratch, float* out) {
  switch (c) {
    case 8: return mlp_block_f32(std::integral_constant<int, 8>(), base_blk, pixels, n, bias, hw, hb, lw, lb, layers, out);
    case 16: return mlp_block_f32(std::integral_constant<int, 16>(), base_blk, pixels, n, bias, hw, hb, lw, lb, layers, out);
    case 32: return mlp_block_f32(std::integral_constant<int, 32>(), base_blk, pixels, n, bias, hw, hb, lw, lb, layers, out);
    default: return mlp_block(base_blk, pixels, n, bias, hw, hb, lw, lb, c, layers, scratch, scratch + c * kLanes, out);
  }
}
#endif

}  // namespace

void fcomb_head_cpu(const at::Tensor& base, const at::Tensor& bias, const at::Tensor& hidden_w,
                    const at::Tensor& hidden_b, const at::Tensor& last_w, const at::Tensor& last_b, at::Tensor& out,
                    const FcombArgs& a) {
  const int64_t blocks = (a.pixels + kLanes - 1) / kLanes;
  // Tasks of a few hundred pixels: enough of them to balance two or more threads.
  const int64_t per_task = std::max<int64_t>(1, std::min<int64_t>(32, blocks / 8));
  const int64_t tasks_per_image = (blocks + per_task - 1) / per_task;
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
      std::vector<T> scratch(static_cast<size_t>(2 * a.c * kLanes));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t bi = t / tasks_per_image;
        const int64_t blk0 = (t % tasks_per_image) * per_task, blk1 = std::min(blocks, blk0 + per_task);
        for (int64_t blk = blk0; blk < blk1; ++blk) {
          const int64_t p0 = blk * kLanes, n = std::min(kLanes, a.pixels - p0);
          const T* base_blk = bp + bi * a.c * a.pixels + p0;
          for (int64_t k = 0; k < a.k; ++k) {
            sample_block(base_blk, a.pixels, n, zp + (bi * a.k + k) * a.c, hw, hb, lw, lb, a.c, a.layers,
                         scratch.data(), op + (bi * a.k + k) * a.pixels + p0);
          }
        }
      }
    });
  });
}

}  // namespace harmonizer_fast
