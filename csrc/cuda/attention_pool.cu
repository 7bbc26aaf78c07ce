// CUDA kernels for the token-attention pooling core (see csrc/include/attention_pool.h): plain CUDA C++
// with raw-pointer launchers, no torch headers. One block per (batch item, position chunk); tiles of
// kTile positions keep their M x kTile scores in shared memory, and each chunk's M x C accumulator lives
// in its own slice of the partials buffer, so there are no atomics and the caller merges the chunks in
// a fixed order. This is the fallback behind the Triton kernels, written for clarity over peak speed.
#include <cuda_runtime.h>

#include "attention_pool.h"
#include "cuda_types.cuh"

namespace harmonizer_fast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kTile = 32;

template <typename T>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ a,
                               typename AccType<T>::type* __restrict__ part_m,
                               typename AccType<T>::type* __restrict__ part_l,
                               typename AccType<T>::type* __restrict__ part_acc, AttnPoolArgs g) {
  using Acc = typename AccType<T>::type;
  extern __shared__ unsigned char smem_raw[];
  Acc* s = reinterpret_cast<Acc*>(smem_raw);  // M x kTile scores, then probabilities
  Acc* corr = s + g.m * kTile;
  Acc* m_run = corr + g.m;
  Acc* l_run = m_run + g.m;
  const int64_t task = blockIdx.x, bi = task / g.splits;
  const int64_t chunk = (g.n + g.splits - 1) / g.splits;
  const int64_t n0 = (task % g.splits) * chunk, n1 = n0 + chunk < g.n ? n0 + chunk : g.n;
  const T* xb = x + bi * g.x_sb;
  const T* ab = a + bi * g.m * g.c;
  Acc* acc = part_acc + task * g.m * g.c;
  for (int64_t k = threadIdx.x; k < g.m * g.c; k += blockDim.x) acc[k] = 0;
  for (int64_t m = threadIdx.x; m < g.m; m += blockDim.x) {
    m_run[m] = -INFINITY;
    l_run[m] = 0;
  }
  __syncthreads();
  for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
    const int64_t len = n1 - t0 < kTile ? n1 - t0 : kTile;
    for (int64_t k = threadIdx.x; k < g.m * kTile; k += blockDim.x) {
      const int64_t m = k / kTile, t = k % kTile;
      Acc v = -INFINITY;
      if (t < len) {
        v = 0;
        for (int64_t c = 0; c < g.c; ++c) v += to_acc(ab[m * g.c + c]) * to_acc(xb[c * g.x_sc + t0 + t]);
      }
      s[k] = v;
    }
    __syncthreads();
    for (int64_t m = threadIdx.x; m < g.m; m += blockDim.x) {  // online softmax, one thread per query
      Acc* sr = s + m * kTile;
      Acc mx = m_run[m];
      for (int64_t t = 0; t < len; ++t) mx = sr[t] > mx ? sr[t] : mx;
      const Acc c = softmax_rescale(m_run[m], mx);
      Acc sum = 0;
      for (int64_t t = 0; t < kTile; ++t) {
        sr[t] = t < len ? hf_exp(sr[t] - mx) : Acc(0);
        sum += sr[t];
      }
      l_run[m] = l_run[m] * c + sum;
      m_run[m] = mx;
      corr[m] = c;
    }
    __syncthreads();
    for (int64_t k = threadIdx.x; k < g.m * g.c; k += blockDim.x) {
      const int64_t m = k / g.c, c = k % g.c;
      Acc v = acc[k] * corr[m];
      for (int64_t t = 0; t < len; ++t) v += s[m * kTile + t] * to_acc(xb[c * g.x_sc + t0 + t]);
      acc[k] = v;
    }
    __syncthreads();
  }
  for (int64_t m = threadIdx.x; m < g.m; m += blockDim.x) {
    part_m[task * g.m + m] = m_run[m];
    part_l[task * g.m + m] = l_run[m];
  }
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ dz, const T* __restrict__ x, const T* __restrict__ a,
                                const typename AccType<T>::type* __restrict__ lse,
                                const typename AccType<T>::type* __restrict__ d, T* __restrict__ dx,
                                typename AccType<T>::type* __restrict__ part_da, AttnPoolArgs g) {
  using Acc = typename AccType<T>::type;
  extern __shared__ unsigned char smem_raw[];
  Acc* p = reinterpret_cast<Acc*>(smem_raw);  // M x kTile probabilities
  Acc* ds = p + g.m * kTile;                  // M x kTile score gradients
  const int64_t task = blockIdx.x, bi = task / g.splits;
  const int64_t chunk = (g.n + g.splits - 1) / g.splits;
  const int64_t n0 = (task % g.splits) * chunk, n1 = n0 + chunk < g.n ? n0 + chunk : g.n;
  const T* xb = x + bi * g.x_sb;
  const T* ab = a + bi * g.m * g.c;
  const T* dzb = dz + bi * g.m * g.c;
  Acc* da = part_da + task * g.m * g.c;
  for (int64_t k = threadIdx.x; k < g.m * g.c; k += blockDim.x) da[k] = 0;
  for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
    const int64_t len = n1 - t0 < kTile ? n1 - t0 : kTile;
    for (int64_t k = threadIdx.x; k < g.m * kTile; k += blockDim.x) {
      const int64_t m = k / kTile, t = k % kTile;
      Acc pv = 0, dsv = 0;
      if (t < len) {
        Acc sc = 0, u = 0;
        for (int64_t c = 0; c < g.c; ++c) {
          const Acc xv = to_acc(xb[c * g.x_sc + t0 + t]);
          sc += to_acc(ab[m * g.c + c]) * xv;
          u += to_acc(dzb[m * g.c + c]) * xv;
        }
        pv = hf_exp(sc - lse[bi * g.m + m]);
        dsv = pv * (u - d[bi * g.m + m]);
      }
      p[k] = pv;
      ds[k] = dsv;
    }
    __syncthreads();
    for (int64_t k = threadIdx.x; k < g.c * kTile; k += blockDim.x) {
      const int64_t c = k / kTile, t = k % kTile;
      if (t >= len) continue;
      Acc v = 0;
      for (int64_t m = 0; m < g.m; ++m) {
        v += to_acc(dzb[m * g.c + c]) * p[m * kTile + t] + to_acc(ab[m * g.c + c]) * ds[m * kTile + t];
      }
      dx[(bi * g.c + c) * g.n + t0 + t] = from_acc<T>(v);
    }
    for (int64_t k = threadIdx.x; k < g.m * g.c; k += blockDim.x) {
      const int64_t m = k / g.c, c = k % g.c;
      Acc v = da[k];
      for (int64_t t = 0; t < len; ++t) v += ds[m * kTile + t] * to_acc(xb[c * g.x_sc + t0 + t]);
      da[k] = v;
    }
    __syncthreads();
  }
}

template <typename T>
int launch_forward(const void* x, const void* a, void* part_m, void* part_l, void* part_acc, const AttnPoolArgs& g,
                   cudaStream_t stream) {
  using Acc = typename AccType<T>::type;
  const int64_t blocks = g.b * g.splits;
  const size_t smem = (g.m * kTile + 3 * g.m) * sizeof(Acc);
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL || smem > 48 * 1024) return cudaErrorInvalidConfiguration;
  forward_kernel<T><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(a), static_cast<Acc*>(part_m), static_cast<Acc*>(part_l),
      static_cast<Acc*>(part_acc), g);
  return cudaGetLastError();
}

template <typename T>
int launch_backward(const void* dz, const void* x, const void* a, const void* lse, const void* d, void* dx,
                    void* part_da, const AttnPoolArgs& g, cudaStream_t stream) {
  using Acc = typename AccType<T>::type;
  const int64_t blocks = g.b * g.splits;
  const size_t smem = 2 * g.m * kTile * sizeof(Acc);
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL || smem > 48 * 1024) return cudaErrorInvalidConfiguration;
  backward_kernel<T><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
      static_cast<const T*>(dz), static_cast<const T*>(x), static_cast<const T*>(a), static_cast<const Acc*>(lse),
      static_cast<const Acc*>(d), static_cast<T*>(dx), static_cast<Acc*>(part_da), g);
  return cudaGetLastError();
}

}  // namespace

int attention_pool_forward_cuda_launch(const void* x, const void* a, void* part_m, void* part_l, void* part_acc,
                                       DType dtype, const AttnPoolArgs& g, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype,
                        [&](auto tag) { return launch_forward<decltype(tag)>(x, a, part_m, part_l, part_acc, g, st); });
}

int attention_pool_backward_cuda_launch(const void* dz, const void* x, const void* a, const void* lse,
                                        const void* d, void* dx, void* part_da, DType dtype, const AttnPoolArgs& g,
                                        void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(
      dtype, [&](auto tag) { return launch_backward<decltype(tag)>(dz, x, a, lse, d, dx, part_da, g, st); });
}

}  // namespace harmonizer_fast
