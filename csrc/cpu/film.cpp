// CPU kernels for FiLM (paper Eq. 3). Forward: parallel over rows. Backward: one task per
// (batch, channel) plane, so each plane's sums are accumulated by one thread in one fixed order
// (deterministic), in double precision for float32 inputs. The contiguous row loops are built per
// instruction set (cpu_isa.h): with the heap recycled the backward is bound by its float -> double
// conversions, which the baseline build does two lanes at a time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu_isa.h"
#include "film.h"

namespace harmonizer_fast {
namespace {

template <typename T>
inline void film_row_impl(const T* __restrict__ xr, T* __restrict__ yr, int64_t w, T g, T be) {
#pragma omp simd
  for (int64_t j = 0; j < w; ++j) yr[j] = film_element<T>(xr[j], g, be);
}
HF_ISA_CLONES(film_row, film_row_impl)

// One contiguous row of the backward: dx = g dy, and the row's sums of dy x and dy added to sums[0..1].
template <typename T>
inline void film_backward_row_impl(const T* __restrict__ dyr, const T* __restrict__ xr, T* __restrict__ dxr,
                                   int64_t w, T g, double* __restrict__ sums) {
  double row_dyx = 0.0, row_dy = 0.0;
#pragma omp simd reduction(+ : row_dyx, row_dy)
  for (int64_t j = 0; j < w; ++j) {
    const T d = dyr[j];
    dxr[j] = g * d;
    row_dyx += static_cast<double>(d * xr[j]);
    row_dy += static_cast<double>(d);
  }
  sums[0] += row_dyx;
  sums[1] += row_dy;
}
HF_ISA_CLONES(film_backward_row, film_backward_row_impl)

template <typename T>
void film_forward_kernel(const T* x, const T* gamma, const T* beta, T* y, const FilmArgs& a) {
  const int64_t rows = a.b * a.c * a.h;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(a.w, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bc = r / a.h, i = r % a.h;
      const int64_t n = bc / a.c, c = bc % a.c;
      const T g = gamma[n * a.g_sb + c * a.g_sc], be = beta[n * a.be_sb + c * a.be_sc];
      const T* __restrict__ xr = x + n * a.sb + c * a.sc + i * a.sh;
      T* __restrict__ yr = y + r * a.w;
      if (a.sw == 1) {
        film_row(xr, yr, a.w, g, be);
      } else {
        for (int64_t j = 0; j < a.w; ++j) yr[j] = film_element<T>(xr[j * a.sw], g, be);
      }
    }
  });
}

template <typename T>
void film_backward_kernel(const T* dy, const T* x, const T* gamma, T* dx, T* dgamma, T* dbeta,
                          const FilmBackwardArgs& a) {
  at::parallel_for(0, a.b * a.c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t n = bc / a.c, c = bc % a.c;
      const T g = gamma[n * a.g_sb + c * a.g_sc];
      double sums[2] = {0.0, 0.0};  // dy x, dy
      for (int64_t i = 0; i < a.h; ++i) {
        const T* __restrict__ dyr = dy + n * a.dy_sb + c * a.dy_sc + i * a.dy_sh;
        const T* __restrict__ xr = x + n * a.x_sb + c * a.x_sc + i * a.x_sh;
        T* __restrict__ dxr = dx + (bc * a.h + i) * a.w;
        if (a.dy_sw == 1 && a.x_sw == 1) {
          film_backward_row(dyr, xr, dxr, a.w, g, sums);
        } else {
          double row_dyx = 0.0, row_dy = 0.0;
          for (int64_t j = 0; j < a.w; ++j) {
            const T d = dyr[j * a.dy_sw];
            dxr[j] = g * d;
            row_dyx += static_cast<double>(d * xr[j * a.x_sw]);
            row_dy += static_cast<double>(d);
          }
          sums[0] += row_dyx;
          sums[1] += row_dy;
        }
      }
      dgamma[bc] = static_cast<T>(sums[0]);
      dbeta[bc] = static_cast<T>(sums[1]);
    }
  });
}

}  // namespace

void film_forward_cpu(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta, at::Tensor& y,
                      const FilmArgs& a) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "film_forward_cpu", [&] {
    film_forward_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), gamma.const_data_ptr<scalar_t>(),
                                  beta.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), a);
  });
}

void film_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gamma, at::Tensor& dx,
                       at::Tensor& dgamma, at::Tensor& dbeta, const FilmBackwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "film_backward_cpu", [&] {
    film_backward_kernel<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                   gamma.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
                                   dgamma.mutable_data_ptr<scalar_t>(), dbeta.mutable_data_ptr<scalar_t>(), a);
  });
}

}  // namespace harmonizer_fast
