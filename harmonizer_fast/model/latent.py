"""Prior and posterior nets of the probabilistic U-Net (paper Eq. 1, 8): axis-aligned Gaussians over a
low-dimensional latent z. The prior sees the image, the posterior the image and one rater's mask."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Independent, Normal

from .cpu_paths import channels_last_pays

LOG_SIGMA_MIN, LOG_SIGMA_MAX = -5.0, 2.0
SIGMA_BOUNDS = ("soft", "hard")
# raw 0 maps to log sigma 0 under the soft bound (sigma 1, the standard normal the heads start from)
_SOFT_SHIFT = math.log(-LOG_SIGMA_MIN / LOG_SIGMA_MAX)


def bound_log_sigma(raw: Tensor, bound: str = "soft") -> Tensor:
    """Log-sigma within [LOG_SIGMA_MIN, LOG_SIGMA_MAX].

    ``"hard"`` clamps, as before: a raw value past a bound has no gradient at all, so once a step overshoots
    (seen on LIDC: one latent dimension's raw log-sigma at 3.5 after a few epochs) neither the KL nor
    anything else can bring it back, and that dimension's sigma stays at e^2 for every image. ``"soft"``
    maps the raw value through a scaled sigmoid, ``min + (max - min) * sigmoid(raw + shift)``: the same
    bounds, the identity's slope near 0 within 30 %, and a gradient everywhere."""
    if bound == "hard":
        return raw.clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX)
    return LOG_SIGMA_MIN + (LOG_SIGMA_MAX - LOG_SIGMA_MIN) * torch.sigmoid(raw + _SOFT_SHIFT)


class AxisAlignedConvGaussian(nn.Module):
    """Stages of ``convs_per_stage`` 3x3 conv + ReLU with 2x2 average pooling between, a spatial mean and a
    1x1 conv to the mean and log-sigma of a ``latent_dim``-d Gaussian with diagonal covariance."""

    def __init__(self, in_channels: int, channels: Sequence[int], convs_per_stage: int, latent_dim: int,
                 init: str = "he", sigma_bound: str = "soft") -> None:  # fmt: skip
        super().__init__()
        if sigma_bound not in SIGMA_BOUNDS:
            raise ValueError(f"AxisAlignedConvGaussian: sigma_bound must be one of {SIGMA_BOUNDS}, got {sigma_bound!r}")
        self.sigma_bound = sigma_bound
        layers: list[nn.Module] = []
        cin = in_channels
        for i, cout in enumerate(channels):
            if i > 0:
                layers.append(nn.AvgPool2d(2, 2, ceil_mode=True))
            for _ in range(convs_per_stage):
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
                cin = cout
        self.encoder = nn.Sequential(*layers)
        self.to_params = nn.Conv2d(cin, 2 * latent_dim, 1)
        self.latent_dim = latent_dim
        if init == "he":
            # He initialization (as the probabilistic U-Net's code): with torch's default conv init each of the
            # ~10 conv + ReLU layers scales the signal by about 1/sqrt(3) and the biases dominate, so the
            # pooled features, and with them the prior, vary across images by ~1e-6 of their size at the start
            # (tests/test_latent_stats.py), and the image's gradient path is as weak.
            for m in self.encoder:
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    nn.init.zeros_(m.bias)
        elif init != "torch":
            raise ValueError(f"AxisAlignedConvGaussian: init must be 'he' or 'torch', got {init!r}")
        # Start near the standard normal (as the probabilistic U-Net initializes its head).
        nn.init.normal_(self.to_params.weight, std=1e-3)
        nn.init.zeros_(self.to_params.bias)

    def forward(self, x: Tensor) -> Independent:
        # The layout is set on the first conv's output: a 1-2 channel input's NCHW and NHWC strides coincide.
        h = self.encoder[0](x)
        if channels_last_pays(h):
            h = h.contiguous(memory_format=torch.channels_last)
        h = self.encoder[1:](h).mean((2, 3), keepdim=True)
        mu, log_sigma = self.to_params(h).flatten(1).chunk(2, dim=1)
        # sigma within [e^-5, e^2]: with the paper's small lambda_KL the GED loss's diversity term could inflate
        # the prior without bound when it trained sigma (seen on LIDC: sigma 2e4, every prior sample empty).
        # validate_args=False: a NaN must reach the trainer's guard (which says where it happened), not
        # stop inside torch.distributions; it also saves a check per call.
        return Independent(
            Normal(mu, torch.exp(bound_log_sigma(log_sigma, self.sigma_bound)), validate_args=False),
            1,
            validate_args=False,
        )


def reparameterize(dist: Independent, eps: Tensor, *, fixed_mean: bool = False, fixed_sigma: bool = False) -> Tensor:
    """``mean + stddev * eps`` for standard-normal draws ``eps`` of shape ``(B, latent)`` or ``(B, S, latent)``
    (S latents per image); differentiable in the distribution's parameters, except those held ``fixed_*``
    (detached: the samples still move with the prior, but no gradient reaches it through them)."""
    mean, std = dist.mean, dist.stddev
    mean, std = (mean.detach() if fixed_mean else mean), (std.detach() if fixed_sigma else std)
    if eps.dim() == 3:
        mean, std = mean[:, None], std[:, None]
    return mean + std * eps.to(mean.device, mean.dtype)


def kl_divergence(posterior: Independent, prior: Independent) -> Tensor:
    """KL(posterior || prior) per image, ``(B,)``, in closed form (both diagonal Gaussians)."""
    return torch.distributions.kl_divergence(posterior, prior)


def with_masks(images: Tensor, mask: Tensor) -> Tensor:
    """Posterior input: the image with one rater mask as an extra channel."""
    return torch.cat([images, mask.to(images.dtype).unsqueeze(1)], dim=1)


__all__ = ["AxisAlignedConvGaussian", "bound_log_sigma", "kl_divergence", "reparameterize", "with_masks"]
