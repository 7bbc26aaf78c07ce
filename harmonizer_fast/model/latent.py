"""Prior and posterior nets of the probabilistic U-Net (paper Eq. 1, 8): axis-aligned Gaussians over a
low-dimensional latent z. The prior sees the image, the posterior the image and one rater's mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Independent, Normal

from .cpu_paths import channels_last_pays

LOG_SIGMA_MIN, LOG_SIGMA_MAX = -5.0, 2.0


class AxisAlignedConvGaussian(nn.Module):
    """Stages of ``convs_per_stage`` 3x3 conv + ReLU with 2x2 average pooling between, a spatial mean and a
    1x1 conv to the mean and log-sigma of a ``latent_dim``-d Gaussian with diagonal covariance."""

    def __init__(self, in_channels: int, channels: Sequence[int], convs_per_stage: int, latent_dim: int) -> None:
        super().__init__()
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
        # sigma within [e^-5, e^2]: with the paper's small lambda_KL the GED loss's diversity term can otherwise
        # inflate the prior without bound (seen on LIDC: sigma 2e4, every prior sample an empty mask).
        # validate_args=False: a NaN must reach the trainer's guard (which says where it happened), not
        # stop inside torch.distributions; it also saves a check per call.
        return Independent(
            Normal(mu, torch.exp(log_sigma.clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX)), validate_args=False),
            1,
            validate_args=False,
        )


def reparameterize(dist: Independent, eps: Tensor) -> Tensor:
    """``mean + stddev * eps`` for standard-normal draws ``eps`` of shape ``(B, latent)`` or ``(B, S, latent)``
    (S latents per image); differentiable in the distribution's parameters."""
    mean, std = dist.mean, dist.stddev
    if eps.dim() == 3:
        mean, std = mean[:, None], std[:, None]
    return mean + std * eps.to(mean.device, mean.dtype)


def kl_divergence(posterior: Independent, prior: Independent) -> Tensor:
    """KL(posterior || prior) per image, ``(B,)``, in closed form (both diagonal Gaussians)."""
    return torch.distributions.kl_divergence(posterior, prior)


def with_masks(images: Tensor, mask: Tensor) -> Tensor:
    """Posterior input: the image with one rater mask as an extra channel."""
    return torch.cat([images, mask.to(images.dtype).unsqueeze(1)], dim=1)


__all__ = ["AxisAlignedConvGaussian", "kl_divergence", "reparameterize", "with_masks"]
