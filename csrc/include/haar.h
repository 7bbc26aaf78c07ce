// Haar DWT element math shared by the CPU (csrc/cpu/haar.cpp) and CUDA (csrc/cuda/haar.cu) kernels.
//
// Convention (PyWavelets, pywt.dwt2(x, "haar", mode="zero")): for the 2x2 block
//     [[a, b],
//      [c, d]]   (rows along H, columns along W)
// the four sub-bands are
//     cA = (a + b + c + d) / 2     cH = (a + b - c - d) / 2
//     cV = (a - b + c - d) / 2     cD = (a - b - c + d) / 2
// Odd sizes are zero-padded at the end, i.e. the missing b, c or d is 0. The 2-D Haar transform of one
// block is orthonormal, so the inverse uses the same butterfly.
#pragma once

#include <cstdint>

#include "hf_common.h"

namespace harmonizer_fast {

template <typename T>
HF_HOST_DEVICE void haar_forward_block(T a, T b, T c, T d, T& ca, T& ch, T& cv, T& cd) {
  // Row sums/differences first, then columns: two butterflies instead of four 4-term sums.
  const T s0 = a + b, d0 = a - b, s1 = c + d, d1 = c - d;
  const T half = T(0.5);
  ca = (s0 + s1) * half;
  ch = (s0 - s1) * half;
  cv = (d0 + d1) * half;
  cd = (d0 - d1) * half;
}

template <typename T>
HF_HOST_DEVICE void haar_inverse_block(T ca, T ch, T cv, T cd, T& a, T& b, T& c, T& d) {
  const T s0 = ca + ch, s1 = ca - ch, d0 = cv + cd, d1 = cv - cd;
  const T half = T(0.5);
  a = (s0 + d0) * half;
  b = (s0 - d0) * half;
  c = (s1 + d1) * half;
  d = (s1 - d1) * half;
}

// Geometry of one call, shared by the CPU and CUDA launchers. Strides are in elements. Inputs may be any
// strided view; outputs have unit stride along W. The low band (cA) and the three high bands
// (cH, cV, cD) have separate bases and strides, so one kernel writes either the combined (N, C, 4, h, w)
// layout (lo = y[:, :, 0], hi = y[:, :, 1:]) or pytorch_wavelets' separate contiguous (yl, yh) tensors.
struct HaarDwtArgs {
  int64_t n, c, h, w;                   // input (N, C, H, W)
  int64_t sn, sc, sh, sw;               // input strides
  int64_t ho, wo;                       // sub-band size: ceil(H/2), ceil(W/2)
  int64_t lo_sn, lo_sc, lo_sh;          // cA strides
  int64_t hi_sn, hi_sc, hi_sb, hi_sh;   // (cH, cV, cD) strides, hi_sb between bands
};

struct HaarIdwtArgs {
  int64_t n, c, hi, wi;                          // sub-band size
  int64_t lo_sn, lo_sc, lo_sh, lo_sw;            // cA strides (any view)
  int64_t hi_sn, hi_sc, hi_sb, hi_sh, hi_sw;     // (cH, cV, cD) strides (any view)
  int64_t h, w;                                  // contiguous output, 2*hi-1 <= h <= 2*hi (crop for odd sizes)
};

}  // namespace harmonizer_fast

namespace harmonizer_fast {

// Raw-pointer CUDA launchers (csrc/cuda/haar.cu). `stream` is a cudaStream_t; the return value is a
// cudaError_t. Declared without CUDA or torch types so ops.cpp and the .cu file share one prototype.
int haar_dwt2d_cuda_launch(const void* x, void* lo, void* hi, DType dtype, const HaarDwtArgs& a,
                           void* stream);
int haar_idwt2d_cuda_launch(const void* lo, const void* hi, void* x, DType dtype, const HaarIdwtArgs& a,
                            void* stream);

}  // namespace harmonizer_fast
