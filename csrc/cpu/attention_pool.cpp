// CPU kernels for the token-attention pooling core (see csrc/include/attention_pool.h). One task per
// (batch item, position chunk); within a task, tiles of kTile positions keep the M x kTile scores in a
// small buffer (never the M x N matrix) and x is read once per pass. Chunks are merged in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention_pool.h"
#include "cpu_isa.h"
#include "cpu_math.h"

namespace harmonizer_fast {
namespace {

constexpr int64_t kTile = 256;

// The tile loops dominate: each is built per instruction set (HF_ISA_CLONES, cpu_isa.h).

// s[t] = exp(s[t] - shift) for t < len; returns the sum.
template <typename T>
inline T exp_shift_tile_impl(T* __restrict__ s, int64_t len, T shift) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < len; ++t) {
    s[t] = exp_vectorizable(s[t] - shift);
    sum += s[t];
  }
  return sum;
}
HF_ISA_CLONES(exp_shift_tile, exp_shift_tile_impl)

// s[m][t] = sum_c w[m][c] * x[c][t0 + t] for t < len (w is an M x C row-major matrix).
template <typename T>
inline void project_tile_impl(const T* w, const T* x, int64_t x_sc, const AttnPoolArgs& g, int64_t len, T* s) {
  std::fill(s, s + g.m * kTile, T(0));
  for (int64_t c = 0; c < g.c; ++c) {
    const T* __restrict__ xr = x + c * x_sc;
    for (int64_t m = 0; m < g.m; ++m) {
      const T wv = w[m * g.c + c];
      T* __restrict__ sr = s + m * kTile;
#pragma omp simd
      for (int64_t t = 0; t < len; ++t) sr[t] += wv * xr[t];
    }
  }
}
HF_ISA_CLONES(project_tile, project_tile_impl)

// acc[m][c] += sum_t p[m][t] * x[c][t0 + t]
template <typename T>
inline void accumulate_tile_impl(const T* p, const T* x, int64_t x_sc, const AttnPoolArgs& g, int64_t len, T* acc) {
  for (int64_t c = 0; c < g.c; ++c) {
    const T* __restrict__ xr = x + c * x_sc;
    for (int64_t m = 0; m < g.m; ++m) {
      const T* __restrict__ pr = p + m * kTile;
      T dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t t = 0; t < len; ++t) dot += pr[t] * xr[t];
      acc[m * g.c + c] += dot;
    }
  }
}
HF_ISA_CLONES(accumulate_tile, accumulate_tile_impl)

template <typename T>
void forward_kernel(const T* x, const T* a, T* z, T* lse, const AttnPoolArgs& g) {
  const int64_t chunk = (g.n + g.splits - 1) / g.splits;
  std::vector<T> part_m(g.b * g.splits * g.m), part_l(g.b * g.splits * g.m);
  std::vector<T> part_acc(g.b * g.splits * g.m * g.c, T(0));
  at::parallel_for(0, g.b * g.splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> s(g.m * kTile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / g.splits, n0 = (task % g.splits) * chunk, n1 = std::min(g.n, n0 + chunk);
      const T* ab = a + bi * g.m * g.c;
      T* m_run = part_m.data() + task * g.m;
      T* l_run = part_l.data() + task * g.m;
      T* acc = part_acc.data() + task * g.m * g.c;
      std::fill(m_run, m_run + g.m, -std::numeric_limits<T>::infinity());
      std::fill(l_run, l_run + g.m, T(0));
      for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
        const int64_t len = std::min(kTile, n1 - t0);
        const T* xt = x + bi * g.x_sb + t0;
        project_tile(ab, xt, g.x_sc, g, len, s.data());
        for (int64_t m = 0; m < g.m; ++m) {  // online softmax: s becomes exp(s - running max)
          T* sr = s.data() + m * kTile;
          const T m_new = std::max(m_run[m], *std::max_element(sr, sr + len));
          const T corr = softmax_rescale(m_run[m], m_new);
          l_run[m] = l_run[m] * corr + exp_shift_tile(sr, len, m_new);
          m_run[m] = m_new;
          for (int64_t c = 0; c < g.c; ++c) acc[m * g.c + c] *= corr;
        }
        accumulate_tile(s.data(), xt, g.x_sc, g, len, acc);
      }
    }
  });
  at::parallel_for(0, g.b, 1, [&](int64_t begin, int64_t end) {  // merge the chunks in a fixed order
    for (int64_t bi = begin; bi < end; ++bi) {
      for (int64_t m = 0; m < g.m; ++m) {
        T m_tot = -std::numeric_limits<T>::infinity(), l_tot = 0;
        for (int64_t sp = 0; sp < g.splits; ++sp) m_tot = std::max(m_tot, part_m[(bi * g.splits + sp) * g.m + m]);
        T* zr = z + (bi * g.m + m) * g.c;
        std::fill(zr, zr + g.c, T(0));
        for (int64_t sp = 0; sp < g.splits; ++sp) {
          const int64_t k = (bi * g.splits + sp) * g.m + m;
          const T w = softmax_rescale(part_m[k], m_tot);
          l_tot += part_l[k] * w;
          const T* accr = part_acc.data() + k * g.c;
          for (int64_t c = 0; c < g.c; ++c) zr[c] += accr[c] * w;
        }
        for (int64_t c = 0; c < g.c; ++c) zr[c] /= l_tot;
        lse[bi * g.m + m] = m_tot + hf_log(l_tot);
      }
    }
  });
}

template <typename T>
void backward_kernel(const T* dz, const T* x, const T* a, const T* z, const T* lse, T* dx, T* da,
                     const AttnPoolArgs& g) {
  const int64_t chunk = (g.n + g.splits - 1) / g.splits;
  std::vector<T> d(g.b * g.m);
  for (int64_t k = 0; k < g.b * g.m; ++k) {  // D = rowsum(dz * z)
    T sum = 0;
    for (int64_t c = 0; c < g.c; ++c) sum += dz[k * g.c + c] * z[k * g.c + c];
    d[k] = sum;
  }
  std::vector<T> part_da(g.b * g.splits * g.m * g.c, T(0));
  at::parallel_for(0, g.b * g.splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> p(g.m * kTile), ds(g.m * kTile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bi = task / g.splits, n0 = (task % g.splits) * chunk, n1 = std::min(g.n, n0 + chunk);
      const T* ab = a + bi * g.m * g.c;
      const T* dzb = dz + bi * g.m * g.c;
      for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
        const int64_t len = std::min(kTile, n1 - t0);
        const T* xt = x + bi * g.x_sb + t0;
        project_tile(ab, xt, g.x_sc, g, len, p.data());    // scores
        project_tile(dzb, xt, g.x_sc, g, len, ds.data());  // dz x
        for (int64_t m = 0; m < g.m; ++m) {
          const T l = lse[bi * g.m + m], dm = d[bi * g.m + m];
          T* pr = p.data() + m * kTile;
          T* dsr = ds.data() + m * kTile;
          exp_shift_tile(pr, len, l);
#pragma omp simd
          for (int64_t t = 0; t < len; ++t) dsr[t] = pr[t] * (dsr[t] - dm);
        }
        for (int64_t c = 0; c < g.c; ++c) {  // dx[c][t] = sum_m dz[m][c] p[m][t] + a[m][c] ds[m][t]
          T* __restrict__ out = dx + (bi * g.c + c) * g.n + t0;
          std::fill(out, out + len, T(0));
          for (int64_t m = 0; m < g.m; ++m) {
            const T wz = dzb[m * g.c + c], wa = ab[m * g.c + c];
            const T* __restrict__ pr = p.data() + m * kTile;
            const T* __restrict__ dsr = ds.data() + m * kTile;
#pragma omp simd
            for (int64_t t = 0; t < len; ++t) out[t] += wz * pr[t] + wa * dsr[t];
          }
        }
        accumulate_tile(ds.data(), xt, g.x_sc, g, len, part_da.data() + task * g.m * g.c);
      }
    }
  });
  for (int64_t bi = 0; bi < g.b; ++bi) {  // da = sum of the chunks, in a fixed order
    T* dab = da + bi * g.m * g.c;
    std::fill(dab, dab + g.m * g.c, T(0));
    for (int64_t sp = 0; sp < g.splits; ++sp) {
      const T* part = part_da.data() + (bi * g.splits + sp) * g.m * g.c;
      for (int64_t k = 0; k < g.m * g.c; ++k) dab[k] += part[k];
    }
  }
}

}  // namespace

void attention_pool_forward_cpu(const at::Tensor& x, const at::Tensor& a, at::Tensor& z, at::Tensor& lse,
                                const AttnPoolArgs& g) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attention_pool_forward_cpu", [&] {
    forward_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), z.mutable_data_ptr<scalar_t>(),
                             lse.mutable_data_ptr<scalar_t>(), g);
  });
}

void attention_pool_backward_cpu(const at::Tensor& dz, const at::Tensor& x, const at::Tensor& a, const at::Tensor& z,
                                 const at::Tensor& lse, at::Tensor& dx, at::Tensor& da, const AttnPoolArgs& g) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attention_pool_backward_cpu", [&] {
    backward_kernel<scalar_t>(dz.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                              a.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(),
                              lse.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
                              da.mutable_data_ptr<scalar_t>(), g);
  });
}

}  // namespace harmonizer_fast
