// CUDA kernels for pairwise overlaps and GED distance sums (csrc/include/ged.h): plain CUDA C++ with
// raw-pointer launchers, no torch headers. The fallback when Triton is missing or fails on a GPU.
//
// Binary masks: a packing kernel turns each warp's 64 pixels into one 64-bit word with two ballots and
// counts the areas; a 16 x 16 tile kernel then counts intersections with __popcll over words staged in
// shared memory (the same bit layout and the same pair_iou as the CPU kernels). GED sums reduce each tile's
// distances through a fixed shared-memory tree into per-tile partials, and a last kernel adds the partials
// of each image in a fixed order: deterministic, and no K x K matrix is stored.
// Soft masks: the same tiling over float values (float32 accumulation, float64 for float64 inputs).
#include <cuda_runtime.h>

#include "cuda_types.cuh"
#include "ged.h"

namespace harmonizer_fast {
namespace {

constexpr int kTile = kGedTile;  // tile of kTile x kTile pairs per block, kTile x kTile threads
constexpr int kPackWarps = 8;

// Mask values as mask_bit compares them: fp64 stays fp64, every other dtype goes to fp32.
__device__ __forceinline__ float mask_value(uint8_t v) { return static_cast<float>(v); }
__device__ __forceinline__ double mask_value(double v) { return v; }
template <typename T>
__device__ __forceinline__ float mask_value(T v) {
  return static_cast<float>(to_acc(v));
}

// The floating types of every op, plus the uint8 masks that only the GED kernels take.
template <typename F>
int dispatch_mask_dtype(DType dtype, F&& f) {
  return dtype == DType::UInt8 ? f(uint8_t{}) : dispatch_dtype(dtype, f);
}

// One warp per (row, word): lanes read pixels 64 w + lane and 64 w + 32 + lane, two ballots form the word.
template <typename T>
__global__ void pack_kernel(const T* __restrict__ x, int64_t rows, int64_t pixels, double threshold,
                            uint64_t* __restrict__ words, unsigned long long* __restrict__ areas) {
  const int64_t nwords = packed_words(pixels);
  const int lane = threadIdx.x % 32;
  const int64_t task = static_cast<int64_t>(blockIdx.x) * kPackWarps + threadIdx.x / 32;
  if (task >= rows * nwords) return;  // whole warps exit together
  const int64_t row = task / nwords, w = task % nwords;
  const int64_t p0 = w * 64 + lane, p1 = p0 + 32;
  const bool b0 = p0 < pixels && mask_bit(mask_value(x[row * pixels + (p0 < pixels ? p0 : 0)]), threshold);
  const bool b1 = p1 < pixels && mask_bit(mask_value(x[row * pixels + (p1 < pixels ? p1 : 0)]), threshold);
  const unsigned lo = __ballot_sync(0xffffffffu, b0), hi = __ballot_sync(0xffffffffu, b1);
  if (lane == 0) {
    const uint64_t word = static_cast<uint64_t>(lo) | (static_cast<uint64_t>(hi) << 32);
    words[row * nwords + w] = word;
    atomicAdd(areas + row, static_cast<unsigned long long>(__popcll(word)));  // integer: order-independent
  }
}

struct Packed {
  const uint64_t* words;
  const unsigned long long* areas;
};

// Count the intersection of pair (i, j) = (row0_a + ty, row0_b + tx) over packed words.
__device__ int64_t tile_popcount(const uint64_t* a, const uint64_t* b, int64_t na, int64_t nb, int64_t nwords) {
  __shared__ uint64_t sa[kTile][kTile + 1];
  __shared__ uint64_t sb[kTile][kTile + 1];
  const int ty = threadIdx.y, tx = threadIdx.x;
  const int64_t ri = blockIdx.y * kTile + ty, rj = blockIdx.x * kTile + ty;
  int64_t count = 0;
  for (int64_t w0 = 0; w0 < nwords; w0 += kTile) {
    const int64_t w = w0 + tx;
    sa[ty][tx] = (ri < na && w < nwords) ? a[ri * nwords + w] : 0;
    sb[ty][tx] = (rj < nb && w < nwords) ? b[rj * nwords + w] : 0;
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kTile; ++t) count += __popcll(sa[ty][t] & sb[tx][t]);
    __syncthreads();
  }
  return count;
}

// Matrix modes: one block per (image, 16 x 16 tile of pairs).
__global__ void overlap_binary_kernel(const uint64_t* __restrict__ a_words, const unsigned long long* __restrict__ a_area,
                                      const uint64_t* __restrict__ b_words, const unsigned long long* __restrict__ b_area,
                                      float* __restrict__ out, OverlapArgs args, int mode) {
  const int64_t bi = blockIdx.z, nwords = packed_words(args.pixels);
  const int64_t i = blockIdx.y * kTile + threadIdx.y, j = blockIdx.x * kTile + threadIdx.x;
  const int64_t c =
      tile_popcount(a_words + bi * args.ka * nwords, b_words + bi * args.kb * nwords, args.ka, args.kb, nwords);
  if (i >= args.ka || j >= args.kb) return;
  const double inter = static_cast<double>(c);
  const double v = mode == static_cast<int>(OverlapMode::Gram)
                       ? inter
                       : pair_iou<double>(inter, static_cast<double>(a_area[bi * args.ka + i]),
                                          static_cast<double>(b_area[bi * args.kb + j]), args.eps, args.empty_iou);
  out[(bi * args.ka + i) * args.kb + j] = static_cast<float>(v);
}

// Sum of one GED term's distances over a tile, to partials[bi * tiles + tile]. `sym`: b is a; tiles below
// the diagonal are skipped, tiles above it count twice, and `offdiag` drops i == j.
__global__ void distance_sum_kernel(const uint64_t* __restrict__ a_words, const unsigned long long* __restrict__ a_area,
                                    const uint64_t* __restrict__ b_words, const unsigned long long* __restrict__ b_area,
                                    int64_t na, int64_t nb, int64_t pixels, double eps, double empty_iou, bool sym,
                                    bool offdiag, double* __restrict__ partials) {
  __shared__ double red[kTile * kTile];
  const int64_t bi = blockIdx.z, nwords = packed_words(pixels);
  const int64_t tiles = static_cast<int64_t>(gridDim.x) * gridDim.y;
  const int64_t tile = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  const int tid = threadIdx.y * kTile + threadIdx.x;
  if (sym && blockIdx.x < blockIdx.y) {  // whole block exits together
    if (tid == 0) partials[bi * tiles + tile] = 0.0;
    return;
  }
  const int64_t i = blockIdx.y * kTile + threadIdx.y, j = blockIdx.x * kTile + threadIdx.x;
  const int64_t c = tile_popcount(a_words + bi * na * nwords, b_words + bi * nb * nwords, na, nb, nwords);
  double d = 0.0;
  if (i < na && j < nb && !(offdiag && i == j)) {
    d = 1.0 - pair_iou<double>(static_cast<double>(c), static_cast<double>(a_area[bi * na + i]),
                               static_cast<double>(b_area[bi * nb + j]), eps, empty_iou);
  }
  red[tid] = d;
  __syncthreads();
  for (int s = kTile * kTile / 2; s > 0; s /= 2) {  // fixed tree: deterministic
    if (tid < s) red[tid] += red[tid + s];
    __syncthreads();
  }
  if (tid == 0) partials[bi * tiles + tile] = (sym && blockIdx.x > blockIdx.y ? 2.0 : 1.0) * red[0];
}

// sums[bi * 3 + term] = sum of that term's partials, in tile order.
__global__ void sum_partials_kernel(const double* __restrict__ partials, int64_t tiles, int term,
                                    double* __restrict__ sums) {
  const int64_t bi = blockIdx.x;
  if (threadIdx.x != 0) return;
  double s = 0.0;
  for (int64_t t = 0; t < tiles; ++t) s += partials[bi * tiles + t];
  sums[bi * 3 + term] = s;
}

// Soft masks: intersections sum_p a(p) b(p) over the same tiles, float values staged in shared memory.
template <typename T>
__global__ void overlap_soft_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                    const typename AccType<T>::type* __restrict__ a_area,
                                    const typename AccType<T>::type* __restrict__ b_area,
                                    typename AccType<T>::type* __restrict__ out, OverlapArgs args, int mode) {
  using Acc = typename AccType<T>::type;
  __shared__ Acc sa[kTile][kTile + 1];
  __shared__ Acc sb[kTile][kTile + 1];
  const int64_t bi = blockIdx.z;
  const int ty = threadIdx.y, tx = threadIdx.x;
  const int64_t ri = blockIdx.y * kTile + ty, rj = blockIdx.x * kTile + ty;
  const T* a_img = a + bi * args.ka * args.pixels;
  const T* b_img = b + bi * args.kb * args.pixels;
  Acc acc = 0;
  for (int64_t p0 = 0; p0 < args.pixels; p0 += kTile) {
    const int64_t p = p0 + tx;
    sa[ty][tx] = (ri < args.ka && p < args.pixels) ? to_acc(a_img[ri * args.pixels + p]) : Acc(0);
    sb[ty][tx] = (rj < args.kb && p < args.pixels) ? to_acc(b_img[rj * args.pixels + p]) : Acc(0);
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kTile; ++t) acc += sa[ty][t] * sb[tx][t];
    __syncthreads();
  }
  const int64_t i = blockIdx.y * kTile + ty, j = blockIdx.x * kTile + tx;
  if (i >= args.ka || j >= args.kb) return;
  out[(bi * args.ka + i) * args.kb + j] =
      mode == static_cast<int>(OverlapMode::Gram)
          ? acc
          : pair_iou<Acc>(acc, a_area[bi * args.ka + i], b_area[bi * args.kb + j], static_cast<Acc>(args.eps),
                          static_cast<Acc>(args.empty_iou));
}

// Row sums (soft areas): one block per row, fixed tree.
template <typename T>
__global__ void row_sum_kernel(const T* __restrict__ x, int64_t pixels, typename AccType<T>::type* __restrict__ out) {
  using Acc = typename AccType<T>::type;
  __shared__ Acc red[256];
  Acc s = 0;
  for (int64_t p = threadIdx.x; p < pixels; p += blockDim.x) s += to_acc(x[blockIdx.x * pixels + p]);
  red[threadIdx.x] = s;
  __syncthreads();
  for (int st = blockDim.x / 2; st > 0; st /= 2) {
    if (threadIdx.x < st) red[threadIdx.x] += red[threadIdx.x + st];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = red[0];
}

// Pack `rows` masks into the workspace: words first, then one area per row.
int pack(const void* x, DType dtype, int64_t rows, int64_t pixels, double threshold, void* workspace,
         cudaStream_t st, Packed* packed) {
  const int64_t nwords = packed_words(pixels);
  auto* words = static_cast<uint64_t*>(workspace);
  auto* areas = reinterpret_cast<unsigned long long*>(words + rows * nwords);
  cudaError_t err = cudaMemsetAsync(areas, 0, static_cast<size_t>(rows) * sizeof(unsigned long long), st);
  if (err != cudaSuccess) return err;
  const int64_t tasks = rows * nwords;
  const unsigned blocks = static_cast<unsigned>((tasks + kPackWarps - 1) / kPackWarps);
  const int e = dispatch_mask_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    pack_kernel<T><<<blocks, kPackWarps * 32, 0, st>>>(static_cast<const T*>(x), rows, pixels, threshold, words, areas);
    return static_cast<int>(cudaGetLastError());
  });
  *packed = Packed{words, areas};
  return e;
}

// CUDA caps grid z at 65,535: the launchers below run larger batches in chunks of images (pointer offsets),
// so B = 10^5 images is several launches rather than a launch failure.
constexpr int64_t kMaxGridZ = 65535;

int64_t chunk_of(int64_t batch, int64_t b0) { return batch - b0 < kMaxGridZ ? batch - b0 : kMaxGridZ; }

dim3 tile_grid(int64_t na, int64_t nb, int64_t batch) {
  return dim3(static_cast<unsigned>((nb + kTile - 1) / kTile), static_cast<unsigned>((na + kTile - 1) / kTile),
              static_cast<unsigned>(batch));
}

}  // namespace

int overlap_binary_cuda_launch(const void* a, DType a_dtype, const void* b, DType b_dtype, float* out,
                               OverlapMode mode, const OverlapArgs& args, void* workspace, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  const GedWorkspace ws = GedWorkspace::overlap(args);
  Packed pa{}, pb{};
  int err = pack(a, a_dtype, args.batch * args.ka, args.pixels, args.threshold, workspace, st, &pa);
  if (err != cudaSuccess) return err;
  err = pack(b, b_dtype, args.batch * args.kb, args.pixels, args.threshold, static_cast<char*>(workspace) + ws.set_b,
             st, &pb);
  if (err != cudaSuccess) return err;
  const int64_t nw = packed_words(args.pixels);
  for (int64_t b0 = 0; b0 < args.batch; b0 += kMaxGridZ) {
    OverlapArgs chunk = args;
    chunk.batch = chunk_of(args.batch, b0);
    overlap_binary_kernel<<<tile_grid(args.ka, args.kb, chunk.batch), dim3(kTile, kTile), 0, st>>>(
        pa.words + b0 * args.ka * nw, pa.areas + b0 * args.ka, pb.words + b0 * args.kb * nw, pb.areas + b0 * args.kb,
        out + b0 * args.ka * args.kb, chunk, static_cast<int>(mode));
  }
  return cudaGetLastError();
}

int overlap_soft_cuda_launch(const void* a, const void* b, DType dtype, void* out, void* areas, OverlapMode mode,
                             const OverlapArgs& args, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename AccType<T>::type;
    auto* o = static_cast<Acc*>(out);
    Acc* a_area = static_cast<Acc*>(areas);
    Acc* b_area = a_area + args.batch * args.ka;
    row_sum_kernel<T><<<static_cast<unsigned>(args.batch * args.ka), 256, 0, st>>>(static_cast<const T*>(a),
                                                                                   args.pixels, a_area);
    row_sum_kernel<T><<<static_cast<unsigned>(args.batch * args.kb), 256, 0, st>>>(static_cast<const T*>(b),
                                                                                   args.pixels, b_area);
    for (int64_t b0 = 0; b0 < args.batch; b0 += kMaxGridZ) {
      OverlapArgs chunk = args;
      chunk.batch = chunk_of(args.batch, b0);
      overlap_soft_kernel<T><<<tile_grid(args.ka, args.kb, chunk.batch), dim3(kTile, kTile), 0, st>>>(
          static_cast<const T*>(a) + b0 * args.ka * args.pixels, static_cast<const T*>(b) + b0 * args.kb * args.pixels,
          a_area + b0 * args.ka, b_area + b0 * args.kb, o + b0 * args.ka * args.kb, chunk, static_cast<int>(mode));
    }
    return static_cast<int>(cudaGetLastError());
  });
}

int ged_sums_cuda_launch(const void* samples, DType s_dtype, const void* raters, DType r_dtype, double* sums,
                         const GedArgs& g, void* workspace, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  const GedWorkspace ws = GedWorkspace::sums(g);
  char* base = static_cast<char*>(workspace);
  Packed ps{}, pr{};
  int err = pack(samples, s_dtype, g.batch * g.k, g.pixels, g.threshold, workspace, st, &ps);
  if (err != cudaSuccess) return err;
  err = pack(raters, r_dtype, g.batch * g.n, g.pixels, 0.5, base + ws.set_b, st, &pr);
  if (err != cudaSuccess) return err;
  auto* p_cross = reinterpret_cast<double*>(base + ws.cross);
  auto* p_samples = reinterpret_cast<double*>(base + ws.within_a);
  auto* p_raters = reinterpret_cast<double*>(base + ws.within_b);
  const dim3 threads(kTile, kTile);
  const int64_t nw = packed_words(g.pixels);
  for (int64_t b0 = 0; b0 < g.batch; b0 += kMaxGridZ) {
    const int64_t nb = chunk_of(g.batch, b0);
    const uint64_t *sw = ps.words + b0 * g.k * nw, *rw = pr.words + b0 * g.n * nw;
    const unsigned long long *sa = ps.areas + b0 * g.k, *ra = pr.areas + b0 * g.n;
    distance_sum_kernel<<<tile_grid(g.k, g.n, nb), threads, 0, st>>>(sw, sa, rw, ra, g.k, g.n, g.pixels, g.eps,
                                                                      g.empty_iou, false, false,
                                                                      p_cross + b0 * ws.tiles_cross);
    distance_sum_kernel<<<tile_grid(g.k, g.k, nb), threads, 0, st>>>(sw, sa, sw, sa, g.k, g.k, g.pixels, g.eps,
                                                                      g.empty_iou, true, g.offdiag,
                                                                      p_samples + b0 * ws.tiles_a);
    distance_sum_kernel<<<tile_grid(g.n, g.n, nb), threads, 0, st>>>(rw, ra, rw, ra, g.n, g.n, g.pixels, g.eps,
                                                                      g.empty_iou, true, g.offdiag,
                                                                      p_raters + b0 * ws.tiles_b);
  }
  const unsigned nb = static_cast<unsigned>(g.batch);
  sum_partials_kernel<<<nb, 32, 0, st>>>(p_cross, ws.tiles_cross, 0, sums);
  sum_partials_kernel<<<nb, 32, 0, st>>>(p_samples, ws.tiles_a, 1, sums);
  sum_partials_kernel<<<nb, 32, 0, st>>>(p_raters, ws.tiles_b, 2, sums);
  return cudaGetLastError();
}

}  // namespace harmonizer_fast
