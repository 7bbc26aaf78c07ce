"""Synthetic multi-rater data: the embedded default, so that every command runs on a fresh machine with no
download (docs/architecture.md, "Data"). Deterministic for a seed.

Each item is a ``size x size`` grey image with one lesion (a blob with a wobbly outline and a soft edge) on
textured background, and one mask per rater. Raters have distinct styles that stay the same across items:

==========  ==========================================================================================
rater 0     tight: traces inside the edge (eroded by 2 pixels)
rater 1     smooth: the lesion's convex-ish envelope at its edge (outline wobble averaged away)
rater 2     loose: a generous margin (dilated by 2 pixels)
rater 3     very loose: a wide margin (dilated by 4 pixels)
rater 4     conservative: misses small or faint lesions entirely, otherwise at the edge
rater 5+    further raters cycle through the styles with small random offsets
==========  ==========================================================================================

So the first four raters' outlines sit 2 pixels apart and their mean areas grow from rater 0 to rater 3: a
personalizer that works puts head i closest to rater i (``tests/test_personalization.py``).

Scanner effects differ per patient ("scanner"): Gaussian noise level, blur, gamma, and a smooth intensity
drift (bias field); some lesions are faint. Patients hold ``items_per_patient`` consecutive items.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .dataset import MultiRaterData


def _smooth_field(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
    return f / (np.abs(f).max() + 1e-12)


def make_synthetic(
    n: int = 256, *, size: int = 64, raters: int = 4, seed: int = 0, items_per_patient: int = 4,
    radius: tuple[float, float] = (0.06, 0.22),
) -> MultiRaterData:
    """``n`` items of synthetic multi-rater data (images normalized to [0, 1], masks {0, 1}). ``radius``: the
    range of the structure's radius as a share of ``size`` (the default draws structures covering about 1-15 %
    of the image; ``(0.2, 0.23)`` gives large ones, 13-17 %, like an organ on MRI)."""
    if n < 1 or raters < 1 or size < 16:
        raise ValueError(f"make_synthetic: need n >= 1, raters >= 1, size >= 16; got {n}, {raters}, {size}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    images = np.empty((n, 1, size, size), np.float32)
    masks = np.empty((n, raters, size, size), np.uint8)
    patients = np.array([f"synth-{i // items_per_patient:04d}" for i in range(n)])
    scanners: dict[str, tuple[float, float, float, np.ndarray]] = {}
    r_range = radius
    for i in range(n):
        pid = patients[i]
        if pid not in scanners:  # scanner effects per patient: noise, blur, gamma, bias field
            scanners[pid] = (rng.uniform(0.03, 0.12), rng.uniform(0.0, 1.2), rng.uniform(0.7, 1.5),
                             0.15 * _smooth_field(rng, size, size / 4))  # fmt: skip
        noise, blur, gamma, drift = scanners[pid]
        radius = rng.uniform(*r_range) * size
        cy, cx = rng.uniform(0.3, 0.7, size=2) * size
        angle = np.arctan2(yy - cy, xx - cx)
        wobble = sum(rng.normal(0, 0.12) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in range(2, 6))
        aspect = rng.uniform(0.7, 1.3)
        dist = np.sqrt(((yy - cy) * aspect) ** 2 + ((xx - cx) / aspect) ** 2) / radius
        signed = dist - (1 + wobble)  # < 0 inside the lesion's true outline
        contrast = rng.uniform(0.25, 0.6) if rng.random() < 0.8 else rng.uniform(0.08, 0.15)  # some are faint
        lesion = contrast / (1 + np.exp(signed * radius / 1.5))
        texture = 0.05 * _smooth_field(rng, size, 2.0)
        img = 0.3 + texture + lesion + drift
        if blur > 0.1:
            img = ndimage.gaussian_filter(img, blur)
        img = img + rng.normal(0, noise, img.shape)
        images[i, 0] = np.clip(img, 0, 1) ** gamma
        inside = signed * radius  # signed distance-like, in pixels
        smooth_inside = (dist - 1) * radius
        area = float((inside < 0).sum())
        for r in range(raters):
            style = r % 5
            jitter = rng.normal(0, 0.3)
            if style == 0:
                m = inside < -2.0 + jitter
            elif style == 1:
                m = smooth_inside < jitter
            elif style == 2:
                m = inside < 2.0 + jitter
            elif style == 3:
                m = inside < 4.0 + jitter
            else:
                m = (inside < 0.3 + jitter) & (area > 0.03 * size * size) & (contrast > 0.15)
            masks[i, r] = m
    return MultiRaterData(images, masks, patients, f"synthetic(n={n}, size={size}, raters={raters}, seed={seed})")
