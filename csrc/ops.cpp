// The extension module harmonizer_fast._C. Each op registers itself in its torch-side file csrc/<op>_op.cpp
// (torchvision's layout: in a TORCH_LIBRARY_FRAGMENT, one define_op call per op gives its schema, its CPU
// kernel and, when built, its CUDA kernel), so adding an op touches its own files only; the kernels in cpu/ and cuda/
// take plain pointers.
//
// These ops (namespace `harmonizer_fast_C`) are the raw kernels of the "cpu" and "cuda" backends. The
// public, autograd-aware ops (`torch.ops.harmonizer_fast.*`) are defined in Python
// (harmonizer_fast/ops/), which picks a backend per call and must exist even when this extension is
// not built (HARMONIZER_FAST_NO_EXT=1).
#include <Python.h>

#include "cpu_isa.h"

// A plain Python module: loading it runs the ops' static registrations. `with_cuda` tells the
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
