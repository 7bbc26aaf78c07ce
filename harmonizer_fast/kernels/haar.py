"""Triton kernels for the Haar DWT/IDWT (PyWavelets' ``dwt2(x, "haar", mode="zero")`` convention).

Each program owns a BLOCK_H x BLOCK_W tile of output coefficients of one (n, c) plane. The forward
kernel loads the two input rows of every 2x2 block as contiguous 2*BLOCK_W-wide rows (coalesced) and
splits even/odd columns in registers; the inverse joins them back before storing. Odd sizes are
handled by masks (zero padding on load, cropping on store), so no padded copy is ever made. Loads take
any strides; half and bfloat16 inputs are computed in float32, float64 in float64.

Installed as ``harmonizer_fast.kernels.haar``. Under ``TRITON_INTERPRET=1`` (set before importing
triton) the same kernels run on CPU tensors, which is how CI checks them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._plan import NO_SPILL, LaunchPlan, make_plan


@triton.jit
def _haar_dwt2d_kernel(
    x_ptr, lo_ptr, hi_ptr,
    C, H, W, HO, WO,
    sxn, sxc, sxh, sxw,
    slon, sloc, sloh,
    shin, shic, shib, shih,
    FP64: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    pid_nc = tl.program_id(0).to(tl.int64)  # int64: N*C*H*W may exceed 2**31
    n = pid_nc // C
    c = pid_nc % C
    i = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # output rows
    cols = tl.program_id(2) * (2 * BLOCK_W) + tl.arange(0, 2 * BLOCK_W)  # input columns
    row0 = 2 * i
    col_ok = cols[None, :] < W
    # Every index meets its stride in int64: a plane (or a strided view) may span more than 2^31 elements.
    x_base = x_ptr + n * sxn + c * sxc + cols[None, :].to(tl.int64) * sxw
    rows = row0[:, None].to(tl.int64) * sxh
    top = tl.load(x_base + rows, mask=(row0[:, None] < H) & col_ok, other=0.0)
    bot = tl.load(x_base + rows + sxh, mask=(row0[:, None] + 1 < H) & col_ok, other=0.0)
    if FP64:
        top = top.to(tl.float64)
        bot = bot.to(tl.float64)
    else:
        top = top.to(tl.float32)
        bot = bot.to(tl.float32)
    a, b = tl.split(tl.reshape(top, (BLOCK_H, BLOCK_W, 2)))
    cc, d = tl.split(tl.reshape(bot, (BLOCK_H, BLOCK_W, 2)))
    s0 = a + b
    d0 = a - b
    s1 = cc + d
    d1 = cc - d

    j = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    out_ok = (i[:, None] < HO) & (j[None, :] < WO)
    out_ty = lo_ptr.dtype.element_ty
    i64 = i[:, None].to(tl.int64)
    lo = lo_ptr + n * slon + c * sloc + i64 * sloh + j[None, :]
    tl.store(lo, ((s0 + s1) * 0.5).to(out_ty), mask=out_ok)
    hi = hi_ptr + n * shin + c * shic + i64 * shih + j[None, :]
    band = shib.to(tl.int64)
    tl.store(hi, ((s0 - s1) * 0.5).to(out_ty), mask=out_ok)
    tl.store(hi + band, ((d0 + d1) * 0.5).to(out_ty), mask=out_ok)
    tl.store(hi + 2 * band, ((d0 - d1) * 0.5).to(out_ty), mask=out_ok)


@triton.jit
def _haar_idwt2d_kernel(
    lo_ptr, hi_ptr, x_ptr,
    C, HI, WI, H, W,
    slon, sloc, sloh, slow,
    shin, shic, shib, shih, shiw,
    FP64: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    pid_nc = tl.program_id(0).to(tl.int64)
    n = pid_nc // C
    c = pid_nc % C
    i = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    j = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    in_ok = (i[:, None] < HI) & (j[None, :] < WI)
    i64, j64 = i[:, None].to(tl.int64), j[None, :].to(tl.int64)  # strided views may span 2^31 elements
    lo = lo_ptr + n * slon + c * sloc + i64 * sloh + j64 * slow
    hi = hi_ptr + n * shin + c * shic + i64 * shih + j64 * shiw
    band = shib.to(tl.int64)
    ca = tl.load(lo, mask=in_ok, other=0.0)
    ch = tl.load(hi, mask=in_ok, other=0.0)
    cv = tl.load(hi + band, mask=in_ok, other=0.0)
    cd = tl.load(hi + 2 * band, mask=in_ok, other=0.0)
    if FP64:
        ca, ch, cv, cd = ca.to(tl.float64), ch.to(tl.float64), cv.to(tl.float64), cd.to(tl.float64)
    else:
        ca, ch, cv, cd = ca.to(tl.float32), ch.to(tl.float32), cv.to(tl.float32), cd.to(tl.float32)
    s0 = ca + ch
    s1 = ca - ch
    d0 = cv + cd
    d1 = cv - cd
    out_ty = x_ptr.dtype.element_ty
    top = tl.reshape(tl.join((s0 + d0) * 0.5, (s0 - d0) * 0.5), (BLOCK_H, 2 * BLOCK_W)).to(out_ty)
    bot = tl.reshape(tl.join((s1 + d1) * 0.5, (s1 - d1) * 0.5), (BLOCK_H, 2 * BLOCK_W)).to(out_ty)

    row0 = 2 * i
    cols = tl.program_id(2) * (2 * BLOCK_W) + tl.arange(0, 2 * BLOCK_W)
    col_ok = cols[None, :] < W
    x = x_ptr + pid_nc * H * W + cols[None, :]
    row = row0[:, None].to(tl.int64) * W
    tl.store(x + row, top, mask=(row0[:, None] < H) & col_ok)
    tl.store(x + row + W, bot, mask=(row0[:, None] + 1 < H) & col_ok)


# Tiles of output coefficients, 1024 per program, chosen by the plane's width only: two plans per kernel
# and dtype cover every shape (harmonizer_fast.gpucheck compiles them all); narrow planes get tall tiles
# so a program still covers up to 1024 coefficients of one plane.
_TILES = ((16, 64), (64, 16))
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _tile(w: int) -> tuple[int, int]:
    return _TILES[0] if w > 16 else _TILES[1]


def plan_dwt(out_width: int, dtype: torch.dtype) -> LaunchPlan:
    """The forward kernel's plan for outputs ``out_width`` coefficients wide."""
    block_h, block_w = _tile(out_width)
    consts = dict(FP64=dtype == torch.float64, BLOCK_H=block_h, BLOCK_W=block_w)
    return make_plan(_haar_dwt2d_kernel, dict(x_ptr=dtype, lo_ptr=dtype, hi_ptr=dtype), consts, op="haar_dwt2d")


def plan_idwt(in_width: int, dtype: torch.dtype) -> LaunchPlan:
    """The inverse kernel's plan for sub-bands ``in_width`` coefficients wide."""
    block_h, block_w = _tile(in_width)
    consts = dict(FP64=dtype == torch.float64, BLOCK_H=block_h, BLOCK_W=block_w)
    return make_plan(_haar_idwt2d_kernel, dict(lo_ptr=dtype, hi_ptr=dtype, x_ptr=dtype), consts, op="haar_idwt2d")


def gpu_plans(dtypes: tuple[torch.dtype, ...] = DTYPES) -> list[LaunchPlan]:
    """Every plan the launchers can choose: each tile class, each dtype, both directions."""
    widths = (64, 16)  # one width per tile class
    return [f(w, d) for f in (plan_dwt, plan_idwt) for d in dtypes for w in widths]


def _grid(planes: int, h: int, w: int, block_h: int, block_w: int) -> tuple[int, int, int]:
    # planes on x (limit 2^31 - 1): 10^6 feature planes must not hit the 65,535 limit of y and z.
    return (planes, triton.cdiv(h, block_h), triton.cdiv(w, block_w))


def haar_dwt2d_into(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
    """Write the DWT of ``x`` (N, C, H, W) into ``lo`` (N, C, h, w) and ``hi`` (N, C, 3, h, w).

    ``x`` may have any strides; ``lo`` and ``hi`` need unit stride along the last dimension.
    """
    n, c, h, w = x.shape
    ho, wo = lo.shape[-2:]
    if lo.numel() == 0:
        return
    assert lo.stride(-1) == 1 and hi.stride(-1) == 1, "outputs need unit stride along W"
    plan = plan_dwt(wo, x.dtype)
    consts = dict(plan.constexprs)
    plan.launch(
        _grid(n * c, ho, wo, consts["BLOCK_H"], consts["BLOCK_W"]),
        x, lo, hi, c, h, w, ho, wo, *x.stride(), *lo.stride()[:3], *hi.stride()[:4],
    )  # fmt: skip


def haar_idwt2d(lo: torch.Tensor, hi: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`haar_dwt2d_into`: (N, C, height, width) from ``lo`` and ``hi`` (any strides)."""
    n, c, hh, ww = lo.shape
    x = torch.empty((n, c, height, width), dtype=lo.dtype, device=lo.device)
    if x.numel() == 0:
        return x
    plan = plan_idwt(ww, lo.dtype)
    consts = dict(plan.constexprs)
    plan.launch(
        _grid(n * c, hh, ww, consts["BLOCK_H"], consts["BLOCK_W"]),
        lo, hi, x, c, hh, ww, height, width, *lo.stride(), *hi.stride(),
    )  # fmt: skip
    return x


# What this family describes about itself (ops/_examples.py): the plans a call runs, the compile check's rules.
def plans_for(op: str, *args) -> list[LaunchPlan]:
    x = args[0]
    if op.startswith("haar_dwt2d"):
        return [plan_dwt(-(-x.shape[-1] // 2), x.dtype)]
    return [plan_idwt(x.shape[-1], x.dtype)]  # the low band's width: (N, C, 4, h, w) or (N, C, h, w)


COMPILE_RULES = {"_haar_dwt2d_kernel": NO_SPILL, "_haar_idwt2d_kernel": NO_SPILL}
