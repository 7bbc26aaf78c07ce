// Shared macros for code compiled both by the host compiler (CPU kernels) and by nvcc (CUDA kernels).
// Kept free of torch headers so that csrc/cuda/*.cu compiles with nvcc alone.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define HF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HF_HOST_DEVICE inline
#endif

// Full unrolling of a short fixed-trip loop: nvcc's pragma in device code, GCC's in the CPU kernels. The host
// pass of nvcc gets neither (its front end rejects GCC's pragma and its host compiler nvcc's).
#if defined(__CUDA_ARCH__)
#define HF_UNROLL _Pragma("unroll")
#elif defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define HF_UNROLL _Pragma("GCC unroll 8")
#else
#define HF_UNROLL
#endif

namespace harmonizer_fast {

// Element types understood by the raw-pointer CUDA launchers. The torch-side wrapper in ops.cpp maps
// at::ScalarType onto this so the .cu files never see torch.
// UInt8 carries binary masks (bool tensors are passed as their uint8 view).
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3, UInt8 = 4 };

}  // namespace harmonizer_fast
