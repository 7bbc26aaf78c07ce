"""The generalized energy distance (GED) in one place: its published conventions, its three terms and the one
public :func:`ged` (weights included) ([op-registry] #37 item 3).

GED = 2 E d(S, Y) - E d(S, S') - E d(Y, Y') with d = 1 - IoU between K samples S and N raters Y per image.
Layer 1 (:mod:`harmonizer_fast.ops.ged`) computes the three distance sums in fused kernels
(:func:`~harmonizer_fast.ops.ged.ged_sums`); a :class:`Convention` turns them into the three means.
The differentiable GED loss of Eq. 7 is :func:`harmonizer_fast.losses.ged_loss`.

GED conventions (``convention=``), all on masks thresholded at ``threshold`` (strict ``>``):

``dpersona`` (default; the family of code behind the paper's tables)
    IoU = |A and B| / (|A or B| + 1e-8), so two empty masks have IoU 0 and distance 1;
    GED = 2 mean d(S, Y) - mean d(S, S') - mean d(Y, Y'), every mean over the full matrix, diagonal included.
``phiseg``
    as dpersona, but IoU = |A and B| / |A or B| and two empty masks have IoU 1 (distance 0).
``unbiased``
    distance 0 for two empty masks, and the within-set means skip the diagonal, 1/(K(K-1)) sum_{k != k'}.
    A set of one mask has no pairs; its within-set term is then 0.
``kohl`` (the probabilistic U-Net's public evaluation, SimonKohl/probabilistic_unet
    ``evaluation/eval_cityscapes.py``, ``calc_energy_distances`` without probability weights, one class)
    two empty masks have no IoU (NaN); mean d(S, Y) and mean d(S, S') are plain means there, so one such
    pair makes them (and GED) NaN, while mean d(Y, Y') is a nanmean that skips the undefined rater pairs.
    Full matrices, diagonal included. Computed from the intersection kernel's K x N, K x K and N x N
    counts (the fused sums cannot skip pairs), so its memory grows with K^2.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..ops.ged import check_ged_inputs, check_ged_values, ged_sums, iou_from_counts, pairwise_intersection
from ._checks import checked
from .set_level import iou_pairs


class Convention(NamedTuple):
    """One published GED convention: IoU = I / (U + eps), ``empty_iou`` for two empty masks, and whether the
    within-set means skip the diagonal. It also turns the kernels' distance sums into the three means."""

    eps: float
    empty_iou: float
    offdiag: bool
    # Two empty masks have no IoU (empty_iou is NaN): NaN propagates through the cross and sample terms and
    # is skipped in the rater term (the kohl convention). The fused sums kernel cannot skip pairs.
    undefined_empty: bool = False

    def pairs(self, m: int) -> int:
        """Pairs a within-set mean of m masks averages over (0: the term is absent)."""
        return m * (m - 1) if self.offdiag else m * m

    def means(self, sums: Tensor, k: int, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """(mean d(S, Y), mean d(S, S'), mean d(Y, Y')) from ``ged_sums``'s (B, 3) sums of K samples, N raters."""

        def mean(total: Tensor, pairs: int) -> Tensor:
            return total / pairs if pairs > 0 else torch.zeros_like(total)

        return sums[:, 0] / (k * n), mean(sums[:, 1], self.pairs(k)), mean(sums[:, 2], self.pairs(n))


CONVENTIONS: dict[str, Convention] = {
    "dpersona": Convention(eps=1e-8, empty_iou=0.0, offdiag=False),
    "phiseg": Convention(eps=0.0, empty_iou=1.0, offdiag=False),
    "unbiased": Convention(eps=0.0, empty_iou=1.0, offdiag=True),
    "kohl": Convention(eps=0.0, empty_iou=float("nan"), offdiag=False, undefined_empty=True),
}
DEFAULT_CONVENTION = "dpersona"  # the paper's tables


def get_convention(name: str) -> Convention:
    """The registered convention ``name`` (:data:`CONVENTIONS`); ValueError naming the choices otherwise."""
    try:
        return CONVENTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"ged: convention must be one of {sorted(CONVENTIONS)}, got {name!r}") from None


class GEDTerms(NamedTuple):
    """GED and its three terms per image, each ``(B,)``: ``ged = 2 cross - within_samples - within_raters``."""

    ged: Tensor
    cross: Tensor
    within_samples: Tensor
    within_raters: Tensor


def ged_terms(
    samples: Tensor, raters: Tensor, *, threshold: float = 0.5, convention: str = DEFAULT_CONVENTION
) -> GEDTerms:
    """GED with its terms: mean d(S, Y), mean d(S, S'), mean d(Y, Y') per image (float32, shape (B,)).

    samples: probabilities ``(B, K, H, W)`` (thresholded with ``> threshold``) or binary masks; raters:
    binary masks ``(B, N, H, W)`` (bool, uint8 or float in {0, 1}). See the module docstring for the
    conventions. The K x K matrix is never stored (K up to thousands runs in bounded memory).
    """
    conv = get_convention(convention)
    if conv.undefined_empty:  # thresholds in torch, so it checks the values here
        threshold = check_ged_inputs(samples, raters, threshold)
        check_ged_values(samples, raters)
        cross, ws, wr = _terms_skipping_undefined(samples, raters, threshold)
    else:
        sums = ged_sums(samples, raters, threshold=threshold, eps=conv.eps, empty_iou=conv.empty_iou,
                        offdiag=conv.offdiag)  # fmt: skip
        cross, ws, wr = conv.means(sums, samples.shape[1], raters.shape[1])
    ged_value = 2.0 * cross - ws - wr
    return GEDTerms(*(t.to(torch.float32) for t in (ged_value, cross, ws, wr)))


def _terms_skipping_undefined(samples: Tensor, raters: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """The kohl convention's three means from exact pair counts, float64: NaN IoU for two empty masks, plain
    means for the cross and sample terms (NaN propagates), a nanmean for the rater term."""
    s = (samples.detach() > threshold).to(torch.uint8)
    y = (raters.detach() > 0.5).to(torch.uint8)

    def distances(a: Tensor, b: Tensor) -> Tensor:
        inter = pairwise_intersection(a, b).double()
        areas = a.sum((2, 3), dtype=torch.float64), b.sum((2, 3), dtype=torch.float64)
        return 1.0 - iou_from_counts(inter, *areas, 0.0, float("nan"))

    return distances(s, y).mean((1, 2)), distances(s, s).mean((1, 2)), distances(y, y).nanmean((1, 2))


def _weights(w: Optional[Tensor], b: int, m: int, name: str, device: torch.device) -> Tensor:
    if w is None:
        return torch.full((b, m), 1.0 / m, dtype=torch.float64, device=device)
    w = torch.as_tensor(w, dtype=torch.float64, device=device)
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
        ww = ww * (1 - torch.eye(d.shape[1], dtype=ww.dtype, device=ww.device))
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
    ``convention`` (see :data:`CONVENTIONS`) sets the empty-mask IoU and whether the
    within-set sums skip the diagonal (then renormalized over k != k'). Without weights this is the
    fused kernels' :func:`ged_terms` (float32, no K x K matrix stored); with weights the K x K matrices are built
    (float64).
    """
    if sample_weights is None and rater_weights is None:  # the kernels check the maps in their own pass
        return ged_terms(samples, raters, threshold=threshold, convention=convention).ged
    return _weighted_ged(samples, raters, sample_weights, rater_weights, threshold, convention)


# ged refuses bad maps as a @checked metric does, naming itself and the argument, but in the fused kernels'
# own read of the data (ops/ged.py): the decorator's extra min/max pass would cost 0.7-1.25x the GED itself
# (B = 32, K = 8-512, 128 x 128). tests/test_metric_checks.py holds it to the decorator's behaviour.
ged.checked_maps = {"samples": "samples", "raters": "masks"}  # type: ignore[attr-defined]


@checked(samples="samples", raters="masks")
def _weighted_ged(samples: Tensor, raters: Tensor, sample_weights: Optional[Tensor],
                  rater_weights: Optional[Tensor], threshold: float, convention: str) -> Tensor:
    conv = get_convention(convention)
    if conv.undefined_empty:
        raise ValueError(f"ged: convention {convention!r} has no weighted form (its pairs can be undefined); "
                         "pass sample_weights=None and rater_weights=None, or another convention")  # fmt: skip
    b, k, n = samples.shape[0], samples.shape[1], raters.shape[1]
    w = _weights(sample_weights, b, k, "sample_weights", samples.device)
    v = _weights(rater_weights, b, n, "rater_weights", samples.device)

    def dist(a: Tensor, c: Tensor) -> Tensor:
        return 1 - iou_pairs(a, c, threshold=threshold, empty_iou=conv.empty_iou, eps=conv.eps)

    cross = _weighted_mean(dist(samples, raters), w, v, offdiag=False)
    within_s = _weighted_mean(dist(samples, samples), w, w, conv.offdiag)
    within_r = _weighted_mean(dist(raters, raters), v, v, conv.offdiag)
    return 2 * cross - within_s - within_r


__all__ = ["CONVENTIONS", "DEFAULT_CONVENTION", "Convention", "GEDTerms", "get_convention", "ged", "ged_terms"]
