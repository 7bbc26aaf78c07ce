"""Is the latent space doing its job? Statistics of the prior and posterior nets (paper Eq. 1, 8) over a set
of images, and the flags of a collapsed prior.

A probabilistic U-Net's prior p(z | x) should say, per image, where the raters' readings lie in latent
space: its mean should move with the image and its sigma should be about the spread of the posteriors
q(z | x, A_i) of that image's raters. Two ways it fails, both measured here:

- **image-independent prior**: the prior mean is the same for every image (its spread across images is a
  small fraction of sigma), so every image's samples come from one Gaussian and the sample spread cannot
  follow how much the raters disagree on a given image;
- **sigma at a clamp**: sigma sits at the bound of :data:`~harmonizer_fast.model.latent.LOG_SIGMA_MAX` (or
  MIN), where the network no longer controls it.

:func:`latent_statistics` reports, over the images given: the prior mean's std across images per latent
dimension and its ratio to the mean sigma (``mean_spread_ratio``), sigma's quantiles, the share of sigmas at a
clamp, the KL(q(z | x, A_i) || p(z | x)) per latent dimension (mean over images and raters), and how far the
raters' posterior means lie apart in units of the prior's sigma. :func:`collapse_flags` turns them into
the one-line findings that ``evaluate`` and the compare report print.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from .data import MultiRaterData
from .model.latent import LOG_SIGMA_MAX, LOG_SIGMA_MIN, with_masks
from .model.net import HarmonizerNet

# A prior whose mean moves across images by less than this fraction of its sigma is image-independent;
# more than this share of sigmas at a clamp is a clamped prior ([science] proof thresholds).
MIN_SPREAD_RATIO = 0.1
MAX_CLAMPED_SHARE = 0.05
_CLAMP_TOL = 1e-3  # in log-sigma
QUANTILES = ("0.05", "0.25", "0.5", "0.75", "0.95")


@torch.no_grad()
def _gaussians(model: HarmonizerNet, data: MultiRaterData, idx: np.ndarray, batch: int, device: torch.device):
    """Prior means and log-sigmas ``(N, D)`` and every rater's posterior means and log-sigmas ``(N, R, D)``."""
    prior_mu, prior_ls, post_mu, post_ls = [], [], [], []
    for s in range(0, len(idx), batch):
        part = idx[s : s + batch]
        x = torch.from_numpy(data.images[part]).to(device)
        masks = torch.from_numpy(data.masks[part]).to(device)
        prior = model.prior(x)
        prior_mu.append(prior.mean.double().cpu())
        prior_ls.append(prior.stddev.log().double().cpu())
        posts = [model.posterior(with_masks(x, masks[:, r])) for r in range(masks.shape[1])]
        post_mu.append(torch.stack([q.mean for q in posts], 1).double().cpu())
        post_ls.append(torch.stack([q.stddev.log() for q in posts], 1).double().cpu())
    return tuple(torch.cat(t).numpy() for t in (prior_mu, prior_ls, post_mu, post_ls))


def latent_statistics(
    model: HarmonizerNet,
    data: MultiRaterData,
    indices: Optional[np.ndarray] = None,
    *,
    batch: int = 64,
    device: Optional[torch.device] = None,
) -> dict[str, Any]:
    """The prior's and posteriors' statistics over ``data[indices]`` (all images by default); see the module
    docstring. ``data`` is prepared as the model takes it (padded, raters in the training order)."""
    idx = np.arange(len(data)) if indices is None else np.asarray(indices)
    if idx.size < 2:
        raise ValueError(f"latent_statistics: need at least 2 images for a spread across images, got {idx.size}")
    device = device or next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        mu_p, ls_p, mu_q, ls_q = _gaussians(model, data, idx, batch, device)
    finally:
        model.train(was)
    sigma = np.exp(ls_p)
    spread = mu_p.std(0)  # (D,) across images
    clamped = (ls_p >= LOG_SIGMA_MAX - _CLAMP_TOL) | (ls_p <= LOG_SIGMA_MIN + _CLAMP_TOL)
    # KL(q || p) per dimension of two diagonal Gaussians, for every (image, rater, dim)
    var_ratio = np.exp(2 * (ls_q - ls_p[:, None]))
    kl = 0.5 * (var_ratio + (mu_q - mu_p[:, None]) ** 2 / np.exp(2 * ls_p[:, None]) - 1) - (ls_q - ls_p[:, None])
    # how far apart an image's raters sit, in prior sigmas (0: the posterior ignores which rater drew)
    rater_spread = (mu_q.std(1) / sigma).mean()
    return {
        "n_images": int(idx.size),
        "latent_dim": int(mu_p.shape[1]),
        "prior_mean_spread": spread.tolist(),
        "prior_sigma_mean": float(sigma.mean()),
        "mean_spread_ratio": float(spread.mean() / sigma.mean()),
        "prior_sigma_quantiles": {q: float(np.quantile(sigma, float(q))) for q in QUANTILES},
        "prior_sigma_clamped_share": float(clamped.mean()),
        "kl_per_dim": kl.mean((0, 1)).tolist(),
        "kl_total": float(kl.sum(2).mean()),
        "posterior_sigma_mean": float(np.exp(ls_q).mean()),
        "rater_spread_in_prior_sigmas": float(rater_spread),
    }


def collapse_flags(stats: dict[str, Any]) -> list[str]:
    """One line per finding of a collapsed prior in ``stats`` (from :func:`latent_statistics`); empty if none."""
    flags = []
    if stats["mean_spread_ratio"] < MIN_SPREAD_RATIO:
        flags.append(f"image-independent prior: its mean varies across images by {stats['mean_spread_ratio']:.2g} "
                     f"of its sigma (below {MIN_SPREAD_RATIO}); every image samples from one Gaussian")  # fmt: skip
    if stats["prior_sigma_clamped_share"] > MAX_CLAMPED_SHARE:
        flags.append(f"clamped prior: {stats['prior_sigma_clamped_share']:.0%} of its sigmas sit at a clamp "
                     f"(e^{LOG_SIGMA_MIN:g} or e^{LOG_SIGMA_MAX:g})")  # fmt: skip
    return flags


__all__ = ["MAX_CLAMPED_SHARE", "MIN_SPREAD_RATIO", "collapse_flags", "latent_statistics"]
