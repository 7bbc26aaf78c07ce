"""One call per batch: every per-image metric of a batch (:func:`evaluate_batch`) or of a volume's slices
(:func:`evaluate_volume`), the rows :class:`~harmonizer_fast.metrics.accumulator.MetricAccumulator` averages."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ._checks import checked_rater_maps
from .calibration import (
    ECE_BINS,
    _rater_maps,
    brier,
    calibration_bins,
    ece_from_bins,
)
from .energy import ged
from .overlap import dice_binary, dice_matrix, dice_soft, hungarian_match
from .set_level import SET_LEVEL_KEYS, sample_diversity, set_level_metrics
from .uncertainty import (
    _histogram,
    agreement_groups,
    correctness_groups,
    entropy_map,
)

PER_IMAGE_KEYS = ("ged", "ged_unbiased", "dice_soft", "dice_max", "dice_max_reverse", "dice_max_mean", "dice_match",
                  "dice_each_mean", "empty_fraction", *SET_LEVEL_KEYS)  # fmt: skip


@checked_rater_maps
def evaluate_batch(
    probs: Tensor,
    raters: Tensor,
    personalized: Optional[Tensor] = None,
    *,
    agreement_tol: float = 0.1,
    calibration: int | Sequence[float] = ECE_BINS,
) -> dict[str, Any]:
    """Every per-image metric of a batch, as float64 numpy arrays.

    Keys (length-B arrays unless noted): ``ged``, ``ged_unbiased``, ``dice_soft``, ``dice_max``, ``dice_max_reverse``,
    ``dice_max_mean``, ``dice_match``, ``dice_each`` (B, N), ``dice_each_mean``, the set-level metrics
    (:data:`SET_LEVEL_KEYS`: ``hm_iou``, ``d_max``, ``combined_sensitivity``, ``diversity_agreement``,
    ``ci_score``, ``sample_diversity``, ``ncc``), ``empty_fraction`` (the
    share of the K predictions with no pixel above 0.5: 1 on every image is a collapsed model, whose Dice
    and GED are not results), ``ece`` (B, N) over the ``calibration`` bins (a count or edges,
    :func:`calibration_edges`), ``brier`` (B, N), ``lesion_size``, ``dice_consensus``, and the raw material the
    accumulator pools: ``_calibration`` (B, N, T, 3), ``_entropy_correctness`` and ``_entropy_agreement``
    (histograms per group).
    """
    with torch.no_grad():
        probs = probs.detach()
        out: dict[str, Any] = {"ged": ged(probs, raters).double().cpu().numpy()}
        out["ged_unbiased"] = ged(probs, raters, convention="unbiased").double().cpu().numpy()
        out["dice_soft"] = dice_soft(probs, raters).cpu().numpy()
        d = dice_matrix(raters, probs).cpu().numpy()  # (B, N, K)
        out["dice_max"] = d.max(1).mean(1)
        out["dice_max_reverse"] = d.max(2).mean(1)
        out["dice_max_mean"] = 0.5 * (out["dice_max"] + out["dice_max_reverse"])
        matched = [hungarian_match(m) for m in d]
        out["dice_match"] = np.array([m[0] for m in matched])
        out["empty_fraction"] = (probs <= 0.5).flatten(2).all(-1).double().mean(1).cpu().numpy()
        out.update({k: v.cpu().numpy() for k, v in set_level_metrics(probs, raters).items()})
        heads = None if personalized is None else personalized.detach()
        if heads is None:
            out["dice_each"] = np.stack([m[1] for m in matched])
        else:
            out["dice_each"] = dice_binary(heads > 0.5, raters > 0.5).cpu().numpy()
        with np.errstate(invalid="ignore"):
            out["dice_each_mean"] = np.nanmean(out["dice_each"], axis=1)
        maps, y = _rater_maps(probs, raters, heads)
        bins = calibration_bins(maps, y, calibration)
        out["ece"] = ece_from_bins(bins).cpu().numpy()
        out["brier"] = brier(maps, y).cpu().numpy()
        out["_calibration"] = bins.cpu().numpy()
        out["rater_diversity"] = sample_diversity(raters).cpu().numpy()
        out["raters_drawn"] = (raters > 0.5).flatten(2).any(-1).sum(1).double().cpu().numpy()
        out["head_identity"] = _head_identity(heads, raters)
        consensus = raters.double().mean(1) > 0.5
        out["lesion_size"] = consensus.sum((1, 2)).double().cpu().numpy()
        out["dice_consensus"] = dice_binary(probs.double().mean(1) > 0.5, consensus).cpu().numpy()
        h = entropy_map(probs)
        out["_entropy_correctness"] = {g: _histogram(h[m]) for g, m in correctness_groups(probs, raters).items()}
        out["_entropy_agreement"] = {g: _histogram(h[m]) for g, m in agreement_groups(raters, agreement_tol).items()}
    return out


def _head_identity(heads: Optional[Tensor], raters: Tensor) -> np.ndarray:
    """Per image, the share of heads i whose best-matching rater (by Dice at 0.5) is rater i, ties counted as
    a match; NaN without heads. Chance is 1/N for heads that ignore the rater."""
    if heads is None:
        return np.full(raters.shape[0], np.nan)
    d = dice_matrix(raters, heads)  # (B, N raters, N heads)
    own = torch.diagonal(d, dim1=1, dim2=2)  # (B, N): Dice of head i with rater i
    return (own >= d.amax(1) - 1e-12).double().mean(1).cpu().numpy()


def stack_volume(x: Tensor) -> Tensor:
    """A case's slices ``(D, K, H, W)`` as one image ``(1, K, D * H, W)`` (metrics over the whole volume)."""
    d, k, h, w = x.shape
    return x.permute(1, 0, 2, 3).reshape(1, k, d * h, w)


@checked_rater_maps
def evaluate_volume(
    probs: Tensor, raters: Tensor, personalized: Optional[Tensor] = None, **kwargs: Any
) -> dict[str, Any]:
    """:func:`evaluate_batch` for one 3D case given as slices ``(D, K, H, W)``: every metric over the volume."""
    stacked = None if personalized is None else stack_volume(personalized)
    return evaluate_batch(stack_volume(probs), stack_volume(raters), stacked, **kwargs)
