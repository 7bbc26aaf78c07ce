// CPU kernels for FiLM (paper Eq. 3). Forward: parallel over rows. Backward: one task per
// (batch, channel) plane, so each plane's sums are accumulated by one thread in one fixed order
// (deterministic), in double precision for float32 inputs. The contiguous row loops are built per
// instruction set (cpu_isa.h).
//
// Large float32 outputs (y, dx) are written with non-temporal (streaming) stores. FiLM does one FMA per
// element, so it is bound by memory traffic, and an ordinary store first reads the destination line
// into the cache (read for ownership): y = gamma x + beta then moves three lines per line of x instead
// of two. Past kStreamBytes the output cannot stay in the cache for its consumer anyway; below it,
// ordinary stores keep it there. On the 2-core Zen 4 VM a 64 MiB scale-and-add ran 2.8 ms streamed
// against 8-11 ms stored (benchmarks/results: FiLM rows of bench_inference.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include "cpu_isa.h"
#include "film.h"

namespace harmonizer_fast {
namespace {

// Outputs at least this large (bytes) are streamed; see the top of the file.
constexpr int64_t kStreamBytes = int64_t{16} << 20;

#if defined(__GNUC__) && defined(__x86_64__)
#define HF_FILM_STREAM 1
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors stay inside the flattened row loops
// 16 floats, one cache line: each build lowers it to its own registers (1 zmm, 2 ymm or 4 xmm).
typedef float Line __attribute__((vector_size(64)));
constexpr int64_t kLine = 16;

// A line-aligned non-temporal store as four SSE movntps, which every x86-64 build can issue (GCC has no
// width-generic non-temporal builtin); the CPU's write-combining buffer merges them into one line write.
__attribute__((always_inline)) inline void stream_line(float* __restrict__ dst, const Line& v) {
  for (int i = 0; i < 4; ++i) _mm_stream_ps(dst + 4 * i, _mm_loadu_ps(reinterpret_cast<const float*>(&v) + 4 * i));
}

template <typename V>
inline V splat(float s) {
  if constexpr (std::is_same_v<V, float>) {
    return s;
  } else {
    return V{} + s;
  }
}

// out[j] = f(in[j]) over one row: ordinary stores up to out's first line boundary, then whole lines
// streamed, then an ordinary tail. f takes and returns a float or a Line.
template <typename F>
__attribute__((always_inline)) inline void stream_row(const float* __restrict__ in, float* __restrict__ out,
                                                      int64_t w, F f) {
  const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out) % sizeof(Line)) / sizeof(float);
  int64_t j = 0;
  for (const int64_t head = mis == 0 ? 0 : std::min<int64_t>(w, kLine - mis); j < head; ++j) out[j] = f(in[j]);
  for (; j + kLine <= w; j += kLine) {
    Line v;
    std::memcpy(&v, in + j, sizeof(Line));
    stream_line(out + j, f(v));
  }
  for (; j < w; ++j) out[j] = f(in[j]);
}
inline void stream_fence() { _mm_sfence(); }  // the streamed lines are visible before the join
#else
#define HF_FILM_STREAM 0
inline void stream_fence() {}
#endif

template <typename T>
inline void film_row_impl(const T* __restrict__ xr, T* __restrict__ yr, int64_t w, T g, T be, bool stream) {
#if HF_FILM_STREAM
  if constexpr (std::is_same_v<T, float>) {
    if (stream) {
      return stream_row(xr, yr, w, [g, be](auto v) {
        using V = decltype(v);
        return film_element<V>(v, splat<V>(g), splat<V>(be));
      });
    }
  }
#endif
#pragma omp simd
  for (int64_t j = 0; j < w; ++j) yr[j] = film_element<T>(xr[j], g, be);
}
HF_ISA_CLONES(film_row, film_row_impl)

// One contiguous row of the backward: dx = g dy, and the row's sums of dy x and dy added to sums[0..1].
// dx is written first (streamed or stored), then the sums read dy and x from the lines just cached.
template <typename T>
inline void film_backward_row_impl(const T* __restrict__ dyr, const T* __restrict__ xr, T* __restrict__ dxr,
                                   int64_t w, T g, double* __restrict__ sums, bool stream) {
  bool streamed = false;
#if HF_FILM_STREAM
  if constexpr (std::is_same_v<T, float>) {
    if (stream) {
      stream_row(dyr, dxr, w, [g](auto d) { return splat<decltype(d)>(g) * d; });
      streamed = true;
    }
  }
#endif
  if (!streamed) {
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) dxr[j] = g * dyr[j];
  }
  double row_dyx = 0.0, row_dy = 0.0;
#pragma omp simd reduction(+ : row_dyx, row_dy)
  for (int64_t j = 0; j < w; ++j) {
    const T d = dyr[j];
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
  const bool stream = rows * a.w * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bc = r / a.h, i = r % a.h;
      const int64_t n = bc / a.c, c = bc % a.c;
      const T g = gamma[n * a.g_sb + c * a.g_sc], be = beta[n * a.be_sb + c * a.be_sc];
      const T* __restrict__ xr = x + n * a.sb + c * a.sc + i * a.sh;
      T* __restrict__ yr = y + r * a.w;
      if (a.sw == 1) {
        film_row(xr, yr, a.w, g, be, stream);
      } else {
        for (int64_t j = 0; j < a.w; ++j) yr[j] = film_element<T>(xr[j * a.sw], g, be);
      }
    }
    if (stream) stream_fence();
  });
}

template <typename T>
void film_backward_kernel(const T* dy, const T* x, const T* gamma, T* dx, T* dgamma, T* dbeta,
                          const FilmBackwardArgs& a) {
  const bool stream = a.b * a.c * a.h * a.w * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
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
          film_backward_row(dyr, xr, dxr, a.w, g, sums, stream);
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
    if (stream) stream_fence();
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
