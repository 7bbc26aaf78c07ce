"""Collectives behind :meth:`harmonizer_fast.metrics.MetricAccumulator.compute` under torch.distributed.

The accumulator's state is sufficient statistics: per-image rows (gathered, rank 0's images first) and
pooled histograms (summed). Everything travels as float64 tensors through ``all_gather``/``all_reduce``,
never as pickled objects, so the gloo and NCCL backends both carry it (NCCL needs the tensors on the
current CUDA device: ``device``).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..distributed import rank_and_world


def active(group: Optional[dist.ProcessGroup] = None) -> bool:
    """Whether there is more than one process to combine (in ``group``, by default the whole world)."""
    if group is None:
        return rank_and_world()[1] > 1
    return dist.get_world_size(group) > 1


def max_int(value: int, group: Optional[dist.ProcessGroup], device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def sum_array(a: np.ndarray, group: Optional[dist.ProcessGroup], device: torch.device) -> np.ndarray:
    """Elementwise sum over processes (counts stay exact in float64 below 2^53)."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(device)
    dist.all_reduce(t, group=group)
    return t.cpu().numpy().astype(a.dtype)


def gather_rows(a: np.ndarray, group: Optional[dist.ProcessGroup], device: torch.device) -> np.ndarray:
    """Concatenation over processes of arrays that differ only in their first dim, in rank order."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(device)
    world = dist.get_world_size(group)
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    counts = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(counts), *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu().numpy()
