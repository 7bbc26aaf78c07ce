// CUDA kernels for the Haar DWT/IDWT: plain CUDA C++ with raw-pointer launchers (no torch headers, so
// nvcc can compile-check this file on a machine whose torch has no CUDA). The element math is shared
// with the CPU kernels through csrc/include/haar.h.
//
// Layout: one block row of threads per output row; a thread owns one 2x2 input block, i.e. one
// coefficient in each of the four sub-bands. Consecutive threads touch consecutive pairs of input
// elements and consecutive output elements, so reads and writes coalesce.
#include <cuda_runtime.h>

#include "cuda_types.cuh"
#include "haar.h"

namespace harmonizer_fast {
namespace {

template <typename T>
__global__ void haar_dwt2d_kernel(const T* __restrict__ x, T* __restrict__ lo, T* __restrict__ hi,
                                  HaarDwtArgs a, int64_t tiles_per_row) {
  using Acc = typename AccType<T>::type;
  const int64_t row = blockIdx.x / tiles_per_row;  // over N * C * ho
  const int64_t j = (blockIdx.x % tiles_per_row) * blockDim.x + threadIdx.x;
  if (j >= a.wo) return;
  const int64_t nc = row / a.ho, i = row % a.ho;
  const int64_t n = nc / a.c, c = nc % a.c;
  const T* x0 = x + n * a.sn + c * a.sc + 2 * i * a.sh + 2 * j * a.sw;
  const bool has_row1 = 2 * i + 1 < a.h, has_col1 = 2 * j + 1 < a.w;
  const Acc xa = to_acc(x0[0]);
  const Acc xb = has_col1 ? to_acc(x0[a.sw]) : Acc(0);
  const Acc xc = has_row1 ? to_acc(x0[a.sh]) : Acc(0);
  const Acc xd = (has_row1 && has_col1) ? to_acc(x0[a.sh + a.sw]) : Acc(0);
  Acc ca, ch, cv, cd;
  haar_forward_block<Acc>(xa, xb, xc, xd, ca, ch, cv, cd);
  lo[n * a.lo_sn + c * a.lo_sc + i * a.lo_sh + j] = from_acc<T>(ca);
  T* h = hi + n * a.hi_sn + c * a.hi_sc + i * a.hi_sh + j;
  h[0] = from_acc<T>(ch);
  h[a.hi_sb] = from_acc<T>(cv);
  h[2 * a.hi_sb] = from_acc<T>(cd);
}

template <typename T>
__global__ void haar_idwt2d_kernel(const T* __restrict__ lo, const T* __restrict__ hi, T* __restrict__ x,
                                   HaarIdwtArgs a, int64_t tiles_per_row) {
  using Acc = typename AccType<T>::type;
  const int64_t row = blockIdx.x / tiles_per_row;  // over N * C * hi
  const int64_t j = (blockIdx.x % tiles_per_row) * blockDim.x + threadIdx.x;
  if (j >= a.wi) return;
  const int64_t nc = row / a.hi, i = row % a.hi;
  const int64_t n = nc / a.c, c = nc % a.c;
  const T* h = hi + n * a.hi_sn + c * a.hi_sc + i * a.hi_sh + j * a.hi_sw;
  Acc xa, xb, xc, xd;
  haar_inverse_block<Acc>(to_acc(lo[n * a.lo_sn + c * a.lo_sc + i * a.lo_sh + j * a.lo_sw]), to_acc(h[0]),
                          to_acc(h[a.hi_sb]), to_acc(h[2 * a.hi_sb]), xa, xb, xc, xd);
  const bool has_row1 = 2 * i + 1 < a.h, has_col1 = 2 * j + 1 < a.w;
  T* o0 = x + (nc * a.h + 2 * i) * a.w + 2 * j;
  o0[0] = from_acc<T>(xa);
  if (has_col1) o0[1] = from_acc<T>(xb);
  if (has_row1) {
    o0[a.w] = from_acc<T>(xc);
    if (has_col1) o0[a.w + 1] = from_acc<T>(xd);
  }
}

template <typename T>
int launch_dwt(const void* x, void* lo, void* hi, const HaarDwtArgs& a, cudaStream_t stream) {
  const int threads = threads_for_row(a.wo);
  const int64_t tiles = (a.wo + threads - 1) / threads;
  const int64_t blocks = a.n * a.c * a.ho * tiles;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  haar_dwt2d_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<T*>(lo), static_cast<T*>(hi), a, tiles);
  return cudaGetLastError();
}

template <typename T>
int launch_idwt(const void* lo, const void* hi, void* x, const HaarIdwtArgs& a, cudaStream_t stream) {
  const int threads = threads_for_row(a.wi);
  const int64_t tiles = (a.wi + threads - 1) / threads;
  const int64_t blocks = a.n * a.c * a.hi * tiles;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  haar_idwt2d_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      static_cast<const T*>(lo), static_cast<const T*>(hi), static_cast<T*>(x), a, tiles);
  return cudaGetLastError();
}

}  // namespace

int haar_dwt2d_cuda_launch(const void* x, void* lo, void* hi, DType dtype, const HaarDwtArgs& a,
                           void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto tag) { return launch_dwt<decltype(tag)>(x, lo, hi, a, st); });
}

int haar_idwt2d_cuda_launch(const void* lo, const void* hi, void* x, DType dtype, const HaarIdwtArgs& a,
                            void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto tag) { return launch_idwt<decltype(tag)>(lo, hi, x, a, st); });
}

}  // namespace harmonizer_fast
