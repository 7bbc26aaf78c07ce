"""Pairwise IoU and intersections of mask sets, and the distance sums of the generalized energy distance (GED).

API, validation, references, autograd and dispatch (docs/architecture.md, "Conventions"). Everything comes from three
numbers per pair of masks: the intersection ``I = sum_p a(p) b(p)`` (a Gram matrix over pixels: a matrix
product) and the two areas. IoU ``= I / (U + eps)`` with ``U = S_a + S_b - I``, or ``empty_iou`` when U = 0.

This module is layer 1 of GED: the pairwise counts and the distance sums (:func:`ged_sums`) in fused
kernels. The published conventions, the means built from the sums and the public ``ged`` live in
:mod:`harmonizer_fast.metrics.energy`; the GED loss of Eq. 7 in :mod:`harmonizer_fast.losses` (on
:func:`soft_gram`).

Implementations: the ``*_reference`` functions here (torch), ``harmonizer_fast.kernels.ged`` (Triton),
``csrc/cuda/ged.cu`` (CUDA) and ``csrc/cpu/ged.cpp`` (CPU: bit-packed masks and popcounts; ATen's BLAS for
soft Gram matrices).
"""

# No `from __future__ import annotations` here: torch.library.custom_op reads the annotations at runtime.
from enum import IntEnum

import torch
from torch import Tensor

from .. import _backend
from . import _autocast
from . import _examples as _ex
from ._checks import NOT_BINARY, NOT_PROBABILITY, check_binary, check_probabilities, check_threshold


class OverlapMode(IntEnum):
    """What ``pairwise_overlap`` returns per pair (the numbering of csrc/include/ged.h and kernels/ged.py)."""

    GRAM = 0  # intersections
    IOU = 1



_MASK_DTYPES_CPU = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.bool})
_MASK_DTYPES_CUDA = _MASK_DTYPES_CPU
# Binary masks: every backend thresholds the input itself. Soft masks: floating types (float64 is left to
# the C++ and reference paths on GPU; the Triton kernel accumulates in float32).
BINARY_SUPPORT: _backend.Support = {
    "triton": {"cuda": _MASK_DTYPES_CUDA, "cpu": _MASK_DTYPES_CPU},
    "cuda": {"cuda": _MASK_DTYPES_CUDA},
    "cpu": {"cpu": _MASK_DTYPES_CPU},
}
SOFT_SUPPORT: _backend.Support = {
    "triton": {"cuda": _backend.FLOATS_CUDA - {torch.float64}, "cpu": frozenset({torch.float32})},
    "cuda": {"cuda": _backend.FLOATS_CUDA},
    "cpu": {"cpu": _backend.FLOATS_CPU},
}


def _soft_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------
# References: the definition of correct, and the "torch" backend.


def _masks_reference(x: Tensor, threshold: float, soft: bool) -> Tensor:
    if soft:
        return x.to(_soft_dtype(x.dtype))
    return (x > threshold).to(torch.float32)  # counts below 2^24 are exact in float32


def iou_from_counts(inter: Tensor, area_a: Tensor, area_b: Tensor, eps: float, empty_iou: float) -> Tensor:
    """IoU of every pair from the intersections ``(B, Ka, Kb)`` and the areas ``(B, Ka)``, ``(B, Kb)``:
    I / (U + eps), or ``empty_iou`` where the union U is empty (``pair_iou`` in csrc/include/ged.h and the
    Triton epilogue compute the same). Differentiable: the empty branch never divides by zero."""
    uni = area_a[:, :, None] + area_b[:, None, :] - inter
    return torch.where(uni > 0, inter / torch.where(uni > 0, uni + eps, 1.0), empty_iou)


def _iou_reference(af: Tensor, bf: Tensor, eps: float, empty_iou: float) -> Tensor:
    """IoU of every pair of rows of (B, Ka, P) and (B, Kb, P) masks, in float64."""
    inter = torch.bmm(af, bf.transpose(1, 2)).double()
    return iou_from_counts(inter, af.sum(-1).double(), bf.sum(-1).double(), eps, empty_iou)


def pairwise_overlap_reference(
    a: Tensor, b: Tensor, threshold: float, soft: bool, eps: float, empty_iou: float, mode: int
) -> Tensor:
    """Intersections (GRAM) or IoU (IOU) of a ``(B, Ka, P)`` and b ``(B, Kb, P)`` by ``torch.bmm``."""
    af, bf = _masks_reference(a, threshold, soft), _masks_reference(b, threshold, soft)
    if mode == OverlapMode.GRAM:
        return torch.bmm(af, bf.transpose(1, 2))
    return _iou_reference(af, bf, eps, empty_iou).to(af.dtype)


def _distance_sum(d: Tensor, offdiag: bool) -> Tensor:
    if offdiag:
        d = d - torch.diag_embed(torch.diagonal(d, dim1=1, dim2=2))
    return d.sum((1, 2))


def ged_sums_reference(
    samples: Tensor, raters: Tensor, threshold: float, eps: float, empty_iou: float, offdiag: bool
) -> Tensor:
    """``(B, 3)`` float64 sums of distances: cross (all K x N pairs), within samples, within raters."""
    s = _masks_reference(samples, threshold, False)
    y = _masks_reference(raters, 0.5, False)  # raters are binary; 0.5 separates 0 from 1 in every dtype
    cross = (1.0 - _iou_reference(s, y, eps, empty_iou)).sum((1, 2))
    within_s = _distance_sum(1.0 - _iou_reference(s, s, eps, empty_iou), offdiag)
    within_r = _distance_sum(1.0 - _iou_reference(y, y, eps, empty_iou), offdiag)
    return torch.stack([cross, within_s, within_r], dim=1)


# ---------------------------------------------------------------------------------------------------------
# Backends. Value checks (floating values outside [0, 1], NaN and Inf included; raters other than 0/1) cost a
# pass over the data (and on a GPU a host sync each), so the C++ CPU kernels make them while packing the masks
# and the Triton kernels while thresholding them (one int32 flag per input, read in one sync: _raise_flagged);
# for the CUDA C++ kernels and the reference they run here, before dispatch. Either way a user's bad input
# raises InvalidInputError, which dispatch never mistakes for a kernel failure (it falls back only from a
# failing Triton kernel).


_CHECKED_IN_KERNEL = ("cpu", "triton")


def _check_probability_values(x: Tensor, op: str, name: str) -> None:
    """Floating values promise probabilities; bool and integer masks (0/255 included) are thresholded as they are."""
    if x.is_floating_point():
        check_probabilities(x, op, name)


def _check_overlap_values(backend: str, a: Tensor, b: Tensor, threshold, soft: bool, *_) -> None:
    if backend in _CHECKED_IN_KERNEL or soft:  # the soft Gram product is plain arithmetic (the API checks its range)
        return
    _check_probability_values(a, "pairwise_iou", "a")
    _check_probability_values(b, "pairwise_iou", "b")


def _check_ged_values(backend: str, samples: Tensor, raters: Tensor, *_) -> None:
    if backend in _CHECKED_IN_KERNEL:
        return
    _check_probability_values(samples, "ged", "samples")
    check_binary(raters, "ged", "raters")


def _raise_flagged(flags: Tensor, messages: tuple[str, ...]) -> None:
    """Raise the first message whose flag a Triton kernel set: all flags come to the host in one sync."""
    for raised, message in zip(flags.tolist(), messages):
        if raised:
            raise _backend.InvalidInputError(message)


def _triton_overlap(a: Tensor, b: Tensor, *args) -> Tensor:
    from ..kernels.ged import pairwise_overlap

    soft = args[1]
    out, flags = pairwise_overlap(a, b, *args)
    if soft:
        return out.to(_soft_dtype(a.dtype))
    _raise_flagged(flags, tuple(NOT_PROBABILITY.format(op="pairwise_iou", name=n) for n in ("a", "b")))
    return out


def _triton_ged_sums(*args) -> Tensor:
    from ..kernels.ged import ged_sums

    sums, flags = ged_sums(*args)
    _raise_flagged(flags, (NOT_PROBABILITY.format(op="ged", name="samples"),
                           NOT_BINARY.format(op="ged", name="raters")))  # fmt: skip
    return sums


def _ext_overlap(*args) -> Tensor:
    return torch.ops.harmonizer_fast_C.pairwise_overlap(*args)


def _ext_ged_sums(*args) -> Tensor:
    return torch.ops.harmonizer_fast_C.ged_sums(*args)


_OVERLAP = {"torch": pairwise_overlap_reference, "triton": _triton_overlap, "cuda": _ext_overlap, "cpu": _ext_overlap}
_GED_SUMS = {"torch": ged_sums_reference, "triton": _triton_ged_sums, "cuda": _ext_ged_sums, "cpu": _ext_ged_sums}
IMPLS = {"pairwise_overlap": _OVERLAP, "ged_sums": _GED_SUMS}  # for reports and benchmarks
SUPPORT = BINARY_SUPPORT


def _as_kernel_masks(x: Tensor) -> Tensor:
    return x.view(torch.uint8) if x.dtype == torch.bool else x


@torch.library.custom_op("harmonizer_fast::pairwise_overlap", mutates_args=())
def _overlap_op(a: Tensor, b: Tensor, threshold: float, soft: bool, eps: float, empty_iou: float, mode: int) -> Tensor:
    support = SOFT_SUPPORT if soft else BINARY_SUPPORT
    a, b = _as_kernel_masks(a), _as_kernel_masks(b)
    return _backend.dispatch("pairwise_overlap", a, _OVERLAP, support, a, b, threshold, soft, eps, empty_iou, mode,
                             check=_check_overlap_values)  # fmt: skip


@_overlap_op.register_fake
def _(a: Tensor, b: Tensor, threshold: float, soft: bool, eps: float, empty_iou: float, mode: int) -> Tensor:
    dtype = _soft_dtype(a.dtype) if soft else torch.float32
    return a.new_empty((a.shape[0], a.shape[1], b.shape[1]), dtype=dtype)


def _overlap_setup_context(ctx, inputs, output) -> None:
    a, b, _, soft, _, _, mode = inputs
    if not soft or mode != OverlapMode.GRAM:
        ctx.differentiable = False
        return
    ctx.differentiable = True
    ctx.save_for_backward(a, b)


def _overlap_backward(ctx, grad: Tensor):
    # Only the soft Gram matrix is differentiable: d(a b^T) = g b, g^T a. Thresholded masks have no gradient.
    if not ctx.differentiable:
        return None, None, None, None, None, None, None
    a, b = ctx.saved_tensors
    g = grad.to(_soft_dtype(a.dtype))
    grad_a = torch.bmm(g, b.to(g.dtype)).to(a.dtype) if ctx.needs_input_grad[0] else None
    grad_b = torch.bmm(g.transpose(1, 2), a.to(g.dtype)).to(b.dtype) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None, None, None, None, None


_overlap_op.register_autograd(_overlap_backward, setup_context=_overlap_setup_context)


@torch.library.custom_op("harmonizer_fast::ged_sums", mutates_args=())
def _ged_sums_op(
    samples: Tensor, raters: Tensor, threshold: float, eps: float, empty_iou: float, offdiag: bool
) -> Tensor:
    s, r = _as_kernel_masks(samples), _as_kernel_masks(raters)
    return _backend.dispatch("ged_sums", s, _GED_SUMS, BINARY_SUPPORT, s, r, threshold, eps, empty_iou, offdiag,
                             check=_check_ged_values)  # fmt: skip


@_ged_sums_op.register_fake
def _(samples: Tensor, raters: Tensor, threshold: float, eps: float, empty_iou: float, offdiag: bool) -> Tensor:
    return samples.new_empty((samples.shape[0], 3), dtype=torch.float64)


# Metrics and the GED loss: float32 in and out under autocast (ops/_autocast.py).
_autocast.register(_overlap_op, "float32")
_autocast.register(_ged_sums_op, "float32")

# What torch.export's run_decompositions turns each op into (harmonizer_fast.export): the references.
DECOMPOSITIONS = {
    torch.ops.harmonizer_fast.pairwise_overlap.default: pairwise_overlap_reference,
    torch.ops.harmonizer_fast.ged_sums.default: ged_sums_reference,
}


# ---------------------------------------------------------------------------------------------------------
# Validation and the public API.


def check_masks(x: object, op: str, name: str, *, floating: bool = False) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor (B, K, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: {name} must be a 4-D tensor (B, K, H, W), got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor of probabilities, got {x.dtype}")
    if not (x.is_floating_point() or x.dtype in (torch.bool, torch.uint8)):
        raise TypeError(f"{op}: {name} must be bool, uint8 or floating point, got {x.dtype}")
    b, k, h, w = x.shape
    if b == 0:
        raise ValueError(f"{op}: {name} has an empty batch (B = 0)")
    if k == 0:
        raise ValueError(f"{op}: {name} has no masks (K = 0 along dim 1); at least one is needed")
    if h == 0 or w == 0:
        raise ValueError(f"{op}: {name} has an empty image size {h} x {w}")
    return x


def check_pair(a: Tensor, b: Tensor, op: str, a_name: str, b_name: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{op}: {a_name} and {b_name} must be on one device, got {a.device} and {b.device}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{op}: {a_name} and {b_name} must have the same batch size B, got {a.shape[0]} and {b.shape[0]}"
        )
    if a.shape[2:] != b.shape[2:]:
        raise ValueError(
            f"{op}: {a_name} and {b_name} must have the same H x W, got {tuple(a.shape[2:])} and {tuple(b.shape[2:])}"
        )


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], x.shape[1], -1).contiguous()


def _binary(x: Tensor) -> Tensor:
    """A flattened input of a thresholded computation. Thresholding has no gradient: detaching says so, so the
    result does not claim ``requires_grad`` and a backward through it fails loudly instead of giving None."""
    return _flat(x.detach())


@_autocast.float32  # under autocast: float32 throughout, sums of the soft IoU included
def pairwise_iou(a: Tensor, b: Tensor, *, soft: bool = False, empty_iou: float = 0.0, threshold: float = 0.5) -> Tensor:
    """IoU of every pair of masks: a ``(B, Ka, H, W)``, b ``(B, Kb, H, W)`` -> ``(B, Ka, Kb)`` float32.

    Binary (default): both sides are thresholded with ``> threshold`` (bool, uint8 and float inputs alike),
    IoU = |A and B| / |A or B|, and two empty masks get ``empty_iou``; not differentiable (thresholding has
    no gradient). ``soft=True`` uses the values as they are: sum(p q) / (sum p + sum q - sum(p q)), with
    ``empty_iou`` when the denominator is 0; float64 for float64 inputs, and differentiable.
    """
    op = "pairwise_iou"
    threshold = check_threshold(threshold, op)
    check_masks(a, op, "a", floating=soft)
    check_masks(b, op, "b", floating=soft)
    check_pair(a, b, op, "a", "b")
    if soft and a.dtype != b.dtype:
        raise TypeError(f"pairwise_iou: soft masks a and b must share one dtype, got {a.dtype} and {b.dtype}")
    if soft:
        check_probabilities(a, op, "a")
        check_probabilities(b, op, "b")
    if soft and torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        # The differentiable route: the Gram op (with its backward) and the IoU in torch on (B, Ka, Kb).
        return iou_from_counts(soft_gram(a, b), a.sum((2, 3)), b.sum((2, 3)), 0.0, empty_iou)
    a, b = (_flat(a), _flat(b)) if soft else (_binary(a), _binary(b))
    return _overlap_op(a, b, threshold, bool(soft), 0.0, float(empty_iou), OverlapMode.IOU)


def pairwise_intersection(a: Tensor, b: Tensor, *, threshold: float = 0.5) -> Tensor:
    """Pixel counts of ``A and B`` for every pair of binary masks, ``(B, Ka, Kb)`` float32 (exact below 2^24).

    Both sides are thresholded with ``> threshold``; the building block of Dice and IoU matrices.
    """
    op = "pairwise_intersection"
    threshold = check_threshold(threshold, op)
    check_masks(a, op, "a")
    check_masks(b, op, "b")
    check_pair(a, b, op, "a", "b")
    return _overlap_op(_binary(a), _binary(b), threshold, False, 0.0, 0.0, OverlapMode.GRAM)


def check_ged_inputs(samples: Tensor, raters: Tensor, threshold: float, op: str = "ged") -> float:
    """The checks every GED computation makes on its inputs (types, shapes, one device, the threshold);
    returns the threshold. The values are checked by the kernels' own pass (:func:`ged_sums`)."""
    threshold = check_threshold(threshold, op)
    check_masks(samples, op, "samples")
    check_masks(raters, op, "raters")
    check_pair(samples, raters, op, "samples", "raters")
    return threshold


def check_ged_values(samples: Tensor, raters: Tensor) -> None:
    """Samples are probabilities or binary masks, raters binary masks: for a GED computed outside the kernels."""
    _check_ged_values("torch", samples, raters)


def ged_sums(
    samples: Tensor, raters: Tensor, *, threshold: float = 0.5, eps: float, empty_iou: float, offdiag: bool,
    op: str = "ged",
) -> Tensor:
    """The distance sums of GED per image, ``(B, 3)`` float64: sum d(S, Y) over the K x N pairs, sum d(S, S')
    over the K x K and sum d(Y, Y') over the N x N (diagonals left out with ``offdiag``), d = 1 - IoU with
    IoU = I / (U + eps), or ``empty_iou`` where U = 0; samples thresholded with ``> threshold``. The fused
    kernels never store a K x K matrix. The conventions and the means built from these sums are in
    :mod:`harmonizer_fast.metrics.energy`; ``op`` is the name errors give."""
    threshold = check_ged_inputs(samples, raters, threshold, op)
    return _ged_sums_op(_binary(samples), _binary(raters), threshold, eps, empty_iou, offdiag)


def soft_gram(a: Tensor, b: Tensor) -> Tensor:
    """Differentiable ``sum_p a(p) b(p)`` for every pair: ``(B, Ka, H, W)`` x ``(B, Kb, H, W)`` -> ``(B, Ka, Kb)``."""
    check_pair(a, b, "soft_gram", "a", "b")
    return _overlap_op(_flat(a), _flat(b), 0.0, True, 0.0, 0.0, OverlapMode.GRAM)


# What this family describes about itself (ops/_examples.py): example inputs and FLOP formulas.
def examples(scale: str = "test", dtype: torch.dtype = torch.float64, device="cpu") -> dict:
    b, k, n, p = _ex.pick(scale, (2, 4, 3, 30), (16, 50, 4, 128 * 128))
    probs = _ex.uniform((b, k, p), 18, dtype, device) if scale == "test" else _ex.binary((b, k, p), 18, dtype, device)
    masks = _ex.binary((b, n, p), 19, dtype, device)
    return {"pairwise_overlap": (probs, masks, 0.5, False, 1e-8, 0.0, int(OverlapMode.IOU)),
            "ged_sums": (probs, masks, 0.5, 1e-8, 0.0, True)}  # fmt: skip


FLOPS = {
    "pairwise_overlap": lambda a, b, *_, **__: 2 * a[0] * a[1] * b[1] * a[2],  # the Gram product
    "ged_sums": lambda s, r, *_, **__: 2 * s[0] * s[2] * (s[1] * r[1] + s[1] * s[1] + r[1] * r[1]),
}
