"""The sample mean's pixel entropy and how it follows the raters (paper appendices C and E): the entropy map,
its pooled histograms by correctness and by rater agreement, and the per-image Spearman test of [science] #35."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._checks import checked

ENTROPY_BINS = 4096
CORRECTNESS = ("TP", "FP", "FN", "TN")
AGREEMENT = ("agree", "somewhat", "disagree")


@checked(probs="samples")
def entropy_map(probs: Tensor) -> Tensor:
    """Normalized binary entropy of the sample mean, ``(B, H, W)`` in [0, 1] (0 log 0 = 0)."""
    p = probs.double().mean(1).clamp(0.0, 1.0)
    q = 1.0 - p
    return -(torch.where(p > 0, p * torch.log2(p), 0.0) + torch.where(q > 0, q * torch.log2(q), 0.0))


def _histogram(values: Tensor, bins: int = ENTROPY_BINS) -> np.ndarray:
    idx = (values.double().clamp(0.0, 1.0) * bins).floor().clamp(max=bins - 1).long()
    return torch.bincount(idx.flatten().cpu(), minlength=bins).numpy().astype(np.int64)


def histogram_median(hist: np.ndarray) -> float:
    """Median of values in [0, 1] from their ``len(hist)``-bin histogram (linear within the bin); NaN if empty."""
    total = int(hist.sum())
    if total == 0:
        return math.nan
    cum = np.cumsum(hist)
    half = total / 2.0
    k = int(np.searchsorted(cum, half))
    before = cum[k - 1] if k > 0 else 0
    return (k + (half - before) / hist[k]) / len(hist)


def correctness_groups(probs: Tensor, raters: Tensor) -> dict[str, Tensor]:
    """Appendix C: boolean ``(B, H, W)`` masks of TP/FP/FN/TN over the pixels where every rater agrees."""
    consensus = raters.double().mean(1)
    pred = probs.double().mean(1) > 0.5
    fg, bg = consensus == 1.0, consensus == 0.0
    return {"TP": pred & fg, "FP": pred & bg, "FN": ~pred & fg, "TN": ~pred & bg}


def agreement_groups(raters: Tensor, tol: float = 0.1) -> dict[str, Tensor]:
    """Appendix E: boolean ``(B, H, W)`` masks of agree / somewhat / disagree from the rater mean."""
    p = raters.double().mean(1)
    agree = (p <= tol) | (p >= 1.0 - tol)
    disagree = (p - 0.5).abs() <= tol
    return {"agree": agree, "somewhat": ~agree & ~disagree, "disagree": disagree}


def uncertainty_follows_raters(sample_div: np.ndarray, rater_div: np.ndarray) -> dict[str, Any]:
    """Spearman's rank correlation over images between the samples' mean pairwise 1 - IoU
    (:func:`sample_diversity`) and the raters' ([science] item 2): does the model's spread follow how much the
    raters disagree on each image? Pass the images where every rater drew (elsewhere an empty reading makes
    the raters' distance 1 whatever the lesion). ``spearman`` is NaN with fewer than 3 images or a constant
    series."""
    from scipy.stats import spearmanr

    a, b = np.asarray(sample_div, np.float64), np.asarray(rater_div, np.float64)
    n = int(a.size)
    if n < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"n_images": n, "spearman": math.nan, "p": math.nan}
    res = spearmanr(a, b)
    return {"n_images": n, "spearman": float(res.statistic), "p": float(res.pvalue)}
