// The runtime choice of the CPU kernels' instruction-set build (csrc/include/cpu_isa.h).
#include "cpu_isa.h"

#include <cstring>

namespace harmonizer_fast {

namespace {

CpuIsa detect() {
#if HF_HAS_ISA_CLONES
  __builtin_cpu_init();
  // libgcc's feature bits include the OS check (XGETBV) that AVX and AVX-512 register state is saved.
  if (__builtin_cpu_supports("x86-64-v4")) return CpuIsa::Avx512;
  if (__builtin_cpu_supports("x86-64-v3")) return CpuIsa::Avx2;
#endif
  return CpuIsa::Baseline;
}

const CpuIsa kSupported = detect();

}  // namespace

namespace isa_detail {
std::atomic<int> current{static_cast<int>(kSupported)};
}

CpuIsa cpu_isa_supported() { return kSupported; }

bool cpu_has_vpopcntdq() {
#if HF_HAS_ISA_CLONES
  static const bool has = kSupported == CpuIsa::Avx512 && __builtin_cpu_supports("avx512vpopcntdq");
  return has;
#else
  return false;
#endif
}

bool set_cpu_isa(CpuIsa isa) {
  if (static_cast<int>(isa) > static_cast<int>(kSupported)) return false;
  isa_detail::current.store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Avx512:
      return "avx512";
    case CpuIsa::Avx2:
      return "avx2";
    default:
      return "baseline";
  }
}

bool parse_cpu_isa(const char* name, CpuIsa* out) {
  for (CpuIsa isa : {CpuIsa::Baseline, CpuIsa::Avx2, CpuIsa::Avx512}) {
    if (std::strcmp(name, cpu_isa_name(isa)) == 0) {
      *out = isa;
      return true;
    }
  }
  return false;
}

}  // namespace harmonizer_fast
