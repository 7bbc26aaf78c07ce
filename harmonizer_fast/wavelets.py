"""Drop-in replacements for pytorch_wavelets' ``DWTForward``/``DWTInverse`` and PyWavelets' ``dwt2``/``idwt2``.

Only the Haar wavelet (``"haar"``, alias ``"db1"``) in ``mode="zero"`` is implemented; anything else raises
``NotImplementedError`` naming what is supported. Values, shapes and output structure follow the
originals; the work is done by :func:`harmonizer_fast.haar_dwt2d_split` and its inverse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .ops.haar import haar_dwt2d_split, haar_idwt2d_split

_HAAR_NAMES = ("haar", "db1")
_SQRT_HALF = float(np.sqrt(0.5))
_HAAR_DEC = (np.array([_SQRT_HALF, _SQRT_HALF]), np.array([-_SQRT_HALF, _SQRT_HALF]))
_SUPPORTED = "the Haar wavelet ('haar' or 'db1') with mode='zero'"


def _check_wavelet(wave: Any, mode: str, who: str) -> None:
    if isinstance(wave, str):
        ok = wave.lower() in _HAAR_NAMES
    elif isinstance(wave, (tuple, list)):  # explicit filters, as pytorch_wavelets accepts (lo, hi[, lo, hi])
        ok = len(wave) in (2, 4) and all(
            np.allclose(np.asarray(f, dtype=np.float64).ravel(), _HAAR_DEC[k % 2]) for k, f in enumerate(wave)
        )
    else:  # a pywt.Wavelet or anything with a name
        ok = str(getattr(wave, "name", "")).lower() in _HAAR_NAMES
    if not ok:
        raise NotImplementedError(f"{who}: wave={wave!r} is not implemented; only {_SUPPORTED} is")
    if mode != "zero":
        raise NotImplementedError(f"{who}: mode={mode!r} is not implemented; only {_SUPPORTED} is")


def _filter_buffers(module: nn.Module, prefix: str, lo: np.ndarray, hi: np.ndarray) -> None:
    # Same names, shapes and values as pytorch_wavelets' buffers, so state dicts load either way.
    dtype = torch.get_default_dtype()
    for name, f in ((f"{prefix}0", lo), (f"{prefix}1", hi)):
        t = torch.tensor(np.ascontiguousarray(f), dtype=dtype)
        module.register_buffer(f"{name}_col", t.reshape(1, 1, -1, 1))
        module.register_buffer(f"{name}_row", t.reshape(1, 1, 1, -1))


class DWTForward(nn.Module):
    """J-level 2-D Haar DWT with pytorch_wavelets' interface.

    ``forward(x)`` with x ``(N, C, H, W)`` returns ``(yl, [yh_1, ..., yh_J])``: ``yl`` the coarsest
    low-pass ``(N, C, H_J, W_J)`` and ``yh_j`` ``(N, C, 3, H_j, W_j)`` holding (cH, cV, cD) of level j,
    finest first. Each level halves the size, rounding up (odd sizes are zero-padded).
    """

    def __init__(self, J: int = 1, wave: Any = "haar", mode: str = "zero") -> None:
        super().__init__()
        _check_wavelet(wave, mode, "DWTForward")
        if not isinstance(J, int) or J < 1:
            raise ValueError(f"DWTForward: J must be an int >= 1, got {J!r}")
        self.J = J
        self.mode = mode
        _filter_buffers(self, "h", _HAAR_DEC[0][::-1], _HAAR_DEC[1][::-1])  # analysis filters are reversed

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        yh = []
        ll = x
        for _ in range(self.J):
            ll, high = haar_dwt2d_split(ll)
            yh.append(high)
        return ll, yh


class DWTInverse(nn.Module):
    """Inverse of :class:`DWTForward` with pytorch_wavelets' interface.

    ``forward((yl, yh))`` reconstructs level by level from the coarsest; an entry of ``yh`` may be None
    (zero high-pass). As in pytorch_wavelets, a low-pass one row/column larger than the next level's
    high-pass is cropped, and the output has the even size ``2 * yh[0].shape[-2:]``.
    """

    def __init__(self, wave: Any = "haar", mode: str = "zero") -> None:
        super().__init__()
        _check_wavelet(wave, mode, "DWTInverse")
        self.mode = mode
        _filter_buffers(self, "g", _HAAR_DEC[0], -_HAAR_DEC[1])  # synthesis filters: rec_lo, rec_hi

    def forward(self, coeffs: tuple[Tensor, Sequence[Optional[Tensor]]]) -> Tensor:
        yl, yh = coeffs
        ll = yl
        for high in list(yh)[::-1]:
            if high is None:
                high = ll.new_zeros((ll.shape[0], ll.shape[1], 3, ll.shape[-2], ll.shape[-1]))
            if ll.shape[-2] > high.shape[-2]:
                ll = ll[..., :-1, :]
            if ll.shape[-1] > high.shape[-1]:
                ll = ll[..., :-1]
            ll = haar_idwt2d_split(ll, high)
        return ll


def _check_axes(axes: Sequence[int], ndim: int, who: str) -> None:
    if len(axes) != 2 or [a % ndim for a in axes] != [ndim - 2, ndim - 1]:
        raise NotImplementedError(f"{who}: only axes=(-2, -1) is implemented, got {tuple(axes)}")


def dwt2(data: Tensor, wavelet: Any = "haar", mode: str = "zero", axes: Sequence[int] = (-2, -1)):
    """PyWavelets' ``dwt2`` on a tensor: returns ``(cA, (cH, cV, cD))`` over the last two dims.

    Unlike pywt, whose default mode is ``"symmetric"``, the default here is ``"zero"``, the only mode
    implemented; for even sizes the two agree for the Haar wavelet. Differentiable.
    """
    _check_wavelet(wavelet, mode, "dwt2")
    if not isinstance(data, Tensor):
        raise TypeError(f"dwt2: data must be a torch.Tensor (use torch.from_numpy), got {type(data).__name__}")
    if data.dim() < 2:
        raise ValueError(f"dwt2: data must have at least 2 dims, got shape {tuple(data.shape)}")
    _check_axes(axes, data.dim(), "dwt2")
    lead, (h, w) = data.shape[:-2], data.shape[-2:]
    lo, hi = haar_dwt2d_split(data.reshape(-1, 1, h, w))
    ho, wo = lo.shape[-2:]
    bands = tuple(hi[:, 0, k].reshape(*lead, ho, wo) for k in range(3))
    return lo.reshape(*lead, ho, wo), bands


def idwt2(coeffs, wavelet: Any = "haar", mode: str = "zero", axes: Sequence[int] = (-2, -1)) -> Tensor:
    """PyWavelets' ``idwt2`` on tensors: ``(cA, (cH, cV, cD))`` -> the (2h, 2w) reconstruction.

    Any of the four may be None (treated as zeros), as in pywt. Differentiable.
    """
    _check_wavelet(wavelet, mode, "idwt2")
    ca, details = coeffs
    if len(details) != 3:
        raise ValueError(f"idwt2: coeffs must be (cA, (cH, cV, cD)), got {len(details)} detail bands")
    bands = [ca, *details]
    present = [b for b in bands if b is not None]
    if not present:
        raise ValueError("idwt2: at least one of cA, cH, cV, cD must be given")
    ref = present[0]
    if not isinstance(ref, Tensor) or ref.dim() < 2:
        raise ValueError("idwt2: coefficients must be tensors with at least 2 dims")
    _check_axes(axes, ref.dim(), "idwt2")
    for name, b in zip(("cA", "cH", "cV", "cD"), bands):
        if b is not None and (not isinstance(b, Tensor) or b.shape != ref.shape):
            raise ValueError(
                f"idwt2: all coefficients must have one shape {tuple(ref.shape)}; {name} has "
                f"{tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__}"
            )
    bands = [torch.zeros_like(ref) if b is None else b for b in bands]
    lead, (h, w) = ref.shape[:-2], ref.shape[-2:]
    lo = bands[0].reshape(-1, 1, h, w)
    hi = torch.stack(bands[1:], dim=-3).reshape(-1, 1, 3, h, w)
    return haar_idwt2d_split(lo, hi).reshape(*lead, 2 * h, 2 * w)
