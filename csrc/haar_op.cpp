// Torch-side Haar DWT/IDWT: the op schemas, argument checks and stride bookkeeping shared by the CPU kernels
// (cpu/haar.cpp) and the CUDA launchers (cuda/haar.cu), and the registration of each for its device.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "haar.h"
#include "torch_common.h"

namespace harmonizer_fast {

void haar_dwt2d_cpu(const at::Tensor& x, at::Tensor& lo, at::Tensor& hi, const HaarDwtArgs& a);
void haar_idwt2d_cpu(const at::Tensor& lo, const at::Tensor& hi, at::Tensor& x, const HaarIdwtArgs& a);

namespace {

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

void dwt_cpu(const at::Tensor& x, at::Tensor& lo, at::Tensor& hi) {
  const HaarDwtArgs a = dwt_args(x, lo, hi);
  if (lo.numel() > 0) haar_dwt2d_cpu(x, lo, hi, a);
}

at::Tensor idwt_cpu(const at::Tensor& lo, const at::Tensor& hi, int64_t height, int64_t width) {
  const HaarIdwtArgs a = idwt_args(lo, hi, height, width);
  at::Tensor x = at::empty({a.n, a.c, height, width}, lo.options());
  if (x.numel() > 0) haar_idwt2d_cpu(lo, hi, x, a);
  return x;
}

#ifdef WITH_CUDA
void dwt_cuda(const at::Tensor& x, at::Tensor& lo, at::Tensor& hi) {
  const HaarDwtArgs a = dwt_args(x, lo, hi);
  if (lo.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(haar_dwt2d_cuda_launch(x.const_data_ptr(), lo.mutable_data_ptr(), hi.mutable_data_ptr(),
                                      to_dtype(x.scalar_type()), a, current_stream()),
               "haar_dwt2d");
}

at::Tensor idwt_cuda(const at::Tensor& lo, const at::Tensor& hi, int64_t height, int64_t width) {
  const HaarIdwtArgs a = idwt_args(lo, hi, height, width);
  at::Tensor x = at::empty({a.n, a.c, height, width}, lo.options());
  if (x.numel() == 0) return x;
  const c10::cuda::CUDAGuard guard(lo.device());
  check_launch(haar_idwt2d_cuda_launch(lo.const_data_ptr(), hi.const_data_ptr(), x.mutable_data_ptr(),
                                       to_dtype(lo.scalar_type()), a, current_stream()),
               "haar_idwt2d");
  return x;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(harmonizer_fast_C, m) {
  define_op(m, "haar_dwt2d_out(Tensor x, Tensor(a!) lo, Tensor(b!) hi) -> ()", dwt_cpu, HF_CUDA_KERNEL(dwt_cuda));
  define_op(m, "haar_idwt2d(Tensor lo, Tensor hi, int height, int width) -> Tensor",
            idwt_cpu, HF_CUDA_KERNEL(idwt_cuda));
}

}  // namespace harmonizer_fast
