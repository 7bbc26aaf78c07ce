"""The one check at every public metric's boundary ([reliability] #36 item 3).

Each public metric declares its map arguments and their kind with :func:`checked`; the decorator validates
them before the metric runs, with messages that name the metric and the argument. Metrics calling metrics
(``evaluate_batch`` computes a dozen) are checked once, at the outermost call: a context variable marks the
inside, so the value passes (one min/max pass per argument) are not repeated.

Kinds of ``(B, M, H, W)`` maps:

- ``probabilities``: floating point, finite, within [0, 1] (what a model's sigmoid gives);
- ``samples``: probabilities, or binary masks as bool or uint8 (thresholded at ``> threshold``);
- ``masks``: binary rater masks, bool, uint8 or floating, values 0 and 1 only.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from ..ops._checks import check_binary, check_probabilities

F = TypeVar("F", bound=Callable[..., Any])
KINDS = ("probabilities", "samples", "masks")
_INSIDE = contextvars.ContextVar("harmonizer_fast_metric_checked", default=False)


def check_map(value: object, op: str, name: str, kind: str) -> Tensor:
    """One ``(B, M, H, W)`` map argument of kind ``kind`` (module docstring); returns it."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor (B, M, H, W), got {type(value).__name__}")
    if value.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-D (B, M, H, W), got shape {tuple(value.shape)}")
    if value.numel() == 0:
        raise ValueError(f"{op}: {name} must have B >= 1, at least one map and H, W >= 1, got shape "
                         f"{tuple(value.shape)}")  # fmt: skip
    if value.device.type == "meta":
        raise ValueError(f"{op}: {name} must hold values (a CPU or CUDA tensor), got a meta tensor")
    floating = value.is_floating_point()
    if kind == "probabilities" and not floating:
        raise TypeError(f"{op}: {name} must hold probabilities (floating point), got {value.dtype}")
    if not (floating or value.dtype in (torch.bool, torch.uint8)):
        raise TypeError(f"{op}: {name} must be bool, uint8 or floating point, got {value.dtype}")
    if kind == "masks":
        check_binary(value, op, name)
    elif floating:
        check_probabilities(value, op, name)
    return value


def check_agree(maps: Mapping[str, Tensor], op: str) -> None:
    """Every map of one call on one device, with one batch size B and one image size H x W."""
    items = list(maps.items())
    for name, t in items[1:]:
        first, ref = items[0]
        if t.shape[0] != ref.shape[0] or t.shape[2:] != ref.shape[2:]:
            raise ValueError(f"{op}: {first} {tuple(ref.shape)} and {name} {tuple(t.shape)} must agree in B, H and W")
        if t.device != ref.device:
            raise ValueError(f"{op}: {first} and {name} must be on one device, got {ref.device} and {t.device}")


def checked(optional: Sequence[str] = (), same_shape: Sequence[tuple[str, str]] = (), **kinds: str) -> Callable[[F], F]:
    """``@checked(probs="samples", raters="masks")``: validate those arguments (of those kinds) at the call,
    unless a checked metric is already running. ``optional``: arguments that may be None; ``same_shape``:
    pairs that must have one shape (a head per rater)."""
    for kind in kinds.values():
        if kind not in KINDS:
            raise ValueError(f"checked: kind must be one of {KINDS}, got {kind!r}")

    def wrap(fn: F) -> F:
        sig = inspect.signature(fn)
        op = fn.__name__

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if _INSIDE.get():
                return fn(*args, **kwargs)
            bound = sig.bind(*args, **kwargs)  # a missing or unknown argument: Python's own TypeError
            maps = {}
            for name, kind in kinds.items():
                value = bound.arguments.get(name, sig.parameters[name].default)
                if value is None and name in optional:
                    continue
                maps[name] = check_map(value, op, name, kind)
            check_agree(maps, op)
            for a, b in same_shape:
                if a in maps and b in maps and maps[a].shape != maps[b].shape:
                    raise ValueError(f"{op}: {b} must have the shape of {a} (one map per rater), "
                                     f"{tuple(maps[a].shape)}, got {tuple(maps[b].shape)}")  # fmt: skip
            token = _INSIDE.set(True)
            try:
                return fn(*args, **kwargs)
            finally:
                _INSIDE.reset(token)

        call.checked_maps = dict(kinds)  # type: ignore[attr-defined]  (tests discover the checked metrics by it)
        return call  # type: ignore[return-value]

    return wrap


# The check of every metric taking the K samples' probabilities, the raters' masks and optional heads, one map
# per rater (ece, reliability_curve, evaluate_batch, evaluate_volume).
checked_rater_maps = checked(optional=("personalized",), same_shape=(("raters", "personalized"),),
                             probs="probabilities", raters="masks", personalized="probabilities")  # fmt: skip
