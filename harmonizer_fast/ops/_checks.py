"""Input validation shared by the ops: every message names the op, the argument and what was expected."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from . import _autocast

NOT_PROBABILITY = "{op}: {name} must hold probabilities, finite and within [0, 1]"
NOT_BINARY = "{op}: {name} must be binary masks (values 0 and 1 only)"


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


def check_binary(t: torch.Tensor, op: str, name: str) -> None:
    """bool masks, or values 0 and 1 only (one pass; NaN fails the compares)."""
    from .._backend import InvalidInputError

    if t.dtype != torch.bool and not bool(((t == 0) | (t == 1)).all()):
        raise InvalidInputError(NOT_BINARY.format(op=op, name=name))


def check_threshold(value: object, op: str, name: str = "threshold") -> float:
    """A mask threshold (strict ``>``) for probabilities: a real number in [0, 1); 1 or more would empty every
    mask and a negative one fill it, NaN would empty it silently. Returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{op}: {name} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_probabilities(t: torch.Tensor, op: str, name: str) -> None:
    """Every value finite and within [0, 1] ([reliability] #36: probabilities above 1, below 0 or Inf were
    thresholded as if they were probabilities, and logits passed silently). One min/max pass; NaN fails the
    comparisons and is refused with the rest. The kernels that threshold make the same check in their own pass
    and raise the same message (ops/ged.py), so every backend words it alike."""
    from .._backend import InvalidInputError

    if t.numel() == 0 or torch.compiler.is_compiling():  # a data-dependent branch would break the graph
        return
    lo, hi = torch.aminmax(t.detach()) if t.is_floating_point() else (t.min(), t.max())
    lo, hi = float(lo), float(hi)
    if not (lo >= 0.0 and hi <= 1.0):
        raise InvalidInputError(f"{NOT_PROBABILITY.format(op=op, name=name)}; got values from {lo:g} to {hi:g}")
