"""Calibration per rater (paper appendix F): reliability bins, ECE (Eq. 9) and the Brier score (Eq. 10)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ._checks import checked, checked_rater_maps

ECE_BINS = 10


def _is_count(bins: Any) -> bool:
    return isinstance(bins, numbers.Integral) and not isinstance(bins, bool)


def calibration_edges(bins: int | Sequence[float] = ECE_BINS) -> Tensor:
    """Bin edges ``(T + 1,)`` float64 of a reliability diagram: ``bins`` equal-width bins, or the user's own
    increasing edges from 0 to 1 (a threshold list such as ``(0, 0.05, 0.1, 0.5, 1)`` for a sweep finer where
    the probabilities crowd)."""
    if _is_count(bins):
        if bins < 1:
            raise ValueError(f"calibration: bins must be at least 1, got {bins}")
        return torch.linspace(0.0, 1.0, int(bins) + 1, dtype=torch.float64)
    if not isinstance(bins, (Sequence, Tensor, np.ndarray)) or isinstance(bins, str):
        raise TypeError(f"calibration: bins must be a bin count or a list of edges, got {type(bins).__name__}")
    edges = torch.as_tensor([float(b) for b in bins], dtype=torch.float64)
    if edges.numel() < 2 or edges[0] != 0.0 or edges[-1] != 1.0 or not bool((edges[1:] > edges[:-1]).all()):
        raise ValueError(f"calibration: bins as edges must increase strictly from 0 to 1, got {list(bins)!r}")
    return edges


def calibration_bins(p: Tensor, y: Tensor, bins: int | Sequence[float] = ECE_BINS) -> Tensor:
    """Per (B, N) map: ``(B, N, T, 3)`` float64 of (pixel count, sum of confidences, sum of labels) per bin.

    ``bins``: a count of equal-width bins (bin ``floor(p T)``, p = 1 in the last, as the paper's Eq. 9), or
    increasing edges from 0 to 1 (bin i holds ``edges[i] <= p < edges[i + 1]``, p = 1 in the last). The
    counts are sums, so they add over images and over processes (:class:`MetricAccumulator`)."""
    b, n = p.shape[:2]
    pf = p.double().clamp(0.0, 1.0).reshape(b * n, -1)
    if _is_count(bins):
        t = calibration_edges(bins).numel() - 1  # validates the count
        idx = (pf * t).floor().clamp(max=t - 1).long()
    else:
        edges = calibration_edges(bins).to(p.device)
        t = edges.numel() - 1
        idx = torch.bucketize(pf, edges[1:-1], right=True)
    idx = idx + torch.arange(b * n, device=p.device)[:, None] * t
    out = torch.zeros((b * n * t, 3), dtype=torch.float64, device=p.device)
    out[:, 0].index_add_(0, idx.flatten(), torch.ones_like(pf).flatten())
    out[:, 1].index_add_(0, idx.flatten(), pf.flatten())
    out[:, 2].index_add_(0, idx.flatten(), y.double().reshape(b * n, -1).flatten())
    return out.reshape(b, n, t, 3)


def ece_from_bins(counts: Tensor) -> Tensor:
    """ECE (paper Eq. 9) from :func:`calibration_bins` counts: sum_k |B_k|/N |acc_k - conf_k|."""
    total = counts[..., 0].sum(-1)
    return (counts[..., 2] - counts[..., 1]).abs().sum(-1) / total


def _rater_maps(probs: Tensor, raters: Tensor, personalized: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """What each rater's calibration is measured on: head i (personalized), or the sample mean for every
    rater; and the raters' binary labels. Both ``(B, N, H, W)`` float64."""
    n = raters.shape[1]
    maps = probs.double().mean(1, keepdim=True).expand(-1, n, -1, -1) if personalized is None else personalized.double()
    return maps, (raters > 0.5).double()


@checked_rater_maps
def ece(
    probs: Tensor,
    raters: Tensor,
    personalized: Optional[Tensor] = None,
    *,
    bins: int | Sequence[float] = ECE_BINS,
) -> Tensor:
    """``(B, N)`` float64: the expected calibration error (paper Eq. 9) of rater i's map (head i of
    ``personalized``, or the mean of the K samples) against rater i's mask, over ``bins`` (a count of
    equal-width bins or a list of edges, :func:`calibration_edges`)."""
    maps, y = _rater_maps(probs.detach(), raters, None if personalized is None else personalized.detach())
    return ece_from_bins(calibration_bins(maps, y, bins))


@checked_rater_maps
def reliability_curve(
    probs: Tensor,
    raters: Tensor,
    personalized: Optional[Tensor] = None,
    *,
    bins: int | Sequence[float] = ECE_BINS,
) -> dict[str, Tensor]:
    """The reliability diagram over a batch, every pixel pooled, per rater: ``edges (T + 1,)``, ``count (N,
    T)``, ``confidence (N, T)`` and ``frequency (N, T)`` (mean probability and foreground share per bin, NaN
    in an empty bin), and ``ece (N,)`` of the pooled pixels."""
    maps, y = _rater_maps(probs.detach(), raters, None if personalized is None else personalized.detach())
    cal = calibration_bins(maps, y, bins).sum(0)  # (N, T, 3)
    count = cal[..., 0]
    safe = torch.where(count > 0, count, torch.ones_like(count))
    nan = torch.full_like(count, math.nan)
    return {"edges": calibration_edges(bins), "count": count,
            "confidence": torch.where(count > 0, cal[..., 1] / safe, nan),
            "frequency": torch.where(count > 0, cal[..., 2] / safe, nan), "ece": ece_from_bins(cal)}  # fmt: skip


@checked(p="probabilities", y="masks")
def brier(p: Tensor, y: Tensor) -> Tensor:
    """Brier score (paper Eq. 10) per (B, N) map: mean squared difference of probability and label."""
    return ((p.double() - y.double()) ** 2).mean((-2, -1))
