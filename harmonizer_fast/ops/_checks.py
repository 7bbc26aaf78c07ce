"""Input validation shared by the ops: every message names the op, the argument and what was expected."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _autocast


def check_float_tensor(t: object, op: str, name: str, ndim: int, layout: str) -> torch.Tensor:
    """Require a non-empty floating tensor of rank ``ndim``; ``layout`` names the dims, e.g. "(N, C, H, W)"."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(
            f"{op}: {name} must be a {ndim}-D tensor {layout}, got a {t.dim()}-D tensor of shape {tuple(t.shape)}"
        )
    if not t.is_floating_point():
        raise TypeError(
            f"{op}: {name} must be a floating-point tensor (float32, float64, float16 or bfloat16), got {t.dtype}"
        )
    if t.numel() == 0:
        raise ValueError(f"{op}: {name} is empty (shape {tuple(t.shape)}); every dimension of {layout} must be >= 1")
    return t


def check_same_device_dtype(ref: torch.Tensor, t: torch.Tensor, op: str, ref_name: str, name: str) -> None:
    """One device and one dtype; under autocast, half and single precision may mix (ops/_autocast.py)."""
    if t.device != ref.device or (t.dtype != ref.dtype and not _autocast.mixable(ref, t)):
        raise ValueError(
            f"{op}: {name} must have the device and dtype of {ref_name} ({ref.device}, {ref.dtype}), "
            f"got ({t.device}, {t.dtype})"
        )


def check_shape(t: torch.Tensor, expected: Sequence[int], op: str, name: str, layout: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {layout} = {tuple(expected)}, got {tuple(t.shape)}")


def check_probabilities(t: torch.Tensor, op: str, name: str) -> None:
    """Every value finite and within [0, 1] ([reliability] #36: probabilities above 1, below 0 or Inf were
    thresholded as if they were probabilities, and logits passed silently). One min/max pass; NaN fails the
    comparisons and is refused with the rest."""
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t.detach()) if t.is_floating_point() else (t.min(), t.max())
    lo, hi = float(lo), float(hi)
    if not (lo >= 0.0 and hi <= 1.0):
        raise ValueError(f"{op}: {name} must hold probabilities, finite and within [0, 1]; got values from {lo:g} to "
                         f"{hi:g}")  # fmt: skip
