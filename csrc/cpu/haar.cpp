// CPU kernels for the Haar DWT/IDWT: one pass over memory, parallel over output rows.
// The element math lives in csrc/include/haar.h and is shared with csrc/cuda/haar.cu; argument checks
// and stride bookkeeping are in csrc/ops.cpp, shared with the CUDA path.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "haar.h"

namespace harmonizer_fast {
namespace {

// Roughly 32K elements per task, so that small images still split across threads.
int64_t grain_for(int64_t row_len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_len, 1)); }

// One output row from input rows x0 and x1 (x1 == nullptr: odd H, the zero-padding row). kUnit
// specializes unit stride along W, where the compiler turns the stride-2 loads into vector shuffles.
template <typename T, bool kUnit>
void dwt_row(const T* __restrict__ x0, const T* __restrict__ x1, int64_t sw, int64_t w, T* __restrict__ ya,
             T* __restrict__ yh, T* __restrict__ yv, T* __restrict__ yd) {
  const int64_t s = kUnit ? 1 : sw;
  const int64_t pairs = w / 2;
  if (x1 != nullptr) {
    for (int64_t j = 0; j < pairs; ++j) {
      haar_forward_block<T>(x0[2 * j * s], x0[(2 * j + 1) * s], x1[2 * j * s], x1[(2 * j + 1) * s], ya[j],
                            yh[j], yv[j], yd[j]);
    }
  } else {
    for (int64_t j = 0; j < pairs; ++j) {
      haar_forward_block<T>(x0[2 * j * s], x0[(2 * j + 1) * s], T(0), T(0), ya[j], yh[j], yv[j], yd[j]);
    }
  }
  if (w & 1) {  // odd W: the right neighbour is zero padding
    const int64_t j = pairs;
    const T c = x1 != nullptr ? x1[2 * j * s] : T(0);
    haar_forward_block<T>(x0[2 * j * s], T(0), c, T(0), ya[j], yh[j], yv[j], yd[j]);
  }
}

template <typename T>
void dwt_kernel(const T* x, T* lo, T* hi, const HaarDwtArgs& a) {
  const int64_t rows = a.n * a.c * a.ho;
  at::parallel_for(0, rows, grain_for(a.wo), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t nc = r / a.ho, i = r % a.ho;
      const int64_t n = nc / a.c, c = nc % a.c;
      const T* x0 = x + n * a.sn + c * a.sc + 2 * i * a.sh;
      const T* x1 = (2 * i + 1 < a.h) ? x0 + a.sh : nullptr;
      T* ya = lo + n * a.lo_sn + c * a.lo_sc + i * a.lo_sh;
      T* yh = hi + n * a.hi_sn + c * a.hi_sc + i * a.hi_sh;
      if (a.sw == 1) {
        dwt_row<T, true>(x0, x1, 1, a.w, ya, yh, yh + a.hi_sb, yh + 2 * a.hi_sb);
      } else {
        dwt_row<T, false>(x0, x1, a.sw, a.w, ya, yh, yh + a.hi_sb, yh + 2 * a.hi_sb);
      }
    }
  });
}

// Output rows 2i and 2i+1 (o1 == nullptr when an odd H crops it) from one row of each sub-band.
template <typename T, bool kUnit>
void idwt_row(const T* __restrict__ ca, const T* __restrict__ ch, const T* __restrict__ cv,
              const T* __restrict__ cd, int64_t lo_sw, int64_t hi_sw, int64_t w, T* __restrict__ o0,
              T* __restrict__ o1) {
  const int64_t sl = kUnit ? 1 : lo_sw, sh = kUnit ? 1 : hi_sw;
  const int64_t pairs = w / 2;
  T a, b, c, d;
  if (o1 != nullptr) {
    for (int64_t j = 0; j < pairs; ++j) {
      haar_inverse_block<T>(ca[j * sl], ch[j * sh], cv[j * sh], cd[j * sh], a, b, c, d);
      o0[2 * j] = a;
      o0[2 * j + 1] = b;
      o1[2 * j] = c;
      o1[2 * j + 1] = d;
    }
  } else {
    for (int64_t j = 0; j < pairs; ++j) {
      haar_inverse_block<T>(ca[j * sl], ch[j * sh], cv[j * sh], cd[j * sh], a, b, c, d);
      o0[2 * j] = a;
      o0[2 * j + 1] = b;
    }
  }
  if (w & 1) {  // odd W: the right column is cropped
    const int64_t j = pairs;
    haar_inverse_block<T>(ca[j * sl], ch[j * sh], cv[j * sh], cd[j * sh], a, b, c, d);
    o0[2 * j] = a;
    if (o1 != nullptr) o1[2 * j] = c;
  }
}

template <typename T>
void idwt_kernel(const T* lo, const T* hi, T* x, const HaarIdwtArgs& a) {
  const int64_t rows = a.n * a.c * a.hi;
  at::parallel_for(0, rows, grain_for(a.w), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t nc = r / a.hi, i = r % a.hi;
      const int64_t n = nc / a.c, c = nc % a.c;
      const T* ca = lo + n * a.lo_sn + c * a.lo_sc + i * a.lo_sh;
      const T* ch = hi + n * a.hi_sn + c * a.hi_sc + i * a.hi_sh;
      T* o0 = x + (nc * a.h + 2 * i) * a.w;
      T* o1 = (2 * i + 1 < a.h) ? o0 + a.w : nullptr;
      if (a.lo_sw == 1 && a.hi_sw == 1) {
        idwt_row<T, true>(ca, ch, ch + a.hi_sb, ch + 2 * a.hi_sb, 1, 1, a.w, o0, o1);
      } else {
        idwt_row<T, false>(ca, ch, ch + a.hi_sb, ch + 2 * a.hi_sb, a.lo_sw, a.hi_sw, a.w, o0, o1);
      }
    }
  });
}

}  // namespace

void haar_dwt2d_cpu(const at::Tensor& x, at::Tensor& lo, at::Tensor& hi, const HaarDwtArgs& a) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "haar_dwt2d_cpu", [&] {
    dwt_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), lo.mutable_data_ptr<scalar_t>(),
                         hi.mutable_data_ptr<scalar_t>(), a);
  });
}

void haar_idwt2d_cpu(const at::Tensor& lo, const at::Tensor& hi, at::Tensor& x, const HaarIdwtArgs& a) {
  AT_DISPATCH_FLOATING_TYPES(lo.scalar_type(), "haar_idwt2d_cpu", [&] {
    idwt_kernel<scalar_t>(lo.const_data_ptr<scalar_t>(), hi.const_data_ptr<scalar_t>(),
                          x.mutable_data_ptr<scalar_t>(), a);
  });
}

}  // namespace harmonizer_fast
