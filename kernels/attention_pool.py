"""Triton kernels for the token-attention pooling core (paper Eq. 2; see harmonizer_fast/ops/attention_pool.py).

``z[b] = softmax(a[b] x[b]) x[b]^T`` with x[b] (C, N) and a[b] (M, C). One program per (batch item,
position chunk) streams its positions in BLOCK_N tiles: the scores tile ``a @ x_tile`` and the update
``p @ x_tile^T`` are tensor-core dots (float32 operands use IEEE fp32, not TF32), the softmax is online
(running max and sum), and nothing of size M x N is ever stored. Each chunk writes its running max, sum
and M x C accumulator; the launcher merges the chunks in a fixed order. The backward pass recomputes the
probabilities from the saved log-sum-exp and writes dx tile by tile with per-chunk partials of da.
Installed as ``harmonizer_fast.kernels.attention_pool``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, FP32: tl.constexpr, ACC: tl.constexpr):
    if FP32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b, out_dtype=ACC)


@triton.jit
def _program_geometry(C, N, M, SPLITS, CHUNK, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's (batch item, position chunk) and its query/channel ranges with their masks."""
    task = tl.program_id(0).to(tl.int64)
    n0 = (task % SPLITS) * CHUNK
    rm = tl.arange(0, BLOCK_M)
    rc = tl.arange(0, BLOCK_C)
    return task, task // SPLITS, n0, tl.minimum(N, n0 + CHUNK), rm, rc, rm < M, rc < C


@triton.jit
def _forward_kernel(
    x_ptr, a_ptr, pm_ptr, pl_ptr, pacc_ptr,
    C, N, M, SPLITS, CHUNK, sxb, sxc,
    FP32: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    task, bi, n0, n1, rm, rc, m_ok, c_ok = _program_geometry(C, N, M, SPLITS, CHUNK, BLOCK_M, BLOCK_C)
    a = tl.load(a_ptr + bi * M * C + rm[:, None] * C + rc[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    l_i = tl.zeros((BLOCK_M,), dtype=ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    x_base = x_ptr + bi * sxb + rc[:, None] * sxc
    for start in range(n0, n1, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        n_ok = rn < n1
        xt = tl.load(x_base + rn[None, :], mask=c_ok[:, None] & n_ok[None, :], other=0.0)  # (C, N) tile
        s = _dot(a, xt, FP32, ACC)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(xt.dtype), tl.trans(xt), FP32, ACC)
        m_i = m_new
    out = task * M + rm
    tl.store(pm_ptr + out, m_i, mask=m_ok)
    tl.store(pl_ptr + out, l_i, mask=m_ok)
    tl.store(pacc_ptr + out[:, None] * C + rc[None, :], acc, mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def _backward_kernel(
    dz_ptr, x_ptr, a_ptr, lse_ptr, d_ptr, dx_ptr, pda_ptr,
    C, N, M, SPLITS, CHUNK, sxb, sxc,
    FP32: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    task, bi, n0, n1, rm, rc, m_ok, c_ok = _program_geometry(C, N, M, SPLITS, CHUNK, BLOCK_M, BLOCK_C)
    mc = bi * M * C + rm[:, None] * C + rc[None, :]
    mc_ok = m_ok[:, None] & c_ok[None, :]
    a = tl.load(a_ptr + mc, mask=mc_ok, other=0.0)
    dz = tl.load(dz_ptr + mc, mask=mc_ok, other=0.0)
    lse = tl.load(lse_ptr + bi * M + rm, mask=m_ok, other=0.0)
    d = tl.load(d_ptr + bi * M + rm, mask=m_ok, other=0.0)
    da = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    x_base = x_ptr + bi * sxb + rc[:, None] * sxc
    dx_base = dx_ptr + bi * C * N + rc[:, None] * N
    for start in range(n0, n1, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        n_ok = rn < n1
        tile_ok = c_ok[:, None] & n_ok[None, :]
        xt = tl.load(x_base + rn[None, :], mask=tile_ok, other=0.0)
        p = tl.exp(_dot(a, xt, FP32, ACC) - lse[:, None])
        p = tl.where(m_ok[:, None] & n_ok[None, :], p, 0.0)
        ds = p * (_dot(dz, xt, FP32, ACC) - d[:, None])
        dxt = _dot(tl.trans(dz), p.to(dz.dtype), FP32, ACC) + _dot(tl.trans(a), ds.to(a.dtype), FP32, ACC)
        tl.store(dx_base + rn[None, :], dxt.to(dx_ptr.dtype.element_ty), mask=tile_ok)
        da += _dot(ds.to(xt.dtype), tl.trans(xt), FP32, ACC)
    tl.store(pda_ptr + task * M * C + rm[:, None] * C + rc[None, :], da, mask=mc_ok)


def _acc_tl(x: torch.Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _geometry(x: torch.Tensor, a: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    b, c = x.shape[:2]
    n = x.shape[2] * x.shape[3]
    m = a.shape[1]
    splits = min(max(1, min(64, triton.cdiv(n, 4096))), n)  # as csrc/include/attention_pool.h
    return b, c, n, m, splits, triton.cdiv(n, splits)


def _blocks(m: int, c: int) -> tuple[int, int, int]:
    block_m = max(16, triton.next_power_of_2(m))
    block_c = max(16, triton.next_power_of_2(c))
    block_n = 64 if block_c <= 64 else (32 if block_c <= 256 else 16)  # bound the register tiles
    return block_m, block_c, block_n


def attention_pool_forward(x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, lse)`` for x (B, C, H, W) with contiguous planes and a contiguous (B, M, C)."""
    assert x.stride(3) == 1 and x.stride(2) == x.shape[3] and a.is_contiguous()
    b, c, n, m, splits, chunk = _geometry(x, a)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    part_m = torch.empty((b, splits, m), dtype=acc, device=x.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty((b, splits, m, c), dtype=acc, device=x.device)
    block_m, block_c, block_n = _blocks(m, c)
    _forward_kernel[(b * splits,)](
        x, a, part_m, part_l, part_acc, c, n, m, splits, chunk, x.stride(0), x.stride(1),
        FP32=x.dtype == torch.float32, ACC=_acc_tl(x), BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_N=block_n,
    )  # fmt: skip
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
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    d = (dz.to(acc) * z.to(acc)).sum(-1).contiguous()
    dx = torch.empty((b, c, x.shape[2], x.shape[3]), dtype=x.dtype, device=x.device)
    part_da = torch.empty((b, splits, m, c), dtype=acc, device=x.device)
    block_m, block_c, block_n = _blocks(m, c)
    _backward_kernel[(b * splits,)](
        dz.contiguous(), x, a, lse.contiguous(), d, dx, part_da, c, n, m, splits, chunk, x.stride(0), x.stride(1),
        FP32=x.dtype == torch.float32, ACC=_acc_tl(x), BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_N=block_n,
    )  # fmt: skip
    return dx, part_da.sum(dim=1).to(a.dtype)
