// CPU kernels for pairwise overlaps of binary mask sets and the GED distance sums (csrc/include/ged.h).
//
// Binary masks are packed once into 64-bit words (32x smaller than float32, so a whole image's K masks
// stay in cache), then every intersection is a popcount of an AND: exact, and on AVX-512 VPOPCNTDQ
// eight words per instruction. The GED sums are reduced as the counts are produced, so no K x K matrix is
// ever stored. Soft masks take ATen's BLAS for their Gram matrix instead (csrc/ged_op.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "cpu_isa.h"
#include "ged.h"

namespace harmonizer_fast {
namespace {

// The popcount loop dominates. It is built per instruction set (cpu_isa.h); at the avx512 level a CPU with
// AVX-512 VPOPCNTDQ (Ice Lake, Zen 4) gets a clone that counts eight words per instruction.
// counts[j] = popcount(a & rows[j]) for j < nrows; rows are `words` apart.
inline void and_popcount_row_impl(const uint64_t* __restrict__ a, const uint64_t* __restrict__ rows, int64_t nrows,
                                  int64_t words, int64_t* __restrict__ counts) {
  for (int64_t j = 0; j < nrows; ++j) {
    const uint64_t* __restrict__ r = rows + j * words;
    int64_t s = 0;
    for (int64_t w = 0; w < words; ++w) s += __builtin_popcountll(a[w] & r[w]);
    counts[j] = s;
  }
}
HF_ISA_CLONES(and_popcount_row_isa, and_popcount_row_impl)

#if HF_HAS_ISA_CLONES
__attribute__((target("arch=x86-64-v4,avx512vpopcntdq"), flatten)) void and_popcount_row_vpopcnt(
    const uint64_t* __restrict__ a, const uint64_t* __restrict__ rows, int64_t nrows, int64_t words,
    int64_t* __restrict__ counts) {
  and_popcount_row_impl(a, rows, nrows, words, counts);
}
#endif

void and_popcount_row(const uint64_t* __restrict__ a, const uint64_t* __restrict__ rows, int64_t nrows,
                      int64_t words, int64_t* __restrict__ counts) {
#if HF_HAS_ISA_CLONES
  if (cpu_isa() == CpuIsa::Avx512 && cpu_has_vpopcntdq()) return and_popcount_row_vpopcnt(a, rows, nrows, words, counts);
#endif
  and_popcount_row_isa(a, rows, nrows, words, counts);
}

// Value checks made while packing, at no extra pass over the data: a value outside [0, 1], NaN and Inf
// included (probabilities), or any value other than 0 and 1 (rater masks; NaN included).
enum class Check : int { None = 0, Probability = 1, Binary = 2 };

template <typename T>
inline bool bad_value(T v, Check check) {
  const float f = static_cast<float>(v);
  if (check == Check::Probability) return !(f >= 0.0f && f <= 1.0f);  // NaN fails both compares
  if (check == Check::Binary) return !(f == 0.0f || f == 1.0f);
  return false;
}

// One row, generic: bit k of word w is pixel 64 w + k.
template <typename T>
int64_t pack_row_generic(const T* __restrict__ row, int64_t pixels, int64_t w0, double threshold, Check check,
                         uint64_t* __restrict__ dst, bool& bad) {
  const int64_t words = packed_words(pixels);
  int64_t area = 0;
  for (int64_t w = w0; w < words; ++w) {
    const int64_t base = w * 64, n = std::min<int64_t>(64, pixels - base);
    uint64_t word = 0;
    for (int64_t k = 0; k < n; ++k) {
      word |= static_cast<uint64_t>(mask_bit(row[base + k], threshold)) << k;
      bad |= bad_value(row[base + k], check);
    }
    dst[w] = word;
    area += __builtin_popcountll(word);
  }
  return area;
}

#if defined(__x86_64__) && defined(__GNUC__)
// float32, AVX-512: four 16-lane compares give one 64-bit word; the checks are compares into the same
// mask registers. Returns the area of the whole words; the caller packs the tail.
__attribute__((target("avx512f"))) int64_t pack_row_f32_avx512(const float* __restrict__ row, int64_t full_words,
                                                                 float threshold, Check check,
                                                                 uint64_t* __restrict__ dst, bool& bad) {
  const __m512 thr = _mm512_set1_ps(threshold), zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  int64_t area = 0;
  __mmask16 bad_lanes = 0;
  for (int64_t w = 0; w < full_words; ++w) {
    uint64_t word = 0;
    for (int q = 0; q < 4; ++q) {
      const __m512 v = _mm512_loadu_ps(row + w * 64 + q * 16);
      word |= static_cast<uint64_t>(_mm512_cmp_ps_mask(v, thr, _CMP_GT_OQ)) << (16 * q);
      if (check == Check::Probability) {  // unordered compares: NaN counts as below 0 and above 1
        bad_lanes |= _mm512_cmp_ps_mask(v, zero, _CMP_NGE_UQ) | _mm512_cmp_ps_mask(v, one, _CMP_NLE_UQ);
      } else if (check == Check::Binary) {
        bad_lanes |= _mm512_cmp_ps_mask(v, zero, _CMP_NEQ_UQ) & _mm512_cmp_ps_mask(v, one, _CMP_NEQ_UQ);
      }
    }
    dst[w] = word;
    area += __builtin_popcountll(word);
  }
  bad |= bad_lanes != 0;
  return area;
}

// float32, AVX2: eight-lane compares and movemask.
__attribute__((target("avx2"))) int64_t pack_row_f32_avx2(const float* __restrict__ row, int64_t full_words,
                                                            float threshold, Check check, uint64_t* __restrict__ dst,
                                                            bool& bad) {
  const __m256 thr = _mm256_set1_ps(threshold), zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  int64_t area = 0;
  int bad_lanes = 0;
  for (int64_t w = 0; w < full_words; ++w) {
    uint64_t word = 0;
    for (int q = 0; q < 8; ++q) {
      const __m256 v = _mm256_loadu_ps(row + w * 64 + q * 8);
      word |= static_cast<uint64_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, thr, _CMP_GT_OQ))) << (8 * q);
      if (check == Check::Probability) {
        bad_lanes |= _mm256_movemask_ps(
            _mm256_or_ps(_mm256_cmp_ps(v, zero, _CMP_NGE_UQ), _mm256_cmp_ps(v, one, _CMP_NLE_UQ)));
      } else if (check == Check::Binary) {
        bad_lanes |= _mm256_movemask_ps(
            _mm256_and_ps(_mm256_cmp_ps(v, zero, _CMP_NEQ_UQ), _mm256_cmp_ps(v, one, _CMP_NEQ_UQ)));
      }
    }
    dst[w] = word;
    area += __builtin_popcountll(word);
  }
  bad |= bad_lanes != 0;
  return area;
}
#endif

template <typename T>
int64_t pack_row(const T* __restrict__ row, int64_t pixels, double threshold, Check check, uint64_t* __restrict__ dst,
                 bool& bad) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<T, float>) {
    const CpuIsa isa = cpu_isa();
    const int64_t full = pixels / 64;
    if (isa != CpuIsa::Baseline) {
      const int64_t area = isa == CpuIsa::Avx512 ? pack_row_f32_avx512(row, full, static_cast<float>(threshold), check, dst, bad)
                                                 : pack_row_f32_avx2(row, full, static_cast<float>(threshold), check, dst, bad);
      return area + pack_row_generic(row, pixels, full, threshold, check, dst, bad);
    }
  }
#endif
  return pack_row_generic(row, pixels, 0, threshold, check, dst, bad);
}

struct Packed {
  std::vector<uint64_t> words;
  std::vector<int64_t> areas;
  int64_t stride = 0;  // words per mask
};

// Pack `rows` masks of `pixels` values (contiguous); raises ValueError naming `op` and `name` when a value
// fails `check`.
Packed pack(const at::Tensor& x, int64_t rows, int64_t pixels, double threshold, Check check, const char* op,
            const char* name) {
  Packed p;
  p.stride = packed_words(pixels);
  p.words.resize(static_cast<size_t>(rows * p.stride));
  p.areas.resize(static_cast<size_t>(rows));
  const at::Tensor src = x.scalar_type() == at::kBool ? x.view(at::kByte) : x;
  // bool and integer masks (0/255 included) are thresholded as they are; only floating values promise a probability
  if (check == Check::Probability && !at::isFloatingType(x.scalar_type())) check = Check::None;
  std::vector<char> bad_rows(static_cast<size_t>(rows), 0);
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "pack_masks", [&] {
    const scalar_t* data = src.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        bool bad = false;
        p.areas[r] = pack_row(data + r * pixels, pixels, threshold, check, p.words.data() + r * p.stride, bad);
        bad_rows[r] = bad;
      }
    });
  });
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK_VALUE(!bad_rows[r], op, ": ", name,
                      check == Check::Binary ? " must be binary masks (values 0 and 1 only)"
                                            : " must hold probabilities, finite and within [0, 1]");
  }
  return p;
}

inline double distance(int64_t inter, int64_t sa, int64_t sb, double eps, double empty_iou) {
  return 1.0 - pair_iou<double>(static_cast<double>(inter), static_cast<double>(sa), static_cast<double>(sb), eps,
                                empty_iou);
}

// Sum of distances of row i of `a` against all rows of `b` (one image's rows); `sym`: b is a, only j >= i are
// counted, j > i twice (the matrix is symmetric), the diagonal once unless `offdiag`.
double row_distance_sum(const Packed& a, int64_t a_row, const Packed& b, int64_t b_row0, int64_t nb, bool sym,
                        bool offdiag, double eps, double empty_iou, std::vector<int64_t>& counts) {
  const int64_t i = a_row - (sym ? b_row0 : 0);  // index of the row within its image, for sym
  const int64_t j0 = sym ? i : 0;
  const int64_t len = nb - j0;
  if (len <= 0) return 0.0;
  counts.resize(static_cast<size_t>(len));
  and_popcount_row(a.words.data() + a_row * a.stride, b.words.data() + (b_row0 + j0) * b.stride, len, a.stride,
                   counts.data());
  double s = 0.0;
  const int64_t sa = a.areas[a_row];
  for (int64_t t = 0; t < len; ++t) {
    const int64_t j = j0 + t;
    const double d = distance(counts[t], sa, b.areas[b_row0 + j], eps, empty_iou);
    if (!sym) {
      s += d;
    } else if (j == i) {
      if (!offdiag) s += d;
    } else {
      s += 2.0 * d;
    }
  }
  return s;
}

// Per-row partial sums of one symmetric (within-set) term, balanced over threads by pairing row t (long)
// with row k - 1 - t (short); the caller sums the partials in a fixed order.
void within_partials(const Packed& p, int64_t batch, int64_t k, bool offdiag, double eps, double empty_iou,
                     std::vector<double>& partial) {
  const int64_t half = (k + 1) / 2;
  partial.assign(static_cast<size_t>(batch * k), 0.0);
  at::parallel_for(0, batch * half, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int64_t> counts;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / half, lo = t % half, hi = k - 1 - lo;
      partial[b * k + lo] = row_distance_sum(p, b * k + lo, p, b * k, k, true, offdiag, eps, empty_iou, counts);
      if (hi != lo) {
        partial[b * k + hi] = row_distance_sum(p, b * k + hi, p, b * k, k, true, offdiag, eps, empty_iou, counts);
      }
    }
  });
}

}  // namespace

void overlap_binary_cpu(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, OverlapMode mode,
                        const OverlapArgs& args) {
  const Packed pa = pack(a, args.batch * args.ka, args.pixels, args.threshold, Check::Probability, "pairwise_iou", "a");
  const Packed pb = pack(b, args.batch * args.kb, args.pixels, args.threshold, Check::Probability, "pairwise_iou", "b");
  float* dst = out.mutable_data_ptr<float>();
  at::parallel_for(0, args.batch * args.ka, 1, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> counts(static_cast<size_t>(args.kb));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t bi = r / args.ka, b_row0 = bi * args.kb;
      and_popcount_row(pa.words.data() + r * pa.stride, pb.words.data() + b_row0 * pb.stride, args.kb, pa.stride,
                       counts.data());
      for (int64_t j = 0; j < args.kb; ++j) {
        dst[r * args.kb + j] =
            mode == OverlapMode::Gram
                ? static_cast<float>(counts[j])
                : static_cast<float>(pair_iou<double>(static_cast<double>(counts[j]), static_cast<double>(pa.areas[r]),
                                                      static_cast<double>(pb.areas[b_row0 + j]), args.eps,
                                                      args.empty_iou));
      }
    }
  });
}

void ged_sums_cpu(const at::Tensor& samples, const at::Tensor& raters, at::Tensor& sums, const GedArgs& g) {
  const Packed ps = pack(samples, g.batch * g.k, g.pixels, g.threshold, Check::Probability, "ged", "samples");
  const Packed pr = pack(raters, g.batch * g.n, g.pixels, 0.5, Check::Binary, "ged", "raters");
  std::vector<double> cross(static_cast<size_t>(g.batch * g.k));
  at::parallel_for(0, g.batch * g.k, 1, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> counts;
    for (int64_t r = r0; r < r1; ++r) {
      cross[r] = row_distance_sum(ps, r, pr, (r / g.k) * g.n, g.n, false, false, g.eps, g.empty_iou, counts);
    }
  });
  std::vector<double> within_s, within_r;
  within_partials(ps, g.batch, g.k, g.offdiag, g.eps, g.empty_iou, within_s);
  within_partials(pr, g.batch, g.n, g.offdiag, g.eps, g.empty_iou, within_r);
  double* out = sums.mutable_data_ptr<double>();
  for (int64_t b = 0; b < g.batch; ++b) {  // fixed order: deterministic
    double c = 0.0, s = 0.0, r = 0.0;
    for (int64_t i = 0; i < g.k; ++i) c += cross[b * g.k + i];
    for (int64_t i = 0; i < g.k; ++i) s += within_s[b * g.k + i];
    for (int64_t i = 0; i < g.n; ++i) r += within_r[b * g.n + i];
    out[b * 3 + 0] = c;
    out[b * 3 + 1] = s;
    out[b * 3 + 2] = r;
  }
}

}  // namespace harmonizer_fast
