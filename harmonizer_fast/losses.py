"""Training objectives of the Harmonizer Network (paper section 3.3-3.4, appendix A; docs/architecture.md, "Model").

- :func:`dice_bce`: L_seg, soft Dice (over the batch in phase 1, per image in phase 2) plus binary
  cross-entropy on logits;
- :func:`kl`: KL(q(z | x, A_k) || p(z | x)) of the posterior and prior Gaussians;
- :func:`harmonizer_penalty`: sum_l ||gamma_l - 1||^2 + ||beta_l||^2 of the Noise Harmonizer;
- :func:`ged_loss`: Eq. 7 over the K prior samples, on the package's soft Gram kernels;
- :func:`dpersona_loss`: D-Persona's stage-2 loss, for its projection heads (:mod:`.model.dpersona`);
- :func:`phase1_loss` (Eq. 8) and :func:`phase2_loss` (Eq. 6) combine them with the appendix-A weights held in
  the model's config (lambda_KL = 2e-3, lambda_harm = 3e-4, lambda_GED = 1.0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .distributed import rank_and_world
from .model.config import HarmonizerConfig
from .model.harmonizer import harmonizer_penalty
from .model.latent import kl_divergence
from .model.net import ModelOutput
from .ops import _autocast
from .ops._checks import check_probabilities
from .ops.ged import check_masks, check_pair, soft_gram

DICE_SMOOTH = 1.0
# The loss's soft IoU is smoothed, (I + s) / (U + s) with s = LOSS_SMOOTH pixels, as soft Dice/Jaccard losses
# are: two all-zero maps then have IoU 1 (distance 0), the reading of the phiseg/unbiased conventions. With a
# dpersona-style 0/0 -> 0 instead, empty samples sit at distance 1 from each other, so "every sample empty"
# maximizes the diversity term and the loss stalls there (measured on LIDC, where about half the rater
# masks of a slice are empty: the GED loss stayed at 1.0 and every prior sample was empty).
LOSS_SMOOTH = 1.0


def _soft_iou_from_gram(inter: Tensor, area_a: Tensor, area_b: Tensor, smooth: float) -> Tensor:
    return (inter + smooth) / (area_a[:, :, None] + area_b[:, None, :] - inter + smooth)


@_autocast.float32  # a loss: float32 throughout under autocast
def ged_loss_per_image(
    probs: Tensor, raters: Tensor, *, smooth: float = LOSS_SMOOTH, check_values: bool = True
) -> Tensor:
    """The GED loss of paper Eq. 7 per image, ``(B,)``: see :func:`ged_loss`."""
    op = "ged_loss"
    check_masks(probs, op, "probs", floating=True)
    check_masks(raters, op, "raters")
    check_pair(probs, raters, op, "probs", "raters")
    k = probs.shape[1]
    r = raters.to(probs.dtype)
    if check_values:  # one pass each; the trainer skips it (a host sync) and guards the total loss instead
        check_probabilities(probs, op, "probs")
        check_probabilities(r, op, "raters")
    area_p, area_r = probs.sum((2, 3)), r.sum((2, 3))
    cross = 1.0 - _soft_iou_from_gram(soft_gram(probs, r), area_p, area_r, smooth)
    loss = 2.0 * cross.mean((1, 2))
    if k > 1:
        within = 1.0 - _soft_iou_from_gram(soft_gram(probs, probs), area_p, area_p, smooth)
        off = within.sum((1, 2)) - torch.diagonal(within, dim1=1, dim2=2).sum(-1)
        loss = loss - off / (k * (k - 1))
    return loss


def ged_loss(probs: Tensor, raters: Tensor, *, smooth: float = LOSS_SMOOTH, check_values: bool = True) -> Tensor:
    """The differentiable GED loss of paper Eq. 7, averaged over the batch (a scalar).

    ``2/(KN) sum_{k,i} d(P_k, A_i) - 2/(K(K-1)) sum_{k<k'} d(P_k, P_k')`` with the soft IoU distance
    d = 1 - (sum(p q) + s) / (sum p + sum q - sum(p q) + s), s = ``smooth`` pixels (default 1: two empty maps
    are at distance 0; see LOSS_SMOOTH for why); the rater-rater term is dropped (it does not
    depend on the model), so the loss is GED minus that constant and may be negative. probs ``(B, K, H, W)``
    in [0, 1], raters ``(B, N, H, W)`` (binary or soft). With K = 1 the within-sample term is absent.
    The Gram products go through the package's kernels and their backward is two batched matrix products.
    probs and raters must be probabilities in [0, 1] (NaN, Inf or values outside raise ValueError);
    ``check_values=False`` skips that check (a host sync), for callers that guard the total loss.
    """
    return ged_loss_per_image(probs, raters, smooth=smooth, check_values=check_values).mean()


def _value(t: Tensor) -> float:
    return float(t.detach())


__all__ = ["dice_bce", "dpersona_loss", "ged_loss", "ged_loss_per_image", "harmonizer_penalty", "kl", "phase1_loss",
           "phase2_loss", "total_loss"]


def dice_bce(logits: Tensor, target: Tensor, *, per_image: bool = False) -> Tensor:
    """L_seg = (1 - soft Dice) + BCE on logits and target ``(..., H, W)``, the BCE averaged over pixels.

    ``per_image=False`` (phase 1): one Dice over every pixel of the batch at once (nnU-Net's "batch Dice";
    D-Persona's generalized Dice also pools the flattened batch). The paper says only "Dice and
    cross-entropy". On LIDC about 40 % of the (slice, rater) targets are empty, and a per-image soft Dice of
    an empty target, 1 - s / (sum p + s), is won only by driving every logit far below zero, where the
    sigmoid no longer passes the lesion's gradient to the shared backbone. Measured on a 40-patient LIDC
    subset, small config, 5 epochs: with a per-image Dice every prior sample was empty (logits near -22) and
    stayed so; with the batch Dice 48 % of the prior samples are non-empty and validation Dice_match is
    0.684 (all-empty scores 0.286). Under DDP the three sums are all-reduced (autograd-aware), so the Dice
    is that of the global batch and two processes train as one does.

    ``per_image=True`` (phase 2, Eq. 6): the mean over images of one Dice each, the quantity Dice_A(i)
    scores. With the backbone frozen an empty target can no longer saturate shared features, and whether a
    rater drew anything on a slice is part of that rater's style: the batch Dice barely charges a head for
    marking a lesion on a slice its rater left empty, where Dice_A(i) scores 0. Measured from one LIDC
    phase-1 model (benchmarks/results/lidc-personalization-small-cpu.md), best validation Dice_mean over
    two phase-2 epochs: 0.566 per image, 0.510 with the batch Dice; on the demo's data the two end within
    0.005 of each other (validation Dice_mean 0.840 and 0.837 after 24 epochs).
    """
    target = target.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    dims = (-2, -1) if per_image else tuple(range(logits.dim()))
    inter, area_p, area_t = (p * target).sum(dims), p.sum(dims), target.sum(dims)
    if not per_image:
        inter, area_p, area_t = _global_sums(inter, area_p, area_t)
    dice = (2 * inter + DICE_SMOOTH) / (area_p + area_t + DICE_SMOOTH)
    return (1 - dice).mean() + bce


def _global_sums(*sums: Tensor) -> tuple[Tensor, ...]:
    """The sums over every process's slice of the batch under DDP (a collective: every rank computes the
    loss each step); the backward all-reduces too, and DDP's gradient averaging then gives exactly the
    gradient of the global batch's Dice."""
    if rank_and_world()[1] == 1 or not torch.is_grad_enabled():
        return sums
    from torch.distributed.nn.functional import all_reduce

    return tuple(all_reduce(torch.stack(sums)).unbind())


GDL_EPS = 1e-6


def dpersona_loss(logits: Tensor, masks: Tensor) -> Tensor:
    """D-Persona's stage-2 objective: the generalized Dice loss (Sudre et al. 2017, as in D-Persona's
    ``GeneralizedDiceLoss``) over the heads ``(B, R, H, W)`` against the raters' masks, one class per rater:
    1 - mean_i 2 w_i sum(p_i t_i) / max(w_i sum(p_i + t_i), eps), each sum over every pixel of the batch, with
    w_i = 1 / max((sum t_i)^2, eps). The weight cancels unless a rater's masks are all empty in the batch,
    where that rater's term is 1 with no gradient. Under DDP the sums are those of the global batch."""
    p, t = torch.sigmoid(logits), masks.to(logits.dtype)
    dims = (0, 2, 3)
    inter, total, area = _global_sums((p * t).sum(dims), (p + t).sum(dims), t.sum(dims))
    w = 1.0 / (area * area).clamp(min=GDL_EPS)
    return 1 - (2 * inter * w / (total * w).clamp(min=GDL_EPS)).mean()


def kl(out: ModelOutput) -> Tensor:
    """Mean over the batch of KL(posterior || prior)."""
    return kl_divergence(out.posterior, out.prior).mean()


def phase1_loss(out: ModelOutput, masks: Tensor, config: HarmonizerConfig) -> tuple[Tensor, dict[str, float]]:
    """Eq. 8: L_seg of the posterior sample against the rater it saw, + lambda_KL KL + lambda_harm penalty
    + lambda_GED L_GED over the prior samples against all raters. Returns the total and its parts."""
    if out.phase != 1:
        raise ValueError(f"phase1_loss: got the output of a phase-{out.phase} forward")
    b = masks.shape[0]
    target = masks[torch.arange(b, device=masks.device), out.rater_index]
    seg = dice_bce(out.posterior_logits, target)
    kl_term = kl(out)
    total = seg + config.lambda_kl * kl_term
    parts = {"seg": _value(seg), "kl": _value(kl_term)}
    if out.harmonizer_params:
        pen = harmonizer_penalty(out.harmonizer_params)
        total = total + config.lambda_harm * pen
        parts["harm"] = _value(pen)
    if config.use_ged_loss and out.prior_logits is not None:
        # no NaN check here: the trainer's guard checks the total and says where it happened
        ged = ged_loss(torch.sigmoid(out.prior_logits), masks.to(out.prior_logits.dtype), check_values=False)
        total = total + config.lambda_ged * ged
        parts["ged"] = _value(ged)
    parts["total"] = _value(total)
    return total, parts


def phase2_loss(out: ModelOutput, masks: Tensor, personalizer: str = "frequency") -> tuple[Tensor, dict[str, float]]:
    """Eq. 6: sum over raters i of L_seg(y_i, A_i), y_i the personalized prediction for rater i, with one
    Dice per image (see :func:`dice_bce` for why phase 2 differs from phase 1 here). D-Persona's heads
    (``personalizer="dpersona"``) train on their own recipe's loss, :func:`dpersona_loss`."""
    if out.phase != 2:
        raise ValueError(f"phase2_loss: got the output of a phase-{out.phase} forward")
    logits = out.personalized_logits
    if personalizer == "dpersona":
        loss = dpersona_loss(logits, masks)
        return loss, {"seg": _value(loss), "total": _value(loss)}
    total = sum(dice_bce(logits[:, i], masks[:, i], per_image=True) for i in range(logits.shape[1]))
    return total, {"seg": _value(total), "total": _value(total)}


def total_loss(out: ModelOutput, masks: Tensor, config: HarmonizerConfig) -> tuple[Tensor, dict[str, float]]:
    """The objective of the phase ``out`` came from."""
    return phase1_loss(out, masks, config) if out.phase == 1 else phase2_loss(out, masks, config.personalizer)
