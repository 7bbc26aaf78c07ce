"""The sampling head "fcomb" of the probabilistic U-Net: z tiled over the image, concatenated with the
features f, then 1x1 convs (paper config 22 -> 16 -> 16 -> 16 -> 1).

Three routes to the same numbers:

- :meth:`Fcomb.naive` repeats the features K times and concatenates z, as earlier code does (the reference);
- :meth:`Fcomb.logits` is differentiable and splits the first conv: ``W [f; z] = W_f f + W_z z``, so the
  per-image term is computed once and each sample only adds a bias; the remaining layers run over B x K;
- :meth:`Fcomb.probabilities` is the inference hot path: the same split, then the fused per-pixel MLP of
  :func:`harmonizer_fast.ops.fcomb.fcomb_head` (C++ on CPU, Triton on GPU), which never stores the
  K x C x H x W activations.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.fcomb import fcomb_head

FOREGROUND_PRIOR = 0.05


class Fcomb(nn.Module):
    def __init__(self, feat_channels: int, latent_dim: int, channels: int, layers: int, init: str = "he") -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"Fcomb: layers must be >= 1, got {layers}")
        self.feat_channels = feat_channels
        self.first = nn.Conv2d(feat_channels + latent_dim, channels, 1)
        self.hidden = nn.ModuleList(nn.Conv2d(channels, channels, 1) for _ in range(layers - 1))
        self.last = nn.Conv2d(channels, 1, 1)
        if init == "he":  # see HarmonizerConfig.init: the features' variation reaches the logits at the start
            for conv in (self.first, *self.hidden):
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.zeros_(conv.bias)
            nn.init.kaiming_normal_(self.last.weight, nonlinearity="linear")
        elif init != "torch":
            raise ValueError(f"Fcomb: init must be 'he' or 'torch', got {init!r}")
        # Start from a foreground probability of 5% (lesions are a few percent of the pixels): the head then
        # learns "lesion = active units" instead of parking lesion pixels at the bias with every ReLU off,
        # a mode it leaves only slowly (measured on synthetic data: loss 0.25 against 0.52 after 150 steps).
        nn.init.constant_(self.last.bias, math.log(FOREGROUND_PRIOR / (1 - FOREGROUND_PRIOR)))

    def _split(self) -> tuple[Tensor, Tensor]:
        w = self.first.weight.flatten(1)  # (C, D + latent)
        return w[:, : self.feat_channels], w[:, self.feat_channels :]

    def naive(self, f: Tensor, z: Tensor) -> Tensor:
        """Logits ``(B, K, H, W)`` by tiling: f repeated K times, z broadcast over the image."""
        b, k, d = z.shape
        h, w = f.shape[-2:]
        x = torch.cat([f.repeat_interleave(k, dim=0), z.reshape(b * k, d, 1, 1).expand(-1, -1, h, w)], dim=1)
        x = F.relu(self.first(x))
        for conv in self.hidden:
            x = F.relu(conv(x))
        return self.last(x).reshape(b, k, h, w)

    def logits(self, f: Tensor, z: Tensor) -> Tensor:
        """Differentiable logits ``(B, K, H, W)`` for latents z ``(B, K, latent)``, first conv split."""
        b, k, _ = z.shape
        w_f, w_z = self._split()
        base = F.conv2d(f, w_f[:, :, None, None], self.first.bias)  # once per image
        x = F.relu(base[:, None] + (z @ w_z.t())[..., None, None]).flatten(0, 1)  # (B K, C, H, W)
        for conv in self.hidden:
            x = F.relu(conv(x))
        return self.last(x).reshape(b, k, *f.shape[-2:])

    def decoder(self, f: Tensor) -> Callable[[Tensor], Tensor]:
        """``decode(z)``: the logits of :meth:`logits` for latents z ``(B, K, latent)``, as ``(B, K, H W)``, for
        many decodes of the same features (an optimization over z). The per-image term is computed once and
        the layers run pixel-major, as matrix products over channels: on a CPU a 1x1 convolution over 16
        channels costs about twice as much, forward and backward."""
        w_f, w_z = self._split()
        base = F.conv2d(f, w_f[:, :, None, None], self.first.bias).flatten(2).transpose(1, 2)  # (B, HW, C)
        layers = [(c.weight.flatten(1).t(), c.bias) for c in self.hidden]
        last_w, last_b = self.last.weight.flatten(), self.last.bias

        def decode(z: Tensor) -> Tensor:
            x = F.relu(base[:, None] + (z @ w_z.t())[:, :, None, :])  # (B, K, HW, C)
            for w, b in layers:
                x = F.relu(x @ w + b)
            return x @ last_w + last_b

        return decode

    @torch.no_grad()
    def probabilities(self, f: Tensor, z: Tensor) -> Tensor:
        """Sigmoid probabilities ``(B, K, H, W)`` through the fused head (inference only)."""
        w_f, w_z = self._split()
        base = F.conv2d(f, w_f[:, :, None, None], self.first.bias)
        bias = z.to(base.dtype) @ w_z.t()
        if self.hidden:
            hidden_w = torch.stack([c.weight.flatten(1) for c in self.hidden])
            hidden_b = torch.stack([c.bias for c in self.hidden])
        else:
            hidden_w = base.new_zeros((0, base.shape[1], base.shape[1]))
            hidden_b = base.new_zeros((0, base.shape[1]))
        return fcomb_head(base, bias, hidden_w, hidden_b, self.last.weight.flatten(), self.last.bias)
