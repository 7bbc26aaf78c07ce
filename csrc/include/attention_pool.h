// Token-attention pooling core (paper Eq. 2, see harmonizer_fast/ops/attention_pool.py):
//   z[b] = softmax(a[b] x[b]) x[b]^T,  lse[b] = logsumexp(a[b] x[b])   with x[b] (C, N), a[b] (M, C).
// Shared by csrc/cpu/attention_pool.cpp and csrc/cuda/attention_pool.cu. Each batch item's positions
// are split into `splits` chunks; each chunk keeps a running max, a running sum and an M x C accumulator
// (online softmax), and the chunks are merged in a fixed order, so results do not depend on threads.
#pragma once

#include <cmath>
#include <cstdint>

#include "hf_common.h"

namespace harmonizer_fast {

struct AttnPoolArgs {
  int64_t b, c, n, m;   // x (B, C, N = H * W) with unit stride along N; a, z, dz (B, M, C) contiguous
  int64_t x_sb, x_sc;   // x strides of the batch and channel dims
  int64_t splits;       // position chunks per batch item
};

HF_HOST_DEVICE float hf_exp(float v) { return expf(v); }
HF_HOST_DEVICE double hf_exp(double v) { return exp(v); }
HF_HOST_DEVICE float hf_log(float v) { return logf(v); }
HF_HOST_DEVICE double hf_log(double v) { return log(v); }

// Rescale factor for a running softmax state when its max moves from m_old to m_new (exp(-inf) = 0).
template <typename A>
HF_HOST_DEVICE A softmax_rescale(A m_old, A m_new) {
  return m_old == -INFINITY ? A(0) : hf_exp(m_old - m_new);
}

// Chunks per batch item: about 4096 positions each, at most 64; independent of the thread count so
// that results are the same on every machine.
inline int64_t attention_pool_splits(int64_t n) {
  int64_t s = (n + 4095) / 4096;
  return s < 1 ? 1 : (s > 64 ? 64 : s);
}

// Raw-pointer CUDA launchers (csrc/cuda/attention_pool.cu); `stream` is a cudaStream_t and the result a
// cudaError_t. Accumulators (`part_*`, `lse`, `d`) are float, or double for Float64.
// Forward writes per-chunk partials: part_m, part_l (B, splits, M) and part_acc (B, splits, M, C).
int attention_pool_forward_cuda_launch(const void* x, const void* a, void* part_m, void* part_l, void* part_acc,
                                       DType dtype, const AttnPoolArgs& g, void* stream);
// Backward writes dx (B, C, N) and per-chunk partials of da (B, splits, M, C); `d` = rowsum(dz * z) (B, M).
int attention_pool_backward_cuda_launch(const void* dz, const void* x, const void* a, const void* lse,
                                        const void* d, void* dx, void* part_da, DType dtype, const AttnPoolArgs& g,
                                        void* stream);

}  // namespace harmonizer_fast
