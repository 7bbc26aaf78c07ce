"""Single-level 2-D Haar DWT and its inverse: API, validation, reference, autograd and dispatch.

Convention (docs/architecture.md, "Conventions"): exactly ``pywt.dwt2(x, "haar", mode="zero")``. For each 2x2 block
``[[a, b], [c, d]]`` of an (H, W) plane, with odd sizes zero-padded at the end,

    cA = (a + b + c + d) / 2,   cH = (a + b - c - d) / 2,
    cV = (a - b + c - d) / 2,   cD = (a - b - c + d) / 2,

and the sub-bands are stacked in pywt's order (cA, cH, cV, cD); the paper's X_LL, X_LH, X_HL, X_HH
(section 3.2) are cA, cH, cV, cD. The transform of each block is orthonormal, so the backward pass of the
DWT is the IDWT cropped to the input size, and the backward pass of the IDWT is the DWT.

Two layouts share one pair of kernels: the combined ``(N, C, 4, h, w)`` tensor of :func:`haar_dwt2d`, and
pytorch_wavelets' separate ``lo (N, C, h, w)`` / ``hi (N, C, 3, h, w)`` of :func:`haar_dwt2d_split`, which
the drop-in modules use so that both of their outputs are contiguous without a copy.

Implementations: ``haar_dwt2d_reference`` (torch), ``harmonizer_fast.kernels.haar`` (Triton),
``csrc/cuda/haar.cu`` (CUDA), ``csrc/cpu/haar.cpp`` (CPU); see ``harmonizer_fast._backend``.
"""

# No `from __future__ import annotations` here: torch.library.custom_op reads the annotations at runtime.
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from . import _autocast
from . import _examples as _ex
from ._checks import check_float_tensor, check_same_device_dtype, check_shape

# ---------------------------------------------------------------------------------------------------
# Reference (pure PyTorch): the definition of correct, and the fallback on any device and dtype.
# ---------------------------------------------------------------------------------------------------


def haar_dwt2d_reference(x: Tensor) -> Tensor:
    """Eager slicing formulation of :func:`haar_dwt2d`; computes in float32 (float64 for float64)."""
    h, w = x.shape[-2:]
    xf = F.pad(x.to(_backend.compute_dtype(x.dtype)), (0, w % 2, 0, h % 2))  # zero padding at the end
    a, b = xf[..., 0::2, 0::2], xf[..., 0::2, 1::2]
    c, d = xf[..., 1::2, 0::2], xf[..., 1::2, 1::2]
    s0, d0, s1, d1 = a + b, a - b, c + d, c - d
    y = torch.stack(((s0 + s1) * 0.5, (s0 - s1) * 0.5, (d0 + d1) * 0.5, (d0 - d1) * 0.5), dim=-3)
    return y.to(x.dtype)


def _haar_idwt2d_reference_split(lo: Tensor, hi: Tensor, height: int, width: int) -> Tensor:
    acc = _backend.compute_dtype(lo.dtype)
    ca, (ch, cv, cd) = lo.to(acc), hi.to(acc).unbind(-3)
    s0, s1, d0, d1 = ca + ch, ca - ch, cv + cd, cv - cd
    top = torch.stack(((s0 + d0) * 0.5, (s0 - d0) * 0.5), dim=-1).flatten(-2)  # rows 2i: a, b interleaved
    bot = torch.stack(((s1 + d1) * 0.5, (s1 - d1) * 0.5), dim=-1).flatten(-2)  # rows 2i+1: c, d
    x = torch.stack((top, bot), dim=-2).flatten(-3, -2)
    return x[..., :height, :width].to(lo.dtype).contiguous()


def haar_idwt2d_reference(y: Tensor, size: Optional[Sequence[int]] = None) -> Tensor:
    """Eager formulation of :func:`haar_idwt2d`."""
    height, width = _output_size(y.shape[-2], y.shape[-1], size, "haar_idwt2d_reference")
    return _haar_idwt2d_reference_split(y[..., 0, :, :], y[..., 1:, :, :], height, width)


# ---------------------------------------------------------------------------------------------------
# Backends. Each forward writes into (lo, hi) views; each inverse reads (lo, hi) views of any strides.
# ---------------------------------------------------------------------------------------------------


def _torch_dwt_into(x: Tensor, lo: Tensor, hi: Tensor) -> None:
    y = haar_dwt2d_reference(x)
    lo.copy_(y[:, :, 0])
    hi.copy_(y[:, :, 1:])


def _triton_dwt_into(x: Tensor, lo: Tensor, hi: Tensor) -> None:
    from ..kernels.haar import haar_dwt2d_into

    haar_dwt2d_into(x, lo, hi)


def _triton_idwt(lo: Tensor, hi: Tensor, height: int, width: int) -> Tensor:
    from ..kernels.haar import haar_idwt2d

    return haar_idwt2d(lo, hi, height, width)


def _ext_dwt_into(x: Tensor, lo: Tensor, hi: Tensor) -> None:
    torch.ops.harmonizer_fast_C.haar_dwt2d_out(x, lo, hi)


def _ext_idwt(lo: Tensor, hi: Tensor, height: int, width: int) -> Tensor:
    return torch.ops.harmonizer_fast_C.haar_idwt2d(lo, hi, height, width)


_DWT_IMPLS = {"torch": _torch_dwt_into, "triton": _triton_dwt_into, "cuda": _ext_dwt_into, "cpu": _ext_dwt_into}
_IDWT_IMPLS = {"torch": _haar_idwt2d_reference_split, "triton": _triton_idwt, "cuda": _ext_idwt, "cpu": _ext_idwt}
SUPPORT = _backend.DEFAULT_SUPPORT
IMPLS = {"haar_dwt2d": _DWT_IMPLS, "haar_idwt2d": _IDWT_IMPLS}  # for reports and benchmarks


def _dwt_into(x: Tensor, lo: Tensor, hi: Tensor) -> None:
    _backend.dispatch("haar_dwt2d", x, _DWT_IMPLS, SUPPORT, x, lo, hi)


def _idwt(lo: Tensor, hi: Tensor, height: int, width: int) -> Tensor:
    return _backend.dispatch("haar_idwt2d", lo, _IDWT_IMPLS, SUPPORT, lo, hi, height, width)


def _band_shape(x: Tensor) -> tuple[int, int, int, int]:
    n, c, h, w = x.shape
    return n, c, (h + 1) // 2, (w + 1) // 2


# ---------------------------------------------------------------------------------------------------
# Custom ops (torch.library): opaque to torch.compile, with fake implementations and autograd.
# Combined layout: haar_dwt2d / haar_idwt2d. Split layout: haar_dwt2d_split / haar_idwt2d_split.
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("harmonizer_fast::haar_dwt2d", mutates_args=())
def _dwt_op(x: Tensor) -> Tensor:
    n, c, ho, wo = _band_shape(x)
    y = x.new_empty((n, c, 4, ho, wo))
    _dwt_into(x, y[:, :, 0], y[:, :, 1:])
    return y


@torch.library.custom_op("harmonizer_fast::haar_idwt2d", mutates_args=())
def _idwt_op(y: Tensor, height: int, width: int) -> Tensor:
    return _idwt(y[:, :, 0], y[:, :, 1:], height, width)


@torch.library.custom_op("harmonizer_fast::haar_dwt2d_split", mutates_args=())
def _dwt_split_op(x: Tensor) -> tuple[Tensor, Tensor]:
    n, c, ho, wo = _band_shape(x)
    lo, hi = x.new_empty((n, c, ho, wo)), x.new_empty((n, c, 3, ho, wo))
    _dwt_into(x, lo, hi)
    return lo, hi


@torch.library.custom_op("harmonizer_fast::haar_idwt2d_split", mutates_args=())
def _idwt_split_op(lo: Tensor, hi: Tensor, height: int, width: int) -> Tensor:
    return _idwt(lo, hi, height, width)


@_dwt_op.register_fake
def _(x: Tensor) -> Tensor:
    n, c, ho, wo = _band_shape(x)
    return x.new_empty((n, c, 4, ho, wo))


@_idwt_op.register_fake
def _(y: Tensor, height: int, width: int) -> Tensor:
    return y.new_empty((y.shape[0], y.shape[1], height, width))


@_dwt_split_op.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    n, c, ho, wo = _band_shape(x)
    return x.new_empty((n, c, ho, wo)), x.new_empty((n, c, 3, ho, wo))


@_idwt_split_op.register_fake
def _(lo: Tensor, hi: Tensor, height: int, width: int) -> Tensor:
    return lo.new_empty((lo.shape[0], lo.shape[1], height, width))


def _save_input_size(ctx, inputs, output) -> None:
    ctx.size = tuple(inputs[0].shape[-2:])


def _dwt_backward(ctx, grad: Tensor) -> Tensor:
    # Adjoint of (zero-pad, orthonormal DWT) = inverse DWT, then crop to the input size.
    return _idwt_op(grad, *ctx.size)


def _dwt_split_backward(ctx, grad_lo: Optional[Tensor], grad_hi: Optional[Tensor]) -> Tensor:
    # Autograd passes zeros for an unused output, so both grads are tensors here.
    return _idwt_split_op(grad_lo, grad_hi, *ctx.size)


def _idwt_backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
    # Adjoint of (inverse DWT, crop) = zero-pad, DWT; the DWT pads odd sizes itself.
    return _dwt_op(grad), None, None


def _idwt_split_backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
    grad_lo, grad_hi = _dwt_split_op(grad)
    return grad_lo, grad_hi, None, None


_dwt_op.register_autograd(_dwt_backward, setup_context=_save_input_size)
_dwt_split_op.register_autograd(_dwt_split_backward, setup_context=_save_input_size)
_idwt_op.register_autograd(_idwt_backward, setup_context=lambda ctx, inputs, output: None)
_idwt_split_op.register_autograd(_idwt_split_backward, setup_context=lambda ctx, inputs, output: None)
for _op in (_dwt_op, _idwt_op, _dwt_split_op, _idwt_split_op):
    _autocast.register(_op, "promote")  # float32 inside, the input's dtype out (ops/_autocast.py)


def _idwt_reference_sized(y: Tensor, height: int, width: int) -> Tensor:
    # The sizes as given: validating them (int() on each) would freeze torch.export's symbolic sizes.
    return _haar_idwt2d_reference_split(y[:, :, 0], y[:, :, 1:], height, width)


def _split_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    y = haar_dwt2d_reference(x)
    return y[:, :, 0].contiguous(), y[:, :, 1:].contiguous()


# What torch.export's run_decompositions turns each op into (harmonizer_fast.export): the references.
DECOMPOSITIONS = {
    torch.ops.harmonizer_fast.haar_dwt2d.default: haar_dwt2d_reference,
    torch.ops.harmonizer_fast.haar_idwt2d.default: _idwt_reference_sized,
    torch.ops.harmonizer_fast.haar_dwt2d_split.default: _split_reference,
    torch.ops.harmonizer_fast.haar_idwt2d_split.default: _haar_idwt2d_reference_split,
}


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def _as_size(v: object) -> int:
    """An int from a size entry; a symbolic size (torch.export, torch.compile) stays symbolic: int() on it would
    freeze the traced program to the example's size."""
    return v if isinstance(v, torch.SymInt) else int(v)  # type: ignore[return-value]


def _output_size(h: int, w: int, size: Optional[Sequence[int]], op: str) -> tuple[int, int]:
    """Output (H, W) of the inverse for sub-bands (h, w): (2h, 2w) or ``size``, which may drop one row/column."""
    if size is None:
        return 2 * h, 2 * w
    if isinstance(size, torch.Size):
        size = tuple(size)
    if not (isinstance(size, Sequence) and len(size) == 2):
        raise ValueError(f"{op}: size must be a pair (H, W), got {size!r}")
    height, width = _as_size(size[0]), _as_size(size[1])
    if not (2 * h - 1 <= height <= 2 * h and 2 * w - 1 <= width <= 2 * w):
        raise ValueError(
            f"{op}: size must be (H, W) with H in ({2 * h - 1}, {2 * h}) and W in ({2 * w - 1}, {2 * w}) for "
            f"sub-bands of size ({h}, {w}), got {tuple(size)}"
        )
    return height, width


def haar_dwt2d(x: Tensor) -> Tensor:
    """2-D Haar DWT of every (H, W) plane: ``(N, C, H, W) -> (N, C, 4, ceil(H/2), ceil(W/2))``.

    Sub-bands in PyWavelets' order (cA, cH, cV, cD), i.e. the paper's (X_LL, X_LH, X_HL, X_HH) of
    section 3.2; equal to ``pywt.dwt2(x, "haar", mode="zero")`` (odd sizes zero-padded at the end).
    Differentiable; any strides; float32/float64 on CPU, plus float16/bfloat16 (computed in float32)
    on CUDA and through the torch reference.
    """
    check_float_tensor(x, "haar_dwt2d", "x", 4, "(N, C, H, W)")
    return _dwt_op(x)


def haar_idwt2d(y: Tensor, size: Optional[Sequence[int]] = None) -> Tensor:
    """Inverse of :func:`haar_dwt2d`: ``(N, C, 4, h, w) -> (N, C, 2h, 2w)``, or ``(N, C, *size)``.

    ``size=(H, W)`` crops the zero-padded reconstruction back to an odd original size, so
    ``haar_idwt2d(haar_dwt2d(x), x.shape[-2:])`` returns ``x``. Without it the result is pywt's
    ``idwt2(..., "haar", mode="zero")``.
    """
    check_float_tensor(y, "haar_idwt2d", "y", 5, "(N, C, 4, h, w)")
    if y.shape[2] != 4:
        raise ValueError(f"haar_idwt2d: y must have 4 sub-bands (cA, cH, cV, cD) in dim 2, got shape {tuple(y.shape)}")
    height, width = _output_size(y.shape[-2], y.shape[-1], size, "haar_idwt2d")
    return _idwt_op(y, height, width)


def haar_dwt2d_split(x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`haar_dwt2d` as two contiguous tensors (pytorch_wavelets' layout).

    ``lo`` = cA ``(N, C, h, w)`` and ``hi`` = (cH, cV, cD) ``(N, C, 3, h, w)``.
    """
    check_float_tensor(x, "haar_dwt2d_split", "x", 4, "(N, C, H, W)")
    return _dwt_split_op(x)


def haar_idwt2d_split(lo: Tensor, hi: Tensor, size: Optional[Sequence[int]] = None) -> Tensor:
    """Inverse of :func:`haar_dwt2d_split` (any strides for ``lo`` and ``hi``); ``size`` as in :func:`haar_idwt2d`."""
    op = "haar_idwt2d_split"
    check_float_tensor(lo, op, "lo", 4, "(N, C, h, w)")
    check_float_tensor(hi, op, "hi", 5, "(N, C, 3, h, w)")
    check_same_device_dtype(lo, hi, op, "lo", "hi")
    n, c, h, w = lo.shape
    check_shape(hi, (n, c, 3, h, w), op, "hi", "(N, C, 3, h, w)")
    height, width = _output_size(h, w, size, op)
    return _idwt_split_op(lo, hi, height, width)


# What this family describes about itself (ops/_examples.py): example inputs and FLOP formulas.
def examples(scale: str = "test", dtype: torch.dtype = torch.float64, device="cpu") -> dict:
    n, c, h, w = _ex.pick(scale, (2, 3, 7, 9), (16, 64, 128, 128))
    hh, hw = -(-h // 2), -(-w // 2)
    x, y = _ex.normal((n, c, h, w), 1, dtype, device), _ex.normal((n, c, 4, hh, hw), 2, dtype, device)
    return {"haar_dwt2d": (x,), "haar_idwt2d": (y, h, w), "haar_dwt2d_split": (x,),
            "haar_idwt2d_split": (y[:, :, 0].contiguous(), y[:, :, 1:].contiguous(), 2 * hh, w)}  # fmt: skip


FLOPS = {
    "haar_dwt2d": lambda x, **_: 4 * _ex.numel(x),  # each output: three additions and one scaling
    "haar_dwt2d_split": lambda x, **_: 4 * _ex.numel(x),
    "haar_idwt2d": lambda y, *_, **__: 4 * _ex.numel(y),
    "haar_idwt2d_split": lambda lo, hi, *_, **__: 4 * (_ex.numel(lo) + _ex.numel(hi)),
}
