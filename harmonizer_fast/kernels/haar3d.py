"""Triton kernels for the 3-D Haar DWT/IDWT (``pywt.dwtn(x, "haar", mode="zero", axes=(-3, -2, -1))``).

Each program owns a BLOCK_H x BLOCK_W tile of sub-band coefficients of one (n, c, i) slab, i being the
sub-band depth index. The forward kernel loads the four input rows (2i + dz, 2j + dy) of every 2x2x2 block
as contiguous 2*BLOCK_W-wide rows (coalesced), splits even/odd columns in registers, runs the 8-point
butterfly and stores eight band tiles; the inverse joins the columns back before storing four output rows.
Odd sizes are handled by masks (zero padding on load, cropping on store), so no padded copy is ever made.
Loads take any strides; half and bfloat16 inputs are computed in float32, float64 in float64. Row and slab
offsets are formed in int64, so a single volume may exceed 2^31 elements.

Installed as ``harmonizer_fast.kernels.haar3d``. Under ``TRITON_INTERPRET=1`` the same kernels run on CPU
tensors, which is how CI checks them; ``harmonizer_fast.gpucheck`` compiles every plan for real GPUs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._plan import NO_SPILL, LaunchPlan, make_plan

# 1 / (2 sqrt 2). Kernels splat it in their compute dtype (tl.full): a bare float literal would be rounded to
# float32, which float64 inputs cannot afford.
SCALE: tl.constexpr = tl.constexpr(0.35355339059327376)


@triton.jit
def _bfly(p, q):
    return p + q, p - q


@triton.jit
def _hadamard8(v0, v1, v2, v3, v4, v5, v6, v7):
    """The unscaled 8-point butterfly of csrc/include/haar.h (haar3d_butterfly): along W, then H, then D over
    the index 4 d + 2 h + w. Its own inverse up to the scale, so both kernels call it."""
    a0, a1 = _bfly(v0, v1)
    a2, a3 = _bfly(v2, v3)
    a4, a5 = _bfly(v4, v5)
    a6, a7 = _bfly(v6, v7)
    b0, b2 = _bfly(a0, a2)
    b1, b3 = _bfly(a1, a3)
    b4, b6 = _bfly(a4, a6)
    b5, b7 = _bfly(a5, a7)
    c0, c4 = _bfly(b0, b4)
    c1, c5 = _bfly(b1, b5)
    c2, c6 = _bfly(b2, b6)
    c3, c7 = _bfly(b3, b7)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _haar_dwt3d_kernel(
    x_ptr, y_ptr,
    C, D, H, W, BD, BH, BW,
    sxn, sxc, sxd, sxh, sxw,
    syn, syc, syb, syd, syh,
    FP64: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)  # over N * C * BD; int64 offsets from here on
    i = pid % BD
    nc = pid // BD
    n = nc // C
    c = nc % C
    j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # sub-band rows
    cols = tl.program_id(2) * (2 * BLOCK_W) + tl.arange(0, 2 * BLOCK_W)  # input columns
    col_ok = cols[None, :] < W
    base = x_ptr + n * sxn + c * sxc + cols[None, :].to(tl.int64) * sxw
    rows0 = (2 * j[:, None]).to(tl.int64)
    z0 = 2 * i
    # Rows that exist in slice z0 and z0 + 1 (0 for the zero-padding slice of an odd D), as scalars: a scalar
    # condition combined with a tensor mask is not supported by the interpreter.
    h0 = tl.where(z0 < D, H, 0)
    h1 = tl.where(z0 + 1 < D, H, 0)
    r00 = tl.load(base + z0 * sxd + rows0 * sxh, mask=(rows0 < h0) & col_ok, other=0.0)
    r01 = tl.load(base + z0 * sxd + (rows0 + 1) * sxh, mask=(rows0 + 1 < h0) & col_ok, other=0.0)
    r10 = tl.load(base + (z0 + 1) * sxd + rows0 * sxh, mask=(rows0 < h1) & col_ok, other=0.0)
    r11 = tl.load(base + (z0 + 1) * sxd + (rows0 + 1) * sxh, mask=(rows0 + 1 < h1) & col_ok, other=0.0)
    acc = tl.float64 if FP64 else tl.float32
    # Along W: the even/odd columns of each row, split in registers.
    v0, v1 = tl.split(tl.reshape(r00.to(acc), (BLOCK_H, BLOCK_W, 2)))
    v2, v3 = tl.split(tl.reshape(r01.to(acc), (BLOCK_H, BLOCK_W, 2)))
    v4, v5 = tl.split(tl.reshape(r10.to(acc), (BLOCK_H, BLOCK_W, 2)))
    v6, v7 = tl.split(tl.reshape(r11.to(acc), (BLOCK_H, BLOCK_W, 2)))
    y0, y1, y2, y3, y4, y5, y6, y7 = _hadamard8(v0, v1, v2, v3, v4, v5, v6, v7)

    k = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    out_ok = (j[:, None] < BH) & (k[None, :] < BW)
    out_ty = y_ptr.dtype.element_ty
    scale = tl.full((BLOCK_H, BLOCK_W), SCALE, acc)
    sb = syb.to(tl.int64)
    y = y_ptr + n * syn + c * syc + i * syd + j[:, None].to(tl.int64) * syh + k[None, :]
    tl.store(y, (y0 * scale).to(out_ty), mask=out_ok)
    tl.store(y + sb, (y1 * scale).to(out_ty), mask=out_ok)
    tl.store(y + 2 * sb, (y2 * scale).to(out_ty), mask=out_ok)
    tl.store(y + 3 * sb, (y3 * scale).to(out_ty), mask=out_ok)
    tl.store(y + 4 * sb, (y4 * scale).to(out_ty), mask=out_ok)
    tl.store(y + 5 * sb, (y5 * scale).to(out_ty), mask=out_ok)
    tl.store(y + 6 * sb, (y6 * scale).to(out_ty), mask=out_ok)
    tl.store(y + 7 * sb, (y7 * scale).to(out_ty), mask=out_ok)


@triton.jit
def _haar_idwt3d_kernel(
    y_ptr, x_ptr,
    C, D, H, W, BD, BH, BW,
    syn, syc, syb, syd, syh, syw,
    FP64: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)  # over N * C * BD
    i = pid % BD
    nc = pid // BD
    n = nc // C
    c = nc % C
    j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    k = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    in_ok = (j[:, None] < BH) & (k[None, :] < BW)
    yb = y_ptr + n * syn + c * syc + i * syd + j[:, None].to(tl.int64) * syh + k[None, :].to(tl.int64) * syw
    acc = tl.float64 if FP64 else tl.float32
    sb = syb.to(tl.int64)
    v0 = tl.load(yb, mask=in_ok, other=0.0).to(acc)
    v1 = tl.load(yb + sb, mask=in_ok, other=0.0).to(acc)
    v2 = tl.load(yb + 2 * sb, mask=in_ok, other=0.0).to(acc)
    v3 = tl.load(yb + 3 * sb, mask=in_ok, other=0.0).to(acc)
    v4 = tl.load(yb + 4 * sb, mask=in_ok, other=0.0).to(acc)
    v5 = tl.load(yb + 5 * sb, mask=in_ok, other=0.0).to(acc)
    v6 = tl.load(yb + 6 * sb, mask=in_ok, other=0.0).to(acc)
    v7 = tl.load(yb + 7 * sb, mask=in_ok, other=0.0).to(acc)
    x0, x1, x2, x3, x4, x5, x6, x7 = _hadamard8(v0, v1, v2, v3, v4, v5, v6, v7)  # corner 4 dz + 2 dy + dx
    out_ty = x_ptr.dtype.element_ty
    scale = tl.full((BLOCK_H, BLOCK_W), SCALE, acc)
    r00 = tl.reshape(tl.join(x0 * scale, x1 * scale), (BLOCK_H, 2 * BLOCK_W)).to(out_ty)
    r01 = tl.reshape(tl.join(x2 * scale, x3 * scale), (BLOCK_H, 2 * BLOCK_W)).to(out_ty)
    r10 = tl.reshape(tl.join(x4 * scale, x5 * scale), (BLOCK_H, 2 * BLOCK_W)).to(out_ty)
    r11 = tl.reshape(tl.join(x6 * scale, x7 * scale), (BLOCK_H, 2 * BLOCK_W)).to(out_ty)

    cols = tl.program_id(2) * (2 * BLOCK_W) + tl.arange(0, 2 * BLOCK_W)
    col_ok = cols[None, :] < W
    rows0 = (2 * j[:, None]).to(tl.int64)
    z0 = 2 * i
    h0 = tl.where(z0 < D, H, 0)  # rows kept in slices z0 and z0 + 1 (0: cropped), as in the forward kernel
    h1 = tl.where(z0 + 1 < D, H, 0)
    x = x_ptr + nc * D * H * W + cols[None, :]  # contiguous output
    tl.store(x + (z0 * H + rows0) * W, r00, mask=(rows0 < h0) & col_ok)
    tl.store(x + (z0 * H + rows0 + 1) * W, r01, mask=(rows0 + 1 < h0) & col_ok)
    tl.store(x + ((z0 + 1) * H + rows0) * W, r10, mask=(rows0 < h1) & col_ok)
    tl.store(x + ((z0 + 1) * H + rows0 + 1) * W, r11, mask=(rows0 + 1 < h1) & col_ok)


# Tiles of sub-band coefficients, 512 per program (the eight bands of a tile and the four input rows live in
# registers at once, twice the 2-D kernel's working set per coefficient), chosen by the band width only: two
# plans per kernel and dtype cover every shape (harmonizer_fast.gpucheck compiles them all).
_TILES = ((8, 64), (32, 16))
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _tile(w: int) -> tuple[int, int]:
    return _TILES[0] if w > 16 else _TILES[1]


def plan_dwt(band_width: int, dtype: torch.dtype) -> LaunchPlan:
    """The forward kernel's plan for sub-bands ``band_width`` coefficients wide."""
    block_h, block_w = _tile(band_width)
    consts = dict(FP64=dtype == torch.float64, BLOCK_H=block_h, BLOCK_W=block_w)
    return make_plan(_haar_dwt3d_kernel, dict(x_ptr=dtype, y_ptr=dtype), consts, op="haar_dwt3d")


def plan_idwt(band_width: int, dtype: torch.dtype) -> LaunchPlan:
    """The inverse kernel's plan for sub-bands ``band_width`` coefficients wide."""
    block_h, block_w = _tile(band_width)
    consts = dict(FP64=dtype == torch.float64, BLOCK_H=block_h, BLOCK_W=block_w)
    return make_plan(_haar_idwt3d_kernel, dict(y_ptr=dtype, x_ptr=dtype), consts, op="haar_idwt3d")


def gpu_plans(dtypes: tuple[torch.dtype, ...] = DTYPES) -> list[LaunchPlan]:
    """Every plan the launchers can choose: each tile class, each dtype, both directions."""
    widths = (64, 16)  # one width per tile class
    return [f(w, d) for f in (plan_dwt, plan_idwt) for d in dtypes for w in widths]


def _grid(slabs: int, bh: int, bw: int, block_h: int, block_w: int) -> tuple[int, int, int]:
    # (n, c, depth) slabs on x (limit 2^31 - 1): 10^6 feature volumes must not hit the 65,535 limit of y and z.
    return (slabs, triton.cdiv(bh, block_h), triton.cdiv(bw, block_w))


def haar_dwt3d_into(x: torch.Tensor, y: torch.Tensor) -> None:
    """Write the DWT of ``x`` (N, C, D, H, W), any strides, into ``y`` (N, C, 8, d, h, w), unit stride along w."""
    n, c, d, h, w = x.shape
    bd, bh, bw = y.shape[-3:]
    if y.numel() == 0:
        return
    assert y.stride(-1) == 1, "y needs unit stride along w"
    plan = plan_dwt(bw, x.dtype)
    consts = dict(plan.constexprs)
    plan.launch(
        _grid(n * c * bd, bh, bw, consts["BLOCK_H"], consts["BLOCK_W"]),
        x, y, c, d, h, w, bd, bh, bw, *x.stride(), *y.stride()[:5],
    )  # fmt: skip


def haar_idwt3d(y: torch.Tensor, depth: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`haar_dwt3d_into`: (N, C, depth, height, width) from ``y`` (any strides)."""
    n, c, _, bd, bh, bw = y.shape
    x = torch.empty((n, c, depth, height, width), dtype=y.dtype, device=y.device)
    if x.numel() == 0:
        return x
    plan = plan_idwt(bw, y.dtype)
    consts = dict(plan.constexprs)
    plan.launch(
        _grid(n * c * bd, bh, bw, consts["BLOCK_H"], consts["BLOCK_W"]),
        y, x, c, depth, height, width, bd, bh, bw, *y.stride(),
    )  # fmt: skip
    return x


# What this family describes about itself (ops/_examples.py): the plans a call runs, the compile check's rules.
def plans_for(op: str, *args) -> list[LaunchPlan]:
    x = args[0]
    if op == "haar_dwt3d":
        return [plan_dwt(-(-x.shape[-1] // 2), x.dtype)]
    return [plan_idwt(x.shape[-1], x.dtype)]


COMPILE_RULES = {"_haar_dwt3d_kernel": NO_SPILL, "_haar_idwt3d_kernel": NO_SPILL}
