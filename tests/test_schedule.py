"""The stage learning-rate schedule (harmonizer_fast.schedule) against torch's CosineAnnealingLR, the budget
that decays it early, and a run saved by the old scheduler resuming on the same curve."""

import math

import pytest
import torch

from harmonizer_fast.schedule import FLOOR, CosineSchedule


def opt(lr=1e-2):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def rates(sched, epochs):
    out = []
    for _ in range(epochs):
        out.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    return out


def test_without_a_budget_it_is_torchs_cosine():
    a, b = opt(), opt()
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(b, T_max=7, eta_min=FLOOR * 1e-2)
    assert rates(CosineSchedule(a, 7), 8) == pytest.approx(rates(ref, 8), rel=1e-12, abs=1e-15)


def test_a_spent_budget_ends_at_the_floor_before_the_planned_epochs():
    s = CosineSchedule(opt(), 100)
    s.optimizer.step()
    s.spend(0.5)
    s.step()  # one epoch of 100 done, half the budget spent: the position is the budget's
    half = FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi / 2))
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * half)
    s.spend(0.2)  # never moves back
    s.spend(1.0)
    s.optimizer.step()
    s.step()
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(FLOOR * 1e-2)


def test_state_round_trip_and_old_cosine_state():
    a = CosineSchedule(opt(), 10)
    rates(a, 3)
    a.spend(0.4)
    b = CosineSchedule(opt(), 10)
    b.load_state_dict(a.state_dict())
    assert (b.last_epoch, b.time_progress) == (3, 0.4)
    old_opt = opt()
    old = torch.optim.lr_scheduler.CosineAnnealingLR(old_opt, T_max=10, eta_min=FLOOR * 1e-2)
    rates(old, 4)
    new_opt = opt()
    new = CosineSchedule(new_opt, 10)
    new_opt.load_state_dict(old_opt.state_dict())  # in the trainer's order: optimizer, then schedule
    new.load_state_dict(old.state_dict())
    assert rates(new, 3) == pytest.approx(rates(old, 3), rel=1e-9)
