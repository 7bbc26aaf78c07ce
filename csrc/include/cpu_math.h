// Element math for the C++ CPU kernels only (not for nvcc): a branch-free exp that vectorizes. The hot
// loops that use it are built per instruction set (cpu_isa.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace harmonizer_fast {

// exp(v) for float, branch-free so that loops over it vectorize (std::exp does not): Cody-Waite
// reduction v = n ln2 + r, a degree-6 Taylor polynomial for e^r on [-ln2/2, ln2/2], and 2^n applied as
// two powers 2^(n/2) 2^(n - n/2) built in the exponent bits (so n = 128 does not overflow and tiny
// results underflow gradually). Measured against double-precision exp over [-87, 88.5] in steps of 1e-4:
// at most 3 ulp (relative error 2.6e-7). Arguments below -87.3 (including -inf) give 0, above 88.72 give +inf.
inline float pow2i(int32_t e) {  // 2^e for -126 <= e <= 127
  const int32_t bits = (e + 127) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// The shared core: n = round(x / ln2) and the polynomial of e^r, r = x - n ln2, for a float or a GCC
// vector of floats (the same operations in the same order, lane by lane).
template <typename V>
inline V exp_core(V x, V& n) {
  n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest via 1.5 * 2^23
  const V r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln2 split in two for accuracy
  V p = V{} + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p;
}

inline float exp_vectorizable(float v) {
  const float x = std::min(std::max(v, -87.3f), 88.72f);
  float n;
  const float p = exp_core(x, n);
  const int32_t ni = static_cast<int32_t>(n), half = ni >> 1;
  const float out = p * pow2i(half) * pow2i(ni - half);
  return v < -87.3f ? 0.0f : (v > 88.72f ? std::numeric_limits<float>::infinity() : out);
}
inline double exp_vectorizable(double v) { return std::exp(v); }

#if defined(__GNUC__)
// exp_vectorizable on a GCC vector of floats (vector_size extension), lane by lane the same arithmetic. For
// loops GCC leaves scalar: at -O3 it does not if-convert exp_vectorizable's range selects for AVX2 or SSE2
// ("control flow in loop"), which made the sampling head's sigmoid a scalar loop on those builds.
template <typename vec>
__attribute__((always_inline)) inline vec exp_vec(vec v) {
  typedef int32_t ivec __attribute__((vector_size(sizeof(vec))));
  const vec lo = vec{} - 87.3f, hi = vec{} + 88.72f;
  vec x = v < lo ? lo : v;
  x = x > hi ? hi : x;
  vec n;
  const vec p = exp_core(x, n);
  const ivec ni = __builtin_convertvector(n, ivec), half = ni >> 1;
  // 2^half and 2^(ni - half) built in the exponent bits; a vector cast of equal size reinterprets the bits.
  const vec out = p * reinterpret_cast<vec>((half + 127) << 23) * reinterpret_cast<vec>((ni - half + 127) << 23);
  const vec inf = vec{} + std::numeric_limits<float>::infinity();
  return v < lo ? vec{} : (v > hi ? inf : out);
}
#endif

}  // namespace harmonizer_fast
