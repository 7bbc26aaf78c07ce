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

#include "cpu_isa.h"

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
// backend report whether the CUDA kernels were compiled in; the functions below read and set the CPU
// kernels' instruction-set build (csrc/include/cpu_isa.h; the Python API is harmonizer_fast.set_cpu_isa).
namespace harmonizer_fast {
namespace {

PyObject* py_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(cpu_isa_name(cpu_isa())); }

PyObject* py_supported_cpu_isas(PyObject*, PyObject*) {
  const int best = static_cast<int>(cpu_isa_supported());
  PyObject* out = PyTuple_New(best + 1);
  if (out == nullptr) return nullptr;
  for (int i = 0; i <= best; ++i) PyTuple_SET_ITEM(out, i, PyUnicode_FromString(cpu_isa_name(static_cast<CpuIsa>(i))));
  return out;
}

PyObject* py_cpu_has_vpopcntdq(PyObject*, PyObject*) { return PyBool_FromLong(cpu_has_vpopcntdq()); }

// set_cpu_isa(name) -> the previous level's name; ValueError for an unknown name or one this CPU lacks.
PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
  CpuIsa isa;
  if (name == nullptr || !parse_cpu_isa(name, &isa)) {
    PyErr_SetString(PyExc_ValueError, "expected one of 'baseline', 'avx2', 'avx512'");
    return nullptr;
  }
  const CpuIsa previous = cpu_isa();
  if (!set_cpu_isa(isa)) {
    PyErr_Format(PyExc_ValueError, "this CPU cannot execute the %s build (it supports up to %s)", name,
                 cpu_isa_name(cpu_isa_supported()));
    return nullptr;
  }
  return PyUnicode_FromString(cpu_isa_name(previous));
}

PyMethodDef hf_methods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "the instruction-set build the CPU kernels run"},
    {"supported_cpu_isas", py_supported_cpu_isas, METH_NOARGS, "the builds this CPU executes, lowest first"},
    {"cpu_has_vpopcntdq", py_cpu_has_vpopcntdq, METH_NOARGS, "whether the avx512 GED popcount uses VPOPCNTDQ"},
    {"set_cpu_isa", py_set_cpu_isa, METH_O, "select a build by name; returns the previous one"},
    {nullptr, nullptr, 0, nullptr}};

struct PyModuleDef hf_module = {PyModuleDef_HEAD_INIT, "_C", "harmonizer_fast C++/CUDA kernels", -1, hf_methods};

}  // namespace
}  // namespace harmonizer_fast

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&harmonizer_fast::hf_module);
  if (m == nullptr) return nullptr;
#ifdef WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  return m;
}
