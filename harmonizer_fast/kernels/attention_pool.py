"""Triton kernels for the token-attention pooling core (paper Eq. 2; see harmonizer_fast/ops/attention_pool.py).

``z[b] = softmax(a[b] x[b]) x[b]^T`` with x[b] (C, N) and a[b] (M, C). The grid is (batch item x
position chunk, channel chunk). Each program streams its positions in BLOCK_N tiles: the scores tile
``a @ x_tile`` is summed over BLOCK_C-channel chunks, the softmax is online (running max and sum), and the
program accumulates only its own BLOCK_C output channels ``p @ x_tile[c]^T``; nothing of size M x N is
ever stored. Chunking the channels bounds shared memory and registers whatever C is: with the whole C in
one tile the fp32 backward needed 108,544 B of shared memory at C = 256 (over sm_86's 99 KiB per block)
and spilled 17-20 KB. The price is that every channel chunk recomputes the scores (C / BLOCK_C times the
M x C x N score work), which is cheap next to reading x for the paper's M = 8 queries.

Every dtype computes in float32 (float64 for float64): tiles are converted after loading and the products
are IEEE fp32 FMAs, not tensor cores. With M = 8 queries a 16-row MMA would be half empty and the op reads
each x element for 2 M FLOPs, so it is bound by memory, not by FMAs; fp16/bf16 probabilities and ``ds``
never round to the input dtype (fp16 ``ds`` could overflow). The launcher merges the position chunks in a
fixed order. The backward pass recomputes the probabilities from the saved log-sum-exp and writes dx tile
by tile with per-chunk partials of da. Installed as ``harmonizer_fast.kernels.attention_pool``.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ._plan import NO_SPILL, LaunchPlan, make_plan


@triton.jit
def _dot(a, b, FP64: tl.constexpr):
    if FP64:
        return tl.dot(a, b, out_dtype=tl.float64)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _scores(q_rows, x_cols, m_ok, n_ok, C, sxc, FP64: tl.constexpr, ACC: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """``q @ x_tile`` (BLOCK_M, BLOCK_N), summed over BLOCK_C-channel chunks; q rows are C long."""
    s = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        rc = c0 + tl.arange(0, BLOCK_C)
        c_ok = rc < C
        q = tl.load(q_rows + rc[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0).to(ACC)
        xt = tl.load(x_cols + rc[:, None] * sxc, mask=c_ok[:, None] & n_ok[None, :], other=0.0).to(ACC)
        s += _dot(q, xt, FP64)
    return s


@triton.jit
def _program_geometry(C, N, M, SPLITS, CHUNK, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's task (batch item x position chunk), batch item, position range [n0, n1), query rows
    and output channels (the channel chunk on grid axis 1) with their masks. Offsets within one batch item
    stay int32 (int64 channel or query offsets made the fp16/bf16 kernels spill 8-16 B on sm_80-90): the
    launchers leave items that int32 cannot address to the other backends (:func:`fits`), so the plans declare
    C, N and sxc bounded, and every offset from the batch item on is int64."""
    task = tl.program_id(0).to(tl.int64)
    bi = task // SPLITS
    n0 = (task % SPLITS) * CHUNK
    rm = tl.arange(0, BLOCK_M)
    ro = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return task, bi, n0, tl.minimum(N, n0 + CHUNK), rm, rm < M, ro, ro < C


@triton.jit
def _forward_kernel(
    x_ptr, a_ptr, pm_ptr, pl_ptr, pacc_ptr,
    C, N, M, SPLITS, CHUNK, sxb, sxc,
    FP64: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    task, bi, n0, n1, rm, m_ok, ro, o_ok = _program_geometry(C, N, M, SPLITS, CHUNK, BLOCK_M, BLOCK_C)
    a_rows = a_ptr + bi * M * C + rm[:, None] * C
    x_b = x_ptr + bi * sxb
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    l_i = tl.zeros((BLOCK_M,), dtype=ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for start in range(n0, n1, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        n_ok = rn < n1
        s = _scores(a_rows, x_b + rn[None, :], m_ok, n_ok, C, sxc, FP64, ACC, BLOCK_M, BLOCK_C, BLOCK_N)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        xo = tl.load(x_b + ro[:, None] * sxc + rn[None, :], mask=o_ok[:, None] & n_ok[None, :], other=0.0).to(ACC)
        acc = acc * alpha[:, None] + _dot(p, tl.trans(xo), FP64)
        m_i = m_new
    out = task * M + rm
    first = m_ok & ((rm * 0 + tl.program_id(1)) == 0)  # every channel chunk has the same softmax state
    tl.store(pm_ptr + out, m_i, mask=first)
    tl.store(pl_ptr + out, l_i, mask=first)
    tl.store(pacc_ptr + out[:, None] * C + ro[None, :], acc, mask=m_ok[:, None] & o_ok[None, :])


@triton.jit
def _backward_kernel(
    dz_ptr, x_ptr, a_ptr, lse_ptr, d_ptr, dx_ptr, pda_ptr,
    C, N, M, SPLITS, CHUNK, sxb, sxc,
    FP64: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    task, bi, n0, n1, rm, m_ok, ro, o_ok = _program_geometry(C, N, M, SPLITS, CHUNK, BLOCK_M, BLOCK_C)
    mo_ok = m_ok[:, None] & o_ok[None, :]
    a_rows = a_ptr + bi * M * C + rm[:, None] * C
    dz_rows = dz_ptr + bi * M * C + rm[:, None] * C
    a_o = tl.load(a_rows + ro[None, :], mask=mo_ok, other=0.0).to(ACC)
    dz_o = tl.load(dz_rows + ro[None, :], mask=mo_ok, other=0.0).to(ACC)
    lse = tl.load(lse_ptr + bi * M + rm, mask=m_ok, other=0.0)
    d = tl.load(d_ptr + bi * M + rm, mask=m_ok, other=0.0)
    da = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    x_b = x_ptr + bi * sxb
    dx_b = dx_ptr + bi * C * N + ro[:, None] * N
    for start in range(n0, n1, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        n_ok = rn < n1
        s = _scores(a_rows, x_b + rn[None, :], m_ok, n_ok, C, sxc, FP64, ACC, BLOCK_M, BLOCK_C, BLOCK_N)
        t = _scores(dz_rows, x_b + rn[None, :], m_ok, n_ok, C, sxc, FP64, ACC, BLOCK_M, BLOCK_C, BLOCK_N)
        p = tl.where(m_ok[:, None] & n_ok[None, :], tl.exp(s - lse[:, None]), 0.0)
        ds = p * (t - d[:, None])
        tile_ok = o_ok[:, None] & n_ok[None, :]
        dxt = _dot(tl.trans(dz_o), p, FP64) + _dot(tl.trans(a_o), ds, FP64)
        tl.store(dx_b + rn[None, :], dxt.to(dx_ptr.dtype.element_ty), mask=tile_ok)
        xo = tl.load(x_b + ro[:, None] * sxc + rn[None, :], mask=tile_ok, other=0.0).to(ACC)
        da += _dot(ds, tl.trans(xo), FP64)
    tl.store(pda_ptr + task * M * C + rm[:, None] * C + ro[None, :], da, mask=mo_ok)


def _geometry(x: torch.Tensor, a: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    b, c = x.shape[:2]
    n = x.shape[2] * x.shape[3]
    m = a.shape[1]
    splits = min(max(1, min(64, triton.cdiv(n, 4096))), n)  # as csrc/include/attention_pool.h
    return b, c, n, m, splits, triton.cdiv(n, splits)


DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ITEM_LIMIT = 2**31  # offsets within one batch item are int32


def fits(x: torch.Tensor, m: int) -> bool:
    """Whether the kernels' int32 offsets within a batch item cover x (B, C, H, W) with m queries: C times
    the largest of the channel stride, H W and the query tile (the (M, C) rows of a, dz and da) below
    2^31. A bigger item takes the other backends, by rule (ops/attention_pool.py)."""
    c, n = x.shape[1], x.shape[2] * x.shape[3]
    return c * max(x.stride(1), n, max(16, triton.next_power_of_2(m))) < ITEM_LIMIT


def _blocks(m: int, c: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, BLOCK_N): queries padded to the 16 rows tl.dot needs; channel chunks of 32 (C <= 32)
    or 64, with 32 positions per tile (16 in the backward pass, which holds a, dz and da). With 8 warps
    these are the largest tiles found without spills on sm_80-90: the fp32 backward at 64 channels x 32
    positions with 4 warps took 255 registers and spilled 32-292 B."""
    block_m = max(16, triton.next_power_of_2(m))
    if c <= 32:
        return block_m, 32, 32
    return block_m, 64, 16 if backward else 32


def _plan(kernel: Any, ptrs: dict[str, torch.dtype], m: int, c: int, dtype: torch.dtype, op: str) -> LaunchPlan:
    block_m, block_c, block_n = _blocks(m, c, kernel is _backward_kernel)
    fp64 = dtype == torch.float64
    consts = dict(FP64=fp64, ACC=tl.float64 if fp64 else tl.float32, BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_N=block_n)
    # C, N, sxc: one batch item's sizes and channel stride, which fits() keeps within int32 offsets
    return make_plan(kernel, ptrs, consts, num_warps=8, num_stages=2, op=op, bounded=("C", "N", "sxc"))


def plan_forward(m: int, c: int, dtype: torch.dtype) -> LaunchPlan:
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ptrs = dict(x_ptr=dtype, a_ptr=dtype, pm_ptr=acc, pl_ptr=acc, pacc_ptr=acc)
    return _plan(_forward_kernel, ptrs, m, c, dtype, "attention_pool")


def plan_backward(m: int, c: int, dtype: torch.dtype) -> LaunchPlan:
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ptrs = dict(dz_ptr=dtype, x_ptr=dtype, a_ptr=dtype, lse_ptr=acc, d_ptr=acc, dx_ptr=dtype, pda_ptr=acc)
    return _plan(_backward_kernel, ptrs, m, c, dtype, "attention_pool_backward")


def gpu_plans(dtypes: tuple[torch.dtype, ...] = DTYPES) -> list[LaunchPlan]:
    """The paper's 8 queries at both channel chunks the rule can pick (C <= 32, and any wider C)."""
    shapes = ((8, 32), (8, 256))
    return [f(m, c, d) for f in (plan_forward, plan_backward) for d in dtypes for m, c in shapes]


def attention_pool_forward(x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, lse)`` for x (B, C, H, W) with contiguous planes and a contiguous (B, M, C)."""
    assert x.stride(3) == 1 and x.stride(2) == x.shape[3] and a.is_contiguous()
    b, c, n, m, splits, chunk = _geometry(x, a)
    if not fits(x, m):
        raise ValueError(f"attention_pool: a batch item of {c} x {n} exceeds the kernels' int32 offsets")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    part_m = torch.empty((b, splits, m), dtype=acc, device=x.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty((b, splits, m, c), dtype=acc, device=x.device)
    plan = plan_forward(m, c, x.dtype)
    grid = (b * splits, triton.cdiv(c, dict(plan.constexprs)["BLOCK_C"]))
    plan.launch(grid, x, a, part_m, part_l, part_acc, c, n, m, splits, chunk, x.stride(0), x.stride(1))
    m_tot = part_m.amax(dim=1)  # merge the chunks' softmax states in a fixed order
    w = torch.exp(part_m - m_tot[:, None])
    l_tot = (part_l * w).sum(dim=1)
    z = (part_acc * w[..., None]).sum(dim=1) / l_tot[..., None]
    return z.to(x.dtype), m_tot + torch.log(l_tot)


def attention_pool_backward(
    dz: torch.Tensor, x: torch.Tensor, a: torch.Tensor, z: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, da)`` of :func:`attention_pool_forward`, recomputing the probabilities from ``lse``."""
    b, c, n, m, splits, chunk = _geometry(x, a)
    if not fits(x, m):
        raise ValueError(f"attention_pool: a batch item of {c} x {n} exceeds the kernels' int32 offsets")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    d = (dz.to(acc) * z.to(acc)).sum(-1).contiguous()
    dx = torch.empty((b, c, x.shape[2], x.shape[3]), dtype=x.dtype, device=x.device)
    part_da = torch.empty((b, splits, m, c), dtype=acc, device=x.device)
    plan = plan_backward(m, c, x.dtype)
    grid = (b * splits, triton.cdiv(c, dict(plan.constexprs)["BLOCK_C"]))
    plan.launch(
        grid, dz.contiguous(), x, a, lse.contiguous(), d, dx, part_da, c, n, m, splits, chunk, x.stride(0), x.stride(1)
    )
    return dx, part_da.sum(dim=1).to(a.dtype)


# What this family describes about itself (ops/_examples.py): the plans a call runs, the compile check's rules.
def plans_for(op: str, *args) -> list[LaunchPlan]:
    x, a = (args[0], args[1]) if op == "attention_pool" else (args[1], args[2])
    plan = plan_forward if op == "attention_pool" else plan_backward
    return [plan(a.shape[1], x.shape[1], x.dtype)]


COMPILE_RULES = {"_forward_kernel": NO_SPILL, "_backward_kernel": NO_SPILL}
