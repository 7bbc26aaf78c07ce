// Torch-side pairwise overlaps and GED sums: the op schemas, argument checks and workspaces of the CPU kernels
// (cpu/ged.cpp) and CUDA launchers (cuda/ged.cu), and the registration of each. Inputs arrive flattened from
// Python as contiguous (B, K, pixels) tensors; binary masks may be any of float32/float64/float16/bfloat16,
// uint8 or bool (a pixel is foreground when > threshold), soft masks a floating type shared by a and b.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ged.h"
#include "torch_common.h"

namespace harmonizer_fast {

void overlap_binary_cpu(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, OverlapMode mode,
                        const OverlapArgs& args);
void ged_sums_cpu(const at::Tensor& samples, const at::Tensor& raters, at::Tensor& sums, const GedArgs& g);

namespace {

void check_masks(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.dim() == 3, op, ": ", name, " must be 3-D (B, K, pixels), got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16 || st == at::kByte ||
                  st == at::kBool,
              op, ": ", name, " must be float32, float64, float16, bfloat16, uint8 or bool, got ", st);
}

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* op, const char* a_name, const char* b_name) {
  check_masks(a, op, a_name);
  check_masks(b, op, b_name);
  TORCH_CHECK(a.device() == b.device(), op, ": ", a_name, " and ", b_name, " must be on one device, got ", a.device(),
              " and ", b.device());
  TORCH_CHECK(a.size(0) == b.size(0) && a.size(2) == b.size(2), op, ": ", a_name, " ", a.sizes(), " and ", b_name,
              " ", b.sizes(), " must agree in batch and pixels");
}

OverlapArgs overlap_args(const at::Tensor& a, const at::Tensor& b, double threshold, double eps, double empty_iou,
                         int64_t mode) {
  check_pair(a, b, "pairwise_overlap", "a", "b");
  TORCH_CHECK(mode == 0 || mode == 1, "pairwise_overlap: mode must be 0 (gram) or 1 (iou), got ", mode);
  return OverlapArgs{a.size(0), a.size(1), b.size(1), a.size(2), threshold, eps, empty_iou};
}

// Soft masks: the accumulation type (float32, or float64 for float64 inputs), shared by a and b.
at::ScalarType soft_acc(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.is_floating_point() && a.scalar_type() == b.scalar_type(),
              "pairwise_overlap: soft masks must share one floating dtype, got ", a.scalar_type(), " and ",
              b.scalar_type());
  return a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

GedArgs ged_args(const at::Tensor& samples, const at::Tensor& raters, double threshold, double eps, double empty_iou,
                 bool offdiag) {
  check_pair(samples, raters, "ged_sums", "samples", "raters");
  return GedArgs{samples.size(0), samples.size(1), raters.size(1), samples.size(2), threshold,
                 eps, empty_iou, offdiag};
}

// pairwise_overlap: mode 0 intersections (Gram), mode 1 IoU; (B, Ka, Kb), float32 for binary masks and the
// accumulation type for soft ones.
at::Tensor overlap_cpu(const at::Tensor& a, const at::Tensor& b, double threshold, bool soft, double eps,
                       double empty_iou, int64_t mode) {
  const OverlapArgs args = overlap_args(a, b, threshold, eps, empty_iou, mode);
  const OverlapMode m = static_cast<OverlapMode>(mode);
  if (soft) {
    // The Gram matrix is a batched matrix product, and ATen's BLAS is the fastest honest route to it.
    const auto acc = soft_acc(a, b);
    const at::Tensor af = a.to(acc), bf = b.to(acc);
    at::Tensor gram = at::bmm(af, bf.transpose(1, 2));
    if (m == OverlapMode::Gram) return gram;  // plain arithmetic, like a matmul: NaN in, NaN out
    const at::Tensor uni = af.sum(-1).unsqueeze(2) + bf.sum(-1).unsqueeze(1) - gram;
    return at::where(uni > 0, gram / (uni + eps), at::full({}, empty_iou, gram.options()));
  }
  at::Tensor out = at::empty({args.batch, args.ka, args.kb}, a.options().dtype(at::kFloat));
  if (out.numel() > 0) overlap_binary_cpu(a, b, out, m, args);
  return out;
}

// ged_sums: (B, 3) float64, the cross, within-sample and within-rater distance sums of the GED (see GedArgs).
at::Tensor ged_sums_cpu_op(const at::Tensor& samples, const at::Tensor& raters, double threshold, double eps,
                           double empty_iou, bool offdiag) {
  const GedArgs g = ged_args(samples, raters, threshold, eps, empty_iou, offdiag);
  at::Tensor sums = at::zeros({g.batch, 3}, samples.options().dtype(at::kDouble));
  if (g.batch > 0 && g.k > 0 && g.n > 0) ged_sums_cpu(samples, raters, sums, g);
  return sums;
}

#ifdef WITH_CUDA
at::Tensor overlap_cuda(const at::Tensor& a, const at::Tensor& b, double threshold, bool soft, double eps,
                        double empty_iou, int64_t mode) {
  const OverlapArgs args = overlap_args(a, b, threshold, eps, empty_iou, mode);
  const OverlapMode m = static_cast<OverlapMode>(mode);
  const c10::cuda::CUDAGuard guard(a.device());
  if (soft) {
    const auto acc = soft_acc(a, b);
    at::Tensor out = at::empty({args.batch, args.ka, args.kb}, a.options().dtype(acc));
    at::Tensor areas = at::empty({args.batch * (args.ka + args.kb)}, a.options().dtype(acc));
    if (out.numel() == 0) return out;
    check_launch(overlap_soft_cuda_launch(a.const_data_ptr(), b.const_data_ptr(), to_dtype(a.scalar_type()),
                                          out.mutable_data_ptr(), areas.mutable_data_ptr(), m, args,
                                          current_stream()),
                 "pairwise_overlap");
    return out;
  }
  at::Tensor out = at::empty({args.batch, args.ka, args.kb}, a.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  at::Tensor ws = at::empty({GedWorkspace::overlap(args).bytes}, a.options().dtype(at::kByte));
  check_launch(overlap_binary_cuda_launch(a.const_data_ptr(), to_dtype(a.scalar_type()), b.const_data_ptr(),
                                          to_dtype(b.scalar_type()), out.mutable_data_ptr<float>(), m, args,
                                          ws.mutable_data_ptr(), current_stream()),
               "pairwise_overlap");
  return out;
}

at::Tensor ged_sums_cuda(const at::Tensor& samples, const at::Tensor& raters, double threshold, double eps,
                         double empty_iou, bool offdiag) {
  const GedArgs g = ged_args(samples, raters, threshold, eps, empty_iou, offdiag);
  at::Tensor sums = at::zeros({g.batch, 3}, samples.options().dtype(at::kDouble));
  if (g.batch == 0 || g.k == 0 || g.n == 0) return sums;
  const c10::cuda::CUDAGuard guard(samples.device());
  at::Tensor ws = at::empty({GedWorkspace::sums(g).bytes}, samples.options().dtype(at::kByte));
  check_launch(ged_sums_cuda_launch(samples.const_data_ptr(), to_dtype(samples.scalar_type()), raters.const_data_ptr(),
                                    to_dtype(raters.scalar_type()), sums.mutable_data_ptr<double>(), g,
                                    ws.mutable_data_ptr(), current_stream()),
               "ged_sums");
  return sums;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(harmonizer_fast_C, m) {
  define_op(m,
            "pairwise_overlap(Tensor a, Tensor b, float threshold, bool soft, float eps, float empty_iou, int mode) "
            "-> Tensor",
            overlap_cpu, HF_CUDA_KERNEL(overlap_cuda));
  define_op(m,
            "ged_sums(Tensor samples, Tensor raters, float threshold, float eps, float empty_iou, bool offdiag) "
            "-> Tensor",
            ged_sums_cpu_op, HF_CUDA_KERNEL(ged_sums_cuda));
}

}  // namespace harmonizer_fast
