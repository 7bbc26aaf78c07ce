// Torch-side 3-D Haar DWT/IDWT: the op schemas, argument checks and stride bookkeeping shared by the CPU kernels
// (cpu/haar3d.cpp) and the CUDA launchers (cuda/haar3d.cu), and the registration of each for its device.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "haar.h"
#include "torch_common.h"

namespace harmonizer_fast {

void haar_dwt3d_cpu(const at::Tensor& x, at::Tensor& y, const Haar3dArgs& a);
void haar_idwt3d_cpu(const at::Tensor& y, at::Tensor& x, const Haar3dArgs& a);

namespace {

void check_bands(const at::Tensor& y, int64_t n, int64_t c, int64_t bd, int64_t bh, int64_t bw, const char* op) {
  TORCH_CHECK(y.sizes() == at::IntArrayRef({n, c, 8, bd, bh, bw}), op, ": y must be ",
              at::IntArrayRef({n, c, 8, bd, bh, bw}), ", got ", y.sizes());
}

Haar3dArgs band_strides(Haar3dArgs a, const at::Tensor& y) {
  a.y_sn = y.stride(0);
  a.y_sc = y.stride(1);
  a.y_sb = y.stride(2);
  a.y_sd = y.stride(3);
  a.y_sh = y.stride(4);
  a.y_sw = y.stride(5);
  return a;
}

Haar3dArgs dwt_args(const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(x.dim() == 5, "haar_dwt3d: x must be 5-D (N, C, D, H, W), got ", x.sizes());
  check_dtype(x, "haar_dwt3d");
  check_same(x, y, "haar_dwt3d", "y");
  Haar3dArgs a{};
  a.n = x.size(0), a.c = x.size(1), a.d = x.size(2), a.h = x.size(3), a.w = x.size(4);
  a.sn = x.stride(0), a.sc = x.stride(1), a.sd = x.stride(2), a.sh = x.stride(3), a.sw = x.stride(4);
  a.bd = (a.d + 1) / 2, a.bh = (a.h + 1) / 2, a.bw = (a.w + 1) / 2;
  check_bands(y, a.n, a.c, a.bd, a.bh, a.bw, "haar_dwt3d");
  TORCH_CHECK(y.stride(5) == 1, "haar_dwt3d: y needs unit stride along w");
  return band_strides(a, y);
}

Haar3dArgs idwt_args(const at::Tensor& y, int64_t depth, int64_t height, int64_t width) {
  TORCH_CHECK(y.dim() == 6 && y.size(2) == 8, "haar_idwt3d: y must be 6-D (N, C, 8, d, h, w), got ", y.sizes());
  check_dtype(y, "haar_idwt3d");
  Haar3dArgs a{};
  a.n = y.size(0), a.c = y.size(1), a.bd = y.size(3), a.bh = y.size(4), a.bw = y.size(5);
  TORCH_CHECK(depth >= 2 * a.bd - 1 && depth <= 2 * a.bd && height >= 2 * a.bh - 1 && height <= 2 * a.bh &&
                  width >= 2 * a.bw - 1 && width <= 2 * a.bw,
              "haar_idwt3d: output size (", depth, ", ", height, ", ", width, ") cannot come from sub-bands of size (",
              a.bd, ", ", a.bh, ", ", a.bw, ")");
  a.d = depth, a.h = height, a.w = width;
  a.sw = 1, a.sh = width, a.sd = height * width, a.sc = depth * a.sd, a.sn = a.c * a.sc;  // contiguous output
  return band_strides(a, y);
}

void dwt_cpu(const at::Tensor& x, at::Tensor& y) {
  const Haar3dArgs a = dwt_args(x, y);
  if (y.numel() > 0) haar_dwt3d_cpu(x, y, a);
}

at::Tensor idwt_cpu(const at::Tensor& y, int64_t depth, int64_t height, int64_t width) {
  const Haar3dArgs a = idwt_args(y, depth, height, width);
  at::Tensor x = at::empty({a.n, a.c, depth, height, width}, y.options());
  if (x.numel() > 0) haar_idwt3d_cpu(y, x, a);
  return x;
}

#ifdef WITH_CUDA
void dwt_cuda(const at::Tensor& x, at::Tensor& y) {
  const Haar3dArgs a = dwt_args(x, y);
  if (y.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(haar_dwt3d_cuda_launch(x.const_data_ptr(), y.mutable_data_ptr(), to_dtype(x.scalar_type()), a,
                                      current_stream()),
               "haar_dwt3d");
}

at::Tensor idwt_cuda(const at::Tensor& y, int64_t depth, int64_t height, int64_t width) {
  const Haar3dArgs a = idwt_args(y, depth, height, width);
  at::Tensor x = at::empty({a.n, a.c, depth, height, width}, y.options());
  if (x.numel() == 0) return x;
  const c10::cuda::CUDAGuard guard(y.device());
  check_launch(haar_idwt3d_cuda_launch(y.const_data_ptr(), x.mutable_data_ptr(), to_dtype(y.scalar_type()), a,
                                       current_stream()),
               "haar_idwt3d");
  return x;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(harmonizer_fast_C, m) {
  define_op(m, "haar_dwt3d_out(Tensor x, Tensor(a!) y) -> ()", dwt_cpu, HF_CUDA_KERNEL(dwt_cuda));
  define_op(m, "haar_idwt3d(Tensor y, int depth, int height, int width) -> Tensor", idwt_cpu,
            HF_CUDA_KERNEL(idwt_cuda));
}

}  // namespace harmonizer_fast
