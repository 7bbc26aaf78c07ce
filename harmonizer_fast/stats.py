"""Paired comparisons over test images, for claims of "better" (docs/architecture.md, "Metrics").

:func:`paired_test` is the two-sided Wilcoxon signed-rank test (scipy) of two models' per-image scores, with
the matched-pairs rank-biserial correlation as its effect size (Kerby 2014): r = (R+ - R-) / (R+ + R-), the
rank sums of the positive and negative differences a - b, so r is in [-1, 1], positive when ``a`` scores
higher, and swapping the two models flips its sign. Zero differences are dropped (Wilcoxon's convention,
scipy's default), and images where either score is NaN are left out and counted.

Slices of one patient are not independent (on LIDC the intra-patient correlation of the scores is about
0.24), so claims pair **patients**: :func:`per_patient` averages each patient's images first. A claim tested
under several conditions is one family: :func:`holm` adjusts its p-values (Holm 1979).
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


def per_patient(values: np.ndarray, patient_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sorted patient ids and each patient's mean of ``values`` over its images (NaN images ignored; a
    patient with only NaN gets NaN), for tests over patients rather than slices."""
    values, patient_id = np.asarray(values, dtype=np.float64), np.asarray(patient_id)
    if values.shape != patient_id.shape or values.ndim != 1:
        raise ValueError(f"per_patient: values and patient_id must be 1-D of one length, got {values.shape} and "
                         f"{patient_id.shape}")  # fmt: skip
    patients, inverse = np.unique(patient_id, return_inverse=True)
    ok = ~np.isnan(values)
    sums = np.bincount(inverse[ok], weights=values[ok], minlength=len(patients))
    counts = np.bincount(inverse[ok], minlength=len(patients))
    with np.errstate(invalid="ignore", divide="ignore"):
        return patients, np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values, in their order: the k-th smallest (k = 1..m) is
    multiplied by m - k + 1, made non-decreasing along that order and capped at 1. A claim whose adjusted p is
    below alpha holds at family-wise error alpha, however many of the family's conditions were tested."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or np.any(np.isnan(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(f"holm: expected p-values in [0, 1], got {p_values!r}")
    order = np.argsort(p, kind="stable")
    m = p.size
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()
