"""Randomness keyed by tuples of ints (seed, epoch, step, image, ...): stable across runs, processes, resumes
and batch sizes, never taken from global state."""

from __future__ import annotations

import torch


def seed_of(*keys: int) -> int:
    """One seed from a tuple of ints."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return seed


def generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by :func:`seed_of` ``(*keys)``."""
    return torch.Generator().manual_seed(seed_of(*keys))
