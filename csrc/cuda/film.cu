// CUDA kernels for FiLM (paper Eq. 3): plain CUDA C++ with raw-pointer launchers, no torch headers.
// Forward: one thread per output element, one block row per input row (coalesced). Backward: one
// block per (plane, chunk) computes dx and reduces its chunk's sums through a fixed shared-memory tree;
// the per-chunk partials are summed afterwards in a fixed order, so gradients are deterministic.
#include <cuda_runtime.h>

#include "cuda_types.cuh"
#include "film.h"

namespace harmonizer_fast {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void film_forward_kernel(const T* __restrict__ x, const T* __restrict__ gamma,
                                    const T* __restrict__ beta, T* __restrict__ y, FilmArgs a,
                                    int64_t tiles_per_row) {
  using Acc = typename AccType<T>::type;
  const int64_t row = blockIdx.x / tiles_per_row;  // over B * C * H
  const int64_t j = (blockIdx.x % tiles_per_row) * blockDim.x + threadIdx.x;
  if (j >= a.w) return;
  const int64_t bc = row / a.h, i = row % a.h;
  const int64_t n = bc / a.c, c = bc % a.c;
  const Acc g = to_acc(gamma[n * a.g_sb + c * a.g_sc]);
  const Acc be = to_acc(beta[n * a.be_sb + c * a.be_sc]);
  y[row * a.w + j] = from_acc<T>(film_element<Acc>(to_acc(x[n * a.sb + c * a.sc + i * a.sh + j * a.sw]), g, be));
}

template <typename T>
__global__ void film_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                     const T* __restrict__ gamma, T* __restrict__ dx,
                                     typename AccType<T>::type* __restrict__ partials, FilmBackwardArgs a) {
  using Acc = typename AccType<T>::type;
  __shared__ Acc s_dyx[kThreads];
  __shared__ Acc s_dy[kThreads];
  const int64_t bc = blockIdx.x / a.chunks, chunk = blockIdx.x % a.chunks;
  const int64_t n = bc / a.c, c = bc % a.c;
  const int64_t plane = a.h * a.w;
  const int64_t per_chunk = (plane + a.chunks - 1) / a.chunks;
  const int64_t begin = chunk * per_chunk, end = begin + per_chunk < plane ? begin + per_chunk : plane;
  const Acc g = to_acc(gamma[n * a.g_sb + c * a.g_sc]);
  Acc sum_dyx = 0, sum_dy = 0;
  for (int64_t k = begin + threadIdx.x; k < end; k += blockDim.x) {
    const int64_t i = k / a.w, j = k % a.w;
    const Acc d = to_acc(dy[n * a.dy_sb + c * a.dy_sc + i * a.dy_sh + j * a.dy_sw]);
    const Acc xv = to_acc(x[n * a.x_sb + c * a.x_sc + i * a.x_sh + j * a.x_sw]);
    dx[bc * plane + k] = from_acc<T>(g * d);
    sum_dyx += d * xv;
    sum_dy += d;
  }
  s_dyx[threadIdx.x] = sum_dyx;
  s_dy[threadIdx.x] = sum_dy;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {  // fixed tree: deterministic
    if (threadIdx.x < stride) {
      s_dyx[threadIdx.x] += s_dyx[threadIdx.x + stride];
      s_dy[threadIdx.x] += s_dy[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = s_dyx[0];
    partials[a.b * a.c * a.chunks + blockIdx.x] = s_dy[0];
  }
}

template <typename T>
int launch_forward(const void* x, const void* gamma, const void* beta, void* y, const FilmArgs& a,
                   cudaStream_t stream) {
  const int threads = threads_for_row(a.w);
  const int64_t tiles = (a.w + threads - 1) / threads;
  const int64_t blocks = a.b * a.c * a.h * tiles;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  film_forward_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(gamma), static_cast<const T*>(beta), static_cast<T*>(y), a,
      tiles);
  return cudaGetLastError();
}

template <typename T>
int launch_backward(const void* dy, const void* x, const void* gamma, void* dx, void* partials,
                    const FilmBackwardArgs& a, cudaStream_t stream) {
  using Acc = typename AccType<T>::type;
  const int64_t blocks = a.b * a.c * a.chunks;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  film_backward_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(gamma), static_cast<T*>(dx),
      static_cast<Acc*>(partials), a);
  return cudaGetLastError();
}

}  // namespace

int film_forward_cuda_launch(const void* x, const void* gamma, const void* beta, void* y, DType dtype,
                             const FilmArgs& a, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto tag) { return launch_forward<decltype(tag)>(x, gamma, beta, y, a, st); });
}

int film_backward_cuda_launch(const void* dy, const void* x, const void* gamma, void* dx, void* partials,
                              DType dtype, const FilmBackwardArgs& a, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype,
                        [&](auto tag) { return launch_backward<decltype(tag)>(dy, x, gamma, dx, partials, a, st); });
}

}  // namespace harmonizer_fast
