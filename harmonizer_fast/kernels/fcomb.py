"""Triton kernel of the fused sampling head (csrc/include/fcomb.h, docs/architecture.md, "Model").

One program per (image, BLOCK_P pixels), on a one-dimensional grid (grid y would cap an image at
65,535 blocks, 8.4 M pixels at BLOCK_P = 128): it loads that block of ``base = W_f f + b`` once, then for each of
the K samples adds the sample's bias ``W_z z_k``, runs the hidden 1x1 layers as (C x C) @ (C x BLOCK_P)
products in registers and writes only the sigmoid output. Computes in float32 (float64 for float64).
The products use IEEE fp32 FMAs, not tensor cores: with the paper's 16 channels the product is 16 x 16
per pixel, too small for TF32's rounding to buy anything, and the head stays exact against the reference.
BLOCK_P shrinks as the channels grow so the (channels x BLOCK_P) activation tile stays in registers (at
64 channels a 128-pixel block spilled 36-54 KB and needed 131.6 KB of shared memory on sm_80-90).
Installed as ``harmonizer_fast.kernels.fcomb``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._plan import NO_SPILL, LaunchPlan, make_plan


@triton.jit
def _fcomb_head_kernel(
    base_ptr, bias_ptr, hw_ptr, hb_ptr, lw_ptr, lb_ptr, out_ptr,
    K, C, P, NPB,
    LAYERS: tl.constexpr, CP: tl.constexpr, BLOCK_P: tl.constexpr, FP64: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    bi = pid // NPB
    px = (pid % NPB) * BLOCK_P + tl.arange(0, BLOCK_P)
    ch = tl.arange(0, CP).to(tl.int64)  # ch * P exceeds 2^31 for images over 2^31 / C pixels
    pm = px < P
    cm = ch < C
    ch_c = C.to(tl.int64)  # C is at most MAX_CHANNELS, but every size meets another in int64 (gpucheck)
    acc_ty = tl.float64 if FP64 else tl.float32
    base = tl.load(base_ptr + bi * C * P + ch[:, None] * P + px[None, :], mask=cm[:, None] & pm[None, :], other=0.0)
    base = base.to(acc_ty)
    lw = tl.load(lw_ptr + ch, mask=cm, other=0.0).to(acc_ty)
    lb = tl.load(lb_ptr).to(acc_ty)
    for k in range(K):
        bias = tl.load(bias_ptr + (bi * K + k) * C + ch, mask=cm, other=0.0).to(acc_ty)
        # PropagateNan.ALL: relu must pass NaN on, as torch.relu does (the default maps NaN to 0, so a NaN
        # image would come out as plausible probabilities).
        h = tl.maximum(base + bias[:, None], 0.0, propagate_nan=tl.PropagateNan.ALL)
        for layer in tl.static_range(LAYERS):
            w = tl.load(
                hw_ptr + ch_c * C * layer + ch[:, None] * C + ch[None, :], mask=cm[:, None] & cm[None, :], other=0.0
            )
            b = tl.load(hb_ptr + ch_c * layer + ch, mask=cm, other=0.0).to(acc_ty)
            g = tl.dot(w.to(acc_ty), h, input_precision="ieee")
            h = tl.maximum(g + b[:, None], 0.0, propagate_nan=tl.PropagateNan.ALL)
        logit = tl.sum(lw[:, None] * h, axis=0) + lb
        prob = 1.0 / (1.0 + tl.exp(-logit))
        tl.store(out_ptr + (bi * K + k) * P + px, prob.to(out_ptr.dtype.element_ty), mask=pm)


DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Pixels per program by padded channel count: the (channels x pixels) activation tile and the
# (channels x channels) weight tile must stay in registers. At 64 channels even a 16-pixel block spilled
# 68-1200 B (and fp32 needed 102,912 B of shared memory, over sm_86's 99 KiB), at 128 channels 20-34 KB,
# so heads wider than 32 channels run on the other backends (ops/fcomb.py routes them; the paper's head
# has 16 channels).
_BLOCK_P = {16: 128, 32: 64}
MAX_CHANNELS = 32


def plan_head(channels: int, layers: int, dtype: torch.dtype) -> LaunchPlan:
    """The plan for ``channels`` fcomb channels and ``layers`` hidden layers (weights in ``dtype``)."""
    cp = max(16, triton.next_power_of_2(channels))  # tl.dot needs at least 16 along every side
    if cp > MAX_CHANNELS:
        raise ValueError(f"fcomb_head's Triton kernel takes at most {MAX_CHANNELS} channels, got {channels}")
    block_p = _BLOCK_P[cp]
    consts = dict(LAYERS=layers, CP=cp, BLOCK_P=block_p, FP64=dtype == torch.float64)
    ptrs = {k: dtype for k in ("base_ptr", "bias_ptr", "hw_ptr", "hb_ptr", "lw_ptr", "lb_ptr", "out_ptr")}
    return make_plan(_fcomb_head_kernel, ptrs, consts, op="fcomb_head")


def gpu_plans(dtypes: tuple[torch.dtype, ...] = DTYPES) -> list[LaunchPlan]:
    """The paper's head (16 channels, 3 hidden layers) and wider heads up to MAX_CHANNELS."""
    shapes = ((16, 3), (32, 3))
    return [plan_head(c, n, d) for d in dtypes for c, n in shapes]


def fcomb_head(base, bias, hidden_w, hidden_b, last_w, last_b) -> torch.Tensor:
    """Probabilities ``(B, K, pixels)`` from base ``(B, C, pixels)`` and per-sample biases ``(B, K, C)``."""
    b, c, p = base.shape
    k = bias.shape[1]
    out = torch.empty((b, k, p), dtype=base.dtype, device=base.device)
    if out.numel() == 0:
        return out
    plan = plan_head(c, hidden_w.shape[0], base.dtype)
    npb = triton.cdiv(p, dict(plan.constexprs)["BLOCK_P"])
    plan.launch((b * npb,), base, bias, hidden_w, hidden_b, last_w, last_b, out, k, c, p, npb)
    return out


# What this family describes about itself (ops/_examples.py): the plans a call runs, the compile check's rules.
def plans_for(op: str, *args) -> list[LaunchPlan]:
    base, hidden_w = args[0], args[2]
    return [plan_head(base.shape[1], hidden_w.shape[0], base.dtype)]


COMPILE_RULES = {"_fcomb_head_kernel": NO_SPILL}
