"""Single-level 3-D (volumetric) Haar DWT and its inverse: API, validation, reference, autograd and dispatch.

Convention: exactly ``pywt.dwtn(x, "haar", mode="zero", axes=(-3, -2, -1))``. Along each of the last three
axes a pair (p, q) becomes a low band (p + q) / sqrt 2 and a high band (p - q) / sqrt 2, odd sizes padded
with one zero at the end. The eight sub-bands are stacked on dim 2 in pywt's key order

    aaa, aad, ada, add, daa, dad, dda, ddd      (index 4 bD + 2 bH + bW, bit 1 = detail along that axis)

so ``haar_dwt3d(x)[:, :, i]`` is ``pywt.dwtn(...)[KEYS[i]]``. For one 2x2x2 block the transform is a
Hadamard matrix over 2 sqrt 2, orthonormal and symmetric: the backward pass of the DWT is the IDWT cropped
to the input size, the backward pass of the IDWT is the DWT, and one butterfly (``csrc/include/haar.h``,
``haar3d_butterfly``) serves both directions in every implementation.

Implementations: ``haar_dwt3d_reference`` (torch), ``harmonizer_fast.kernels.haar3d`` (Triton),
``csrc/cuda/haar3d.cu`` (CUDA), ``csrc/cpu/haar3d.cpp`` (CPU); see ``harmonizer_fast._backend``.
"""

# No `from __future__ import annotations` here: torch.library.custom_op reads the annotations at runtime.
import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend
from . import _autocast
from . import _examples as _ex
from ._checks import check_float_tensor
from .haar import _as_size

KEYS = ("aaa", "aad", "ada", "add", "daa", "dad", "dda", "ddd")
_SCALE = 1.0 / (2.0 * math.sqrt(2.0))

# ---------------------------------------------------------------------------------------------------
# Reference (pure PyTorch): the definition of correct, and the fallback on any device and dtype.
# ---------------------------------------------------------------------------------------------------


def _butterfly(v: Tensor) -> Tensor:
    """The 8-point Hadamard butterfly over dim -4 (corner or band index 4 d + 2 h + w), scaled by 1/(2 sqrt 2)."""
    a = v.unflatten(-4, (2, 2, 2))  # (..., dz, dy, dx, d, h, w)
    for axis in (-4, -5, -6):  # w, then h, then d (the order the C++ and CUDA butterflies use)
        p, q = a.unbind(axis)
        a = torch.stack((p + q, p - q), dim=axis)
    return a.flatten(-6, -4) * _SCALE


def haar_dwt3d_reference(x: Tensor) -> Tensor:
    """Eager slicing formulation of :func:`haar_dwt3d`; computes in float32 (float64 for float64)."""
    d, h, w = x.shape[-3:]
    xf = F.pad(x.to(_backend.compute_dtype(x.dtype)), (0, w % 2, 0, h % 2, 0, d % 2))  # zero padding at the end
    corners = torch.stack([xf[..., i::2, j::2, k::2] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dim=-4)
    return _butterfly(corners).to(x.dtype)


def haar_idwt3d_reference(y: Tensor, size: Optional[Sequence[int]] = None) -> Tensor:
    """Eager formulation of :func:`haar_idwt3d`."""
    return _torch_idwt(y, *_output_size(y.shape[-3:], size, "haar_idwt3d_reference"))


def _torch_idwt(y: Tensor, depth: int, height: int, width: int) -> Tensor:
    """The reference inverse for a validated output size (also the op's decomposition for torch.export, where
    the sizes are symbolic and must not go through int())."""
    corners = _butterfly(y.to(_backend.compute_dtype(y.dtype)))  # (N, C, 8, d, h, w), corner-major
    n, c, _, d, h, w = corners.shape
    x = corners.reshape(n, c, 2, 2, 2, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(n, c, 2 * d, 2 * h, 2 * w)
    return x[..., :depth, :height, :width].to(y.dtype).contiguous()


# ---------------------------------------------------------------------------------------------------
# Backends.
# ---------------------------------------------------------------------------------------------------


def _torch_dwt_into(x: Tensor, y: Tensor) -> None:
    y.copy_(haar_dwt3d_reference(x))


def _triton_dwt_into(x: Tensor, y: Tensor) -> None:
    from ..kernels.haar3d import haar_dwt3d_into

    haar_dwt3d_into(x, y)


def _triton_idwt(y: Tensor, depth: int, height: int, width: int) -> Tensor:
    from ..kernels.haar3d import haar_idwt3d

    return haar_idwt3d(y, depth, height, width)


def _ext_dwt_into(x: Tensor, y: Tensor) -> None:
    torch.ops.harmonizer_fast_C.haar_dwt3d_out(x, y)


def _ext_idwt(y: Tensor, depth: int, height: int, width: int) -> Tensor:
    return torch.ops.harmonizer_fast_C.haar_idwt3d(y, depth, height, width)


_DWT_IMPLS = {"torch": _torch_dwt_into, "triton": _triton_dwt_into, "cuda": _ext_dwt_into, "cpu": _ext_dwt_into}
_IDWT_IMPLS = {"torch": _torch_idwt, "triton": _triton_idwt, "cuda": _ext_idwt, "cpu": _ext_idwt}
SUPPORT = _backend.DEFAULT_SUPPORT
IMPLS = {"haar_dwt3d": _DWT_IMPLS, "haar_idwt3d": _IDWT_IMPLS}  # for reports and benchmarks


def _band_shape(x: Tensor) -> tuple[int, ...]:
    n, c, d, h, w = x.shape
    return n, c, 8, (d + 1) // 2, (h + 1) // 2, (w + 1) // 2


# ---------------------------------------------------------------------------------------------------
# Custom ops (torch.library): opaque to torch.compile, with fake implementations and autograd.
# ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("harmonizer_fast::haar_dwt3d", mutates_args=())
def _dwt_op(x: Tensor) -> Tensor:
    y = x.new_empty(_band_shape(x))
    _backend.dispatch("haar_dwt3d", x, _DWT_IMPLS, SUPPORT, x, y)
    return y


@torch.library.custom_op("harmonizer_fast::haar_idwt3d", mutates_args=())
def _idwt_op(y: Tensor, depth: int, height: int, width: int) -> Tensor:
    return _backend.dispatch("haar_idwt3d", y, _IDWT_IMPLS, SUPPORT, y, depth, height, width)


@_dwt_op.register_fake
def _(x: Tensor) -> Tensor:
    return x.new_empty(_band_shape(x))


@_idwt_op.register_fake
def _(y: Tensor, depth: int, height: int, width: int) -> Tensor:
    return y.new_empty((y.shape[0], y.shape[1], depth, height, width))


def _save_input_size(ctx, inputs, output) -> None:
    ctx.size = tuple(inputs[0].shape[-3:])


def _dwt_backward(ctx, grad: Tensor) -> Tensor:
    # Adjoint of (zero-pad, orthonormal DWT) = inverse DWT, then crop to the input size.
    return _idwt_op(grad, *ctx.size)


def _idwt_backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
    # Adjoint of (inverse DWT, crop) = zero-pad, DWT; the DWT pads odd sizes itself.
    return _dwt_op(grad), None, None, None


_dwt_op.register_autograd(_dwt_backward, setup_context=_save_input_size)
_idwt_op.register_autograd(_idwt_backward, setup_context=lambda ctx, inputs, output: None)
_autocast.register(_dwt_op, "promote")  # float32 inside, the input's dtype out (ops/_autocast.py)
_autocast.register(_idwt_op, "promote")

# What torch.export's run_decompositions turns each op into (harmonizer_fast.export): the references.
DECOMPOSITIONS = {
    torch.ops.harmonizer_fast.haar_dwt3d.default: haar_dwt3d_reference,
    torch.ops.harmonizer_fast.haar_idwt3d.default: _torch_idwt,
}


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def _output_size(bands: Sequence[int], size: Optional[Sequence[int]], op: str) -> tuple[int, int, int]:
    """Output (D, H, W) of the inverse for sub-bands (d, h, w): twice each, or ``size``, which may drop the
    zero-padded last slice, row or column."""
    full = tuple(2 * _as_size(b) for b in bands)
    if size is None:
        return full  # type: ignore[return-value]
    if isinstance(size, torch.Size):
        size = tuple(size)
    if not (isinstance(size, Sequence) and len(size) == 3):
        raise ValueError(f"{op}: size must be a triple (D, H, W), got {size!r}")
    out = tuple(_as_size(s) for s in size)
    if not all(f - 1 <= s <= f for s, f in zip(out, full)):
        ranges = ", ".join(f"{name} in ({f - 1}, {f})" for name, f in zip("DHW", full))
        raise ValueError(f"{op}: size must be (D, H, W) with {ranges} for sub-bands of size "
                         f"{tuple(int(b) for b in bands)}, got {tuple(size)}")  # fmt: skip
    return out  # type: ignore[return-value]


def haar_dwt3d(x: Tensor) -> Tensor:
    """3-D Haar DWT over the last three dims: ``(N, C, D, H, W) -> (N, C, 8, ceil(D/2), ceil(H/2), ceil(W/2))``.

    Sub-bands on dim 2 in PyWavelets' key order (``KEYS``: aaa, aad, ada, add, daa, dad, dda, ddd); equal to
    ``pywt.dwtn(x, "haar", mode="zero", axes=(-3, -2, -1))`` (odd sizes zero-padded at the end).
    Differentiable (twice); any strides; float32/float64 on CPU, plus float16/bfloat16 (computed in float32)
    on CUDA and through the torch reference.
    """
    check_float_tensor(x, "haar_dwt3d", "x", 5, "(N, C, D, H, W)")
    return _dwt_op(x)


def haar_idwt3d(y: Tensor, size: Optional[Sequence[int]] = None) -> Tensor:
    """Inverse of :func:`haar_dwt3d`: ``(N, C, 8, d, h, w) -> (N, C, 2d, 2h, 2w)``, or ``(N, C, *size)``.

    ``size=(D, H, W)`` crops the zero-padded reconstruction back to odd original sizes, so
    ``haar_idwt3d(haar_dwt3d(x), x.shape[-3:])`` returns ``x``. Without it the result is pywt's
    ``idwtn(..., "haar", mode="zero", axes=(-3, -2, -1))``. ``y`` may have any strides.
    """
    check_float_tensor(y, "haar_idwt3d", "y", 6, "(N, C, 8, d, h, w)")
    if y.shape[2] != 8:
        raise ValueError(f"haar_idwt3d: y must have 8 sub-bands ({', '.join(KEYS)}) in dim 2, got shape "
                         f"{tuple(y.shape)}")  # fmt: skip
    return _idwt_op(y, *_output_size(y.shape[-3:], size, "haar_idwt3d"))


# What this family describes about itself (ops/_examples.py): example inputs and FLOP formulas.
def examples(scale: str = "test", dtype: torch.dtype = torch.float64, device="cpu") -> dict:
    n, c, d, h, w = _ex.pick(scale, (1, 2, 3, 5, 6), (2, 8, 64, 128, 128))  # bench: bench_haar.py --3d's first
    y = _ex.normal((n, c, 8, -(-d // 2), -(-h // 2), -(-w // 2)), 4, dtype, device)
    return {"haar_dwt3d": (_ex.normal((n, c, d, h, w), 3, dtype, device),), "haar_idwt3d": (y, d, h, w)}


FLOPS = {
    "haar_dwt3d": lambda x, **_: 4 * _ex.numel(x),  # each coefficient: three butterfly additions and one scaling
    "haar_idwt3d": lambda y, *_, **__: 4 * _ex.numel(y),
}
