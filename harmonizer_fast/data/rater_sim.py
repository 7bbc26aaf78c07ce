"""Rater simulation for single-annotator data (paper appendix J, Kvasir-SEG), deterministic under a seed.

Following the noise-injection protocol the paper cites, each expert mask yields three more plausible
annotations by perturbing its boundary with a smooth random displacement, measured in units of the lesion's
equivalent radius r = sqrt(area / pi):

- ``S_R`` (simulated random, sigma = 0.2): the outline moves by a smooth random field with standard
  deviation 0.2 r;
- ``S_E`` (simulated extreme, sigma = 0.8): the same with 0.8 r (large, irregular deviations);
- ``S_DE`` (simulated diverse expert): a systematic style, dilation or erosion by 0.15 r (sign drawn per
  mask), plus a mild smooth field (0.1 r): a consistent tight or loose annotator.

The perturbation acts on the signed distance to the outline (negative inside), so the results stay single
blobs with natural boundaries. The order of the output raters is (expert, S_R, S_E, S_DE).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .dataset import MultiRaterData

SIGMA_RANDOM, SIGMA_EXTREME, SIGMA_DIVERSE, DIVERSE_SHIFT = 0.2, 0.8, 0.1, 0.15


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    return ndimage.distance_transform_edt(~mask) - ndimage.distance_transform_edt(mask)


def _field(rng: np.random.Generator, shape: tuple[int, int], smooth: float) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal(shape), smooth)
    return f / (f.std() + 1e-12)  # unit standard deviation: sigma is the typical displacement


def simulate_raters(mask: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """``(4, H, W)`` uint8: the expert mask and its S_R, S_E, S_DE variants (see the module docstring)."""
    m = np.asarray(mask) > 0
    if m.ndim != 2:
        raise ValueError(f"simulate_raters: mask must be 2-D (H, W), got shape {m.shape}")
    out = np.zeros((4, *m.shape), np.uint8)
    out[0] = m
    if not m.any():
        return out  # nothing to perturb: every simulated rater agrees on "no lesion"
    rng = np.random.default_rng(seed)
    sd = _signed_distance(m)
    r = max(1.0, float(np.sqrt(m.sum() / np.pi)))
    smooth = max(1.0, r / 2)
    out[1] = sd + SIGMA_RANDOM * r * _field(rng, m.shape, smooth) < 0
    out[2] = sd + SIGMA_EXTREME * r * _field(rng, m.shape, smooth) < 0
    shift = DIVERSE_SHIFT * r * (1 if rng.random() < 0.5 else -1)
    out[3] = sd - shift + SIGMA_DIVERSE * r * _field(rng, m.shape, smooth) < 0
    return out


def simulate_dataset(data: MultiRaterData, *, seed: int = 0) -> MultiRaterData:
    """Four raters per item from the first rater of ``data`` (seeded per item: reproducible subsets)."""
    masks = np.stack([simulate_raters(m[0], seed=seed * 1_000_003 + i) for i, m in enumerate(data.masks)])
    return MultiRaterData(data.images, masks, data.patient_id, f"{data.source} + simulated raters")
