// Op schemas and per-device registration for the extension harmonizer_fast._C (torchvision's layout:
// one registration file beside cpu/ and cuda/). The torch-side code of each op (argument checks, stride
// bookkeeping, device dispatch) is in csrc/<op>_op.cpp; the kernels in cpu/ and cuda/ take plain pointers.
//
// These ops (namespace `harmonizer_fast_C`) are the raw kernels of the "cpu" and "cuda" backends. The
// public, autograd-aware ops (`torch.ops.harmonizer_fast.*`) are defined in Python
// (harmonizer_fast/ops/), which picks a backend per call and must exist even when this extension is
// not built (HARMONIZER_FAST_NO_EXT=1).
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

namespace harmonizer_fast {

// csrc/haar_op.cpp
void haar_dwt2d_out(const at::Tensor& x, at::Tensor& lo, at::Tensor& hi);
at::Tensor haar_idwt2d(const at::Tensor& lo, const at::Tensor& hi, int64_t height, int64_t width);

// csrc/film_op.cpp
at::Tensor film_forward(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta);
std::tuple<at::Tensor, at::Tensor, at::Tensor> film_backward(const at::Tensor& dy, const at::Tensor& x,
                                                             const at::Tensor& gamma);

// csrc/attention_pool_op.cpp
std::tuple<at::Tensor, at::Tensor> attention_pool_forward(const at::Tensor& x, const at::Tensor& a);
std::tuple<at::Tensor, at::Tensor> attention_pool_backward(const at::Tensor& dz, const at::Tensor& x,
                                                           const at::Tensor& a, const at::Tensor& z,
                                                           const at::Tensor& lse);

// csrc/ged_op.cpp
at::Tensor pairwise_overlap(const at::Tensor& a, const at::Tensor& b, double threshold, bool soft, double eps,
                            double empty_iou, int64_t mode);
at::Tensor ged_sums(const at::Tensor& samples, const at::Tensor& raters, double threshold, double eps,
                    double empty_iou, bool offdiag);

// csrc/fcomb_op.cpp
at::Tensor fcomb_head(const at::Tensor& base, const at::Tensor& bias, const at::Tensor& hidden_w,
                      const at::Tensor& hidden_b, const at::Tensor& last_w, const at::Tensor& last_b);

}  // namespace harmonizer_fast

TORCH_LIBRARY(harmonizer_fast_C, m) {
  m.def("haar_dwt2d_out(Tensor x, Tensor(a!) lo, Tensor(b!) hi) -> ()");
  m.def("haar_idwt2d(Tensor lo, Tensor hi, int height, int width) -> Tensor");
  m.def("film(Tensor x, Tensor gamma, Tensor beta) -> Tensor");
  m.def("film_backward(Tensor dy, Tensor x, Tensor gamma) -> (Tensor, Tensor, Tensor)");
  m.def("attention_pool(Tensor x, Tensor a) -> (Tensor, Tensor)");
  m.def("attention_pool_backward(Tensor dz, Tensor x, Tensor a, Tensor z, Tensor lse) -> (Tensor, Tensor)");
  m.def("pairwise_overlap(Tensor a, Tensor b, float threshold, bool soft, float eps, float empty_iou, int mode) -> Tensor");
  m.def("ged_sums(Tensor samples, Tensor raters, float threshold, float eps, float empty_iou, bool offdiag) -> Tensor");
  m.def("fcomb_head(Tensor base, Tensor bias, Tensor hidden_w, Tensor hidden_b, Tensor last_w, Tensor last_b) -> Tensor");
}

TORCH_LIBRARY_IMPL(harmonizer_fast_C, CPU, m) {
  m.impl("haar_dwt2d_out", &harmonizer_fast::haar_dwt2d_out);
  m.impl("haar_idwt2d", &harmonizer_fast::haar_idwt2d);
  m.impl("film", &harmonizer_fast::film_forward);
  m.impl("film_backward", &harmonizer_fast::film_backward);
  m.impl("attention_pool", &harmonizer_fast::attention_pool_forward);
  m.impl("attention_pool_backward", &harmonizer_fast::attention_pool_backward);
  m.impl("pairwise_overlap", &harmonizer_fast::pairwise_overlap);
  m.impl("ged_sums", &harmonizer_fast::ged_sums);
  m.impl("fcomb_head", &harmonizer_fast::fcomb_head);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(harmonizer_fast_C, CUDA, m) {
  m.impl("haar_dwt2d_out", &harmonizer_fast::haar_dwt2d_out);
  m.impl("haar_idwt2d", &harmonizer_fast::haar_idwt2d);
  m.impl("film", &harmonizer_fast::film_forward);
  m.impl("film_backward", &harmonizer_fast::film_backward);
  m.impl("attention_pool", &harmonizer_fast::attention_pool_forward);
  m.impl("attention_pool_backward", &harmonizer_fast::attention_pool_backward);
  m.impl("pairwise_overlap", &harmonizer_fast::pairwise_overlap);
  m.impl("ged_sums", &harmonizer_fast::ged_sums);
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
