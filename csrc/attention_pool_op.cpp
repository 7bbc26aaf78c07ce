// Torch-side token-attention pooling core: the op schemas, argument checks and workspaces of the CPU kernels
// (cpu/attention_pool.cpp) and CUDA launchers (cuda/attention_pool.cu), and the registration of each.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "attention_pool.h"
#include "torch_common.h"

namespace harmonizer_fast {

void attention_pool_forward_cpu(const at::Tensor& x, const at::Tensor& a, at::Tensor& z, at::Tensor& lse,
                                const AttnPoolArgs& g);
void attention_pool_backward_cpu(const at::Tensor& dz, const at::Tensor& x, const at::Tensor& a, const at::Tensor& z,
                                 const at::Tensor& lse, at::Tensor& dx, at::Tensor& da, const AttnPoolArgs& g);

namespace {

constexpr const char* kOp = "attention_pool";

AttnPoolArgs make_args(const at::Tensor& x, const at::Tensor& a) {
  TORCH_CHECK(x.dim() == 4, kOp, ": x must be 4-D (B, C, H, W), got ", x.sizes());
  check_dtype(x, kOp);
  check_same(x, a, kOp, "a");
  const int64_t b = x.size(0), c = x.size(1), n = x.size(2) * x.size(3);
  TORCH_CHECK(x.stride(3) == 1 && x.stride(2) == x.size(3), kOp, ": each (H, W) plane of x must be contiguous");
  TORCH_CHECK(a.dim() == 3 && a.size(0) == b && a.size(2) == c && a.is_contiguous(), kOp,
              ": a must be a contiguous (B, M, C) tensor with B = ", b, " and C = ", c, ", got ", a.sizes());
  TORCH_CHECK(n > 0 && a.size(1) > 0, kOp, ": x must have positions and a at least one query");
  return AttnPoolArgs{b, c, n, a.size(1), x.stride(0), x.stride(1), std::min(attention_pool_splits(n), n)};
}

at::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_matching(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device() && t.sizes() == ref.sizes() && t.is_contiguous(), kOp, "_backward: ", name,
              " must be a contiguous ", ref.sizes(), " tensor on ", ref.device(), ", got ", t.sizes());
}

using Pair = std::tuple<at::Tensor, at::Tensor>;

void check_backward(const AttnPoolArgs& g, const at::Tensor& dz, const at::Tensor& x, const at::Tensor& a,
                    const at::Tensor& z, const at::Tensor& lse) {
  check_matching(a, dz, "dz");
  check_matching(a, z, "z");
  TORCH_CHECK(dz.scalar_type() == x.scalar_type() && z.scalar_type() == x.scalar_type(), kOp,
              "_backward: dz and z must have x's dtype");
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({g.b, g.m}) && lse.scalar_type() == acc_type(x) && lse.is_contiguous(),
              kOp, "_backward: lse must be a contiguous (B, M) tensor of the accumulation dtype");
}

Pair forward_cpu(const at::Tensor& x, const at::Tensor& a) {
  const AttnPoolArgs g = make_args(x, a);
  at::Tensor z = at::empty({g.b, g.m, g.c}, x.options()), lse = at::empty({g.b, g.m}, x.options());
  attention_pool_forward_cpu(x, a, z, lse, g);
  return {z, lse};
}

Pair backward_cpu(const at::Tensor& dz, const at::Tensor& x, const at::Tensor& a, const at::Tensor& z,
                  const at::Tensor& lse) {
  const AttnPoolArgs g = make_args(x, a);
  check_backward(g, dz, x, a, z, lse);
  at::Tensor dx = at::empty(x.sizes(), x.options()), da = at::empty(a.sizes(), a.options());
  attention_pool_backward_cpu(dz, x, a, z, lse, dx, da, g);
  return {dx, da};
}

#ifdef WITH_CUDA
Pair forward_cuda(const at::Tensor& x, const at::Tensor& a) {
  const AttnPoolArgs g = make_args(x, a);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto opts = x.options().dtype(acc_type(x));
  at::Tensor part_m = at::empty({g.b, g.splits, g.m}, opts), part_l = at::empty({g.b, g.splits, g.m}, opts);
  at::Tensor part_acc = at::empty({g.b, g.splits, g.m, g.c}, opts);
  check_launch(attention_pool_forward_cuda_launch(x.const_data_ptr(), a.const_data_ptr(), part_m.mutable_data_ptr(),
                                                  part_l.mutable_data_ptr(), part_acc.mutable_data_ptr(),
                                                  to_dtype(x.scalar_type()), g, current_stream()),
               kOp);
  // Merge the chunks' softmax states (fixed-order reductions over dim 1).
  at::Tensor m_tot = part_m.amax(1);
  at::Tensor w = at::exp(part_m - m_tot.unsqueeze(1));
  at::Tensor l_tot = (part_l * w).sum(1);
  at::Tensor z = (part_acc * w.unsqueeze(-1)).sum(1) / l_tot.unsqueeze(-1);
  return {z.to(x.scalar_type()), m_tot + at::log(l_tot)};
}

Pair backward_cuda(const at::Tensor& dz, const at::Tensor& x, const at::Tensor& a, const at::Tensor& z,
                   const at::Tensor& lse) {
  const AttnPoolArgs g = make_args(x, a);
  check_backward(g, dz, x, a, z, lse);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_type(x);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor d = (dz.to(acc) * z.to(acc)).sum(-1).contiguous();
  at::Tensor part_da = at::empty({g.b, g.splits, g.m, g.c}, x.options().dtype(acc));
  check_launch(attention_pool_backward_cuda_launch(dz.const_data_ptr(), x.const_data_ptr(), a.const_data_ptr(),
                                                   lse.const_data_ptr(), d.const_data_ptr(), dx.mutable_data_ptr(),
                                                   part_da.mutable_data_ptr(), to_dtype(x.scalar_type()), g,
                                                   current_stream()),
               "attention_pool_backward");
  return {dx, part_da.sum(1).to(x.scalar_type())};
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(harmonizer_fast_C, m) {
  define_op(m, "attention_pool(Tensor x, Tensor a) -> (Tensor, Tensor)", forward_cpu, HF_CUDA_KERNEL(forward_cuda));
  define_op(m, "attention_pool_backward(Tensor dz, Tensor x, Tensor a, Tensor z, Tensor lse) -> (Tensor, Tensor)",
            backward_cpu, HF_CUDA_KERNEL(backward_cuda));
}

}  // namespace harmonizer_fast
