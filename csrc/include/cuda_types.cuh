// Conversions between storage types and the fp32/fp64 compute type, for CUDA kernels only.
// Half and bfloat16 are computed in float32 (docs/architecture.md, "Backends"); float64 stays float64.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "hf_common.h"

namespace harmonizer_fast {

template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename AccType<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Calls f(T{}) with the storage type T for `dtype` and returns its cudaError_t, so each launcher is
// written once as a generic lambda.
template <typename F>
int dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float64: return f(double{});
    case DType::Float16: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
    case DType::UInt8: break;  // masks only: the GED launchers dispatch those themselves
  }
  return cudaErrorInvalidValue;
}

// Threads per block for a row of `width` elements: the next power of two from 32 up to `max_threads`.
inline int threads_for_row(int64_t width, int max_threads = 256) {
  int t = 32;
  while (t < max_threads && t < width) t *= 2;
  return t;
}

}  // namespace harmonizer_fast
