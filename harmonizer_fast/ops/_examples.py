"""What each op family describes about itself beside its code ([op-registry] #37 item 1), and the helpers it
uses to do so. Every public module of this package defines

- ``examples(scale, dtype, device)``: one argument tuple per custom op of the family, at ``"test"`` scale
  (small odd shapes: the export test checks each op against its decomposition on them) or ``"bench"`` scale
  (the benchmarks' shapes, paper config at 128 x 128: ``benchmarks/gpu_plan_resources.py`` runs every op's
  Triton path on them and the compile report projects their work);
- ``FLOPS``: op name -> its FLOP formula from the argument shapes, registered with torch's flop counter by
  :mod:`harmonizer_fast.profiler` (as ``_autocast.register`` registers the autocast rules).

and every public module of ``harmonizer_fast.kernels`` defines ``plans_for(op, *args)`` (the launch plans a
call runs) and ``COMPILE_RULES`` (kernel name -> what the compile check requires of it: no register spills,
tensor-core instructions, IEEE fp32; kernels/_plan.py). The central tools read these; none keeps a list of
ops (tests/test_op_registry.py checks that every family has every piece).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

SCALES = ("test", "bench")


def pick(scale: str, test, bench):
    """``test`` or ``bench`` by scale (a typo is an error, not the bench shapes)."""
    if scale not in SCALES:
        raise ValueError(f"examples: scale must be one of {SCALES}, got {scale!r}")
    return test if scale == "test" else bench


def normal(shape: Sequence[int], seed: int, dtype: torch.dtype, device, scale: float = 1.0) -> torch.Tensor:
    """Seeded normal values drawn in float64 on the CPU, then cast: the same numbers on every device."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def uniform(shape: Sequence[int], seed: int, dtype: torch.dtype, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(tuple(shape), generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def binary(shape: Sequence[int], seed: int, dtype: torch.dtype, device, p: float = 0.4) -> torch.Tensor:
    return (uniform(shape, seed, torch.float64, "cpu") < p).to(device=device, dtype=dtype)


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)
