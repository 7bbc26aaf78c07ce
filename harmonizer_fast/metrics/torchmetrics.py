"""The multi-rater set-level metrics as ``torchmetrics.Metric`` classes (``pip install
'harmonizer-fast[adapters]'``): ``update(samples, raters)`` per batch, ``compute()``, ``reset()``, and
torchmetrics' own synchronization across processes.

Each class averages a per-image metric of :mod:`harmonizer_fast.metrics.set_level` (GED: of
:mod:`harmonizer_fast.metrics.energy`) over images:
``samples (B, K, H, W)`` probabilities or binary masks, ``raters (B, N, H, W)`` binary masks. The state is
two sums (value and image count, plus the count of undefined images, e.g. the kohl GED's NaN), reduced with
``sum``, so any split of the images over batches or ranks gives the single-process mean. Options of the
metric (``threshold``, ``convention``, ...) and of ``torchmetrics.Metric`` (``dist_sync_on_step``, ...) are
keyword arguments alike::

    from harmonizer_fast.metrics.torchmetrics import GeneralizedEnergyDistance, collection
    ged = GeneralizedEnergyDistance(convention="phiseg")
    ged.update(samples, raters); ged.compute()
    everything = collection()  # a MetricCollection of every class below
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .._extras import missing_extra

try:
    from torchmetrics import Metric, MetricCollection
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise missing_extra("torchmetrics", "harmonizer_fast.metrics.torchmetrics") from e

from ._adapters import SPECS, per_image, split_options

# torchmetrics.Metric's own keyword arguments (passed through to it).
_FRAMEWORK = frozenset(
    {"compute_on_cpu", "dist_sync_on_step", "process_group", "dist_sync_fn", "distributed_available_fn",
     "sync_on_compute", "compute_with_cache"}
)  # fmt: skip


class SetLevelMetric(Metric):
    """Mean over images of one set-level metric (``metric`` names it in ``SPECS``)."""

    metric: str = ""
    is_differentiable = False
    full_state_update = False
    higher_is_better: Optional[bool] = None

    def __init__(self, **kwargs: Any) -> None:
        spec = SPECS[self.metric]
        self._options = split_options(type(self).__name__, spec, kwargs, _FRAMEWORK)
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("images", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("undefined", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, samples: Tensor, raters: Tensor) -> None:
        v = per_image(type(self).__name__, SPECS[self.metric], samples, raters, self._options).to(self.total.device)
        defined = ~torch.isnan(v)
        self.total += v[defined].sum()
        self.images += defined.sum()
        self.undefined += (~defined).sum()

    def compute(self) -> Tensor:
        """The mean over the images where the metric is defined (NaN if there are none)."""
        return self.total / self.images if self.images > 0 else torch.full_like(self.total, float("nan"))


class GeneralizedEnergyDistance(SetLevelMetric):
    """GED with d = 1 - IoU, ``convention=`` any of ``harmonizer_fast.metrics.CONVENTIONS``."""

    metric = "ged"
    higher_is_better = False


class HungarianMatchedIoU(SetLevelMetric):
    """HM-IoU (Kohl et al. 2019): :func:`harmonizer_fast.metrics.hm_iou`."""

    metric = "hm_iou"
    higher_is_better = True


class MaxDiceMatching(SetLevelMetric):
    """D_max (Rahman et al. 2023): :func:`harmonizer_fast.metrics.d_max`."""

    metric = "d_max"
    higher_is_better = True


class CombinedSensitivity(SetLevelMetric):
    """S_c (Rahman et al. 2023): :func:`harmonizer_fast.metrics.combined_sensitivity`."""

    metric = "combined_sensitivity"
    higher_is_better = True


class DiversityAgreement(SetLevelMetric):
    """D_a (Rahman et al. 2023): :func:`harmonizer_fast.metrics.diversity_agreement`."""

    metric = "diversity_agreement"
    higher_is_better = True


class CollectiveInsight(SetLevelMetric):
    """The CI score (Rahman et al. 2023): :func:`harmonizer_fast.metrics.ci_score`."""

    metric = "ci_score"
    higher_is_better = True


class SampleDiversity(SetLevelMetric):
    """Mean pairwise 1 - IoU among the samples, :func:`harmonizer_fast.metrics.sample_diversity` (raters unused)."""

    metric = "sample_diversity"


class NormalizedCrossCorrelation(SetLevelMetric):
    """PHiSeg's S_NCC: :func:`harmonizer_fast.metrics.ncc`."""

    metric = "ncc"
    higher_is_better = True


CLASSES: dict[str, type[SetLevelMetric]] = {
    c.metric: c
    for c in (GeneralizedEnergyDistance, HungarianMatchedIoU, MaxDiceMatching, CombinedSensitivity,
              DiversityAgreement, CollectiveInsight, SampleDiversity, NormalizedCrossCorrelation)
}  # fmt: skip


def collection(threshold: float = 0.5, **kwargs: Any) -> MetricCollection:
    """Every set-level metric in one ``MetricCollection`` keyed by the metric's name (``ged``, ``hm_iou``,
    ...); ``kwargs`` go to ``torchmetrics.Metric`` of each."""
    # compute_groups=False: torchmetrics would merge metrics whose states happen to be equal after the first
    # batch (two metrics at 1.0 on a perfect batch) and report one value for both from then on.
    return MetricCollection({name: cls(threshold=threshold, **kwargs) for name, cls in CLASSES.items()},
                            compute_groups=False)  # fmt: skip


__all__ = ["CLASSES", "SetLevelMetric", "collection", *(c.__name__ for c in CLASSES.values())]
