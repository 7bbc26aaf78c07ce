"""Triton kernel of the fused sampling head (csrc/include/fcomb.h, docs/architecture.md, "Model").

One program per (image, BLOCK_P pixels): it loads that block of ``base = W_f f + b`` once, then for each of
the K samples adds the sample's bias ``W_z z_k``, runs the hidden 1x1 layers as (C x C) @ (C x BLOCK_P)
products in registers and writes only the sigmoid output. Computes in float32 (float64 for float64).
Installed as ``harmonizer_fast.kernels.fcomb``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fcomb_head_kernel(
    base_ptr, bias_ptr, hw_ptr, hb_ptr, lw_ptr, lb_ptr, out_ptr,
    K, C, P,
    LAYERS: tl.constexpr, CP: tl.constexpr, BLOCK_P: tl.constexpr, FP64: tl.constexpr,
):  # fmt: skip
    bi = tl.program_id(0).to(tl.int64)
    px = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    ch = tl.arange(0, CP)
    pm = px < P
    cm = ch < C
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
                hw_ptr + layer * C * C + ch[:, None] * C + ch[None, :], mask=cm[:, None] & cm[None, :], other=0.0
            )
            b = tl.load(hb_ptr + layer * C + ch, mask=cm, other=0.0).to(acc_ty)
            g = tl.dot(w.to(acc_ty), h, input_precision="ieee")
            h = tl.maximum(g + b[:, None], 0.0, propagate_nan=tl.PropagateNan.ALL)
        logit = tl.sum(lw[:, None] * h, axis=0) + lb
        prob = 1.0 / (1.0 + tl.exp(-logit))
        tl.store(out_ptr + (bi * K + k) * P + px, prob.to(out_ptr.dtype.element_ty), mask=pm)


def fcomb_head(base, bias, hidden_w, hidden_b, last_w, last_b) -> torch.Tensor:
    """Probabilities ``(B, K, pixels)`` from base ``(B, C, pixels)`` and per-sample biases ``(B, K, C)``."""
    b, c, p = base.shape
    k = bias.shape[1]
    out = torch.empty((b, k, p), dtype=base.dtype, device=base.device)
    if out.numel() == 0:
        return out
    cp = max(16, triton.next_power_of_2(c))  # tl.dot needs at least 16 along every side
    block_p = 128 if base.is_cuda else 256
    _fcomb_head_kernel[(b, triton.cdiv(p, block_p))](
        base, bias, hidden_w, hidden_b, last_w, last_b, out, k, c, p,
        LAYERS=hidden_w.shape[0], CP=cp, BLOCK_P=block_p, FP64=base.dtype == torch.float64,
    )  # fmt: skip
    return out
