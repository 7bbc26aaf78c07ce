"""Label-only references: what predictors that never look at the image score on the same images, through the
same metric pipeline ([science] #35 item 3). On LIDC, where a rater left most slices empty, an all-empty
head already scores well on Dice_A(i) of that rater, and the raters' majority mask given to every head is a
strong baseline; a model's table means little without these rows beside it.

- ``all-empty``: every sample and every head predicts nothing;
- ``majority mask``: every sample and every head is the raters' majority mask (at least half drew a pixel);
- ``raters as samples (oracle)``: the samples are the raters' masks themselves, cycled to K, and head i is
  rater i (Table 1's best case, not a prediction).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._deprecation import renamed_kwargs
from .data import MultiRaterData
from .metrics import MetricAccumulator

NAMES = ("all-empty", "majority mask", "raters as samples (oracle)")


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
        for n, (prior, heads) in preds.items():
            accs[n][0].update(prior, y)
            accs[n][1].update(heads, y, heads)
    return {n: {"table1": a.summary(), "table2": h.summary(), "table2_heads": "label-only"}
            for n, (a, h) in accs.items()}  # fmt: skip


__all__ = ["NAMES", "label_only_references"]
