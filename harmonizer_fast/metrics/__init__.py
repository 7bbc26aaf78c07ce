"""Evaluation metrics of multi-rater segmentation, as the field computes them (docs/architecture.md, "Conventions").

Predictions are per-sample probabilities ``probs (B, K, H, W)``; raters are binary masks ``raters (B, N, H, W)``;
optional ``personalized (B, N, H, W)`` holds one probability map per rater head (sample i is rater i's).
Every metric is computed per image, then averaged over images (mean and standard deviation) by
:class:`MetricAccumulator`. Definitions:

- Dice of two binary masks: ``(2 |A and B| + 1e-8) / (|A| + |B| + 1e-8)`` (two empty masks score 1).
- ``dice_soft``: mean of the sample probabilities and mean of the rater masks, both thresholded with a strict
  ``>`` at each of (0.1, 0.3, 0.5, 0.7, 0.9); the Dice of each pair, averaged over the five thresholds.
- Dice matrix ``D[i, j]`` between rater i and sample j (samples thresholded at 0.5). ``dice_max``: mean over
  samples of the max over raters; ``dice_max_reverse``: mean over raters of the max over samples;
  ``dice_max_mean``: the average of those two; ``dice_match``: mean of D over a Hungarian (maximum-Dice,
  rectangular) assignment of raters to distinct samples; ``dice_each[i]``: rater i's matched Dice (NaN for a
  rater left without a sample when K < N), or with ``personalized`` the Dice of head i against rater i.
  ``dice_each_mean``: mean over raters of ``dice_each`` (ignoring NaN).
- ``ged``: :func:`harmonizer_fast.ged` with the ``dpersona`` convention (the paper's tables);
  ``ged_unbiased``: the ``unbiased`` convention (two empty masks at distance 0, within-set means without the
  diagonal), which an all-empty prediction cannot win: the default model-selection score.
- Calibration per rater (paper appendix F): ECE (Eq. 9, 10 equal-width bins unless ``bins`` / ``calibration``
  gives another count or the user's own edges: :func:`ece`, :func:`reliability_curve`) and the Brier score
  (Eq. 10) of rater i's map (the personalized head, or the sample mean without heads) against rater i's mask;
  the accumulator also pools every pixel of the dataset as the paper does.
- Uncertainty (appendices C and E): the normalized binary entropy of the sample mean,
  ``H = -p log2 p - (1 - p) log2 (1 - p)`` in [0, 1]. Its medians by correctness (TP/FP/FN/TN of the mean
  thresholded at 0.5, over pixels where every rater agrees) and by rater agreement (``agree``: rater mean 0
  or 1; ``disagree``: within ``agreement_tol`` of 0.5; ``somewhat``: the rest), pooled over the dataset
  through a 4096-bin histogram (medians to 1/4096).
- Dice by lesion size (appendix D): the consensus mask (rater mean > 0.5) against the sample mean > 0.5, per
  image, grouped by tercile of the consensus area over the dataset (images without a lesion are left out).
- Volumes (NPC-style): :func:`evaluate_volume` stacks a case's slices into one image first.
- Set-level metrics from :mod:`harmonizer_fast.metrics.set_level`, each ``(B,)``, also in every
  :func:`evaluate_batch` (keys :data:`SET_LEVEL_KEYS`): :func:`hm_iou` (Hungarian-matched IoU), :func:`d_max`,
  :func:`combined_sensitivity`, :func:`diversity_agreement` and :func:`ci_score` (Rahman et al. 2023),
  :func:`sample_diversity`, :func:`ncc` (PHiSeg's S_NCC), and :func:`ged` with optional per-sample and
  per-rater weights (every convention of ``CONVENTIONS`` by name; docs/ged-conventions.md compares them).
- Framework adapters, imported only on request: :mod:`harmonizer_fast.metrics.torchmetrics` and
  :mod:`harmonizer_fast.metrics.monai`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..ops._checks import check_threshold
from ..ops.ged import pairwise_intersection
from . import _sync
from ._checks import checked

# Set-level metrics of ambiguous segmentation, importable from here as users expect (hf.metrics.hm_iou);
# ged is the weighted form, equal to harmonizer_fast.ged without weights.
from .set_level import (  # noqa: F401
    CONVENTIONS,
    SET_LEVEL_KEYS,
    ci_score,
    combined_sensitivity,
    d_max,
    diversity_agreement,
    ged,
    hm_iou,
    ncc,
    pair_variances,
    sample_diversity,
    set_level_metrics,
)

DICE_SMOOTH = 1e-8
SOFT_THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)
ECE_BINS = 10
ENTROPY_BINS = 4096
CORRECTNESS = ("TP", "FP", "FN", "TN")
AGREEMENT = ("agree", "somewhat", "disagree")
PER_IMAGE_KEYS = ("ged", "ged_unbiased", "dice_soft", "dice_max", "dice_max_reverse", "dice_max_mean", "dice_match",
                  "dice_each_mean", "empty_fraction", *SET_LEVEL_KEYS)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Input checks.


# ---------------------------------------------------------------------------------------------------------
# Per-image building blocks (tensors in, tensors out; float64 results).


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


@checked(probs="samples")
def entropy_map(probs: Tensor) -> Tensor:
    """Normalized binary entropy of the sample mean, ``(B, H, W)`` in [0, 1] (0 log 0 = 0)."""
    p = probs.double().mean(1).clamp(0.0, 1.0)
    q = 1.0 - p
    return -(torch.where(p > 0, p * torch.log2(p), 0.0) + torch.where(q > 0, q * torch.log2(q), 0.0))


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


@checked(optional=("personalized",), same_shape=(("raters", "personalized"),), probs="probabilities", raters="masks",
         personalized="probabilities")  # fmt: skip
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


@checked(optional=("personalized",), same_shape=(("raters", "personalized"),), probs="probabilities", raters="masks",
         personalized="probabilities")  # fmt: skip
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


# ---------------------------------------------------------------------------------------------------------
# One call per batch.


@checked(optional=("personalized",), same_shape=(("raters", "personalized"),), probs="probabilities", raters="masks",
         personalized="probabilities")  # fmt: skip
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


def stack_volume(x: Tensor) -> Tensor:
    """A case's slices ``(D, K, H, W)`` as one image ``(1, K, D * H, W)`` (metrics over the whole volume)."""
    d, k, h, w = x.shape
    return x.permute(1, 0, 2, 3).reshape(1, k, d * h, w)


@checked(optional=("personalized",), same_shape=(("raters", "personalized"),), probs="probabilities", raters="masks",
         personalized="probabilities")  # fmt: skip
def evaluate_volume(
    probs: Tensor, raters: Tensor, personalized: Optional[Tensor] = None, **kwargs: Any
) -> dict[str, Any]:
    """:func:`evaluate_batch` for one 3D case given as slices ``(D, K, H, W)``: every metric over the volume."""
    stacked = None if personalized is None else stack_volume(personalized)
    return evaluate_batch(stack_volume(probs), stack_volume(raters), stacked, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Dataset level.


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    v = values[~np.isnan(values)]
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


_PER_RATER_ROWS = ("dice_each", "ece", "brier")
_ROW_KEYS = (*PER_IMAGE_KEYS, *_PER_RATER_ROWS, "lesion_size", "dice_consensus", "rater_diversity", "raters_drawn",
             "head_identity")  # fmt: skip


@dataclass
class MetricAccumulator:
    """Turns :func:`evaluate_batch` results into dataset-level tables.

    ``update(probs, raters, personalized=None)`` evaluates a batch (or ``add(evaluate_batch(...))`` adds a
    precomputed one); ``summary()`` returns ``{"n_images", "mean", "std", "per_rater", "calibration",
    "entropy_medians", "dice_by_size"}``; ``markdown()`` renders it.

    Under torch.distributed, each process calls ``update()`` on its own images and ``compute()`` (the
    torchmetrics protocol: update / compute / reset) combines them: the state is sufficient statistics
    (per-image rows, pooled histograms), so N processes equal one process over all their batches.
    """

    agreement_tol: float = 0.1
    calibration: int | Sequence[float] = ECE_BINS  # reliability bins: a count, or edges from 0 to 1
    rows: dict[str, list] = field(default_factory=dict)
    _calibration: Optional[np.ndarray] = None
    _entropy: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def update(self, probs: Tensor, raters: Tensor, personalized: Optional[Tensor] = None) -> dict[str, Any]:
        batch = evaluate_batch(
            probs, raters, personalized, agreement_tol=self.agreement_tol, calibration=self.calibration
        )
        self.add(batch)
        return batch

    def update_volume(self, probs: Tensor, raters: Tensor, personalized: Optional[Tensor] = None) -> dict[str, Any]:
        batch = evaluate_volume(
            probs, raters, personalized, agreement_tol=self.agreement_tol, calibration=self.calibration
        )
        self.add(batch)
        return batch

    def add(self, batch: Mapping[str, Any]) -> None:
        n, bins = batch["dice_each"].shape[1], batch["_calibration"].shape[2]
        if self._calibration is not None and self._calibration.shape[:2] != (n, bins):
            raise ValueError(f"MetricAccumulator: batches must have one rater count and one calibration binning, "
                             f"got {n} raters x {bins} bins after {self._calibration.shape[0]} x "
                             f"{self._calibration.shape[1]}")  # fmt: skip
        for key in _ROW_KEYS:
            self.rows.setdefault(key, []).append(np.asarray(batch[key]))
        cal = batch["_calibration"].sum(0)
        self._calibration = cal if self._calibration is None else self._calibration + cal
        for family in ("_entropy_correctness", "_entropy_agreement"):
            acc = self._entropy.setdefault(family, {})
            for g, hist in batch[family].items():
                acc[g] = hist if g not in acc else acc[g] + hist

    def reset(self) -> None:
        """Forget every batch."""
        self.rows, self._calibration, self._entropy = {}, None, {}

    def compute(self, group: Optional[Any] = None, device: Optional[torch.device] = None) -> dict[str, Any]:
        """:meth:`summary` over every process's batches (a collective: every rank must call it)."""
        return self.synced(group, device).summary()

    def synced(self, group: Optional[Any] = None, device: Optional[torch.device] = None) -> MetricAccumulator:
        """This accumulator, or under torch.distributed (world > 1) a new one holding every rank's batches:
        per-image rows gathered in rank order (rank 0's images first), histograms summed. ``device``: where
        the collectives' tensors live (CPU for gloo; the current CUDA device for NCCL)."""
        if not _sync.active(group):
            return self
        device = device or torch.device("cpu")
        n = _sync.max_int(-1 if self._calibration is None else self._calibration.shape[0], group, device)
        if n < 0:
            raise ValueError("MetricAccumulator.compute: no process added a batch")
        if self._calibration is not None and self._calibration.shape[0] != n:
            raise ValueError(f"MetricAccumulator.compute: processes disagree on the rater count "
                             f"({self._calibration.shape[0]} here, {n} elsewhere)")  # fmt: skip
        out = MetricAccumulator(agreement_tol=self.agreement_tol, calibration=self.calibration)
        for key in _ROW_KEYS:
            local = self.per_image(key) if self.rows else np.zeros((0, n) if key in _PER_RATER_ROWS else (0,))
            out.rows[key] = [_sync.gather_rows(local, group, device)]
        bins = calibration_edges(self.calibration).numel() - 1
        cal = self._calibration if self._calibration is not None else np.zeros((n, bins, 3))
        out._calibration = _sync.sum_array(cal, group, device)
        for family, groups in (("_entropy_correctness", CORRECTNESS), ("_entropy_agreement", AGREEMENT)):
            mine = self._entropy.get(family, {})
            out._entropy[family] = {
                g: _sync.sum_array(mine.get(g, np.zeros(ENTROPY_BINS, np.int64)), group, device) for g in groups
            }
        return out

    def per_image(self, key: str) -> np.ndarray:
        """One metric's values per image, in the order the batches were added (for paired tests)."""
        return np.concatenate(self.rows[key], axis=0)

    def summary(self) -> dict[str, Any]:
        if not self.rows:
            raise ValueError("MetricAccumulator: no batches were added")
        mean, std = {}, {}
        for key in PER_IMAGE_KEYS:
            mean[key], std[key] = _mean_std(self.per_image(key))
        each, ece, brier_ = self.per_image("dice_each"), self.per_image("ece"), self.per_image("brier")
        n = each.shape[1]
        per_rater = {
            f"rater_{i + 1}": {
                "dice": _mean_std(each[:, i]),
                "ece": _mean_std(ece[:, i]),
                "brier": _mean_std(brier_[:, i]),
            }
            for i in range(n)
        }
        cal = self._calibration
        pooled_ece = (np.abs(cal[..., 2] - cal[..., 1]).sum(-1) / cal[..., 0].sum(-1)).tolist()
        calibration = {"ece_pooled": pooled_ece, "reliability": cal.tolist(),
                       "edges": calibration_edges(self.calibration).tolist()}  # fmt: skip
        medians = {
            "correctness": {g: histogram_median(self._entropy["_entropy_correctness"][g]) for g in CORRECTNESS},
            "agreement": {g: histogram_median(self._entropy["_entropy_agreement"][g]) for g in AGREEMENT},
            "pixels": {g: int(h.sum()) for fam in self._entropy.values() for g, h in fam.items()},
        }
        return {
            "n_images": int(self.per_image("ged").shape[0]),
            "mean": mean,
            "std": std,
            "per_rater": per_rater,
            "calibration": calibration,
            "entropy_medians": medians,
            "dice_by_size": self._dice_by_size(),
            "uncertainty_vs_raters": self._uncertainty_vs_raters(),
            "head_identity": _mean_std(self.per_image("head_identity")),
        }

    def _uncertainty_vs_raters(self) -> dict[str, Any]:
        drawn = self.per_image("raters_drawn")
        all_drew = drawn >= self._calibration.shape[0]  # every one of the N raters drew
        return uncertainty_follows_raters(self.per_image("sample_diversity")[all_drew],
                                          self.per_image("rater_diversity")[all_drew])  # fmt: skip

    def _dice_by_size(self) -> dict[str, Any]:
        size, dice = self.per_image("lesion_size"), self.per_image("dice_consensus")
        keep = size > 0
        size, dice = size[keep], dice[keep]
        out: dict[str, Any] = {"excluded_without_lesion": int((~keep).sum())}
        if size.size == 0:
            return out
        edges = np.quantile(size, [0.0, 1 / 3, 2 / 3, 1.0])
        # equally populated bins by rank (ties in size would otherwise unbalance quantile edges)
        order = np.argsort(size, kind="stable")
        for name, part in zip(("small", "medium", "large"), np.array_split(order, 3)):
            if part.size == 0:
                out[name] = {"n": 0}
                continue
            m, s = _mean_std(dice[part])
            out[name] = {"n": int(part.size), "size_range": [float(size[part].min()), float(size[part].max())],
                         "dice_mean": m, "dice_std": s}  # fmt: skip
        out["quantile_edges"] = edges.tolist()
        return out

    def markdown(self, title: str = "Evaluation") -> str:
        """The paper's table columns as mean +- std over images, then per-rater and calibration rows."""
        s = self.summary()
        cols = (("GED", "ged", 1.0), ("Dice_soft", "dice_soft", 100.0), ("Dice_max", "dice_max", 100.0),
                ("Dice_max_rev", "dice_max_reverse", 100.0), ("Dice_match", "dice_match", 100.0),
                ("Dice_mean", "dice_each_mean", 100.0))  # fmt: skip
        lines = [f"### {title} ({s['n_images']} images)", "", "| " + " | ".join(c[0] for c in cols) + " |",
                 "|" + "---|" * len(cols)]  # fmt: skip
        lines.append("| " + " | ".join(f"{s['mean'][k] * f:.4g} ± {s['std'][k] * f:.3g}" for _, k, f in cols) + " |")
        sets = (("HM-IoU", "hm_iou"), ("D_max", "d_max"), ("S_c", "combined_sensitivity"),
                ("D_a", "diversity_agreement"), ("CI", "ci_score"), ("diversity", "sample_diversity"),
                ("S_NCC", "ncc"))  # fmt: skip
        lines += ["", "| " + " | ".join(c[0] for c in sets) + " |", "|" + "---|" * len(sets),
                  "| " + " | ".join(f"{s['mean'][k]:.4g} ± {s['std'][k]:.3g}" for _, k in sets) + " |"]  # fmt: skip
        lines += ["", "| rater | Dice | ECE (pooled) | Brier |", "|---|---|---|---|"]
        for i, (name, r) in enumerate(s["per_rater"].items()):
            lines.append(f"| {name} | {r['dice'][0] * 100:.2f} ± {r['dice'][1] * 100:.2f} | "
                         f"{s['calibration']['ece_pooled'][i]:.4f} | {r['brier'][0]:.4f} |")  # fmt: skip
        med = s["entropy_medians"]
        lines += ["", "| entropy median | " + " | ".join(CORRECTNESS + AGREEMENT) + " |", "|---" * 8 + "|",
                  "| | " + " | ".join(f"{med['correctness'][g]:.3f}" for g in CORRECTNESS) + " | "
                  + " | ".join(f"{med['agreement'][g]:.3f}" for g in AGREEMENT) + " |"]  # fmt: skip
        return "\n".join(lines) + "\n"
