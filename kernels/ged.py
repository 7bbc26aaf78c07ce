"""Triton kernels for pairwise overlaps of mask sets and the GED distance sums (docs/architecture.md, "Conventions").

One kernel, one program per (image, BLOCK_M x BLOCK_N tile of pairs): it walks the pixels in BLOCK_P
chunks, accumulates the tile's intersections with ``tl.dot`` (the Gram matrix over pixels) and both sides'
areas, then finishes in registers: it stores the intersections or the IoU tile, or, for GED, reduces the
tile's distances ``1 - IoU`` to one partial sum, so the K x K matrix never reaches memory. The caller adds
the partials in a fixed order (deterministic, no atomics). Within-set terms compute only tiles on or
above the diagonal and count those above it twice.

Binary masks are thresholded once into float16 0/1 values (exact, half the bytes of float32), so the dot
runs on tensor cores with float32 accumulation and counts below 2^24 are exact; soft masks use float32
operands with IEEE precision. Images go through in chunks so the float16 copy stays bounded (K up to 4096).
Installed as ``harmonizer_fast.kernels.ged``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tile and chunk sizes: tensor-core friendly on GPUs; under the CPU interpreter few large programs are
# fastest (each program is a numpy call sequence).
_GPU_BLOCKS = {"binary": (128, 128, 64, 8), "soft": (64, 64, 32, 4)}
_INTERPRETER_BLOCKS = (32, 32, 128, 4)
_MAX_CHUNK_BYTES = 256 << 20  # the float16 copy of the binary masks, per chunk of images

MODE_GRAM, MODE_IOU, MODE_SUM = 0, 1, 2


@triton.jit
def _overlap_kernel(
    a_ptr, b_ptr, out_ptr,
    KA, KB, P, s_ab, s_ak, s_bb, s_bk,
    eps, empty_iou, n_tj,
    MODE: tl.constexpr, SYM: tl.constexpr, OFFDIAG: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    bi = tl.program_id(0).to(tl.int64)
    ti = tl.program_id(1)
    tj = tl.program_id(2)
    rows = ti * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tj * BLOCK_N + tl.arange(0, BLOCK_N)
    if SYM and tj < ti:  # below the diagonal: the tile above it stands for both
        tl.store(out_ptr + bi * tl.num_programs(1) * n_tj + ti * n_tj + tj, 0.0)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        area_a = tl.zeros((BLOCK_M,), dtype=tl.float32)
        area_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
        a_rows = a_ptr + bi * s_ab + rows[:, None].to(tl.int64) * s_ak
        b_rows = b_ptr + bi * s_bb + cols[:, None].to(tl.int64) * s_bk
        for p0 in range(0, P, BLOCK_P):
            px = p0 + tl.arange(0, BLOCK_P)
            x = tl.load(a_rows + px[None, :], mask=(rows[:, None] < KA) & (px[None, :] < P), other=0.0)
            y = tl.load(b_rows + px[None, :], mask=(cols[:, None] < KB) & (px[None, :] < P), other=0.0)
            if IEEE:
                x = x.to(tl.float32)
                y = y.to(tl.float32)
                acc = tl.dot(x, tl.trans(y), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(y), acc)
            area_a += tl.sum(x.to(tl.float32), axis=1)
            area_b += tl.sum(y.to(tl.float32), axis=1)
        uni = area_a[:, None] + area_b[None, :] - acc
        iou = tl.where(uni > 0, acc / tl.where(uni > 0, uni + eps, 1.0), empty_iou)  # no 0/0 in the dead branch
        ok = (rows[:, None] < KA) & (cols[None, :] < KB)
        if MODE == 0:
            tl.store(out_ptr + bi * KA * KB + rows[:, None] * KB + cols[None, :], acc, mask=ok)
        elif MODE == 1:
            tl.store(out_ptr + bi * KA * KB + rows[:, None] * KB + cols[None, :], iou, mask=ok)
        else:
            if OFFDIAG:
                ok = ok & (rows[:, None] != cols[None, :])
            total = tl.sum(tl.sum(tl.where(ok, 1.0 - iou, 0.0), axis=1), axis=0)
            if SYM and tj > ti:
                total = total * 2.0
            tl.store(out_ptr + bi * tl.num_programs(1) * n_tj + ti * n_tj + tj, total)


def _blocks(binary: bool, device: torch.device) -> tuple[int, int, int, int]:
    if device.type != "cuda":
        return _INTERPRETER_BLOCKS
    return _GPU_BLOCKS["binary" if binary else "soft"]


def _launch(a, b, out, mode: int, sym: bool, offdiag: bool, eps: float, empty_iou: float, binary: bool) -> None:
    batch, ka, p = a.shape
    kb = b.shape[1]
    bm, bn, bp, warps = _blocks(binary, a.device)
    if sym:
        bn = bm  # diagonal tiles must be square
    grid = (batch, triton.cdiv(ka, bm), triton.cdiv(kb, bn))
    _overlap_kernel[grid](
        a, b, out, ka, kb, p, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        float(eps), float(empty_iou), grid[2],
        MODE=mode, SYM=sym, OFFDIAG=offdiag, IEEE=not binary,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_P=bp, num_warps=warps,
    )  # fmt: skip


def _binarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return (x > threshold).to(torch.float16)


def _chunks(batch: int, rows: int, pixels: int) -> tuple[range, int]:
    per_image = max(1, rows * pixels * 2)
    step = max(1, _MAX_CHUNK_BYTES // per_image)
    return range(0, batch, step), step


def pairwise_overlap(
    a: torch.Tensor, b: torch.Tensor, threshold: float, soft: bool, eps: float, empty_iou: float, mode: int
) -> torch.Tensor:
    """Intersections (mode 0) or IoU (mode 1) of every pair, ``(B, Ka, Kb)`` float32; a, b ``(B, K, pixels)``."""
    batch, ka, p = a.shape
    kb = b.shape[1]
    out = torch.empty((batch, ka, kb), dtype=torch.float32, device=a.device)
    starts, step = _chunks(batch, ka + kb, p)
    for s in starts:
        e = min(batch, s + step)
        x, y = (a[s:e], b[s:e]) if soft else (_binarize(a[s:e], threshold), _binarize(b[s:e], threshold))
        _launch(x.contiguous(), y.contiguous(), out[s:e], mode, False, False, eps, empty_iou, not soft)
    return out


def ged_sums(
    samples: torch.Tensor, raters: torch.Tensor, threshold: float, eps: float, empty_iou: float, offdiag: bool
) -> torch.Tensor:
    """``(B, 3)`` float64 distance sums: cross, within samples, within raters (see csrc/include/ged.h)."""
    batch, k, p = samples.shape
    n = raters.shape[1]
    sums = torch.empty((batch, 3), dtype=torch.float64, device=samples.device)
    starts, step = _chunks(batch, k + n, p)
    for s in starts:
        e = min(batch, s + step)
        x, y = _binarize(samples[s:e], threshold), _binarize(raters[s:e], 0.5)
        for term, (u, v, sym) in enumerate(((x, y, False), (x, x, True), (y, y, True))):
            bm, bn, _, _ = _blocks(True, samples.device)
            bn = bm if sym else bn
            partials = torch.empty((e - s, triton.cdiv(u.shape[1], bm), triton.cdiv(v.shape[1], bn)),
                                   dtype=torch.float32, device=samples.device)  # fmt: skip
            _launch(u, v, partials, MODE_SUM, sym, offdiag and sym, eps, empty_iou, True)
            sums[s:e, term] = partials.flatten(1).to(torch.float64).sum(-1)
    return sums
