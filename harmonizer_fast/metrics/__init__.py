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
  :func:`sample_diversity`, :func:`ncc` (PHiSeg's S_NCC); :func:`ged` (:mod:`.energy`, also ``hf.ged``) with
  optional per-sample and per-rater weights (every convention of ``CONVENTIONS`` by name, ``get_convention``;
  docs/ged-conventions.md compares them).
- Framework adapters, imported only on request: :mod:`harmonizer_fast.metrics.torchmetrics` and
  :mod:`harmonizer_fast.metrics.monai`.

Each group lives in a module with one job, re-exported here: :mod:`.overlap` (per-image Dice scores),
:mod:`.calibration`, :mod:`.uncertainty`, :mod:`.set_level`, :mod:`.batch` (one call per batch) and
:mod:`.accumulator` (the dataset-level tables).
"""

from __future__ import annotations

from .accumulator import MetricAccumulator
from .batch import PER_IMAGE_KEYS, evaluate_batch, evaluate_volume, stack_volume
from .calibration import ECE_BINS, brier, calibration_bins, calibration_edges, ece, ece_from_bins, reliability_curve

# GED in one place: conventions, terms, the one public ged (weights included); hf.ged is the same function
from .energy import CONVENTIONS, DEFAULT_CONVENTION, Convention, GEDTerms, ged, ged_terms, get_convention
from .overlap import DICE_SMOOTH, SOFT_THRESHOLDS, dice_binary, dice_matrix, dice_soft, dice_soft_curve, hungarian_match

# Set-level metrics of ambiguous segmentation, importable from here as users expect (hf.metrics.hm_iou)
from .set_level import (
    SET_LEVEL_KEYS,
    ci_score,
    combined_sensitivity,
    d_max,
    diversity_agreement,
    hm_iou,
    ncc,
    pair_variances,
    sample_diversity,
    set_level_metrics,
)
from .uncertainty import (
    AGREEMENT,
    CORRECTNESS,
    ENTROPY_BINS,
    agreement_groups,
    correctness_groups,
    entropy_map,
    histogram_median,
    uncertainty_follows_raters,
)

__all__ = [
    "AGREEMENT", "CONVENTIONS", "CORRECTNESS", "Convention", "DEFAULT_CONVENTION", "DICE_SMOOTH", "ECE_BINS",
    "ENTROPY_BINS", "GEDTerms", "MetricAccumulator", "PER_IMAGE_KEYS", "SET_LEVEL_KEYS", "SOFT_THRESHOLDS",
    "agreement_groups", "brier", "calibration_bins", "calibration_edges", "ci_score", "combined_sensitivity",
    "correctness_groups", "d_max", "dice_binary", "dice_matrix", "dice_soft", "dice_soft_curve",
    "diversity_agreement", "ece", "ece_from_bins", "entropy_map", "evaluate_batch", "evaluate_volume", "ged",
    "ged_terms", "get_convention", "histogram_median", "hm_iou", "hungarian_match", "ncc", "pair_variances",
    "reliability_curve", "sample_diversity", "set_level_metrics", "stack_volume", "uncertainty_follows_raters",
]  # fmt: skip
