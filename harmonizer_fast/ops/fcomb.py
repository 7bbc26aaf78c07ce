"""The fused sampling head of the probabilistic U-Net ("fcomb", docs/architecture.md, "Model"): K samples per image
for the price of one backbone pass.

fcomb's first 1x1 conv on ``concat(f, z)`` splits into ``W_f f + b`` (``base``, once per image) plus
``W_z z_k`` (``bias``, one vector per sample). :func:`fcomb_head` then runs, for every pixel and sample,
``h = relu(base + bias_k)``, the hidden 1x1 layers ``h = relu(W_l h + b_l)`` and ``sigmoid(w . h + b)``,
without materializing the K x C x H x W activations. Inference only (no autograd): training goes through
the model's differentiable torch path.

Implementations: ``fcomb_head_reference`` (torch, chunked over samples so temporaries stay bounded),
``harmonizer_fast.kernels.fcomb`` (Triton) and ``csrc/cpu/fcomb.cpp`` (C++ CPU).
"""

# No `from __future__ import annotations` here: torch.library.custom_op reads the annotations at runtime.
import torch
from torch import Tensor

from .. import _backend
from . import _autocast
from . import _examples as _ex

REFERENCE_CHUNK = 1 << 22  # elements of one (B, k, C, H, W) temporary in the reference


def fcomb_head_reference(
    base: Tensor, bias: Tensor, hidden_w: Tensor, hidden_b: Tensor, last_w: Tensor, last_b: Tensor
) -> Tensor:
    """Plain torch, chunked over the samples so that no temporary exceeds REFERENCE_CHUNK elements."""
    b, c, p = base.shape
    k = bias.shape[1]
    acc = _backend.compute_dtype(base.dtype)
    step = max(1, REFERENCE_CHUNK // max(1, b * c * p))
    chunks = []
    for k0 in range(0, k, step):
        h = torch.relu(base.to(acc)[:, None] + bias[:, k0 : k0 + step].to(acc)[..., None])  # (B, k, C, P)
        for w, bb in zip(hidden_w.to(acc), hidden_b.to(acc)):
            h = torch.relu(torch.einsum("oc,bkcp->bkop", w, h) + bb[:, None])
        logit = torch.einsum("c,bkcp->bkp", last_w.to(acc).flatten(), h) + last_b.to(acc).flatten()
        chunks.append(torch.sigmoid(logit).to(base.dtype))
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)


def _triton(*args: Tensor) -> Tensor:
    from ..kernels.fcomb import fcomb_head as run

    return run(*args)


def _ext(*args: Tensor) -> Tensor:
    return torch.ops.harmonizer_fast_C.fcomb_head(*args)


_IMPLS = {"torch": fcomb_head_reference, "triton": _triton, "cpu": _ext}
# The Triton kernel keeps a (channels x channels) weight tile in registers: above 32 channels it spills
# (kernels/fcomb.py, MAX_CHANNELS), so wider heads run on the other backends, by rule rather than by a
# failure and a fallback warning.
TRITON_MAX_CHANNELS = 32
_WIDE_IMPLS = {k: v for k, v in _IMPLS.items() if k != "triton"}
IMPLS = {"fcomb_head": _IMPLS}
SUPPORT = _backend.DEFAULT_SUPPORT


@torch.library.custom_op("harmonizer_fast::fcomb_head", mutates_args=())
def _fcomb_head_op(
    base: Tensor, bias: Tensor, hidden_w: Tensor, hidden_b: Tensor, last_w: Tensor, last_b: Tensor
) -> Tensor:
    if base.shape[1] > TRITON_MAX_CHANNELS:
        op, impls = f"fcomb_head with more than {TRITON_MAX_CHANNELS} channels", _WIDE_IMPLS
    else:
        op, impls = "fcomb_head", _IMPLS
    return _backend.dispatch(op, base, impls, SUPPORT, base, bias, hidden_w, hidden_b, last_w, last_b)


@_fcomb_head_op.register_fake
def _(base: Tensor, bias: Tensor, hidden_w: Tensor, hidden_b: Tensor, last_w: Tensor, last_b: Tensor) -> Tensor:
    return base.new_empty((base.shape[0], bias.shape[1], base.shape[2]))


# Probabilities thresholded at 0.5 downstream: float32 out, even under autocast (ops/_autocast.py).
_autocast.register(_fcomb_head_op, "float32")


def _fcomb_head_decomposition(
    base: Tensor, bias: Tensor, hidden_w: Tensor, hidden_b: Tensor, last_w: Tensor, last_b: Tensor
) -> Tensor:
    """The reference in one pass: its chunk count is Python arithmetic on the sizes, which torch.export would
    freeze into the program (every dynamic size specialized to the traced one)."""
    acc = _backend.compute_dtype(base.dtype)
    h = torch.relu(base.to(acc)[:, None] + bias.to(acc)[..., None])  # (B, K, C, P)
    for w, bb in zip(hidden_w.to(acc), hidden_b.to(acc)):
        h = torch.relu(torch.einsum("oc,bkcp->bkop", w, h) + bb[:, None])
    logit = torch.einsum("c,bkcp->bkp", last_w.to(acc).flatten(), h) + last_b.to(acc).flatten()
    return torch.sigmoid(logit).to(base.dtype)


# What torch.export's run_decompositions turns the op into (harmonizer_fast.export).
DECOMPOSITIONS = {torch.ops.harmonizer_fast.fcomb_head.default: _fcomb_head_decomposition}


def fcomb_head(
    base: Tensor, bias: Tensor, hidden_w: Tensor, hidden_b: Tensor, last_w: Tensor, last_b: Tensor
) -> Tensor:
    """Sample probabilities ``(B, K, H, W)`` of the split fcomb head.

    base ``(B, C, H, W)`` = W_f f + b; bias ``(B, K, C)`` = W_z z_k; hidden_w ``(L, C, C)``, hidden_b ``(L, C)``;
    last_w ``(C,)``, last_b ``(1,)``. All one dtype and device. Not differentiable.
    """
    if base.dim() != 4:
        raise ValueError(f"fcomb_head: base must be (B, C, H, W), got shape {tuple(base.shape)}")
    b, c, h, w = base.shape
    if bias.dim() != 3 or bias.shape[0] != b or bias.shape[2] != c:
        raise ValueError(f"fcomb_head: bias must be (B, K, C) = ({b}, K, {c}), got {tuple(bias.shape)}")
    if hidden_w.dim() != 3 or tuple(hidden_w.shape[1:]) != (c, c) or tuple(hidden_b.shape) != (hidden_w.shape[0], c):
        raise ValueError("fcomb_head: hidden_w must be (L, C, C) and hidden_b (L, C)")
    args = [t.detach().contiguous() for t in (bias, hidden_w, hidden_b, last_w.reshape(-1), last_b.reshape(-1))]
    out = _fcomb_head_op(base.detach().reshape(b, c, h * w).contiguous(), *args)
    return out.reshape(b, bias.shape[1], h, w)


# What this family describes about itself (ops/_examples.py): example inputs and FLOP formulas.
def examples(scale: str = "test", dtype: torch.dtype = torch.float64, device="cpu") -> dict:
    b, k, c, p, layers = _ex.pick(scale, (2, 3, 8, 30, 2), (16, 50, 16, 128 * 128, 3))
    args = [_ex.normal(s, 12 + i, dtype, device, scale=0.3 if i == 2 else 1.0)
            for i, s in enumerate(((b, c, p), (b, k, c), (layers, c, c), (layers, c), (c,), (1,)))]  # fmt: skip
    return {"fcomb_head": tuple(args)}


def _head_flops(base, bias, hidden_w, *_, **__) -> int:
    b, c, p = base
    k, layers = bias[1], hidden_w[0]
    return b * k * p * (c + 2 * layers * c * c + 2 * c)  # bias add, hidden products, last dot


FLOPS = {"fcomb_head": _head_flops}
