// Pairwise overlaps of mask sets and the generalized energy distance (GED), docs/architecture.md, "Conventions".
// Element math and argument structs shared by csrc/cpu/ged.cpp and csrc/cuda/ged.cu.
//
// Every quantity comes from three numbers per pair (i, j): the intersection I = sum_p a_i(p) b_j(p) (a
// Gram matrix over pixels) and the areas S_a = sum_p a_i(p), S_b = sum_p b_j(p). Binary masks are
// packed into 64-bit words (bit k of word w is pixel 64 w + k, set when the value is > threshold), so I
// is a popcount of a bitwise AND and is exact; soft masks use their values directly.
#pragma once

#include <cstdint>
#include <type_traits>

#include "hf_common.h"

namespace harmonizer_fast {

// What an overlap launch produces.
enum class OverlapMode : int {
  Gram = 0,  // out[b, i, j] = I                                          (B, Ka, Kb)
  Iou = 1,   // out[b, i, j] = IoU                                        (B, Ka, Kb)
};

// IoU of one pair from its intersection and areas: I / (U + eps) with U = S_a + S_b - I, and `empty_iou`
// when the union is empty. eps = 1e-8, empty_iou = 0 is D-Persona's |A and B| / (|A or B| + 1e-8);
// eps = 0, empty_iou = 1 is PHiSeg's (0 / 0 read as a perfect match).
template <typename T>
HF_HOST_DEVICE T pair_iou(T inter, T area_a, T area_b, T eps, T empty_iou) {
  const T uni = area_a + area_b - inter;
  return uni > T(0) ? inter / (uni + eps) : empty_iou;
}

// The mask rule shared by the packers and the Python/Triton paths: a pixel is foreground when > threshold,
// compared as torch's `x > threshold` compares: fp64 masks against the double threshold, every other dtype
// in fp32 against the threshold rounded to fp32 (a float threshold made fp64 values within rounding of it,
// e.g. 0.3 + 1e-12 against 0.3, binarize differently from the torch and Triton paths).
template <typename T>
HF_HOST_DEVICE bool mask_bit(T v, double threshold) {
  if constexpr (std::is_same_v<T, double>) {
    return v > threshold;
  } else {
    return static_cast<float>(v) > static_cast<float>(threshold);
  }
}

HF_HOST_DEVICE int64_t packed_words(int64_t pixels) { return (pixels + 63) / 64; }

struct OverlapArgs {
  int64_t batch, ka, kb, pixels;  // a is (batch, ka, pixels), b is (batch, kb, pixels), both contiguous
  double threshold;               // binary masks: the packing threshold
  double eps, empty_iou;
};

// GED distance sums per image, written to sums[b * 3 + t] (double): t = 0 the cross term
// sum_{k,n} d(S_k, Y_n), t = 1 the within-sample term sum_{k,k'} d(S_k, S_k'), t = 2 the within-rater term;
// with `offdiag` the within terms skip k == k' (the unbiased estimator). d = 1 - pair_iou.
struct GedArgs {
  int64_t batch, k, n, pixels;
  double threshold;
  double eps, empty_iou;
  bool offdiag;
};

// CUDA: pairs per block side, and the byte layout of the launchers' workspace. One struct holds every offset,
// so the torch side sizes the workspace and the launchers find their parts from the same numbers: packed
// set A at 0 (its words, then one 64-bit area per row), packed set B at `set_b`, then for the GED sums one
// double partial per tile of each term (cross, within A, within B).
constexpr int kGedTile = 16;
inline int64_t packed_set_bytes(int64_t rows, int64_t pixels) { return rows * packed_words(pixels) * 8 + rows * 8; }
inline int64_t tiles(int64_t n) { return (n + kGedTile - 1) / kGedTile; }

struct GedWorkspace {
  int64_t set_b = 0;                                     // byte offset of packed set B
  int64_t cross = 0, within_a = 0, within_b = 0;         // byte offsets of the three terms' partials
  int64_t tiles_cross = 0, tiles_a = 0, tiles_b = 0;     // partials per image of each term
  int64_t bytes = 0;                                     // total size

  // Overlaps of (batch * ka) against (batch * kb) packed masks.
  static GedWorkspace overlap(const OverlapArgs& a) {
    GedWorkspace w;
    w.set_b = packed_set_bytes(a.batch * a.ka, a.pixels);
    w.bytes = w.cross = w.set_b + packed_set_bytes(a.batch * a.kb, a.pixels);
    return w;
  }
  // GED sums: samples (set A) and raters (set B) packed, then the partials.
  static GedWorkspace sums(const GedArgs& g) {
    GedWorkspace w = overlap(OverlapArgs{g.batch, g.k, g.n, g.pixels, g.threshold, g.eps, g.empty_iou});
    w.tiles_cross = tiles(g.k) * tiles(g.n);
    w.tiles_a = tiles(g.k) * tiles(g.k);
    w.tiles_b = tiles(g.n) * tiles(g.n);
    w.within_a = w.cross + g.batch * w.tiles_cross * 8;
    w.within_b = w.within_a + g.batch * w.tiles_a * 8;
    w.bytes = w.within_b + g.batch * w.tiles_b * 8;
    return w;
  }
};

// Raw-pointer CUDA launchers (csrc/cuda/ged.cu); `stream` is a cudaStream_t, the result a cudaError_t.
// Binary overlaps take a workspace of GedWorkspace::overlap(args).bytes; soft overlaps write the areas
// (accumulation type, batch * (ka + kb)) to `areas`.
int overlap_binary_cuda_launch(const void* a, DType a_dtype, const void* b, DType b_dtype, float* out,
                               OverlapMode mode, const OverlapArgs& args, void* workspace, void* stream);
int overlap_soft_cuda_launch(const void* a, const void* b, DType dtype, void* out, void* areas, OverlapMode mode,
                             const OverlapArgs& args, void* stream);
// GED sums take a workspace of GedWorkspace::sums(args).bytes and write sums[b * 3 + term] (double).
int ged_sums_cuda_launch(const void* samples, DType s_dtype, const void* raters, DType r_dtype, double* sums,
                         const GedArgs& args, void* workspace, void* stream);

}  // namespace harmonizer_fast
