"""FiLM, the Noise Harmonizer's modulation (paper Eq. 3): ``f~ = gamma * f + beta`` per (batch, channel).

API, validation, reference, autograd and dispatch. The backward pass computes ``dx = gamma * dy``,
``dgamma = sum_hw dy * x`` and ``dbeta = sum_hw dy`` in one pass over ``(dy, x)``; every backend reduces
each (batch, channel) plane in a fixed order (no atomics), so the same inputs give bit-identical
gradients run after run. A per-channel ``(C,)`` gamma or beta is broadcast over the batch as a stride-0
view; autograd then sums its gradient over the batch with ``torch.sum`` (also deterministic).

Implementations: ``film_reference`` (torch), ``harmonizer_fast.kernels.film`` (Triton),
``csrc/cuda/film.cu`` (CUDA), ``csrc/cpu/film.cpp`` (CPU).
"""

# No `from __future__ import annotations` here: torch.library.custom_op reads the annotations at runtime.
import torch
from torch import Tensor

from .. import _backend
from . import _autocast
from . import _examples as _ex
from ._checks import check_float_tensor, check_same_device_dtype


def film_reference(x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """Eager formulation of :func:`film` (gamma, beta broadcastable to (B, C)); computes in float32/float64."""
    acc = _backend.compute_dtype(x.dtype)
    y = gamma.to(acc)[..., None, None] * x.to(acc) + beta.to(acc)[..., None, None]
    return y.to(x.dtype)


def _film_backward_reference(dy: Tensor, x: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    acc = _backend.compute_dtype(x.dtype)
    dy_acc = dy.to(acc)
    dx = (gamma.to(acc)[..., None, None] * dy_acc).to(x.dtype)
    dgamma = (dy_acc * x.to(acc)).sum(dim=(2, 3)).to(x.dtype)
    dbeta = dy_acc.sum(dim=(2, 3)).to(x.dtype)
    return dx, dgamma, dbeta


def _triton_forward(x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    from ..kernels.film import film_forward

    return film_forward(x, gamma, beta)


def _triton_backward(dy: Tensor, x: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels.film import film_backward

    return film_backward(dy, x, gamma)


def _ext_forward(x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    return torch.ops.harmonizer_fast_C.film(x, gamma, beta)


def _ext_backward(dy: Tensor, x: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(torch.ops.harmonizer_fast_C.film_backward(dy, x, gamma))


_FORWARD = {"torch": film_reference, "triton": _triton_forward, "cuda": _ext_forward, "cpu": _ext_forward}
_BACKWARD = {"torch": _film_backward_reference, "triton": _triton_backward, "cuda": _ext_backward, "cpu": _ext_backward}
SUPPORT = _backend.DEFAULT_SUPPORT
IMPLS = {"film": _FORWARD, "film_backward": _BACKWARD}  # for reports and benchmarks


@torch.library.custom_op("harmonizer_fast::film", mutates_args=())
def _film_op(x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    return _backend.dispatch("film", x, _FORWARD, SUPPORT, x, gamma, beta)


@torch.library.custom_op("harmonizer_fast::film_backward", mutates_args=())
def _film_backward_op(dy: Tensor, x: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dx, dgamma, dbeta = _backend.dispatch("film_backward", x, _BACKWARD, SUPPORT, dy, x, gamma)
    return dx, dgamma, dbeta


@_film_op.register_fake
def _(x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_film_backward_op.register_fake
def _(dy: Tensor, x: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    b, c = x.shape[:2]
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((b, c)), x.new_empty((b, c))


def _setup_context(ctx, inputs, output) -> None:
    x, gamma, _ = inputs
    ctx.save_for_backward(x, gamma)


def _backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    x, gamma = ctx.saved_tensors
    return _film_backward_op(grad, x, gamma)


_film_op.register_autograd(_backward, setup_context=_setup_context)
_autocast.register(_film_op, "promote")  # float32 inside, the widest input dtype out (ops/_autocast.py)
_autocast.register(_film_backward_op, "promote")

# What torch.export's run_decompositions turns each op into (harmonizer_fast.export): the references.
DECOMPOSITIONS = {
    torch.ops.harmonizer_fast.film.default: film_reference,
    torch.ops.harmonizer_fast.film_backward.default: _film_backward_reference,
}


def _as_batch_param(p: object, x: Tensor, name: str) -> Tensor:
    b, c = x.shape[:2]
    if not isinstance(p, Tensor):
        raise TypeError(f"film: {name} must be a torch.Tensor of shape (B, C) or (C,), got {type(p).__name__}")
    check_same_device_dtype(x, p, "film", "x", name)
    # Rank first: comparing a (B, C) shape with (C,) element by element would make torch.export guard B != C.
    if p.dim() == 1 and p.shape[0] == c:
        return p.expand(b, c)  # stride-0 view: no copy, autograd sums the gradient over the batch
    if p.dim() == 2 and p.shape[0] == b and p.shape[1] == c:
        return p
    raise ValueError(f"film: {name} must have shape (B, C) = ({b}, {c}) or (C,) = ({c},), got {tuple(p.shape)}")


def film(x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """FiLM modulation of paper Eq. 3: ``gamma[b, c] * x[b, c, h, w] + beta[b, c]``.

    x ``(B, C, H, W)`` (any strides), gamma and beta ``(B, C)`` or ``(C,)``, all one dtype and device;
    returns a contiguous tensor of x's shape and dtype. Differentiable in all three, with a fused,
    deterministic backward. float32/float64 on CPU; float32/float16/bfloat16/float64 on CUDA (half
    precision computed in float32).
    """
    check_float_tensor(x, "film", "x", 4, "(B, C, H, W)")
    return _film_op(x, _as_batch_param(gamma, x, "gamma"), _as_batch_param(beta, x, "beta"))


# What this family describes about itself (ops/_examples.py): example inputs and FLOP formulas.
def examples(scale: str = "test", dtype: torch.dtype = torch.float64, device="cpu") -> dict:
    b, c, h, w = _ex.pick(scale, (2, 3, 4, 5), (16, 64, 128, 128))
    x = _ex.normal((b, c, h, w), 5, dtype, device)
    gamma, beta = _ex.normal((b, c), 6, dtype, device), _ex.normal((b, c), 7, dtype, device)
    return {"film": (x, gamma, beta), "film_backward": (_ex.normal((b, c, h, w), 10, dtype, device), x, gamma)}


FLOPS = {
    "film": lambda x, gamma, beta, **_: 2 * _ex.numel(x),  # one multiply-add per element
    "film_backward": lambda dy, x, gamma, **_: 4 * _ex.numel(x),  # dx = g dy; dgamma += dy x; dbeta += dy
}
