// Torch-side fused sampling head: the op schema, argument checks and the CPU registration of the kernel
// (cpu/fcomb.cpp). GPUs run the Triton kernel (harmonizer_fast/kernels/fcomb.py) or the torch reference; there is no CUDA
// C++ variant of this op.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "fcomb.h"
#include "torch_common.h"

namespace harmonizer_fast {

void fcomb_head_cpu(const at::Tensor& base, const at::Tensor& bias, const at::Tensor& hidden_w,
                    const at::Tensor& hidden_b, const at::Tensor& last_w, const at::Tensor& last_b, at::Tensor& out,
                    const FcombArgs& a);

namespace {

at::Tensor fcomb_head(const at::Tensor& base, const at::Tensor& bias, const at::Tensor& hidden_w,
                      const at::Tensor& hidden_b, const at::Tensor& last_w, const at::Tensor& last_b) {
  const char* op = "fcomb_head";
  TORCH_CHECK(base.dim() == 3 && base.is_contiguous(), op, ": base must be a contiguous (B, C, pixels) tensor");
  check_dtype(base, op);
  for (const auto* t : {&bias, &hidden_w, &hidden_b, &last_w, &last_b}) {
    check_same(base, *t, op, "weights");
    TORCH_CHECK(t->is_contiguous(), op, ": every argument must be contiguous");
  }
  const int64_t b = base.size(0), c = base.size(1), pixels = base.size(2);
  TORCH_CHECK(bias.dim() == 3 && bias.size(0) == b && bias.size(2) == c, op, ": bias must be (B, K, C) = (", b,
              ", K, ", c, "), got ", bias.sizes());
  const int64_t layers = hidden_w.size(0);
  TORCH_CHECK(hidden_w.dim() == 3 && hidden_w.size(1) == c && hidden_w.size(2) == c, op,
              ": hidden_w must be (L, C, C), got ", hidden_w.sizes());
  TORCH_CHECK(hidden_b.dim() == 2 && hidden_b.size(0) == layers && hidden_b.size(1) == c, op,
              ": hidden_b must be (L, C), got ", hidden_b.sizes());
  TORCH_CHECK(last_w.numel() == c && last_b.numel() == 1, op, ": last_w must have C values and last_b one");
  const FcombArgs a{b, bias.size(1), c, pixels, layers};
  at::Tensor out = at::empty({b, a.k, pixels}, base.options());
  if (out.numel() == 0) return out;
  fcomb_head_cpu(base, bias, hidden_w, hidden_b, last_w, last_b, out, a);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(harmonizer_fast_C, m) {
  define_op(m,
            "fcomb_head(Tensor base, Tensor bias, Tensor hidden_w, Tensor hidden_b, Tensor last_w, Tensor last_b) "
            "-> Tensor",
            fcomb_head, nullptr);
}

}  // namespace harmonizer_fast
