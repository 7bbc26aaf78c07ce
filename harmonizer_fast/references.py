"""Label-only references: what predictors that never look at the image score on the same images, through the
same metric pipeline ([science] #35 item 3). On LIDC, where a rater left most slices empty, an all-empty
head already scores well on Dice_A(i) of that rater, and the raters' majority mask given to every head is a
strong baseline; a model's table means little without these rows beside it.

- ``all-empty``: every sample and every head predicts nothing;
- ``majority mask``: every sample and every head is the raters' majority mask (at least half drew a pixel);
- ``raters as samples (oracle)``: the samples are the raters' masks themselves, cycled to K, and head i is
  rater i (Table 1's best case, not a prediction);
- ``area-matched consensus (oracle)``: head i is the consensus shape at rater i's own area on this image
  (:func:`area_matched_consensus`), the samples those heads cycled to K. It knows every rater's area and
  nothing of their shapes: the head identity a model that reproduces each rater's size perfectly, and the
  raters' shared outline, would reach (on LIDC's all-raters test slices of fold 0: 66 %, where the raters'
  stored order is their area order and adjacent raters agree at Dice 0.83-0.86).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._deprecation import renamed_kwargs
from .data import MultiRaterData
from .metrics import MetricAccumulator

NAMES = ("all-empty", "majority mask", "raters as samples (oracle)", "area-matched consensus (oracle)")


def consensus_score(masks: Tensor) -> Tensor:
    """``(B, 1, H, W)`` float64: each pixel's share of the raters who drew it, plus a light 5 x 5 binomial
    smoothing of that share (below 1e-3, so it never reorders two sharing levels) that breaks its ties toward
    the lesion's centre: the raters' consensus as a ranking of pixels."""
    freq = masks.double().mean(1, keepdim=True)
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64)
    return freq + 1e-3 * F.conv2d(freq, (torch.outer(k, k) / 256)[None, None], padding=2)


def top_pixels(score: Tensor, areas: Tensor) -> Tensor:
    """``(B, R, H, W)`` float: mask r of image b holds the ``areas[b, r]`` pixels of highest ``score`` (ties to
    the lower pixel index). ``score`` is ``(B, R, H, W)`` (a ranking per mask) or ``(B, 1, H, W)`` (one per
    image); ``areas`` is ``(B, R)``, whole numbers of pixels. A shape at a given size: with the raters' areas and
    a model's probabilities it separates the model's outline from its size."""
    b, _, h, w = score.shape
    flat = score.flatten(2)
    rank = flat.sort(dim=2, descending=True, stable=True).indices.argsort(2)  # 0 for the best pixel
    return (rank < areas.to(rank.device)[:, :, None]).reshape(b, areas.shape[1], h, w).float()


def area_matched_consensus(masks: Tensor) -> Tensor:
    """``(B, R, H, W)`` float: for each rater r, the |Y_r| pixels the raters drew most often on that image
    (:func:`consensus_score` ranked by :func:`top_pixels`). An empty rater gets an empty mask."""
    return top_pixels(consensus_score(masks), masks.flatten(2).sum(2))


@renamed_kwargs(samples="num_samples")
def label_only_references(
    data: MultiRaterData, indices: np.ndarray, num_samples: int, batch: int = 64
) -> dict[str, Any]:
    """Tables 1 and 2 (in the form of :func:`harmonizer_fast.evaluate.summarize`) of each predictor of
    :data:`NAMES` on ``data[indices]`` with K = ``num_samples``."""
    idx = np.asarray(indices)
    accs = {n: (MetricAccumulator(), MetricAccumulator()) for n in NAMES}
    r = data.num_raters
    for s in range(0, len(idx), batch):
        y = torch.from_numpy(data.masks[idx[s : s + batch]])
        yf = y.float()
        majority = (yf.sum(1, keepdim=True) >= r / 2).float()
        preds = {
            "all-empty": (torch.zeros(y.shape[0], num_samples, *y.shape[2:]), torch.zeros_like(yf)),
            "majority mask": (majority.expand(-1, num_samples, -1, -1), majority.expand(-1, r, -1, -1)),
            "raters as samples (oracle)": (yf.repeat(1, -(-num_samples // r), 1, 1)[:, :num_samples], yf),
        }
        matched = area_matched_consensus(y)
        preds["area-matched consensus (oracle)"] = (matched.repeat(1, -(-num_samples // r), 1, 1)[:, :num_samples],
                                                    matched)  # fmt: skip
        for n, (prior, heads) in preds.items():
            accs[n][0].update(prior, y)
            accs[n][1].update(heads, y, heads)
    return {n: {"table1": a.summary(), "table2": h.summary(), "table2_heads": "label-only"}
            for n, (a, h) in accs.items()}  # fmt: skip


__all__ = ["NAMES", "area_matched_consensus", "label_only_references"]
