// FiLM (paper Eq. 3, the Noise Harmonizer's modulation): y = gamma * x + beta per (batch, channel).
// Element math and argument structs shared by csrc/cpu/film.cpp and csrc/cuda/film.cu.
//
// Backward, in one pass over (dy, x):  dx = gamma * dy,  dgamma = sum_hw dy * x,  dbeta = sum_hw dy.
// The sums are reduced per (batch, channel) plane in a fixed order (no atomics), so gradients are
// bit-identical run after run.
#pragma once

#include <cstdint>

#include "hf_common.h"

namespace harmonizer_fast {

template <typename T>
HF_HOST_DEVICE T film_element(T x, T gamma, T beta) {
  return gamma * x + beta;
}

struct FilmArgs {
  int64_t b, c, h, w;
  int64_t sb, sc, sh, sw;   // x strides (any view)
  int64_t g_sb, g_sc;       // gamma strides; g_sb == 0 when one gamma serves the whole batch
  int64_t be_sb, be_sc;     // beta strides
};

struct FilmBackwardArgs {
  int64_t b, c, h, w;
  int64_t dy_sb, dy_sc, dy_sh, dy_sw;
  int64_t x_sb, x_sc, x_sh, x_sw;
  int64_t g_sb, g_sc;
  int64_t chunks;           // CUDA: partial sums per plane, summed afterwards in a fixed order
};

// Raw-pointer CUDA launchers (csrc/cuda/film.cu); `stream` is a cudaStream_t, the result a cudaError_t.
// `partials` holds 2 * b * c * chunks accumulators (float, or double for Float64): dgamma then dbeta.
int film_forward_cuda_launch(const void* x, const void* gamma, const void* beta, void* y, DType dtype,
                             const FilmArgs& a, void* stream);
int film_backward_cuda_launch(const void* dy, const void* x, const void* gamma, void* dx, void* partials,
                              DType dtype, const FilmBackwardArgs& a, void* stream);

}  // namespace harmonizer_fast
