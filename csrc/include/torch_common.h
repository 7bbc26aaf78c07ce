// Torch-side helpers shared by the per-op files csrc/<op>_op.cpp (not by the torch-free .cu files).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <string>

#include "hf_common.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace harmonizer_fast {

inline void check_same(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.device() == ref.device() && t.scalar_type() == ref.scalar_type(), op, ": ", arg,
              " must match the input's device and dtype (", ref.device(), ", ", ref.scalar_type(), "), got ",
              t.device(), ", ", t.scalar_type());
}

// CPU kernels take float32/float64; CUDA kernels also float16/bfloat16 (computed in float32).
inline void check_dtype(const at::Tensor& t, const char* op) {
  const auto st = t.scalar_type();
  if (t.is_cuda()) {
    TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
                ": CUDA kernel supports float32, float64, float16 and bfloat16, got ", st);
  } else {
    TORCH_CHECK(st == at::kFloat || st == at::kDouble, op, ": CPU kernel supports float32 and float64, got ", st);
  }
}

#ifdef WITH_CUDA
inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    case at::kByte: return DType::UInt8;
    case at::kBool: return DType::UInt8;
    default: return DType::Float32;  // callers admitted only the types above
  }
}

inline void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, op, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

inline void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#endif


// define_op(m, schema, cpu, cuda): the schema of one op of harmonizer_fast_C with its CPU kernel and, in a
// CUDA build, its CUDA kernel, so that each op file registers an op in one statement. HF_CUDA_KERNEL(f) is
// &f in a CUDA build and nullptr otherwise, so the op files need no #ifdef of their own around it.
#ifdef WITH_CUDA
#define HF_CUDA_KERNEL(f) (&(f))
#else
#define HF_CUDA_KERNEL(f) nullptr
#endif

template <typename T>
struct NonDeduced {
  using type = T;
};

template <typename R, typename... Args>
void define_op(torch::Library& m, const char* schema, R (*cpu)(Args...),
               typename NonDeduced<R (*)(Args...)>::type cuda) {
  const std::string name(schema, std::strchr(schema, '(') - schema);
  m.def(schema);
  m.impl(name.c_str(), torch::dispatch(c10::DispatchKey::CPU, cpu));
  if (cuda != nullptr) m.impl(name.c_str(), torch::dispatch(c10::DispatchKey::CUDA, cuda));
}

}  // namespace harmonizer_fast
