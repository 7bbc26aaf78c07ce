// Torch-side FiLM: argument checks, stride bookkeeping and device dispatch for the CPU kernels
// (cpu/film.cpp) and CUDA launchers (cuda/film.cu). Registered in ops.cpp. gamma and beta arrive as
// (B, C) views; a per-channel (C,) parameter is expanded with stride 0 by the Python caller.
#include <ATen/ATen.h>

#include <tuple>

#include "film.h"
#include "torch_common.h"

namespace harmonizer_fast {

void film_forward_cpu(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta, at::Tensor& y,
                      const FilmArgs& a);
void film_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gamma, at::Tensor& dx,
                       at::Tensor& dgamma, at::Tensor& dbeta, const FilmBackwardArgs& a);

namespace {

void check_params(const at::Tensor& x, const at::Tensor& p, const char* op, const char* name) {
  check_same(x, p, op, name);
  TORCH_CHECK(p.dim() == 2 && p.size(0) == x.size(0) && p.size(1) == x.size(1), op, ": ", name, " must be (B, C) = (",
              x.size(0), ", ", x.size(1), "), got ", p.sizes());
}

}  // namespace

at::Tensor film_forward(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta) {
  TORCH_CHECK(x.dim() == 4, "film: x must be 4-D (B, C, H, W), got ", x.sizes());
  check_dtype(x, "film");
  check_params(x, gamma, "film", "gamma");
  check_params(x, beta, "film", "beta");
  const FilmArgs a{x.size(0), x.size(1), x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                   gamma.stride(0), gamma.stride(1), beta.stride(0), beta.stride(1)};
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (y.numel() == 0) return y;
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    check_launch(film_forward_cuda_launch(x.const_data_ptr(), gamma.const_data_ptr(), beta.const_data_ptr(),
                                          y.mutable_data_ptr(), to_dtype(x.scalar_type()), a, current_stream()),
                 "film");
#else
    TORCH_CHECK(false, "film: harmonizer_fast._C was built without CUDA");
#endif
  } else {
    film_forward_cpu(x, gamma, beta, y, a);
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> film_backward(const at::Tensor& dy, const at::Tensor& x,
                                                             const at::Tensor& gamma) {
  TORCH_CHECK(x.dim() == 4, "film_backward: x must be 4-D (B, C, H, W), got ", x.sizes());
  check_dtype(x, "film_backward");
  check_same(x, dy, "film_backward", "dy");
  TORCH_CHECK(dy.sizes() == x.sizes(), "film_backward: dy must have x's shape ", x.sizes(), ", got ", dy.sizes());
  check_params(x, gamma, "film_backward", "gamma");
  const int64_t b = x.size(0), c = x.size(1), plane = x.size(2) * x.size(3);
  // GPU: enough blocks to fill the device even for few planes; CPU: one task per plane.
  const int64_t chunks = x.is_cuda() ? std::min<int64_t>(64, std::max<int64_t>(1, plane / 8192)) : 1;
  const FilmBackwardArgs a{b, c, x.size(2), x.size(3),
                           dy.stride(0), dy.stride(1), dy.stride(2), dy.stride(3),
                           x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                           gamma.stride(0), gamma.stride(1), chunks};
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) {
    return {dx, at::zeros({b, c}, x.options()), at::zeros({b, c}, x.options())};
  }
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor partials = at::empty({2, b, c, chunks}, x.options().dtype(acc));
    check_launch(film_backward_cuda_launch(dy.const_data_ptr(), x.const_data_ptr(), gamma.const_data_ptr(),
                                           dx.mutable_data_ptr(), partials.mutable_data_ptr(),
                                           to_dtype(x.scalar_type()), a, current_stream()),
                 "film_backward");
    // Fixed-order reduction of the chunks, into two separate tensors (an op's outputs must not alias).
    return {dx, partials[0].sum(-1).to(x.scalar_type()), partials[1].sum(-1).to(x.scalar_type())};
#else
    TORCH_CHECK(false, "film_backward: harmonizer_fast._C was built without CUDA");
#endif
  }
  at::Tensor dgamma = at::empty({b, c}, x.options()), dbeta = at::empty({b, c}, x.options());
  film_backward_cpu(dy, x, gamma, dx, dgamma, dbeta, a);
  return {dx, dgamma, dbeta};
}

}  // namespace harmonizer_fast
