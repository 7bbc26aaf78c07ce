"""Triton kernels for FiLM (paper Eq. 3): ``y = gamma * x + beta`` per (batch, channel) plane.

Forward: each program writes a BLOCK_H x BLOCK_W tile of one plane (strided loads, contiguous store).
Backward: each program owns a band of rows of one plane, writes ``dx = gamma * dy`` there and reduces its
band's ``sum(dy * x)`` and ``sum(dy)`` with ``tl.sum`` (a fixed tree); the per-band partials are summed by
the caller in a fixed order, so gradients are deterministic without atomics. Computes in float32
(float64 for float64). Installed as ``harmonizer_fast.kernels.film``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._plan import NO_SPILL, LaunchPlan, make_plan


@triton.jit
def _film_forward_kernel(
    x_ptr, g_ptr, b_ptr, y_ptr,
    C, H, W,
    sxb, sxc, sxh, sxw, sgb, sgc, sbb, sbc,
    FP64: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    n = pid // C
    c = pid % C
    i = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    j = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    ok = (i[:, None] < H) & (j[None, :] < W)
    i64, j64 = i[:, None].to(tl.int64), j[None, :].to(tl.int64)  # a plane or view may span 2^31 elements
    x = tl.load(x_ptr + n * sxb + c * sxc + i64 * sxh + j64 * sxw, mask=ok, other=0.0)
    g = tl.load(g_ptr + n * sgb + c * sgc)
    b = tl.load(b_ptr + n * sbb + c * sbc)
    if FP64:
        y = g.to(tl.float64) * x.to(tl.float64) + b.to(tl.float64)
    else:
        y = g.to(tl.float32) * x.to(tl.float32) + b.to(tl.float32)
    tl.store(y_ptr + pid * H * W + i64 * W + j[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _film_backward_kernel(
    dy_ptr, x_ptr, g_ptr, dx_ptr, part_ptr,
    C, H, W, ROWS_PER_CHUNK, CHUNKS, BC,
    sdb, sdc, sdh, sdw, sxb, sxc, sxh, sxw, sgb, sgc,
    FP64: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)  # plane
    chunk = tl.program_id(1)
    n = pid // C
    c = pid % C
    acc_ty = tl.float64 if FP64 else tl.float32
    g = tl.load(g_ptr + n * sgb + c * sgc).to(acc_ty)
    sum_dyx = tl.zeros((BLOCK_H, BLOCK_W), dtype=acc_ty)
    sum_dy = tl.zeros((BLOCK_H, BLOCK_W), dtype=acc_ty)
    row0 = chunk.to(tl.int64) * ROWS_PER_CHUNK  # int64 from here: every row index meets a stride
    for r in range(row0, row0 + ROWS_PER_CHUNK, BLOCK_H):
        i = r + tl.arange(0, BLOCK_H)
        row_ok = (i[:, None] < H) & (i[:, None] < row0 + ROWS_PER_CHUNK)
        for col in range(0, W, BLOCK_W):
            j = col + tl.arange(0, BLOCK_W)
            ok = row_ok & (j[None, :] < W)
            j64 = j[None, :].to(tl.int64)
            dy = tl.load(dy_ptr + n * sdb + c * sdc + i[:, None] * sdh + j64 * sdw, mask=ok, other=0.0)
            x = tl.load(x_ptr + n * sxb + c * sxc + i[:, None] * sxh + j64 * sxw, mask=ok, other=0.0)
            dy = dy.to(acc_ty)
            tl.store(dx_ptr + pid * H * W + i[:, None] * W + j[None, :], (g * dy).to(dx_ptr.dtype.element_ty), mask=ok)
            sum_dyx += dy * x.to(acc_ty)
            sum_dy += dy
    tl.store(part_ptr + pid * CHUNKS + chunk, tl.sum(tl.sum(sum_dyx, axis=1), axis=0))
    tl.store(part_ptr + BC.to(tl.int64) * CHUNKS + pid * CHUNKS + chunk, tl.sum(tl.sum(sum_dy, axis=1), axis=0))


# Tiles of 2048 elements chosen by the plane's width only, so two plans per kernel and dtype cover every
# shape (harmonizer_fast.gpucheck compiles them all).
_TILES = ((16, 128), (64, 32))
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _tile(w: int) -> tuple[int, int]:
    return _TILES[0] if w > 32 else _TILES[1]


def plan_forward(width: int, dtype: torch.dtype, param_dtype: torch.dtype) -> LaunchPlan:
    block_h, block_w = _tile(width)
    consts = dict(FP64=dtype == torch.float64, BLOCK_H=block_h, BLOCK_W=block_w)
    ptrs = dict(x_ptr=dtype, g_ptr=param_dtype, b_ptr=param_dtype, y_ptr=dtype)
    return make_plan(_film_forward_kernel, ptrs, consts, op="film")


def plan_backward(width: int, dtype: torch.dtype, param_dtype: torch.dtype) -> LaunchPlan:
    block_h, block_w = _tile(width)
    consts = dict(FP64=dtype == torch.float64, BLOCK_H=block_h, BLOCK_W=block_w)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ptrs = dict(dy_ptr=dtype, x_ptr=dtype, g_ptr=param_dtype, dx_ptr=dtype, part_ptr=acc)
    return make_plan(_film_backward_kernel, ptrs, consts, op="film_backward")


def gpu_plans(dtypes: tuple[torch.dtype, ...] = DTYPES) -> list[LaunchPlan]:
    """Every plan the launchers can choose (gamma and beta in the feature dtype, as the model passes them)."""
    return [f(w, d, d) for f in (plan_forward, plan_backward) for d in dtypes for w in (128, 32)]


def film_forward(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``gamma * x + beta`` for x (B, C, H, W) of any strides and gamma, beta (B, C) views (stride 0 allowed)."""
    b, c, h, w = x.shape
    y = torch.empty((b, c, h, w), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    plan = plan_forward(w, x.dtype, gamma.dtype)
    block_h, block_w = dict(plan.constexprs)["BLOCK_H"], dict(plan.constexprs)["BLOCK_W"]
    grid = (b * c, triton.cdiv(h, block_h), triton.cdiv(w, block_w))  # planes on x: no 65,535 limit
    plan.launch(grid, x, gamma, beta, y, c, h, w, *x.stride(), *gamma.stride(), *beta.stride())
    return y


def film_backward(dy: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor):
    """``(dx, dgamma, dbeta)`` with dgamma, dbeta per (B, C) plane, reduced deterministically."""
    b, c, h, w = x.shape
    dx = torch.empty((b, c, h, w), dtype=x.dtype, device=x.device)
    plan = plan_backward(w, x.dtype, gamma.dtype)
    block_h = dict(plan.constexprs)["BLOCK_H"]
    # Enough programs to fill a GPU when there are few planes; whole row blocks per chunk.
    chunks = max(1, min(64, (h * w) // 8192, triton.cdiv(h, block_h)))
    rows_per_chunk = triton.cdiv(triton.cdiv(h, chunks), block_h) * block_h
    chunks = triton.cdiv(h, rows_per_chunk)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    partials = torch.empty((2, b, c, chunks), dtype=acc, device=x.device)
    plan.launch(
        (b * c, chunks),
        dy, x, gamma, dx, partials, c, h, w, rows_per_chunk, chunks, b * c,
        *dy.stride(), *x.stride(), *gamma.stride(),
    )  # fmt: skip
    # fixed-order reduction over the chunks; two separate tensors (outputs of an op must not alias)
    return dx, partials[0].sum(-1).to(x.dtype), partials[1].sum(-1).to(x.dtype)


# What this family describes about itself (ops/_examples.py): the plans a call runs, the compile check's rules.
def plans_for(op: str, *args) -> list[LaunchPlan]:
    x, gamma = (args[0], args[1]) if op == "film" else (args[1], args[2])
    plan = plan_forward if op == "film" else plan_backward
    return [plan(x.shape[-1], x.dtype, gamma.dtype)]


COMPILE_RULES = {"_film_forward_kernel": NO_SPILL, "_film_backward_kernel": NO_SPILL}
