"""Per-image overlap scores of samples against raters: Dice of binary masks, ``dice_soft`` over thresholds,
the rater-by-sample Dice matrix and its Hungarian matching (definitions in :mod:`harmonizer_fast.metrics`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..ops._checks import check_threshold
from ..ops.ged import pairwise_intersection
from ._checks import checked

DICE_SMOOTH = 1e-8
SOFT_THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)


def dice_binary(a: Tensor, b: Tensor) -> Tensor:
    """Dice of binary masks ``a``, ``b`` (same shape ``(..., H, W)``), reduced over the last two dims."""
    a, b = a.bool(), b.bool()
    inter = (a & b).sum((-2, -1)).double()
    return (2 * inter + DICE_SMOOTH) / (a.sum((-2, -1)).double() + b.sum((-2, -1)).double() + DICE_SMOOTH)


@checked(probs="samples", raters="masks")
def dice_soft_curve(probs: Tensor, raters: Tensor, thresholds: Sequence[float] = SOFT_THRESHOLDS) -> Tensor:
    """``(B, T)``: the Dice of the mean prediction and the mean annotation, both thresholded (strict ``>``) at
    each of the T ``thresholds`` (any list in [0, 1): a sweep curve)."""
    try:  # a list, tuple or 1-D array
        values = [] if isinstance(thresholds, (str, bytes)) else list(thresholds)
    except TypeError:
        values = []
    if not values:
        raise ValueError(f"dice_soft: thresholds must be a non-empty list of values in [0, 1), got {thresholds!r}")
    ts = [check_threshold(t, "dice_soft", f"thresholds[{i}]") for i, t in enumerate(values)]
    p = probs.double().mean(1)
    y = raters.double().mean(1)
    return torch.stack([dice_binary(p > t, y > t) for t in ts], dim=1)


@checked(probs="samples", raters="masks")
def dice_soft(probs: Tensor, raters: Tensor, thresholds: Sequence[float] = SOFT_THRESHOLDS) -> Tensor:
    """``(B,)``: Dice_soft, the mean of :func:`dice_soft_curve` over ``thresholds`` (the paper's five by default)."""
    return dice_soft_curve(probs, raters, thresholds).mean(1)


@checked(raters="masks", probs="samples")
def dice_matrix(raters: Tensor, probs: Tensor, threshold: float = 0.5) -> Tensor:
    """``(B, N, K)`` float64: Dice between rater i and sample j (samples thresholded with ``> threshold``).

    The intersections are one Gram product over pixels (the package's pairwise op, popcounts on CPU).
    """
    inter = pairwise_intersection(raters, probs, threshold=threshold).double()
    area_r = (raters > threshold).sum((2, 3)).double()
    area_s = (probs > threshold).sum((2, 3)).double()
    return (2 * inter + DICE_SMOOTH) / (area_r[:, :, None] + area_s[:, None, :] + DICE_SMOOTH)


def hungarian_match(d: np.ndarray) -> tuple[float, np.ndarray]:
    """Maximum-Dice assignment of raters (rows) to distinct samples (columns) of one ``(N, K)`` matrix.

    Returns the mean matched Dice and each rater's matched Dice (NaN for raters left over when K < N).
    """
    rows, cols = linear_sum_assignment(1.0 - d)  # min cost = max Dice
    each = np.full(d.shape[0], np.nan)
    each[rows] = d[rows, cols]
    return float(d[rows, cols].mean()), each
