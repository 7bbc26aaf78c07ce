"""The multi-rater set-level metrics as MONAI ``CumulativeIterationMetric`` classes (``pip install
'harmonizer-fast[adapters]'``): ``metric(y_pred=samples, y=raters)`` per batch, ``aggregate()``,
``reset()``, with MONAI's buffer gathered across ranks under torch.distributed.

``y_pred`` holds the K samples of each image on the channel dim, ``(B, K, H, W)`` probabilities or binary
masks, and ``y`` the N raters, ``(B, N, H, W)``: the dims a MONAI user reserves for classes carry the sets
here. Each call buffers one value per image, ``(B, 1)``; ``aggregate()`` reduces the buffer with MONAI's
``do_metric_reduction`` (``reduction="mean"`` by default, NaN images, e.g. the kohl GED's, left out), and
``get_buffer()`` returns the per-image values::

    from harmonizer_fast.metrics.monai import GeneralizedEnergyDistanceMetric
    metric = GeneralizedEnergyDistanceMetric(convention="phiseg")
    for samples, raters in loader:
        metric(y_pred=samples, y=raters)
    value = metric.aggregate().item(); metric.reset()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._extras import missing_extra

try:
    from monai.metrics import CumulativeIterationMetric
    from monai.metrics.utils import do_metric_reduction
    from monai.utils import MetricReduction
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise missing_extra("monai", "harmonizer_fast.metrics.monai") from e

from ._adapters import SPECS, per_image, split_options


class SetLevelMetric(CumulativeIterationMetric):
    """One set-level metric per image (``metric`` names it in ``SPECS``), buffered and reduced MONAI's way."""

    metric: str = ""

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN, **kwargs: Any) -> None:
        super().__init__()
        self.reduction = reduction
        self._options = split_options(type(self).__name__, SPECS[self.metric], kwargs, frozenset())

    def _compute_tensor(self, y_pred: Tensor, y: Tensor | None = None, **kwargs: Any) -> Tensor:
        if y is None:
            raise ValueError(f"{type(self).__name__}: y (the raters, (B, N, H, W)) is required")
        return per_image(type(self).__name__, SPECS[self.metric], y_pred, y, self._options)[:, None]

    def aggregate(self, reduction: MetricReduction | str | None = None) -> Tensor:
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"{type(self).__name__}: nothing to aggregate; call the metric on a batch first")
        value, not_nans = do_metric_reduction(data, reduction or self.reduction)
        # MONAI reduces a column with no defined value to 0; undefined is not a score of 0.
        return torch.where(not_nans > 0, value, torch.full_like(value, float("nan")))


class GeneralizedEnergyDistanceMetric(SetLevelMetric):
    """GED with d = 1 - IoU (lower is better), ``convention=`` any of ``harmonizer_fast.metrics.CONVENTIONS``."""

    metric = "ged"


class HungarianMatchedIoUMetric(SetLevelMetric):
    """HM-IoU (Kohl et al. 2019)."""

    metric = "hm_iou"


class MaxDiceMatchingMetric(SetLevelMetric):
    """D_max (Rahman et al. 2023)."""

    metric = "d_max"


class CombinedSensitivityMetric(SetLevelMetric):
    """S_c (Rahman et al. 2023)."""

    metric = "combined_sensitivity"


class DiversityAgreementMetric(SetLevelMetric):
    """D_a (Rahman et al. 2023)."""

    metric = "diversity_agreement"


class CollectiveInsightMetric(SetLevelMetric):
    """The CI score (Rahman et al. 2023)."""

    metric = "ci_score"


class SampleDiversityMetric(SetLevelMetric):
    """Mean pairwise 1 - IoU among the samples (``y`` is required by the protocol but not used)."""

    metric = "sample_diversity"


class NormalizedCrossCorrelationMetric(SetLevelMetric):
    """PHiSeg's S_NCC."""

    metric = "ncc"


CLASSES: dict[str, type[SetLevelMetric]] = {
    c.metric: c
    for c in (GeneralizedEnergyDistanceMetric, HungarianMatchedIoUMetric, MaxDiceMatchingMetric,
              CombinedSensitivityMetric, DiversityAgreementMetric, CollectiveInsightMetric, SampleDiversityMetric,
              NormalizedCrossCorrelationMetric)
}  # fmt: skip

__all__ = ["CLASSES", "SetLevelMetric", *(c.__name__ for c in CLASSES.values())]
