"""How much a personalizer *can* gain on top of a frozen phase-1 model: the latent ceiling.

Phase 2 (paper section 3.2, Eq. 6) trains only the Personalizer: rater i's prediction is the frozen shared
head decoding one latent z'_i (``fcomb(f, z'_i)``). Whatever the Personalizer does, its heads are bounded by
the best latent the frozen head can decode for that image and rater. This module finds such a latent by
cheating on purpose: for every image and rater it starts from the best of the prior mean and K prior samples
(scored against the rater's *own* mask) and descends soft Dice + BCE against that mask, keeping the best
thresholded Dice seen. The result is an oracle, never a prediction, and a lower bound on the true ceiling:
gradient descent can miss a better latent (on a target that one latent decodes exactly it recovers Dice
0.89 from 0.59, not 1; tests/test_latent_ceiling.py). By construction it is at least the Dice of the best
prior sample for each rater, so at least Table 1's Dice_max and Dice_match on the same draws.

What it tells a user: when the personalized Dice_mean is far below the ceiling, the Personalizer is the
limit, and when the ceiling is above the phase-1 Dice_match, latents that beat Dice_match exist on that
phase-1 model. Being a lower bound, a ceiling near Dice_match suggests, but does not prove, that phase 1 is
the limit (see the README's demo section for the measured figures).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._deprecation import renamed_kwargs
from .losses import DICE_SMOOTH
from .metrics import dice_binary
from .model.latent import reparameterize
from .model.net import HarmonizerNet

STEPS, LR, SAMPLES, BATCH = 100, 1.0, 16, 16


def _loss(logits: Tensor, target: Tensor) -> Tensor:
    """Per (image, rater) soft Dice loss plus pixel-mean BCE over the last dim, ``(B, R)``: phase 2's
    objective (:func:`harmonizer_fast.losses.dice_bce` with ``per_image=True``), unreduced."""
    p = torch.sigmoid(logits)
    dice = (2 * (p * target).sum(-1) + DICE_SMOOTH) / (p.sum(-1) + target.sum(-1) + DICE_SMOOTH)
    return 1 - dice + F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1)


def _dice(a: Tensor, b: Tensor) -> Tensor:
    """Binary Dice over the last (pixel) dim, as :func:`harmonizer_fast.metrics.dice_binary` scores it."""
    return dice_binary(a[..., None], b[..., None])


@renamed_kwargs(samples="num_samples")
def latent_ceiling(
    model: HarmonizerNet,
    images: Tensor,
    masks: Tensor,
    *,
    num_samples: int = SAMPLES,
    steps: int = STEPS,
    lr: float = LR,
    generator: Optional[torch.Generator] = None,
    batch: int = BATCH,
) -> Tensor:
    """The oracle Dice ``(B, R)`` of rater r's best decodable latent for each image (module docstring).

    images ``(B, C, H, W)``; masks ``(B, R, H, W)`` with R = ``config.num_raters``; ``num_samples`` prior draws
    (from ``generator``, all drawn first, so ``batch`` does not change the result) besides the prior mean as
    starting points; ``steps`` Adam steps at ``lr`` (on 16 held-out images of an earlier demo model the
    defaults gave 0.9206, 800 steps at 0.5 gave 0.9217), ``batch`` images at a time.
    The model's weights are not changed.
    """
    if masks.dim() != 4 or masks.shape[0] != images.shape[0] or masks.shape[1] != model.config.num_raters:
        raise ValueError(f"latent_ceiling: masks must be (B, {model.config.num_raters}, H, W) for images "
                         f"{tuple(images.shape)}, got {tuple(masks.shape)}")  # fmt: skip
    if num_samples < 0 or steps < 0 or not lr > 0:
        raise ValueError(f"latent_ceiling: need num_samples >= 0, steps >= 0, lr > 0; got {num_samples}, {steps}, {lr}")
    if batch < 1:
        raise ValueError(f"latent_ceiling: batch must be >= 1, got {batch}")
    draws = torch.randn((images.shape[0], num_samples, model.config.latent_dim), generator=generator)
    was_training = model.training
    model.eval()
    frozen = [p for p in model.fcomb.parameters() if p.requires_grad]
    for p in frozen:  # only z learns; no weight gradients are computed
        p.requires_grad_(False)
    try:
        parts = [_optimize(model, images[i : i + batch], masks[i : i + batch], draws[i : i + batch], steps, lr)
                 for i in range(0, images.shape[0], batch)]  # fmt: skip
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    return torch.cat(parts)


def _optimize(model: HarmonizerNet, images: Tensor, masks: Tensor, draws: Tensor, steps: int, lr: float) -> Tensor:
    """:func:`latent_ceiling` for one chunk of images."""
    target = (masks > 0).flatten(2).to(images.dtype)  # (B, R, HW), pixel-major like the decoder
    with torch.no_grad():
        f, _ = model.features(images)
        prior = model.prior(images)
        decode = model.fcomb.decoder(f)
        starts = torch.cat([prior.mean[:, None], reparameterize(prior, draws)], dim=1)  # (B, 1 + K, D)
        start_dice = _dice(decode(starts)[:, :, None] > 0, target[:, None] > 0)  # (B, 1 + K, R)
        best, pick = start_dice.max(dim=1)  # (B, R)
        z0 = torch.gather(starts, 1, pick[..., None].expand(-1, -1, starts.shape[-1]))  # (B, R, D)
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    for step in range(steps + 1):
        logits = decode(z)
        with torch.no_grad():
            best = torch.maximum(best, _dice(logits > 0, target > 0))
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        _loss(logits, target).sum().backward()
        opt.step()
    return best


def ceiling_summary(ceiling: Tensor, heads_dice_each: Tensor, phase1_dice_match: Tensor) -> dict[str, object]:
    """Means over images of the ceiling (per rater and overall) beside the heads' Dice_A(i) ``(B, R)`` and the
    phase-1 Dice_match ``(B,)`` of the same images."""
    c, h, m = ceiling.double(), heads_dice_each.double(), phase1_dice_match.double()
    return {
        "dice_mean": float(c.mean()),
        "per_rater": [float(v) for v in c.mean(0)],
        "heads_dice_mean": float(h.mean()),
        "heads_per_rater": [float(v) for v in h.mean(0)],
        "phase1_dice_match": float(m.mean()),
        "ceiling_minus_heads": float(c.mean() - h.mean()),
        "ceiling_minus_phase1_dice_match": float(c.mean() - m.mean()),
    }


__all__ = ["ceiling_summary", "latent_ceiling"]
