"""Set-level metrics of ambiguous segmentation: K samples against N raters per image, each returning ``(B,)``.

Re-exported by :mod:`harmonizer_fast.metrics`. Inputs: ``samples (B, K, H, W)`` probabilities (thresholded with
``> threshold``, default 0.5) or binary masks, ``raters (B, N, H, W)`` binary masks. Every K x N or K x K
comparison is one call of the package's pairwise-intersection kernel
(:func:`~harmonizer_fast.ops.ged.pairwise_intersection`, exact pixel counts); only the Hungarian matching
loops, once per image.

Empty masks are where published code disagrees; each function names its convention and takes it as an
argument where the literature varies.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .ops.ged import CONVENTIONS, DEFAULT_CONVENTION, _convention, pairwise_intersection
from .ops.ged import ged as _plain_ged

# PHiSeg's cross-entropy takes the log of a binary sample, so it adds an epsilon inside the log (as its
# evaluation code does): a pixel where target and sample disagree costs -log(1e-8) = 18.4 nats.
NCC_EPS = 1e-8


def _binary(x: Tensor, threshold: float) -> Tensor:
    return x > threshold if x.dtype != torch.bool else x


def _areas(x: Tensor, threshold: float) -> Tensor:
    return _binary(x, threshold).sum((2, 3), dtype=torch.float64)


def _dice_from_counts(inter: Tensor, area_a: Tensor, area_b: Tensor, empty_dice: float) -> Tensor:
    total = area_a[:, :, None] + area_b[:, None, :]
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.full_like(total, empty_dice))


def dice_pairs(a: Tensor, b: Tensor, *, threshold: float = 0.5, empty_dice: float = 1.0) -> Tensor:
    """Dice of every pair of masks, ``(B, Ka, Kb)`` float64; two empty masks score ``empty_dice``."""
    inter = pairwise_intersection(a, b, threshold=threshold).double()
    return _dice_from_counts(inter, _areas(a, threshold), _areas(b, threshold), empty_dice)


def iou_pairs(a: Tensor, b: Tensor, *, threshold: float = 0.5, empty_iou: float = 1.0, eps: float = 0.0) -> Tensor:
    """IoU ``I / (U + eps)`` of every pair of masks, ``(B, Ka, Kb)`` float64 from the kernels' exact pixel
    counts; two empty masks score ``empty_iou``."""
    inter = pairwise_intersection(a, b, threshold=threshold).double()
    union = _areas(a, threshold)[:, :, None] + _areas(b, threshold)[:, None, :] - inter
    return torch.where(union > 0, inter / (union + eps), torch.full_like(union, empty_iou))


def hm_iou(samples: Tensor, raters: Tensor, *, threshold: float = 0.5, empty_iou: float = 1.0) -> Tensor:
    """Hungarian-matched IoU (Kohl et al. 2019, the hierarchical probabilistic U-Net's LIDC evaluation).

    The K samples are matched one-to-one to the raters by the assignment that maximizes the total IoU, and
    the matched IoUs are averaged. When N divides K the rater set is repeated K / N times first (as that
    evaluation does with 16 samples and 4 graders), so every sample is matched; otherwise the assignment is
    rectangular and matches min(K, N) pairs. Two empty masks have IoU ``empty_iou`` (1: they agree).
    """
    k, n = samples.shape[1], raters.shape[1]
    iou = iou_pairs(samples, raters, threshold=threshold, empty_iou=empty_iou)
    if k % n == 0:
        iou = iou.repeat(1, 1, k // n)
    out = []
    for m in iou.cpu().numpy():
        rows, cols = linear_sum_assignment(m, maximize=True)
        out.append(m[rows, cols].mean())
    return torch.tensor(np.asarray(out), dtype=torch.float64)


def d_max(samples: Tensor, raters: Tensor, *, threshold: float = 0.5, empty_dice: float = 1.0) -> Tensor:
    """D_max of the collectively-intelligent diffusion work (Rahman et al., CVPR 2023): the mean over raters
    of the best Dice any sample reaches with that rater; two empty masks have Dice ``empty_dice``."""
    return dice_pairs(raters, samples, threshold=threshold, empty_dice=empty_dice).amax(2).mean(1)


def combined_sensitivity(samples: Tensor, raters: Tensor, *, threshold: float = 0.5) -> Tensor:
    """S_c of Rahman et al. (CVPR 2023): TP / (TP + FN) of the union of the samples against the union of the
    raters. When no rater marks anything there is nothing to miss, and S_c is 1."""
    s = _binary(samples, threshold).any(1)
    r = _binary(raters, threshold).any(1)
    tp = (s & r).sum((1, 2), dtype=torch.float64)
    positives = r.sum((1, 2), dtype=torch.float64)
    return torch.where(positives > 0, tp / positives.clamp_min(1), torch.ones_like(tp))


def sample_diversity(samples: Tensor, *, threshold: float = 0.5, empty_iou: float = 1.0) -> Tensor:
    """Mean pairwise distance 1 - IoU among the samples, over the K (K - 1) ordered pairs k != k'; 0 for
    K = 1. Two empty samples are identical (IoU ``empty_iou`` = 1, distance 0)."""
    k = samples.shape[1]
    if k < 2:
        return torch.zeros(samples.shape[0], dtype=torch.float64)
    d = 1 - iou_pairs(samples, samples, threshold=threshold, empty_iou=empty_iou)
    return (d.sum((1, 2)) - torch.diagonal(d, dim1=1, dim2=2).sum(1)) / (k * (k - 1))


def _weights(w: Optional[Tensor], b: int, m: int, name: str) -> Tensor:
    if w is None:
        return torch.full((b, m), 1.0 / m, dtype=torch.float64)
    w = torch.as_tensor(w, dtype=torch.float64)
    if w.dim() == 1:
        w = w.expand(b, -1)
    if w.shape != (b, m):
        raise ValueError(f"ged: {name} must have shape ({m},) or ({b}, {m}), got {tuple(w.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"ged: {name} must be finite and non-negative")
    total = w.sum(1, keepdim=True)
    if (total <= 0).any():
        raise ValueError(f"ged: {name} must have a positive sum for every image")
    return w / total


def _weighted_mean(d: Tensor, wa: Tensor, wb: Tensor, offdiag: bool) -> Tensor:
    ww = wa[:, :, None] * wb[:, None, :]
    if offdiag:
        ww = ww * (1 - torch.eye(d.shape[1], dtype=ww.dtype))
    total = ww.sum((1, 2))
    return torch.where(total > 0, (ww * d).sum((1, 2)) / total.clamp_min(1e-300), torch.zeros_like(total))


def ged(
    samples: Tensor,
    raters: Tensor,
    *,
    sample_weights: Optional[Tensor] = None,
    rater_weights: Optional[Tensor] = None,
    threshold: float = 0.5,
    convention: str = DEFAULT_CONVENTION,
) -> Tensor:
    """Generalized energy distance with d = 1 - IoU, optionally weighted by per-sample and per-rater
    probabilities (the mixture-of-stochastic-experts evaluation, Gao et al. 2023):

    ``2 sum_{k,i} w_k v_i d(S_k, A_i) - sum_{k,k'} w_k w_k' d(S_k, S_k') - sum_{i,i'} v_i v_i' d(A_i, A_i')``

    with the weights normalized to sum 1 per image, ``(K,)``/``(N,)`` or per image ``(B, K)``/``(B, N)``. The
    ``convention`` (see :data:`harmonizer_fast.ops.ged.CONVENTIONS`) sets the empty-mask IoU and whether the
    within-set sums skip the diagonal (then renormalized over k != k'). Without weights this is the
    package's fused :func:`harmonizer_fast.ged` (float32); with weights the K x K matrices are built (float64).
    """
    if sample_weights is None and rater_weights is None:
        return _plain_ged(samples, raters, threshold=threshold, convention=convention)
    conv = _convention(convention)
    b, k, n = samples.shape[0], samples.shape[1], raters.shape[1]
    w = _weights(sample_weights, b, k, "sample_weights")
    v = _weights(rater_weights, b, n, "rater_weights")

    def dist(a: Tensor, c: Tensor) -> Tensor:
        return 1 - iou_pairs(a, c, threshold=threshold, empty_iou=conv.empty_iou, eps=conv.eps)

    cross = _weighted_mean(dist(samples, raters), w, v, offdiag=False)
    within_s = _weighted_mean(dist(samples, samples), w, w, conv.offdiag)
    within_r = _weighted_mean(dist(raters, raters), v, v, conv.offdiag)
    return 2 * cross - within_s - within_r


def _cross_entropy_map(target: Tensor, sample: Tensor) -> Tensor:
    """Pixelwise two-class CE of a binary ``sample`` under a (soft) ``target``: -sum_c t_c log(s_c + eps)."""
    return -(target * (sample + NCC_EPS).log() + (1 - target) * (1 - sample + NCC_EPS).log())


def _ncc(a: Tensor, c: Tensor) -> Tensor:
    """Normalized cross-correlation of two maps per image (last two dims); 0 when either map is constant."""
    a = a.flatten(-2)
    c = c.flatten(-2)
    a = a - a.mean(-1, keepdim=True)
    c = c - c.mean(-1, keepdim=True)
    denom = a.square().mean(-1).sqrt() * c.square().mean(-1).sqrt()
    num = (a * c).mean(-1)
    return torch.where(denom > 0, num / denom.clamp_min(1e-300), torch.zeros_like(num))


def ncc(samples: Tensor, raters: Tensor, *, threshold: float = 0.5) -> Tensor:
    """PHiSeg's S_NCC (Baumgartner et al. 2019, Eq. 11): does the samples' own variability predict where they
    disagree with each rater?

    ``S_NCC = mean_i NCC( mean_k CE(s_bar, s_k), mean_k CE(A_i, s_k) )``

    with s_k the binarized samples, s_bar their pixelwise mean, CE(t, s) = -[t log(s + eps) + (1 - t)
    log(1 - s + eps)] per pixel (eps 1e-8) and NCC(a, b) = mean_p (a - mean a)(b - mean b) / (std a std b)
    over pixels, population std. A constant map (every sample equal, or a rater equal to every sample) has
    no correlation to measure and scores 0, where a plain transcription would give NaN.
    """
    s = _binary(samples, threshold).double()
    r = _binary(raters, threshold).double()
    s_bar = s.mean(1, keepdim=True)
    e_ss = _cross_entropy_map(s_bar, s).mean(1)  # (B, H, W)
    e_sy = _cross_entropy_map(r[:, :, None], s[:, None]).mean(2)  # (B, N, H, W)
    return _ncc(e_ss[:, None], e_sy).mean(1)


__all__ = [
    "CONVENTIONS",
    "combined_sensitivity",
    "d_max",
    "dice_pairs",
    "ged",
    "hm_iou",
    "iou_pairs",
    "ncc",
    "sample_diversity",
]
