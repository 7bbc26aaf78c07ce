// The probabilistic U-Net's sampling head "fcomb" for K latent samples at once (docs/architecture.md, "Model").
// The first 1x1 conv of fcomb on concat(f, z) splits into W_f f + b (computed once per image: `base`) plus
// W_z z (one bias vector per sample); what remains per pixel and sample is a small MLP:
//   h = relu(base[:, p] + bias_k);  h = relu(W_l h + b_l) for each hidden layer;  out = sigmoid(w . h + b).
// Element math shared by csrc/cpu/fcomb.cpp (and the Triton kernel's docstring).
#pragma once

#include <cmath>
#include <cstdint>

#include "hf_common.h"

namespace harmonizer_fast {

struct FcombArgs {
  int64_t b, k, c, pixels;  // base (b, c, pixels), bias (b, k, c), out (b, k, pixels); all contiguous
  int64_t layers;           // hidden (c x c) layers after the split first layer
};

// NaN passes through, as in torch.relu: a NaN feature must give a NaN probability, not a plausible one.
template <typename T>
HF_HOST_DEVICE T relu(T v) {
  return v < T(0) ? T(0) : v;
}

template <typename T>
HF_HOST_DEVICE T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

}  // namespace harmonizer_fast
