// CUDA kernels for the 3-D Haar DWT/IDWT: plain CUDA C++ with raw-pointer launchers (no torch headers, so nvcc
// can compile-check this file on a machine whose torch has no CUDA). The element math is shared with the CPU
// kernels through csrc/include/haar.h (haar3d_butterfly).
//
// Layout: blocks walk rows of sub-band coefficients (one (n, c, i, j) row, tiled along w); a thread owns one
// 2x2x2 input block, i.e. one coefficient in each of the eight sub-bands. Consecutive threads touch
// consecutive pairs of input elements and consecutive coefficients, so reads and writes coalesce.
#include <cuda_runtime.h>

#include "cuda_types.cuh"
#include "haar.h"

namespace harmonizer_fast {
namespace {

template <typename T>
__global__ void haar_dwt3d_kernel(const T* __restrict__ x, T* __restrict__ y, Haar3dArgs a, int64_t tiles_per_row) {
  using Acc = typename AccType<T>::type;
  const int64_t row = blockIdx.x / tiles_per_row;  // over N * C * bd * bh
  const int64_t k = (blockIdx.x % tiles_per_row) * blockDim.x + threadIdx.x;
  if (k >= a.bw) return;
  const int64_t j = row % a.bh, i = (row / a.bh) % a.bd, nc = row / (a.bh * a.bd);
  const int64_t n = nc / a.c, c = nc % a.c;
  const T* base = x + n * a.sn + c * a.sc + 2 * i * a.sd + 2 * j * a.sh + 2 * k * a.sw;
  Acc in[8];
  HF_UNROLL
  for (int q = 0; q < 8; ++q) {
    const int dz = q >> 2, dy = (q >> 1) & 1, dx = q & 1;
    const bool inside = 2 * i + dz < a.d && 2 * j + dy < a.h && 2 * k + dx < a.w;
    in[q] = inside ? to_acc(base[dz * a.sd + dy * a.sh + dx * a.sw]) : Acc(0);
  }
  Acc out[8];
  haar3d_butterfly<Acc>(in, out);
  T* o = y + n * a.y_sn + c * a.y_sc + i * a.y_sd + j * a.y_sh + k;
  HF_UNROLL
  for (int b = 0; b < 8; ++b) o[b * a.y_sb] = from_acc<T>(out[b]);
}

template <typename T>
__global__ void haar_idwt3d_kernel(const T* __restrict__ y, T* __restrict__ x, Haar3dArgs a, int64_t tiles_per_row) {
  using Acc = typename AccType<T>::type;
  const int64_t row = blockIdx.x / tiles_per_row;
  const int64_t k = (blockIdx.x % tiles_per_row) * blockDim.x + threadIdx.x;
  if (k >= a.bw) return;
  const int64_t j = row % a.bh, i = (row / a.bh) % a.bd, nc = row / (a.bh * a.bd);
  const int64_t n = nc / a.c, c = nc % a.c;
  const T* b0 = y + n * a.y_sn + c * a.y_sc + i * a.y_sd + j * a.y_sh + k * a.y_sw;
  Acc in[8];
  HF_UNROLL
  for (int b = 0; b < 8; ++b) in[b] = to_acc(b0[b * a.y_sb]);
  Acc out[8];
  haar3d_butterfly<Acc>(in, out);
  T* o = x + ((nc * a.d + 2 * i) * a.h + 2 * j) * a.w + 2 * k;
  HF_UNROLL
  for (int q = 0; q < 8; ++q) {
    const int dz = q >> 2, dy = (q >> 1) & 1, dx = q & 1;
    if (2 * i + dz < a.d && 2 * j + dy < a.h && 2 * k + dx < a.w) o[(dz * a.h + dy) * a.w + dx] = from_acc<T>(out[q]);
  }
}

template <typename T, typename Kernel>
int launch(Kernel kernel, const void* in, void* out, const Haar3dArgs& a, cudaStream_t stream) {
  const int threads = threads_for_row(a.bw);
  const int64_t tiles = (a.bw + threads - 1) / threads;
  const int64_t blocks = a.n * a.c * a.bd * a.bh * tiles;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(static_cast<const T*>(in), static_cast<T*>(out), a,
                                                                tiles);
  return cudaGetLastError();
}

}  // namespace

int haar_dwt3d_cuda_launch(const void* x, void* y, DType dtype, const Haar3dArgs& a, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch<T>(haar_dwt3d_kernel<T>, x, y, a, st);
  });
}

int haar_idwt3d_cuda_launch(const void* y, void* x, DType dtype, const Haar3dArgs& a, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch<T>(haar_idwt3d_kernel<T>, y, x, a, st);
  });
}

}  // namespace harmonizer_fast
