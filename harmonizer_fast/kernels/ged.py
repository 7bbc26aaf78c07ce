"""Triton kernels for pairwise overlaps of mask sets and the GED distance sums (docs/architecture.md, "Conventions").

One kernel, one program per (image, BLOCK_M x BLOCK_N tile of pairs), and per pixel split when images and
tiles are too few to fill the GPU (_split_count): it walks the pixels in BLOCK_P chunks, accumulates the
tile's intersections with ``tl.dot`` (the Gram matrix over pixels) and both sides' areas, then finishes in
registers: it stores the intersections or the IoU tile, or, for GED, reduces the tile's distances
``1 - IoU`` to one partial sum, so the K x K matrix never reaches memory. The caller adds the partials in a
fixed order (deterministic, no atomics). Within-set terms compute only tiles on or
above the diagonal and count those above it twice.

Binary masks are thresholded once into float16 0/1 values (exact, half the bytes of float32) by
_binarize_kernel, which checks the values in the same pass (NaN samples, raters that are not 0/1) and raises
a flag instead of costing a pass and a host sync per check; the dot
runs on tensor cores with float32 accumulation and counts below 2^24 are exact; soft masks use float32
operands with IEEE precision (FMAs, never TF32: the soft Gram feeds the GED loss's gradient, and TF32's
10-bit mantissa would move it by 1e-3). Tiles follow the set sizes (gpu_blocks). Images go through in
chunks so the float16 copy stays bounded (K up to 4096).
Installed as ``harmonizer_fast.kernels.ged``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._plan import IEEE_FP32, NO_SPILL, TENSOR_CORES, LaunchPlan, make_plan

# Under the CPU interpreter few large programs are fastest (each program is a numpy call sequence); on a
# GPU the tiles follow the set sizes (plan_overlap).
_INTERPRETER_BLOCKS = (32, 32, 128, 4)
_MAX_CHUNK_BYTES = 256 << 20  # the float16 copy of the binary masks, per chunk of images

MODE_GRAM, MODE_IOU, MODE_SUM = 0, 1, 2
CHECK_NONE, CHECK_PROBABILITY, CHECK_BINARY = 0, 1, 2  # what _binarize_kernel checks while it thresholds
BINARIZE_BLOCK = 2048


@triton.jit
def _binarize_kernel(x_ptr, thr_ptr, out_ptr, flag_ptr, N, CHECK: tl.constexpr, BLOCK: tl.constexpr):
    """out = (x > threshold) as float16 0/1, compared as torch compares a tensor with a Python float: in x's
    own floating dtype (float64 samples within float32 rounding of 0.3 must not flip), in float32 for uint8
    masks; ``thr_ptr`` holds the threshold in that compare dtype. CHECK_PROBABILITY / CHECK_BINARY also set
    ``*flag_ptr`` to 1 when a value is outside [0, 1] (NaN and Inf included) / not 0 or 1: one atomic per
    program that finds one, none otherwise (no contention on clean data)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(x_ptr + offs, mask=ok, other=0)
    thr = tl.load(thr_ptr)
    tl.store(out_ptr + offs, (x.to(thr.dtype) > thr).to(tl.float16), mask=ok)
    if CHECK != 0:
        if CHECK == 1:
            bad = ok & ((x < 0) | (x > 1) | (x != x))  # Inf is above 1 or below 0
        else:
            bad = ok & (x != 0) & (x != 1)
        if tl.max(bad.to(tl.int32), axis=0) > 0:
            tl.atomic_max(flag_ptr, 1)


@triton.jit
def _overlap_kernel(
    a_ptr, b_ptr, out_ptr,
    KA, KB, P, s_ab, s_ak, s_bb, s_bk,
    eps, empty_iou, n_tj, SPLITS, PPS,
    MODE: tl.constexpr, SYM: tl.constexpr, OFFDIAG: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    pid0 = tl.program_id(0).to(tl.int64)  # image x pixel split (SPLITS > 1 only in MODE 0)
    bi = pid0 // SPLITS
    p_lo = (pid0 % SPLITS) * PPS
    p_hi = tl.minimum(P, p_lo + PPS)
    ti = tl.program_id(1)
    tj = tl.program_id(2)
    rows = ti * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tj * BLOCK_N + tl.arange(0, BLOCK_N)
    if SYM and tj < ti:  # below the diagonal: the tile above it stands for both
        tl.store(out_ptr + bi * tl.num_programs(1) * n_tj + ti.to(tl.int64) * n_tj + tj, 0.0)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        area_a = tl.zeros((BLOCK_M,), dtype=tl.float32)
        area_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
        a_rows = a_ptr + bi * s_ab + rows[:, None].to(tl.int64) * s_ak
        b_rows = b_ptr + bi * s_bb + cols[:, None].to(tl.int64) * s_bk
        for p0 in range(p_lo, p_hi, BLOCK_P):
            px = p0 + tl.arange(0, BLOCK_P)
            x = tl.load(a_rows + px[None, :], mask=(rows[:, None] < KA) & (px[None, :] < p_hi), other=0.0)
            y = tl.load(b_rows + px[None, :], mask=(cols[:, None] < KB) & (px[None, :] < p_hi), other=0.0)
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
        pair = rows[:, None].to(tl.int64) * KB + cols[None, :]  # Ka x Kb passes 2^31 at K = 46,341
        if MODE == 0:  # one Gram per (image, pixel split)
            tl.store(out_ptr + pid0 * KA * KB + pair, acc, mask=ok)
        elif MODE == 1:
            tl.store(out_ptr + bi * KA * KB + pair, iou, mask=ok)
        else:
            if OFFDIAG:
                ok = ok & (rows[:, None] != cols[None, :])
            total = tl.sum(tl.sum(tl.where(ok, 1.0 - iou, 0.0), axis=1), axis=0)
            if SYM and tj > ti:
                total = total * 2.0
            tl.store(out_ptr + bi * tl.num_programs(1) * n_tj + ti.to(tl.int64) * n_tj + tj, total)


def _compare_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype.is_floating_point else torch.float32


def plan_binarize(dtype: torch.dtype, check: int) -> LaunchPlan:
    """The binarization plan for masks of ``dtype`` (bool masks are read as uint8)."""
    consts = dict(CHECK=check, BLOCK=BINARIZE_BLOCK)
    pointers = dict(x_ptr=dtype, thr_ptr=_compare_dtype(dtype), out_ptr=torch.float16, flag_ptr=torch.int32)
    return make_plan(_binarize_kernel, pointers, consts, num_warps=8, op="binarize")  # 4 warps spilled 8 B (sm_86)


def binarize(x: torch.Tensor, threshold: float, check: int, flag: torch.Tensor) -> torch.Tensor:
    """``(x > threshold)`` as float16 0/1 values (x contiguous, any dtype the plans take), raising ``flag``
    (an int32 element on x's device) where ``check`` finds a bad value."""
    out = torch.empty(x.shape, dtype=torch.float16, device=x.device)
    if x.numel() == 0:
        return out
    thr = torch.full((1,), threshold, dtype=_compare_dtype(x.dtype), device=x.device)
    plan_binarize(x.dtype, check).launch((triton.cdiv(x.numel(), BINARIZE_BLOCK),), x, thr, out, flag, x.numel())
    return out


def _side(k: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(k)))


def gpu_blocks(ka: int, kb: int, binary: bool, sym: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_P, num_warps) for ``ka`` x ``kb`` pairs on a GPU.

    Each side is the set size rounded up to a power of two, at least 16 (the smallest tensor-core tile
    side) and at most 128 (64 for soft masks, whose fp32 operands take twice the registers, and for the
    square within-set tiles: 128 x 128 spilled 24-40 B on sm_80-89 even with 16 warps): with K = 50
    samples and N = 4 raters a fixed 128 x 128 tile did 1.2% useful work in the cross term and 0.1% within
    raters. The pixel block grows as the tile shrinks, so each stage still moves about 8 KiB of operands
    (twice that kept every tile at 247-255 registers a thread). Within-set tiles are square (the diagonal
    tile stands for both halves). 8 warps for the 64 x 64 tile: with 4 it spilled 300-450 B in its
    epilogue (IoU and distance temporaries per pair).
    """
    cap = 128 if binary and not sym else 64
    bm = _side(ka, cap)
    bn = bm if sym else _side(kb, cap)
    budget = 4096 if binary else 2048  # elements per operand stage: 8 KiB of fp16 or fp32
    bp = min(256, max(32, budget // (bm + bn)))
    bp = 1 << (bp.bit_length() - 1)  # a power of two
    warps = 4 if bm * bn < 64 * 64 else 8
    return bm, bn, bp, warps


def plan_overlap(
    ka: int, kb: int, mode: int, sym: bool, offdiag: bool, binary: bool, dtype: torch.dtype, device_type: str = "cuda"
) -> LaunchPlan:
    """The plan for ``ka`` x ``kb`` pairs; ``dtype`` is the mask dtype the kernel reads (float16 0/1 values
    for binary masks)."""
    if device_type == "cuda":
        bm, bn, bp, warps = gpu_blocks(ka, kb, binary, sym)
    else:
        bm, bn, bp, warps = _INTERPRETER_BLOCKS
        bn = bm if sym else bn
    consts = dict(MODE=mode, SYM=sym, OFFDIAG=offdiag, IEEE=not binary, BLOCK_M=bm, BLOCK_N=bn, BLOCK_P=bp)
    out = torch.float32
    return make_plan(
        _overlap_kernel, dict(a_ptr=dtype, b_ptr=dtype, out_ptr=out), consts, num_warps=warps,
        floats=("eps", "empty_iou"), op="ged_sums" if mode == MODE_SUM else "pairwise_overlap",
    )  # fmt: skip


# (K, N) of the benchmarks and the model: the loss (4 x 4), evaluation at K = 16 and 50, the sampling
# benchmarks' 1000 samples (100 samples pick the same tiles as 1000). Each gives its cross and within-set tiles.
PLAN_SETS = ((4, 4), (16, 4), (50, 4), (1000, 4))


def gpu_plans(
    soft_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16),
) -> list[LaunchPlan]:
    """Every plan the launchers pick for PLAN_SETS: GED sums (cross, within with and without the
    diagonal), binary intersections and IoU, and the soft Gram and IoU per input dtype."""
    plans = []
    for k, n in PLAN_SETS:
        plans += [
            plan_overlap(k, n, MODE_SUM, False, False, True, torch.float16),
            plan_overlap(k, k, MODE_SUM, True, True, True, torch.float16),
            plan_overlap(n, n, MODE_SUM, True, True, True, torch.float16),
            plan_overlap(k, k, MODE_SUM, True, False, True, torch.float16),
            plan_overlap(k, n, MODE_GRAM, False, False, True, torch.float16),
            plan_overlap(k, n, MODE_IOU, False, False, True, torch.float16),
        ]
        plans += [plan_overlap(k, n, m, False, False, False, d) for d in soft_dtypes for m in (MODE_GRAM, MODE_IOU)]
    # the binarization pass: samples of every floating dtype, float64 included (NaN check) or uint8/bool
    # (nothing to check), raters of every dtype (binary check)
    for d in dict.fromkeys((*soft_dtypes, torch.float64)):
        plans += [plan_binarize(d, CHECK_PROBABILITY), plan_binarize(d, CHECK_BINARY)]
    plans += [plan_binarize(torch.uint8, CHECK_NONE), plan_binarize(torch.uint8, CHECK_BINARY)]
    return list(dict.fromkeys(plans))


def _launch(
    a, b, out, mode: int, sym: bool, offdiag: bool, eps: float, empty_iou: float, binary: bool, splits: int = 1
) -> None:
    batch, ka, p = a.shape
    kb = b.shape[1]
    plan = plan_overlap(ka, kb, mode, sym, offdiag, binary, a.dtype, a.device.type)
    consts = dict(plan.constexprs)
    pps = triton.cdiv(triton.cdiv(p, splits), consts["BLOCK_P"]) * consts["BLOCK_P"]
    grid = (batch * splits, triton.cdiv(ka, consts["BLOCK_M"]), triton.cdiv(kb, consts["BLOCK_N"]))
    plan.launch(
        grid, a, b, out, ka, kb, p, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        float(eps), float(empty_iou), grid[2], splits, pps,
    )  # fmt: skip


def _split_count(batch: int, ka: int, kb: int, pixels: int, sym: bool, binary: bool, device: torch.device) -> int:
    """Pixel splits per image: enough programs for two per SM when the images and pair tiles alone are too
    few (at B = 1, K = 50, N = 4 every term is one program, so one SM would walk all pixels), each split
    keeping at least 4 pixel blocks. Splits run the Gram mode and are added in a fixed order, so the result
    does not depend on scheduling. One split under the CPU interpreter."""
    if device.type != "cuda":
        return 1
    bm, bn, bp, _ = gpu_blocks(ka, kb, binary, sym)
    programs = batch * triton.cdiv(ka, bm) * triton.cdiv(kb, bn)
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= target:
        return 1
    return max(1, min(triton.cdiv(target, programs), pixels // (4 * bp)))


def _split_intersections(u, v, splits: int, binary: bool) -> torch.Tensor:
    """``(B, Ku, Kv)`` intersections from ``splits`` pixel ranges per image, summed in split order."""
    batch, ku, _ = u.shape
    kv = v.shape[1]
    part = torch.empty((batch * splits, ku, kv), dtype=torch.float32, device=u.device)
    _launch(u, v, part, MODE_GRAM, False, False, 0.0, 0.0, binary, splits)
    return part.view(batch, splits, ku, kv).sum(1)


def _iou(inter: torch.Tensor, u: torch.Tensor, v: torch.Tensor, eps: float, empty_iou: float) -> torch.Tensor:
    """The kernel's epilogue in torch (float32), from the split path's intersections and the masks."""
    from ..ops.ged import iou_from_counts  # the one torch transcription of pair_iou

    return iou_from_counts(inter, u.sum(-1, dtype=torch.float32), v.sum(-1, dtype=torch.float32), eps, empty_iou)


def _tile_counts(ka: int, kb: int, sym: bool, device_type: str) -> tuple[int, int]:
    consts = dict(plan_overlap(ka, kb, MODE_SUM, sym, False, True, torch.float16, device_type).constexprs)
    return triton.cdiv(ka, consts["BLOCK_M"]), triton.cdiv(kb, consts["BLOCK_N"])


def _chunks(batch: int, rows: int, pixels: int) -> tuple[range, int]:
    per_image = max(1, rows * pixels * 2)
    step = max(1, _MAX_CHUNK_BYTES // per_image)
    return range(0, batch, step), step


def _value_check(x: torch.Tensor) -> int:
    """Floating values promise probabilities; bool and integer masks (0/255 included) are thresholded as they are."""
    return CHECK_PROBABILITY if x.is_floating_point() else CHECK_NONE


def pairwise_overlap(
    a: torch.Tensor, b: torch.Tensor, threshold: float, soft: bool, eps: float, empty_iou: float, mode: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersections (mode 0) or IoU (mode 1) of every pair, ``(B, Ka, Kb)`` float32; a, b ``(B, K, pixels)``.
    Also the int32 flags ``(2,)``: a / b held a value outside [0, 1] (binary mode, floating inputs; the caller
    reads them once, one host sync)."""
    batch, ka, p = a.shape
    kb = b.shape[1]
    out = torch.empty((batch, ka, kb), dtype=torch.float32, device=a.device)
    flags = torch.zeros(2, dtype=torch.int32, device=a.device)
    starts, step = _chunks(batch, ka + kb, p)
    for s in starts:
        e = min(batch, s + step)
        if soft:
            x, y = a[s:e], b[s:e]
        else:
            x = binarize(a[s:e].contiguous(), threshold, _value_check(a), flags[0:1])
            y = binarize(b[s:e].contiguous(), threshold, _value_check(b), flags[1:2])
        x, y = x.contiguous(), y.contiguous()
        splits = _split_count(e - s, ka, kb, p, False, not soft, a.device)
        if splits == 1:
            _launch(x, y, out[s:e], mode, False, False, eps, empty_iou, not soft)
        else:
            inter = _split_intersections(x, y, splits, not soft)
            out[s:e] = inter if mode == MODE_GRAM else _iou(inter, x.float(), y.float(), eps, empty_iou)
    return out, flags


def ged_sums(
    samples: torch.Tensor, raters: torch.Tensor, threshold: float, eps: float, empty_iou: float, offdiag: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 3)`` float64 distance sums: cross, within samples, within raters (see csrc/include/ged.h); and the
    int32 flags ``(2,)``: samples held a value outside [0, 1], raters held a value other than 0 and 1 (read once
    by the caller)."""
    batch, k, p = samples.shape
    n = raters.shape[1]
    sums = torch.empty((batch, 3), dtype=torch.float64, device=samples.device)
    flags = torch.zeros(2, dtype=torch.int32, device=samples.device)
    starts, step = _chunks(batch, k + n, p)
    for s in starts:
        e = min(batch, s + step)
        x = binarize(samples[s:e].contiguous(), threshold, _value_check(samples), flags[0:1])
        y = binarize(raters[s:e].contiguous(), 0.5, CHECK_BINARY, flags[1:2])
        for term, (u, v, sym) in enumerate(((x, y, False), (x, x, True), (y, y, True))):
            splits = _split_count(e - s, u.shape[1], v.shape[1], p, sym, True, samples.device)
            if splits > 1:
                d = 1.0 - _iou(_split_intersections(u, v, splits, True), u, v, eps, empty_iou)
                if offdiag and sym:
                    d = d * (1 - torch.eye(u.shape[1], device=d.device, dtype=d.dtype))
                sums[s:e, term] = d.flatten(1).to(torch.float64).sum(-1)
                continue
            ti, tj = _tile_counts(u.shape[1], v.shape[1], sym, samples.device.type)
            partials = torch.empty((e - s, ti, tj), dtype=torch.float32, device=samples.device)
            _launch(u, v, partials, MODE_SUM, sym, offdiag and sym, eps, empty_iou, True)
            sums[s:e, term] = partials.flatten(1).to(torch.float64).sum(-1)
    return sums, flags


# What this family describes about itself (ops/_examples.py): the plans a call runs, the compile check's rules.
def plans_for(op: str, *args) -> list[LaunchPlan]:
    """The plans of a call that runs one pixel split per image (the compile report's projections)."""
    a, b = args[0], args[1]
    ka, kb = a.shape[1], b.shape[1]
    if op == "ged_sums":
        offdiag = args[5]
        return [plan_binarize(a.dtype, _value_check(a)), plan_binarize(b.dtype, CHECK_BINARY)] + [
            plan_overlap(u, v, MODE_SUM, sym, offdiag and sym, True, torch.float16)
            for u, v, sym in ((ka, kb, False), (ka, ka, True), (kb, kb, True))
        ]
    soft, mode = args[3], args[6]
    if soft:
        return [plan_overlap(ka, kb, mode, False, False, False, a.dtype)]
    return [plan_binarize(a.dtype, _value_check(a)), plan_binarize(b.dtype, _value_check(b)),
            plan_overlap(ka, kb, mode, False, False, True, torch.float16)]  # fmt: skip


def _overlap_rules(plan_key: str) -> frozenset:
    """The binary path (IEEE=False) runs its Gram on tensor cores and must not spill; the soft path must stay
    IEEE fp32 (no TF32), where a spill is reported in the table, not a failure."""
    return NO_SPILL | TENSOR_CORES if "IEEE=False" in plan_key else IEEE_FP32


COMPILE_RULES = {"_binarize_kernel": NO_SPILL, "_overlap_kernel": _overlap_rules}
