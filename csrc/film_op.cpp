// Torch-side FiLM: the op schemas, argument checks and stride bookkeeping shared by the CPU kernels
// (cpu/film.cpp) and CUDA launchers (cuda/film.cu), and the registration of each for its device. gamma and
// beta arrive as (B, C) views; a per-channel (C,) parameter is expanded with stride 0 by the Python caller.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "film.h"
#include "torch_common.h"

namespace harmonizer_fast {

void film_forward_cpu(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta, at::Tensor& y,
                      const FilmArgs& a);
void film_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gamma, at::Tensor& dx,
                       at::Tensor& dgamma, at::Tensor& dbeta, const FilmBackwardArgs& a);

namespace {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

void check_params(const at::Tensor& x, const at::Tensor& p, const char* op, const char* name) {
  check_same(x, p, op, name);
  TORCH_CHECK(p.dim() == 2 && p.size(0) == x.size(0) && p.size(1) == x.size(1), op, ": ", name, " must be (B, C) = (",
              x.size(0), ", ", x.size(1), "), got ", p.sizes());
}

FilmArgs forward_args(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta) {
  TORCH_CHECK(x.dim() == 4, "film: x must be 4-D (B, C, H, W), got ", x.sizes());
  check_dtype(x, "film");
  check_params(x, gamma, "film", "gamma");
  check_params(x, beta, "film", "beta");
  return FilmArgs{x.size(0), x.size(1), x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                  gamma.stride(0), gamma.stride(1), beta.stride(0), beta.stride(1)};
}

// `chunks`: partial sums per (B, C) plane of the parameter gradients (the CUDA kernel splits planes over
// blocks; the CPU kernel takes one task per plane).
FilmBackwardArgs backward_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gamma, int64_t chunks) {
  TORCH_CHECK(x.dim() == 4, "film_backward: x must be 4-D (B, C, H, W), got ", x.sizes());
  check_dtype(x, "film_backward");
  check_same(x, dy, "film_backward", "dy");
  TORCH_CHECK(dy.sizes() == x.sizes(), "film_backward: dy must have x's shape ", x.sizes(), ", got ", dy.sizes());
  check_params(x, gamma, "film_backward", "gamma");
  return FilmBackwardArgs{x.size(0), x.size(1), x.size(2), x.size(3),
                          dy.stride(0), dy.stride(1), dy.stride(2), dy.stride(3),
                          x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                          gamma.stride(0), gamma.stride(1), chunks};
}

Grads empty_grads(const at::Tensor& x) {
  const auto bc = at::IntArrayRef({x.size(0), x.size(1)});
  return {at::empty(x.sizes(), x.options()), at::zeros(bc, x.options()), at::zeros(bc, x.options())};
}

at::Tensor forward_cpu(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta) {
  const FilmArgs a = forward_args(x, gamma, beta);
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (y.numel() > 0) film_forward_cpu(x, gamma, beta, y, a);
  return y;
}

Grads backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gamma) {
  const FilmBackwardArgs a = backward_args(dy, x, gamma, 1);
  if (x.numel() == 0) return empty_grads(x);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dgamma = at::empty({a.b, a.c}, x.options()), dbeta = at::empty({a.b, a.c}, x.options());
  film_backward_cpu(dy, x, gamma, dx, dgamma, dbeta, a);
  return {dx, dgamma, dbeta};
}

#ifdef WITH_CUDA
at::Tensor forward_cuda(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta) {
  const FilmArgs a = forward_args(x, gamma, beta);
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (y.numel() == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(film_forward_cuda_launch(x.const_data_ptr(), gamma.const_data_ptr(), beta.const_data_ptr(),
                                        y.mutable_data_ptr(), to_dtype(x.scalar_type()), a, current_stream()),
               "film");
  return y;
}

Grads backward_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gamma) {
  // Enough blocks to fill the device even for few planes.
  const int64_t plane = x.dim() == 4 ? x.size(2) * x.size(3) : 0;
  const FilmBackwardArgs a = backward_args(dy, x, gamma, std::min<int64_t>(64, std::max<int64_t>(1, plane / 8192)));
  if (x.numel() == 0) return empty_grads(x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty(x.sizes(), x.options());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partials = at::empty({2, a.b, a.c, a.chunks}, x.options().dtype(acc));
  check_launch(film_backward_cuda_launch(dy.const_data_ptr(), x.const_data_ptr(), gamma.const_data_ptr(),
                                         dx.mutable_data_ptr(), partials.mutable_data_ptr(), to_dtype(x.scalar_type()),
                                         a, current_stream()),
               "film_backward");
  // Fixed-order reduction of the chunks, into two separate tensors (an op's outputs must not alias).
  return {dx, partials[0].sum(-1).to(x.scalar_type()), partials[1].sum(-1).to(x.scalar_type())};
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(harmonizer_fast_C, m) {
  define_op(m, "film(Tensor x, Tensor gamma, Tensor beta) -> Tensor", forward_cpu, HF_CUDA_KERNEL(forward_cuda));
  define_op(m, "film_backward(Tensor dy, Tensor x, Tensor gamma) -> (Tensor, Tensor, Tensor)",
            backward_cpu, HF_CUDA_KERNEL(backward_cuda));
}

}  // namespace harmonizer_fast
