"""What ``train --resume`` may change in a run, and where the run stands under the plan it continues with.

A run directory belongs to the ``train`` that created it ([reliability] #36); ``--resume`` continues it with
the recorded recipe. :func:`resume_plan` compares the recorded :class:`~harmonizer_fast.train.TrainConfig` and
position with the one asked for and either returns the position under the new plan with what changed, in
words for the log, or refuses naming every difference:

- **fixed**: everything that defines the run (data protocol, split, seed, batch, loss weights, selection);
- **extended or shortened**: the epochs of the stage in progress and of the stages not started, the phase
  ``"1"`` grown to ``"both"`` (phase 2 added), ``max_minutes`` and its clock. A finished stage keeps its
  epochs; a stage in progress cannot end before the epochs it has done;
- **lowered**: the learning rates (a diverged run resumes at a lower rate, [reliability] #36 item 5), never
  raised.

Termination by construction: the returned stage index is the first stage whose last epoch lies ahead of the
position (``len(stages)`` when the plan is done), so the trainer's loop over stages always moves forward; a
recorded position outside its own plan is a damaged manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

# TrainConfig fields a resumed run may change, by how; every other field is fixed.
EXTENSIBLE = ("epochs_phase1", "epochs_phase2", "phase", "max_minutes", "budget_clock")
LOWERABLE = ("lr_phase1", "lr_phase2", "lr_prior")
FREE = ("val_batch",)  # only how many validation images go through the model at once


class ResumeError(ValueError):
    """The resumed run and the recipe asked for disagree; the message names each difference."""


@dataclass(frozen=True)
class ResumePoint:
    stage: int  # index into the new plan's stages; len(stages): nothing left to train
    epoch: int
    step: int
    notes: tuple[str, ...]  # what the new plan changes, for the log


def stage_ends(stages: list[tuple[int, int]]) -> list[int]:
    """The global epoch after each stage's last (epochs count over the stages)."""
    ends, total = [], 0
    for _, epochs in stages:
        total += epochs
        ends.append(total)
    return ends


def check_position(stages: list[tuple[int, int]], stage: int, epoch: int, step: int, steps_per_epoch: int) -> None:
    """A recorded position must lie within the plan it was recorded under; :class:`ResumeError` otherwise."""
    ends = stage_ends(stages)
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (stage, epoch, step))
    ok = ok and 0 <= stage <= len(stages) and 0 <= step < steps_per_epoch
    if ok and stage == len(stages):
        ok = epoch == (ends[-1] if ends else 0) and step == 0
    elif ok:
        start = ends[stage] - stages[stage][1]
        ok = start <= epoch < ends[stage] or (epoch == ends[stage] and step == 0)
    if not ok:
        raise ResumeError(f"the recorded position (stage {stage}, epoch {epoch}, step {step}) lies outside its plan "
                          f"{stages} of {steps_per_epoch} steps per epoch")  # fmt: skip


def _effective_lr(cfg: Any, name: str) -> float:
    value = getattr(cfg, name)
    return cfg.lr_phase1 if name == "lr_prior" and value is None else value


def _recipe_differences(recorded: Any, asked: Any) -> tuple[list[str], list[str]]:
    """(refusals, notes) for the fixed fields and the learning rates."""
    refuse, notes = [], []
    for f in fields(recorded):
        a, b = getattr(recorded, f.name), getattr(asked, f.name)
        if f.name in EXTENSIBLE or f.name in FREE or a == b:
            continue
        if f.name in LOWERABLE:
            old, new = _effective_lr(recorded, f.name), _effective_lr(asked, f.name)
            if f.name == "lr_prior" and (a is None) != (b is None):
                refuse.append(f"lr_prior: recorded {a}, asked {b} (the prior's own rate cannot be added or removed)")
            elif new > old:
                refuse.append(f"{f.name}: recorded {old:g}, asked {new:g} (a resume may lower a rate, not raise it)")
            elif new < old:
                notes.append(f"{f.name} lowered from {old:g} to {new:g}")
            continue
        refuse.append(f"{f.name}: recorded {a!r}, asked {b!r}")
    if recorded.phase != asked.phase and not (recorded.phase == "1" and asked.phase == "both"):
        refuse.append(f"phase: recorded {recorded.phase!r}, asked {asked.phase!r} (a run can only grow from '1' to "
                      "'both')")  # fmt: skip
    elif recorded.phase != asked.phase:
        notes.append("the plan grows by phase 2")
    return refuse, notes


def resume_plan(recorded: Any, asked: Any, stage: int, epoch: int, step: int) -> ResumePoint:
    """The position of a run recorded with TrainConfig ``recorded`` at (stage, epoch, step) under the
    TrainConfig ``asked``, with notes on what changes; :class:`ResumeError` naming every refused difference.
    The position must have passed :func:`check_position` against the recorded plan."""
    old_stages, new_stages = recorded.stages(), asked.stages()
    refuse, notes = _recipe_differences(recorded, asked)
    old_ends = stage_ends(old_stages)
    complete = stage == len(old_stages)
    for i, (phase, epochs) in enumerate(old_stages):
        if i >= len(new_stages) or new_stages[i][0] != phase:
            continue  # the phase change itself is judged above
        new = new_stages[i][1]
        done = min(epochs, epoch - (old_ends[i] - epochs) + (step > 0))  # epochs of this stage begun
        reopened = complete and i == len(old_stages) - 1  # a finished run's last stage may grow
        if i < stage and not reopened and new != epochs:
            refuse.append(f"epochs of phase {phase}: it finished its {epochs} epochs; asked {new}")
        elif new < done:
            refuse.append(f"epochs of phase {phase}: {done} done, asked {new}")
        elif new != epochs:
            notes.append(f"phase {phase} {'extended' if new > epochs else 'shortened'} from {epochs} to {new} epochs"
                         + ("; its learning rate rises again along the longer cosine" if reopened else ""))  # fmt: skip
    if refuse:
        raise ResumeError("--resume: " + "; ".join(refuse) + " (resume with the recorded settings, or train into a "
                          "new --out)")  # fmt: skip
    new_ends = stage_ends(new_stages)
    # the first stage whose last epoch lies ahead (check_position: a step > 0 lies before its stage's end)
    new_stage = next((i for i, end in enumerate(new_ends) if epoch < end), len(new_stages))
    return ResumePoint(new_stage, epoch, step, tuple(notes))


__all__ = ["EXTENSIBLE", "FREE", "LOWERABLE", "ResumeError", "ResumePoint", "check_position", "resume_plan",
           "stage_ends"]  # fmt: skip
