"""The learning-rate schedule of a training stage: cosine decay from the base rate to ``floor`` x base over
the planned epochs, or over the time budget when that ends first.

The paper trains 100 + 150 epochs (section 4, implementation details) with the probabilistic U-Net's
schedule; a CPU user gives a ``max_minutes`` budget that fits a few of them. A schedule over the planned
epochs alone would then stop near its start, at the full rate, with the model of a noisy step selected
([science] #35: every LIDC run of the comparison did). Here the schedule's position is the larger of the
share of planned epochs done and the share of the budget spent, so a budget-stopped stage ends at the floor
rate whichever limit comes first, and a stage without a budget is the plain epoch cosine.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

FLOOR = 0.1  # the final rate as a share of the base rate


class CosineSchedule(LRScheduler):
    """``lr = base * (floor + (1 - floor) * (1 + cos(pi * t)) / 2)`` at position ``t = max(epochs done /
    epochs, time_progress)``, clipped to 1. :meth:`spend` raises ``time_progress`` (never lowers it), before
    :meth:`step`. Its state (``last_epoch``, ``epochs``, ``time_progress``) is saved with the run."""

    def __init__(self, optimizer: torch.optim.Optimizer, epochs: int, floor: float = FLOOR) -> None:
        if epochs < 1:
            raise ValueError(f"CosineSchedule: epochs must be >= 1, got {epochs}")
        self.epochs, self.floor, self.time_progress = epochs, floor, 0.0
        super().__init__(optimizer)

    def position(self) -> float:
        return min(1.0, max(self.last_epoch / self.epochs, self.time_progress))

    def spend(self, fraction: float) -> None:
        """The share of the stage's time budget spent so far."""
        self.time_progress = max(self.time_progress, min(1.0, float(fraction)))

    def get_lr(self) -> list[float]:
        scale = self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * self.position()))
        return [base * scale for base in self.base_lrs]

    def replan(self, base_lrs: list[float], epochs: int) -> None:
        """Continue at the same position with other base rates and stage length (a resume that lowers a rate
        or changes the planned epochs); the optimizer's rates follow at once."""
        if epochs < 1 or len(base_lrs) != len(self.optimizer.param_groups):
            raise ValueError(f"CosineSchedule.replan: {len(base_lrs)} base rates for "
                             f"{len(self.optimizer.param_groups)} groups, epochs {epochs}")  # fmt: skip
        self.base_lrs, self.epochs = list(base_lrs), epochs
        for group, base, lr in zip(self.optimizer.param_groups, self.base_lrs, self.get_lr()):
            group["initial_lr"], group["lr"] = base, lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        if "epochs" not in state:  # a run saved by torch's CosineAnnealingLR (T_max epochs, the same curve)
            state["epochs"] = state.pop("T_max")
            state.pop("eta_min", None)
            state.setdefault("time_progress", 0.0)
            state.setdefault("floor", self.floor)
        super().load_state_dict(state)


__all__ = ["FLOOR", "CosineSchedule"]
