"""Input checks of HarmonizerNet's forward passes: every message names the argument and what was expected."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from .config import HarmonizerConfig


def check_counts(where: str, counts: Mapping[str, object]) -> None:
    """Each count of a workflow call (samples, batch, K, ...) must be an integer >= 1; numpy integers count,
    booleans do not."""
    for name, value in counts.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}: {name} must be an integer >= 1, got {value!r}")


def check_images(c: HarmonizerConfig, images: object, *, finite: bool = False) -> Tensor:
    """Images ``(B, C, H, W)``: floating point, the config's channels, H and W multiples of its size multiple;
    with ``finite``, no NaN or Inf (the inference paths check values: one pass, small beside the backbone,
    and NaN pixels would come out as NaN maps at best; training leaves that to the trainer's loss guard)."""
    if not isinstance(images, Tensor):
        raise TypeError(f"HarmonizerNet: images must be a torch.Tensor (B, C, H, W), got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"HarmonizerNet: images must be 4-D (B, C, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"HarmonizerNet: images must be floating point, got {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError("HarmonizerNet: images is an empty batch (B = 0)")
    if images.device.type == "meta":
        raise ValueError("HarmonizerNet: images must hold values (a CPU or CUDA tensor), got a meta tensor")
    if images.shape[1] != c.in_channels:
        raise ValueError(
            f"HarmonizerNet: images have {images.shape[1]} channels, the config expects in_channels={c.in_channels}"
        )
    m = c.size_multiple
    h, w = images.shape[-2:]
    if h % m or w % m or h == 0 or w == 0:
        raise ValueError(
            f"HarmonizerNet: image size {h} x {w} cannot go through {c.downsamplings} halvings; H and W must be "
            f"positive multiples of {m} (pad the images, e.g. to {-(-h // m) * m} x {-(-w // m) * m})"
        )
    if finite and not bool(torch.isfinite(images).all()):
        raise ValueError("HarmonizerNet: images contain NaN or Inf")
    return images


def check_masks(c: HarmonizerConfig, masks: object, images: Tensor) -> Tensor:
    """Rater masks ``(B, R, H, W)`` matching the images in B, H and W, with the config's rater count."""
    if not isinstance(masks, Tensor) or masks.dim() != 4:
        raise ValueError("HarmonizerNet: masks must be a 4-D tensor (B, R, H, W)")
    if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(
            f"HarmonizerNet: masks {tuple(masks.shape)} must match images {tuple(images.shape)} in B, H and W"
        )
    if masks.shape[1] != c.num_raters:
        raise ValueError(f"HarmonizerNet: masks hold {masks.shape[1]} raters, the config has num_raters={c.num_raters}")
    return masks
