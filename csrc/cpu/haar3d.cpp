// CPU kernels for the 3-D Haar DWT/IDWT: one pass over memory, parallel over rows of sub-band coefficients.
// The element math (haar3d_butterfly) lives in csrc/include/haar.h and is shared with csrc/cuda/haar3d.cu;
// argument checks and stride bookkeeping are in csrc/haar3d_op.cpp, shared with the CUDA path.
//
// One task row is one (n, c, i, j) row of the sub-bands: the forward reads the four input rows
// (2i + dz, 2j + dy) of its 2x2xW slab and writes eight band rows; the inverse does the reverse. Rows
// beyond an odd D or H read a zero row (forward) or write to scratch that is dropped (inverse), so the
// inner loops have no branches.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "haar.h"

namespace harmonizer_fast {
namespace {

// About 32K coefficients per task, so that small volumes still split across threads.
int64_t grain_for(int64_t row_len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_len, 1)); }

// Eight band rows from four input rows r0..r3 (r_q = row (dz, dy) with q = 2 dz + dy), each with its own
// stride along W (a zero row has stride 1). kUnit: every stride is 1, the compiler's vectorizable case.
template <typename T, bool kUnit>
void dwt3_row(const T* __restrict__ r0, const T* __restrict__ r1, const T* __restrict__ r2, const T* __restrict__ r3,
              const int64_t (&s)[4], int64_t w, T* const (&y)[8]) {
  T* __restrict__ y0 = y[0];
  T* __restrict__ y1 = y[1];
  T* __restrict__ y2 = y[2];
  T* __restrict__ y3 = y[3];
  T* __restrict__ y4 = y[4];
  T* __restrict__ y5 = y[5];
  T* __restrict__ y6 = y[6];
  T* __restrict__ y7 = y[7];
  const int64_t s0 = kUnit ? 1 : s[0], s1 = kUnit ? 1 : s[1], s2 = kUnit ? 1 : s[2], s3 = kUnit ? 1 : s[3];
  const int64_t pairs = w / 2;
  for (int64_t k = 0; k < pairs; ++k) {
    const T in[8] = {r0[2 * k * s0], r0[(2 * k + 1) * s0], r1[2 * k * s1], r1[(2 * k + 1) * s1],
                     r2[2 * k * s2], r2[(2 * k + 1) * s2], r3[2 * k * s3], r3[(2 * k + 1) * s3]};
    T out[8];
    haar3d_butterfly<T>(in, out);
    y0[k] = out[0];
    y1[k] = out[1];
    y2[k] = out[2];
    y3[k] = out[3];
    y4[k] = out[4];
    y5[k] = out[5];
    y6[k] = out[6];
    y7[k] = out[7];
  }
  if (w & 1) {  // odd W: the right neighbour is zero padding
    const int64_t k = pairs;
    const T in[8] = {r0[2 * k * s0], T(0), r1[2 * k * s1], T(0), r2[2 * k * s2], T(0), r3[2 * k * s3], T(0)};
    T out[8];
    haar3d_butterfly<T>(in, out);
    for (int b = 0; b < 8; ++b) y[b][k] = out[b];
  }
}

template <typename T>
void dwt3_kernel(const T* x, T* y, const Haar3dArgs& a) {
  const int64_t rows = a.n * a.c * a.bd * a.bh;
  at::parallel_for(0, rows, grain_for(8 * a.bw), [&](int64_t begin, int64_t end) {
    const std::vector<T> zeros(static_cast<size_t>(a.w) + 1, T(0));
    for (int64_t r = begin; r < end; ++r) {
      const int64_t j = r % a.bh, i = (r / a.bh) % a.bd, nc = r / (a.bh * a.bd);
      const int64_t n = nc / a.c, c = nc % a.c;
      const T* base = x + n * a.sn + c * a.sc;
      const T* in[4];
      int64_t s[4];
      const bool unit = a.sw == 1;
      for (int q = 0; q < 4; ++q) {
        const int64_t dz = 2 * i + (q >> 1), dy = 2 * j + (q & 1);
        const bool inside = dz < a.d && dy < a.h;
        in[q] = inside ? base + dz * a.sd + dy * a.sh : zeros.data();
        s[q] = inside ? a.sw : 1;
      }
      T* const b0 = y + n * a.y_sn + c * a.y_sc + i * a.y_sd + j * a.y_sh;
      T* const out[8] = {b0, b0 + a.y_sb, b0 + 2 * a.y_sb, b0 + 3 * a.y_sb,
                         b0 + 4 * a.y_sb, b0 + 5 * a.y_sb, b0 + 6 * a.y_sb, b0 + 7 * a.y_sb};
      if (unit) {
        dwt3_row<T, true>(in[0], in[1], in[2], in[3], s, a.w, out);
      } else {
        dwt3_row<T, false>(in[0], in[1], in[2], in[3], s, a.w, out);
      }
    }
  });
}

// Four output rows o0..o3 (row (dz, dy), q = 2 dz + dy; a cropped row points at scratch) from one row of
// each of the eight bands, read with stride sy along w (kUnit: 1).
template <typename T, bool kUnit>
void idwt3_row(const T* const (&y)[8], int64_t sy, int64_t w, T* __restrict__ o0, T* __restrict__ o1,
               T* __restrict__ o2, T* __restrict__ o3) {
  const T* __restrict__ y0 = y[0];
  const T* __restrict__ y1 = y[1];
  const T* __restrict__ y2 = y[2];
  const T* __restrict__ y3 = y[3];
  const T* __restrict__ y4 = y[4];
  const T* __restrict__ y5 = y[5];
  const T* __restrict__ y6 = y[6];
  const T* __restrict__ y7 = y[7];
  const int64_t st = kUnit ? 1 : sy;
  const int64_t pairs = w / 2;
  for (int64_t k = 0; k < pairs; ++k) {
    const int64_t e = k * st;
    const T in[8] = {y0[e], y1[e], y2[e], y3[e], y4[e], y5[e], y6[e], y7[e]};
    T out[8];
    haar3d_butterfly<T>(in, out);
    o0[2 * k] = out[0];
    o0[2 * k + 1] = out[1];
    o1[2 * k] = out[2];
    o1[2 * k + 1] = out[3];
    o2[2 * k] = out[4];
    o2[2 * k + 1] = out[5];
    o3[2 * k] = out[6];
    o3[2 * k + 1] = out[7];
  }
  if (w & 1) {  // odd W: the right column is cropped
    const int64_t e = pairs * st;
    const T in[8] = {y0[e], y1[e], y2[e], y3[e], y4[e], y5[e], y6[e], y7[e]};
    T out[8];
    haar3d_butterfly<T>(in, out);
    o0[2 * pairs] = out[0];
    o1[2 * pairs] = out[2];
    o2[2 * pairs] = out[4];
    o3[2 * pairs] = out[6];
  }
}

template <typename T>
void idwt3_kernel(const T* y, T* x, const Haar3dArgs& a) {
  const int64_t rows = a.n * a.c * a.bd * a.bh;
  at::parallel_for(0, rows, grain_for(8 * a.bw), [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(static_cast<size_t>(8 * a.bw));  // one 2 bw row per cropped output row
    for (int64_t r = begin; r < end; ++r) {
      const int64_t j = r % a.bh, i = (r / a.bh) % a.bd, nc = r / (a.bh * a.bd);
      const int64_t n = nc / a.c, c = nc % a.c;
      const T* b0 = y + n * a.y_sn + c * a.y_sc + i * a.y_sd + j * a.y_sh;
      const T* const in[8] = {b0, b0 + a.y_sb, b0 + 2 * a.y_sb, b0 + 3 * a.y_sb,
                              b0 + 4 * a.y_sb, b0 + 5 * a.y_sb, b0 + 6 * a.y_sb, b0 + 7 * a.y_sb};
      T* out[4];
      for (int q = 0; q < 4; ++q) {
        const int64_t dz = 2 * i + (q >> 1), dy = 2 * j + (q & 1);
        out[q] = (dz < a.d && dy < a.h) ? x + ((nc * a.d + dz) * a.h + dy) * a.w : scratch.data() + q * 2 * a.bw;
      }
      if (a.y_sw == 1) {
        idwt3_row<T, true>(in, 1, a.w, out[0], out[1], out[2], out[3]);
      } else {
        idwt3_row<T, false>(in, a.y_sw, a.w, out[0], out[1], out[2], out[3]);
      }
    }
  });
}

}  // namespace

void haar_dwt3d_cpu(const at::Tensor& x, at::Tensor& y, const Haar3dArgs& a) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "haar_dwt3d_cpu", [&] {
    dwt3_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), a);
  });
}

void haar_idwt3d_cpu(const at::Tensor& y, at::Tensor& x, const Haar3dArgs& a) {
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "haar_idwt3d_cpu", [&] {
    idwt3_kernel<scalar_t>(y.const_data_ptr<scalar_t>(), x.mutable_data_ptr<scalar_t>(), a);
  });
}

}  // namespace harmonizer_fast
