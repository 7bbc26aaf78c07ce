"""Token-attention pooling, the Noise Harmonizer's attention (paper Eq. 2, f'_l before GAP).

M learnable artifact tokens (queries) attend over the H*W positions of a feature map x (B, C, H, W),
with keys and values projected from x:

    out[b] = softmax(Q[b] K[b]^T * scale) V[b],   K[b] = (W_k x[b])^T,  V[b] = (W_v x[b])^T     (B, M, Dh)

Because K and V are linear in x, the kernels never form them: with ``a = scale * Q W_k`` (M x C),

    scores = a x[b]   and   out[b] = (softmax(scores) x[b]^T) W_v^T,

so the work is two M x C x HW products instead of 2 Dh x C x HW + 2 M x Dh x HW, and the kernels read x
once per pass with an online (running max) softmax, never storing K, V or the M x HW scores. The
projections ``a`` and ``z W_v^T`` are tiny and stay in torch (ordinary autograd). The core op
``attention_pool(x, a) -> (z, lse)`` has its own backward, which recomputes the probabilities from the
saved log-sum-exp ``lse`` (float32, float64 for float64 inputs):

    D = rowsum(dz * z);  p_n = exp(a x_n - lse);  ds_n = p_n * (dz x_n - D)
    dx_n = dz^T p_n + a^T ds_n;   da = sum_n ds_n x_n^T

Implementations: ``_core_reference`` (torch), ``harmonizer_fast.kernels.attention_pool`` (Triton),
``csrc/cuda/attention_pool.cu`` (CUDA), ``csrc/cpu/attention_pool.cpp`` (CPU).
"""

# No `from __future__ import annotations` here: torch.library.custom_op reads the annotations at runtime.
import math
from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from . import _autocast
from . import _examples as _ex
from ._checks import check_float_tensor, check_same_device_dtype


def token_attention_pool_reference(
    x: Tensor, queries: Tensor, w_k: Tensor, w_v: Tensor, *, scale: Optional[float] = None
) -> Tensor:
    """The eager composite, as the paper writes it: project K and V, softmax over positions, weighted sum."""
    dh = w_k.shape[0]
    scale = 1.0 / math.sqrt(dh) if scale is None else scale
    xf = x.flatten(2)  # (B, C, N)
    k = torch.einsum("dc,bcn->bnd", w_k, xf)
    v = torch.einsum("dc,bcn->bnd", w_v, xf)
    q = queries if queries.dim() == 3 else queries.expand(x.shape[0], *queries.shape)
    scores = torch.einsum("bmd,bnd->bmn", q, k) * scale
    return torch.einsum("bmn,bnd->bmd", scores.softmax(dim=-1), v)


def _core_reference(x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    acc = _backend.compute_dtype(x.dtype)
    xf = x.flatten(2).to(acc)  # (B, C, N)
    scores = torch.matmul(a.to(acc), xf)  # (B, M, N)
    lse = torch.logsumexp(scores, dim=-1)
    z = torch.matmul(torch.exp(scores - lse[..., None]), xf.transpose(1, 2))
    return z.to(x.dtype), lse


def _core_backward_reference(dz: Tensor, x: Tensor, a: Tensor, z: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    acc = _backend.compute_dtype(x.dtype)
    xf, a_, dz_ = x.flatten(2).to(acc), a.to(acc), dz.to(acc)
    p = torch.exp(torch.matmul(a_, xf) - lse[..., None])  # (B, M, N)
    d = (dz_ * z.to(acc)).sum(-1, keepdim=True)  # (B, M, 1)
    ds = p * (torch.matmul(dz_, xf) - d)
    dx = torch.matmul(dz_.transpose(1, 2), p) + torch.matmul(a_.transpose(1, 2), ds)
    da = torch.matmul(ds, xf.transpose(1, 2))
    return dx.reshape(x.shape).to(x.dtype), da.to(a.dtype)


def _triton_core(x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    from ..kernels.attention_pool import attention_pool_forward

    return attention_pool_forward(x, a)


def _triton_core_backward(dz: Tensor, x: Tensor, a: Tensor, z: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    from ..kernels.attention_pool import attention_pool_backward

    return attention_pool_backward(dz, x, a, z, lse)


def _ext_core(x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    return tuple(torch.ops.harmonizer_fast_C.attention_pool(x, a))


def _ext_core_backward(dz: Tensor, x: Tensor, a: Tensor, z: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    return tuple(torch.ops.harmonizer_fast_C.attention_pool_backward(dz, x, a, z, lse))


_FORWARD = {"torch": _core_reference, "triton": _triton_core, "cuda": _ext_core, "cpu": _ext_core}
_BACKWARD = {
    "torch": _core_backward_reference,
    "triton": _triton_core_backward,
    "cuda": _ext_core_backward,
    "cpu": _ext_core_backward,
}
SUPPORT = _backend.DEFAULT_SUPPORT
IMPLS = {"attention_pool": _FORWARD, "attention_pool_backward": _BACKWARD}
_BEYOND_INT32 = " (a batch item beyond the Triton kernels' int32 offsets)"


def _route(op: str, x: Tensor, m: int, impls: dict) -> tuple[str, dict]:
    """The Triton kernels address one batch item with int32 offsets (kernels/attention_pool.py ``fits``): a
    bigger item runs on the other backends by rule, not by a failure and a fallback warning."""
    if _backend._unavailable("triton", x.device.type):
        return op, impls
    from ..kernels.attention_pool import fits

    return (op, impls) if fits(x, m) else (op + _BEYOND_INT32, {k: v for k, v in impls.items() if k != "triton"})


def _flat_plane(x: Tensor) -> Tensor:
    # The kernels walk each (b, c) plane as one run of H*W elements; other layouts are copied once.
    _, _, h, w = x.shape
    return x if x.stride(3) == 1 and x.stride(2) == w else x.contiguous()


@torch.library.custom_op("harmonizer_fast::attention_pool", mutates_args=())
def _core_op(x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    x = _flat_plane(x)
    op, impls = _route("attention_pool", x, a.shape[1], _FORWARD)
    z, lse = _backend.dispatch(op, x, impls, SUPPORT, x, a.contiguous())
    return z, lse


@torch.library.custom_op("harmonizer_fast::attention_pool_backward", mutates_args=())
def _core_backward_op(dz: Tensor, x: Tensor, a: Tensor, z: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    x = _flat_plane(x)
    dz, a, z, lse = dz.contiguous(), a.contiguous(), z.contiguous(), lse.contiguous()  # all (B, M[, C]): tiny
    op, impls = _route("attention_pool_backward", x, a.shape[1], _BACKWARD)
    dx, da = _backend.dispatch(op, x, impls, SUPPORT, dz, x, a, z, lse)
    return dx, da


@_core_op.register_fake
def _(x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    b, m, c = a.shape
    return x.new_empty((b, m, c)), x.new_empty((b, m), dtype=_backend.compute_dtype(x.dtype))


@_core_backward_op.register_fake
def _(dz: Tensor, x: Tensor, a: Tensor, z: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(a)


def _setup_context(ctx, inputs, output) -> None:
    x, a = inputs
    z, lse = output
    ctx.save_for_backward(x, a, z, lse)


def _backward(ctx, dz: Tensor, dlse: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    x, a, z, lse = ctx.saved_tensors
    # lse is an auxiliary output for the backward pass; the public function never exposes it.
    return _core_backward_op(dz, x, a, z, lse)


_core_op.register_autograd(_backward, setup_context=_setup_context)
_autocast.register(_core_op, "float32")  # a softmax over positions: float32 in and out (ops/_autocast.py)
_autocast.register(_core_backward_op, "float32")

# What torch.export's run_decompositions turns each op into (harmonizer_fast.export): the references.
DECOMPOSITIONS = {
    torch.ops.harmonizer_fast.attention_pool.default: _core_reference,
    torch.ops.harmonizer_fast.attention_pool_backward.default: _core_backward_reference,
}


@_autocast.float32  # a softmax over positions: float32 throughout under autocast, projections included
def token_attention_pool(
    x: Tensor, queries: Tensor, w_k: Tensor, w_v: Tensor, *, scale: Optional[float] = None
) -> Tensor:
    """Attention of M query tokens over the H*W positions of x (paper Eq. 2): ``(B, M, Dh)``.

    ``softmax(Q (W_k x)^T * scale) (W_v x)`` over positions, with x ``(B, C, H, W)``, queries ``(M, Dh)``
    (shared by the batch) or ``(B, M, Dh)``, and ``w_k``, ``w_v`` ``(Dh, C)``; ``scale`` defaults to
    ``1 / sqrt(Dh)``. Differentiable in x, queries, w_k and w_v. Computed in float32 (float64 for float64)
    with an online softmax, so large logits do not overflow.

    Precision: when the softmax saturates (large ``scale`` or logits), the gradients with respect to
    ``queries`` and ``w_k`` are ill-conditioned in float32 for any implementation. With scale 5, C = 300,
    Dh = 64, three random trials against float64 gave errors of 3e-4, 5e-5 and 2e-1 of their largest entry
    on the CPU kernel (eager float32 composite: 3e-5, 1e-5 and 3e-2). Use float64 where they matter.
    """
    op = "token_attention_pool"
    check_float_tensor(x, op, "x", 4, "(B, C, H, W)")
    b, c = x.shape[:2]
    for name, t in (("queries", queries), ("w_k", w_k), ("w_v", w_v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        check_same_device_dtype(x, t, op, "x", name)
    if w_k.dim() != 2 or w_k.shape[1] != c or w_k.numel() == 0:
        raise ValueError(f"{op}: w_k must have shape (Dh, C) with C = {c}, got {tuple(w_k.shape)}")
    dh = w_k.shape[0]
    if tuple(w_v.shape) != (dh, c):
        raise ValueError(f"{op}: w_v must have shape (Dh, C) = ({dh}, {c}), like w_k; got {tuple(w_v.shape)}")
    if queries.dim() not in (2, 3) or queries.shape[-1] != dh or queries.shape[-2] == 0:
        raise ValueError(f"{op}: queries must have shape (M, Dh) or (B, M, Dh) with Dh = {dh}, got "
                         f"{tuple(queries.shape)}")  # fmt: skip
    if queries.dim() == 3 and queries.shape[0] != b:
        raise ValueError(f"{op}: queries has batch {queries.shape[0]}, x has batch {b}")
    if scale is None:
        scale = 1.0 / math.sqrt(dh)
    elif not math.isfinite(float(scale)):
        raise ValueError(f"{op}: scale must be finite, got {scale}")
    a = torch.matmul(queries, w_k) * scale  # (M, C) or (B, M, C)
    a = a.expand(b, *a.shape[-2:]) if a.dim() == 2 else a
    z, _ = _core_op(x, a)
    return torch.matmul(z, w_v.t())


# What this family describes about itself (ops/_examples.py): example inputs and FLOP formulas.
def examples(scale: str = "test", dtype: torch.dtype = torch.float64, device="cpu") -> dict:
    b, c, h, w, m = _ex.pick(scale, (2, 6, 5, 7, 3), (16, 256, 16, 16, 8))
    x, a = _ex.normal((b, c, h, w), 8, dtype, device), _ex.normal((b, m, c), 9, dtype, device, scale=0.3)
    z, lse = torch.ops.harmonizer_fast.attention_pool(x, a)
    return {"attention_pool": (x, a),
            "attention_pool_backward": (_ex.normal((b, m, c), 11, dtype, device), x, a, z, lse)}  # fmt: skip


def _pool_flops(x, a, **_) -> int:
    return 4 * x[0] * a[1] * x[1] * _ex.numel(x[2:])  # scores (a x) and the weighted sum over positions


FLOPS = {"attention_pool": _pool_flops, "attention_pool_backward": lambda dz, x, a, *_, **__: 2 * _pool_flops(x, a)}
