// Op schemas and per-device registration for the extension harmonizer_fast._C (torchvision's layout:
// one registration file beside cpu/ and cuda/). Argument checks and stride bookkeeping live here once,
// for both devices; the kernels in cpu/ and cuda/ take plain pointers and the argument structs.
//
// These ops (namespace `harmonizer_fast_C`) are the raw kernels of the "cpu" and "cuda" backends. The
// public, autograd-aware ops (`torch.ops.harmonizer_fast.*`) are defined in Python
// (harmonizer_fast/ops/), which picks a backend per call and must exist even when this extension is
// not built (HARMONIZER_FAST_NO_EXT=1).
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "haar.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace harmonizer_fast {

void haar_dwt2d_cpu(const at::Tensor& x, at::Tensor& lo, at::Tensor& hi, const HaarDwtArgs& a);
void haar_idwt2d_cpu(const at::Tensor& lo, const at::Tensor& hi, at::Tensor& x, const HaarIdwtArgs& a);

namespace {

void check_same(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.device() == ref.device() && t.scalar_type() == ref.scalar_type(), op, ": ", arg,
              " must match the input's device and dtype (", ref.device(), ", ", ref.scalar_type(), "), got ",
              t.device(), ", ", t.scalar_type());
}

void check_dtype(const at::Tensor& t, const char* op) {
  const auto st = t.scalar_type();
  if (t.is_cuda()) {
    TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
                ": CUDA kernel supports float32, float64, float16 and bfloat16, got ", st);
  } else {
    TORCH_CHECK(st == at::kFloat || st == at::kDouble, op, ": CPU kernel supports float32 and float64, got ", st);
  }
}

HaarDwtArgs dwt_args(const at::Tensor& x, const at::Tensor& lo, const at::Tensor& hi) {
  TORCH_CHECK(x.dim() == 4, "haar_dwt2d: x must be 4-D (N, C, H, W), got ", x.sizes());
  check_dtype(x, "haar_dwt2d");
  check_same(x, lo, "haar_dwt2d", "lo");
  check_same(x, hi, "haar_dwt2d", "hi");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t ho = (h + 1) / 2, wo = (w + 1) / 2;
  TORCH_CHECK(lo.sizes() == at::IntArrayRef({n, c, ho, wo}), "haar_dwt2d: lo must be ", at::IntArrayRef({n, c, ho, wo}),
              ", got ", lo.sizes());
  TORCH_CHECK(hi.sizes() == at::IntArrayRef({n, c, 3, ho, wo}), "haar_dwt2d: hi must be ",
              at::IntArrayRef({n, c, 3, ho, wo}), ", got ", hi.sizes());
  TORCH_CHECK(lo.stride(3) == 1 && hi.stride(4) == 1, "haar_dwt2d: outputs need unit stride along W");
  return HaarDwtArgs{n, c, h, w, x.stride(0), x.stride(1), x.stride(2), x.stride(3), ho, wo,
                     lo.stride(0), lo.stride(1), lo.stride(2),
                     hi.stride(0), hi.stride(1), hi.stride(2), hi.stride(3)};
}

HaarIdwtArgs idwt_args(const at::Tensor& lo, const at::Tensor& hi, int64_t height, int64_t width) {
  TORCH_CHECK(lo.dim() == 4, "haar_idwt2d: lo must be 4-D (N, C, h, w), got ", lo.sizes());
  check_dtype(lo, "haar_idwt2d");
  check_same(lo, hi, "haar_idwt2d", "hi");
  const int64_t n = lo.size(0), c = lo.size(1), hi_ = lo.size(2), wi = lo.size(3);
  TORCH_CHECK(hi.sizes() == at::IntArrayRef({n, c, 3, hi_, wi}), "haar_idwt2d: hi must be ",
              at::IntArrayRef({n, c, 3, hi_, wi}), ", got ", hi.sizes());
  TORCH_CHECK(height >= 2 * hi_ - 1 && height <= 2 * hi_ && width >= 2 * wi - 1 && width <= 2 * wi,
              "haar_idwt2d: output size (", height, ", ", width, ") cannot come from sub-bands of size (", hi_,
              ", ", wi, ")");
  return HaarIdwtArgs{n, c, hi_, wi,
                      lo.stride(0), lo.stride(1), lo.stride(2), lo.stride(3),
                      hi.stride(0), hi.stride(1), hi.stride(2), hi.stride(3), hi.stride(4), height, width};
}

#ifdef WITH_CUDA
DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: return DType::Float32;  // check_dtype() admitted only these four
  }
}

void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, op, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}
#endif

}  // namespace

void haar_dwt2d_out(const at::Tensor& x, at::Tensor& lo, at::Tensor& hi) {
  const HaarDwtArgs a = dwt_args(x, lo, hi);
  if (lo.numel() == 0) return;
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    check_launch(haar_dwt2d_cuda_launch(x.const_data_ptr(), lo.mutable_data_ptr(), hi.mutable_data_ptr(),
                                        to_dtype(x.scalar_type()), a, c10::cuda::getCurrentCUDAStream().stream()),
                 "haar_dwt2d");
#else
    TORCH_CHECK(false, "haar_dwt2d: harmonizer_fast._C was built without CUDA");
#endif
  } else {
    haar_dwt2d_cpu(x, lo, hi, a);
  }
}

at::Tensor haar_idwt2d(const at::Tensor& lo, const at::Tensor& hi, int64_t height, int64_t width) {
  const HaarIdwtArgs a = idwt_args(lo, hi, height, width);
  at::Tensor x = at::empty({a.n, a.c, height, width}, lo.options());
  if (x.numel() == 0) return x;
  if (lo.is_cuda()) {
#ifdef WITH_CUDA
    const c10::cuda::CUDAGuard guard(lo.device());
    check_launch(haar_idwt2d_cuda_launch(lo.const_data_ptr(), hi.const_data_ptr(), x.mutable_data_ptr(),
                                         to_dtype(lo.scalar_type()), a, c10::cuda::getCurrentCUDAStream().stream()),
                 "haar_idwt2d");
#else
    TORCH_CHECK(false, "haar_idwt2d: harmonizer_fast._C was built without CUDA");
#endif
  } else {
    haar_idwt2d_cpu(lo, hi, x, a);
  }
  return x;
}

}  // namespace harmonizer_fast

TORCH_LIBRARY(harmonizer_fast_C, m) {
  m.def("haar_dwt2d_out(Tensor x, Tensor(a!) lo, Tensor(b!) hi) -> ()");
  m.def("haar_idwt2d(Tensor lo, Tensor hi, int height, int width) -> Tensor");
}

TORCH_LIBRARY_IMPL(harmonizer_fast_C, CPU, m) {
  m.impl("haar_dwt2d_out", &harmonizer_fast::haar_dwt2d_out);
  m.impl("haar_idwt2d", &harmonizer_fast::haar_idwt2d);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(harmonizer_fast_C, CUDA, m) {
  m.impl("haar_dwt2d_out", &harmonizer_fast::haar_dwt2d_out);
  m.impl("haar_idwt2d", &harmonizer_fast::haar_idwt2d);
}
#endif

// A plain Python module: importing it runs the static registrations above. `with_cuda` tells the
// backend report whether the CUDA kernels were compiled in.
static struct PyModuleDef hf_module = {PyModuleDef_HEAD_INIT, "_C", "harmonizer_fast C++/CUDA kernels", -1,
                                       nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&hf_module);
  if (m == nullptr) return nullptr;
#ifdef WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  return m;
}
