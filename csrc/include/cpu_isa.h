// Which instruction-set build of the hot CPU loops runs (C++ CPU kernels only, not for nvcc).
//
// The hot loops are compiled three times: for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the x86-64
// baseline. GCC's target_clones would pick one per machine at load time, so each machine could only ever
// test one of them; here the choice is a runtime setting instead, so that one machine can run (and test,
// and benchmark) every build its CPU can execute:
//   - default: the best level the CPU supports;
//   - HARMONIZER_FAST_CPU_ISA=baseline|avx2|avx512 (read by harmonizer_fast._backend when the extension
//     loads) or harmonizer_fast.set_cpu_isa(...) at run time; a level the CPU cannot execute is refused.
//
// HF_ISA_CLONES(name, impl) defines name_avx512 / name_avx2 / name_baseline, each a copy of the function
// template `impl` inlined (flatten) into a wrapper compiled for that level, and name(...) which calls the
// one the current level selects. `impl`'s template parameters must be deducible from its arguments (pass
// std::integral_constant for a compile-time size). The switch costs one relaxed atomic load per call, so
// clone a loop over a tile or a row, not a per-element function.
#pragma once

#include <atomic>
#include <utility>

namespace harmonizer_fast {

enum class CpuIsa : int { Baseline = 0, Avx2 = 1, Avx512 = 2 };

namespace isa_detail {
extern std::atomic<int> current;  // csrc/cpu/cpu_isa.cpp
}

// The level the kernels run now.
inline CpuIsa cpu_isa() { return static_cast<CpuIsa>(isa_detail::current.load(std::memory_order_relaxed)); }
// The best level this CPU (and its OS: AVX-512 state saving) executes.
CpuIsa cpu_isa_supported();
// AVX-512 VPOPCNTDQ (Ice Lake and later, Zen 4): the GED popcount loop has a clone for it at the avx512 level.
bool cpu_has_vpopcntdq();
// Select a level; returns false (and changes nothing) when the CPU cannot execute it.
bool set_cpu_isa(CpuIsa isa);
const char* cpu_isa_name(CpuIsa isa);
// "baseline" | "avx2" | "avx512" -> level; false for any other name.
bool parse_cpu_isa(const char* name, CpuIsa* out);

}  // namespace harmonizer_fast

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HF_TARGET_AVX512 __attribute__((target("arch=x86-64-v4"), flatten))
#define HF_TARGET_AVX2 __attribute__((target("arch=x86-64-v3"), flatten))
#define HF_HAS_ISA_CLONES 1
#else
#define HF_TARGET_AVX512 __attribute__((flatten))
#define HF_TARGET_AVX2 __attribute__((flatten))
#define HF_HAS_ISA_CLONES 0
#endif

#define HF_ISA_CLONES(name, impl)                                                    \
  template <typename... A>                                                           \
  HF_TARGET_AVX512 auto name##_avx512(A&&... a) {                                    \
    return impl(std::forward<A>(a)...);                                              \
  }                                                                                  \
  template <typename... A>                                                           \
  HF_TARGET_AVX2 auto name##_avx2(A&&... a) {                                        \
    return impl(std::forward<A>(a)...);                                              \
  }                                                                                  \
  template <typename... A>                                                           \
  __attribute__((flatten)) auto name##_baseline(A&&... a) {                          \
    return impl(std::forward<A>(a)...);                                              \
  }                                                                                  \
  template <typename... A>                                                           \
  inline auto name(A&&... a) {                                                       \
    switch (::harmonizer_fast::cpu_isa()) {                                          \
      case ::harmonizer_fast::CpuIsa::Avx512:                                        \
        return name##_avx512(std::forward<A>(a)...);                                 \
      case ::harmonizer_fast::CpuIsa::Avx2:                                          \
        return name##_avx2(std::forward<A>(a)...);                                   \
      default:                                                                       \
        return name##_baseline(std::forward<A>(a)...);                               \
    }                                                                                \
  }
