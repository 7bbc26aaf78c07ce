"""Preprocessing as data: how raw pixels become the network's input, recorded in every checkpoint.

A :class:`Preprocessing` travels in the checkpoint manifest (``"preprocessing"``), so ``predict``, ``sample``,
``evaluate`` and the exported model's metadata apply what the model was trained with instead of asking the
user to normalise and pad by hand. Checkpoints written before it existed read as the default recipe, which is
what the dataset readers have always done (:func:`harmonizer_fast.data.dataset.normalize_images`).

Intensities (per 2-D image and channel, as in training):

- ``intensity="auto"``: uint8 is divided by 255 and uint16 by 65535 (scaled, never clipped); floating images
  already in [0, 1] are kept; any other image (floats beyond [0, 1], signed or 32-bit integers such as CT
  Hounsfield units) is min-max scaled to [0, 1] (a constant image becomes 0).
- ``intensity="window"``: clip to ``window = (low, high)`` and scale to [0, 1], the radiologist's intensity
  window (for CT lungs, e.g. (-1350, 150) HU: level -600, width 1500). Same result for every slice of a scan.

Geometry: H and W are zero-padded at their ends to multiples of ``size_multiple`` (the network's five
halvings); predictions are cropped back to the input's size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

INTENSITY = ("auto", "window")


@dataclass(frozen=True)
class Preprocessing:
    intensity: str = "auto"
    window: Optional[tuple[float, float]] = None
    size_multiple: int = 32

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITY:
            raise ValueError(f"preprocessing: intensity must be one of {INTENSITY}, got {self.intensity!r}")
        if self.intensity == "window":
            w = self.window
            if (not isinstance(w, (tuple, list)) or len(w) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in w)
                    or not w[0] < w[1]):  # fmt: skip
                raise ValueError(f"preprocessing: window must be two finite numbers low < high, got {w!r}")
            object.__setattr__(self, "window", (float(w[0]), float(w[1])))
        elif self.window is not None:
            raise ValueError("preprocessing: a window needs intensity='window'")
        m = self.size_multiple
        if not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= 1024:
            raise ValueError(f"preprocessing: size_multiple must be an int in [1, 1024], got {m!r}")

    @classmethod
    def ct_window(cls, low: float, high: float) -> Preprocessing:
        return cls("window", (low, high))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["window"] = list(self.window) if self.window is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Preprocessing:
        """The recipe of a manifest (``None``: a checkpoint older than the field, which used the default)."""
        if d is None:
            return cls()
        if not isinstance(d, dict) or set(d) - {"intensity", "window", "size_multiple"}:
            raise ValueError(f"preprocessing: expected an object with intensity, window, size_multiple, got {d!r}")
        w = d.get("window")
        return cls(d.get("intensity", "auto"), tuple(w) if isinstance(w, list) else w, d.get("size_multiple", 32))

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """Raw images ``(..., H, W)`` (any leading dims: slices, channels) -> float32 in [0, 1], per 2-D image."""
        x = np.asarray(images)
        if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise ValueError(f"images must hold integer or floating-point pixels, got {x.dtype}")
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise ValueError("images contain NaN or Inf")
        if self.intensity == "window":
            lo, hi = self.window
            return ((np.clip(x.astype(np.float64), lo, hi) - lo) / (hi - lo)).astype(np.float32)
        if x.dtype == np.uint8:
            return x.astype(np.float32) / 255.0
        if x.dtype == np.uint16:
            return x.astype(np.float32) / 65535.0
        f = x.astype(np.float32)  # float32 arithmetic, as training's readers have always done it
        if np.issubdtype(x.dtype, np.floating) and f.size and f.min() >= 0.0 and f.max() <= 1.0:
            return f
        lo = f.min(axis=(-2, -1), keepdims=True)
        span = f.max(axis=(-2, -1), keepdims=True) - lo
        return np.where(span > 0, (f - lo) / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)

    def pad(self, images: np.ndarray) -> np.ndarray:
        """Zero-pad the last two dims at their ends to multiples of ``size_multiple``."""
        h, w = images.shape[-2:]
        ph, pw = -h % self.size_multiple, -w % self.size_multiple
        if ph == 0 and pw == 0:
            return images
        return np.pad(images, [(0, 0)] * (images.ndim - 2) + [(0, ph), (0, pw)])

    def describe(self) -> str:
        pad = f"pad to multiples of {self.size_multiple}"
        if self.intensity == "window":
            return f"window [{self.window[0]:g}, {self.window[1]:g}] -> [0, 1]; {pad}"
        return f"uint8/255, uint16/65535, else per-image min-max; {pad}"
