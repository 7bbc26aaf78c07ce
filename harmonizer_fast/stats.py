"""Paired comparisons over test images, for claims of "better" (docs/architecture.md, "Metrics").

:func:`paired_test` is the two-sided Wilcoxon signed-rank test (scipy) of two models' per-image scores, with
the matched-pairs rank-biserial correlation as its effect size (Kerby 2014): r = (R+ - R-) / (R+ + R-), the
rank sums of the positive and negative differences a - b, so r is in [-1, 1], positive when ``a`` scores
higher, and swapping the two models flips its sign. Zero differences are dropped (Wilcoxon's convention,
scipy's default), and images where either score is NaN are left out and counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata, wilcoxon


def rank_biserial(d: np.ndarray) -> float:
    """The matched-pairs rank-biserial correlation of differences ``d`` (zeros dropped); 0 when all are zero."""
    d = d[d != 0]
    if d.size == 0:
        return 0.0
    ranks = rankdata(np.abs(d))
    return float((ranks[d > 0].sum() - ranks[d < 0].sum()) / ranks.sum())


def paired_test(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """``a`` against ``b``, paired by image: the count, mean difference a - b, images better and worse, the
    rank-biserial effect and the two-sided Wilcoxon signed-rank p-value (1.0 when every difference is 0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_test: a and b must be 1-D of one length, got shapes {a.shape} and {b.shape}")
    keep = ~(np.isnan(a) | np.isnan(b))
    d = a[keep] - b[keep]
    p = float(wilcoxon(d).pvalue) if np.any(d != 0) else 1.0
    return {
        "n_images": int(d.size),
        "n_nan_dropped": int((~keep).sum()),
        "mean_difference": float(d.mean()) if d.size else float("nan"),
        "images_better": int((d > 0).sum()),
        "images_worse": int((d < 0).sum()),
        "rank_biserial": rank_biserial(d),
        "wilcoxon_p": p,
    }
