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

// 3-D Haar (PyWavelets, pywt.dwtn(x, "haar", mode="zero", axes=(-3, -2, -1))): the 2x2x2 block v[c] with
// corner c = 4 dz + 2 dy + dx (depth, row, column offsets) gives eight sub-bands y[b], b = 4 bz + 2 by + bx,
// bit 1 meaning the detail filter along that axis (pywt's key order aaa, aad, ada, add, daa, dad, dda, ddd):
//     y[b] = sum_c (-1)^popcount(b & c) v[c] / (2 sqrt 2)
// a Hadamard matrix over 2 sqrt 2: orthonormal and symmetric, so it is its own inverse and one butterfly
// serves both directions. Three radix-2 stages (columns, rows, depth): 24 additions and 8 scalings.
template <typename T>
HF_HOST_DEVICE void haar3d_butterfly(const T (&in)[8], T (&out)[8]) {
  T a[8], b[8];
HF_UNROLL
  for (int i = 0; i < 8; i += 2) {  // along W (bit 0)
    a[i] = in[i] + in[i + 1];
    a[i + 1] = in[i] - in[i + 1];
  }
HF_UNROLL
  for (int i = 0; i < 8; ++i) b[i] = (i & 2) ? a[i - 2] - a[i] : a[i] + a[i + 2];  // along H (bit 1)
  const T scale = T(0.35355339059327376220042218105242452);  // 1 / (2 sqrt 2)
HF_UNROLL
  for (int i = 0; i < 8; ++i) out[i] = ((i & 4) ? b[i - 4] - b[i] : b[i] + b[i + 4]) * scale;  // along D (bit 2)
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

// 3-D geometry: input (N, C, D, H, W) of any strides, sub-bands y (N, C, 8, d, h, w) of any strides with
// unit stride along w on the forward side; the inverse reads y of any strides and writes a contiguous x
// with 2d - 1 <= D <= 2d (likewise H, W: the zero-padded end is cropped).
struct Haar3dArgs {
  int64_t n, c, d, h, w;                    // signal (N, C, D, H, W)
  int64_t sn, sc, sd, sh, sw;               // signal strides (forward input; the inverse writes contiguously)
  int64_t bd, bh, bw;                       // sub-band size: ceil(D/2), ceil(H/2), ceil(W/2)
  int64_t y_sn, y_sc, y_sb, y_sd, y_sh, y_sw;  // sub-band strides, y_sb between bands
};

}  // namespace harmonizer_fast

namespace harmonizer_fast {

// Raw-pointer CUDA launchers (csrc/cuda/haar.cu). `stream` is a cudaStream_t; the return value is a
// cudaError_t. Declared without CUDA or torch types so ops.cpp and the .cu file share one prototype.
int haar_dwt2d_cuda_launch(const void* x, void* lo, void* hi, DType dtype, const HaarDwtArgs& a,
                           void* stream);
int haar_idwt2d_cuda_launch(const void* lo, const void* hi, void* x, DType dtype, const HaarIdwtArgs& a,
                            void* stream);
int haar_dwt3d_cuda_launch(const void* x, void* y, DType dtype, const Haar3dArgs& a, void* stream);
int haar_idwt3d_cuda_launch(const void* y, void* x, DType dtype, const Haar3dArgs& a, void* stream);

}  // namespace harmonizer_fast
